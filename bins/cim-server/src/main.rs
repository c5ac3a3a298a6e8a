use clap::Parser as _;

fn main() -> std::process::ExitCode {
    match cim_server::run_blocking(cim_server::Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => cim_io::launch::report_failure(error.as_ref()),
    }
}
