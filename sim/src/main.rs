fn main() {
    eprintln!("cim-sim: the turmoil scenarios are not built yet (see the simulation issue)");
    std::process::exit(2);
}
