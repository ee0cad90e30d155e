//! `bastiond`: the bastion daemon.
//!
//! The daemon's listeners, session pool and control API are not built yet (see the
//! project issues); today this binary only reports its version.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version") | Some("-V") => {
            println!("bastiond {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "bastiond {}: the daemon is not implemented yet; only --version is available",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
