//! On-demand bastions: EC2 instances and Fargate tasks that exist only while used.
//!
//! * [`lifecycle`]: every lifecycle decision, as one pure function ([`lifecycle::decide`]).
//! * [`manager`]: the lifecycle of one profile's bastion (launch, wait for Session
//!   Manager, reuse, idle and lifetime termination, reconciliation after a crash): it
//!   gathers the decisions' inputs and executes their steps.
//! * [`cloud`]: the EC2 and ECS calls behind it.
//! * [`registry`]: where each bastion's record lives (a local file or a DynamoDB table).
//! * [`userdata`]: the EC2 user-data templates.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

pub mod cloud;
pub mod lifecycle;
pub mod manager;
pub mod registry;
pub mod userdata;

/// What a daemon keeps in its state directory: its persistent id (the registry lease
/// holder, kept across restarts so that a restarted daemon resumes what it left), and
/// the ledger of the Session Manager sessions it has open (so that sessions left behind
/// by a daemon that was killed are terminated by the next one, instead of holding their
/// target busy until the service times them out). The directory is locked while the
/// daemon runs: two daemons cannot share it.
#[derive(Clone, Debug)]
pub struct Host {
    /// The state directory (0700).
    pub state_dir: PathBuf,
    /// The daemon's id.
    pub daemon_id: String,
    /// The exclusive lock on `state_dir/lock`, held while the daemon runs.
    _lock: Arc<std::fs::File>,
    ledger: Arc<Mutex<()>>,
}

impl Host {
    /// Opens (creating) `state_dir`, locks it, and reads (or creates) its `daemon-id`.
    pub fn open(state_dir: &Path) -> std::io::Result<Host> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(state_dir)?;
        // Also when it existed with a wider mode (a unit's StateDirectory= default).
        std::fs::set_permissions(
            state_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(state_dir.join("lock"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
            |e| {
                std::io::Error::new(
                    std::io::ErrorKind::WouldBlock,
                    format!(
                        "{} is in use by another bastiond ({e}); give each daemon its own --state-dir",
                        state_dir.display()
                    ),
                )
            },
        )?;
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
            _lock: Arc::new(lock),
            ledger: Arc::default(),
        })
    }

    fn ledger_path(&self) -> PathBuf {
        self.state_dir.join("sessions.json")
    }

    fn edit_ledger(
        &self,
        f: impl FnOnce(&mut BTreeMap<String, String>),
    ) -> BTreeMap<String, String> {
        let _guard = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.ledger_path();
        let mut map: BTreeMap<String, String> = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let before = map.clone();
        f(&mut map);
        if map != before {
            let tmp = path.with_extension("tmp");
            let written = serde_json::to_vec(&map)
                .map_err(std::io::Error::other)
                .and_then(|text| {
                    let mut file = std::fs::OpenOptions::new()
                        .create(true)
                        .truncate(true)
                        .write(true)
                        .mode(0o600)
                        .open(&tmp)?;
                    file.write_all(&text)?;
                    file.sync_all()
                })
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                tracing::warn!(path = %path.display(), error = %e, "cannot update the session ledger");
            }
        }
        before
    }

    /// Notes that session `id` of `profile` is open.
    pub fn note_session(&self, id: &str, profile: &str) {
        self.edit_ledger(|m| {
            m.insert(id.to_owned(), profile.to_owned());
        });
    }

    /// Notes that session `id` ended.
    pub fn drop_session(&self, id: &str) {
        self.edit_ledger(|m| {
            m.remove(id);
        });
    }

    /// The sessions a previous run left open (session id → profile). Each stays listed
    /// until [`Host::drop_session`] (after TerminateSession succeeded).
    pub fn leftover_sessions(&self) -> BTreeMap<String, String> {
        self.edit_ledger(|_| {})
    }
}

fn new_id(path: &Path) -> std::io::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| {
            !h.is_empty()
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        })
        .unwrap_or_else(|| "host".to_owned());
    let id = format!(
        "{host}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
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
