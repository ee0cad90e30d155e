//! `bastionctl`: the bastion control client.
//!
//! The control API it talks to is not built yet (see the
//! project issues); today this binary only reports its version.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version") | Some("-V") => {
            println!("bastionctl {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "bastionctl {}: the control client is not implemented yet; only --version is available",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
