use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    cim_route::run_blocking(cim_route::Args::parse())
}
