//! Names the git commit this crate is built from, for the `*_build_info` metric: the
//! `CIM_GIT_COMMIT` environment variable if set (a packager's build), else `git rev-parse`
//! of the checkout when git and a checkout are there (no network either way), else nothing
//! (the metric says `unknown`).

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!text.is_empty()).then_some(text)
}

fn main() {
    println!("cargo:rerun-if-env-changed=CIM_GIT_COMMIT");
    if std::env::var_os("CIM_GIT_COMMIT").is_some() {
        return;
    }
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return;
    };
    println!("cargo:rustc-env=CIM_GIT_COMMIT={commit}");
    // Built again when HEAD moves (a commit, a checkout), not on every build.
    for path in ["HEAD", "logs/HEAD"] {
        if let Some(file) = git(&["rev-parse", "--git-path", path]) {
            println!("cargo:rerun-if-changed={file}");
        }
    }
}
