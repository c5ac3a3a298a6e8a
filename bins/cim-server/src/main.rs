use clap::Parser as _;

/// mimalloc rather than glibc's malloc: the serving path allocates and frees a frame's
/// buffers per message, and glibc's malloc was a third of the cluster's CPU in a fan-out
/// (BENCHMARKS.md, round 9).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match cim_server::run_blocking(cim_server::Args::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => cim_io::launch::report_failure(error.as_ref()),
    }
}
