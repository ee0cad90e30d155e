//! On-demand bastions: EC2 instances and Fargate tasks that exist only while used.
//!
//! * [`manager`]: the lifecycle of one profile's bastion (launch, wait for Session
//!   Manager, reuse, idle and lifetime termination, reconciliation after a crash).
//! * [`cloud`]: the EC2 and ECS calls behind it.
//! * [`registry`]: where each bastion's record lives (a local file or a DynamoDB table).
//! * [`userdata`]: the EC2 user-data templates.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub mod cloud;
pub mod manager;
pub mod registry;
pub mod userdata;

/// What every on-demand bastion of a daemon shares: its state directory and its
/// persistent id (the registry lease holder, kept across restarts so that a restarted
/// daemon resumes what it left).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// The state directory (0700).
    pub state_dir: PathBuf,
    /// The daemon's id.
    pub daemon_id: String,
}

impl Host {
    /// Opens (creating) `state_dir` and its `daemon-id` file.
    pub fn open(state_dir: &Path) -> std::io::Result<Host> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
        let path = state_dir.join("daemon-id");
        let daemon_id = match std::fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => id.trim().to_owned(),
            Ok(_) => new_id(&path)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_id(&path)?,
            Err(e) => return Err(e),
        };
        Ok(Host {
            state_dir: state_dir.to_path_buf(),
            daemon_id,
        })
    }
}

fn new_id(path: &Path) -> std::io::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || "-.".contains(c)))
        .unwrap_or_else(|| "host".to_owned());
    let id = format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(id.as_bytes())?;
    f.sync_all()?;
    Ok(id)
}

/// The default state directory: `$STATE_DIRECTORY` (systemd), else
/// `$XDG_STATE_HOME/bastion`, else `~/.local/state/bastion`.
pub fn default_state_dir() -> Option<PathBuf> {
    std::env::var_os("STATE_DIRECTORY")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| {
            std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .map(|p| p.join("bastion"))
        })
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state/bastion")))
}
