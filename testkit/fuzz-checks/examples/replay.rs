//! Runs one target's check on the given files and says what each reached or where it broke,
//! without cargo-fuzz: `cargo run -p cim-fuzz-checks --example replay -- <target> <file>...`
//! (a crash that `cargo fuzz run` saved in fuzz/artifacts/<target>/, or a corpus folder's
//! files).

use std::process::ExitCode;

use cim_fuzz_checks::TARGETS;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_default();
    let Some(target) = TARGETS.iter().find(|t| t.name == name) else {
        let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
        eprintln!("usage: replay <target> <file>...; targets: {names:?}");
        return ExitCode::FAILURE;
    };
    let mut failed = 0;
    for path in args {
        let data = match std::fs::read(&path) {
            Ok(data) => data,
            Err(e) => {
                eprintln!("{path}: {e}");
                failed += 1;
                continue;
            }
        };
        match std::panic::catch_unwind(|| (target.check)(&data)) {
            Ok(reached) => println!("{path}: ok, reached {reached:?}"),
            Err(_) => {
                println!("{path}: BROKE an invariant (message above)");
                failed += 1;
            }
        }
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
