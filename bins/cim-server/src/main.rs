use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    cim_server::run_blocking(cim_server::Args::parse())
}
