//! The local registry: a JSON file, replaced atomically under an advisory lock.
//!
//! Every write reads the file, checks the expected version, and replaces the whole file:
//! the new content goes to `<file>.tmp`, which is fsynced and renamed over the file, and
//! the directory is fsynced, so a crash (or `kill -9`) at any point leaves either the old
//! or the new file, never a torn one. An exclusive `flock` on `<file>.lock` serialises
//! writers on the same machine.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Record, RegistryError};

/// The file's content.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Contents {
    /// Records by key.
    #[serde(default)]
    records: BTreeMap<String, Record>,
}

/// A registry in a local JSON file.
#[derive(Clone, Debug)]
pub struct FileRegistry {
    path: Arc<PathBuf>,
    daemon_id: Arc<str>,
}

impl FileRegistry {
    /// The registry at `path` (created on the first write), owned by the daemon
    /// `daemon_id`.
    pub fn new(path: PathBuf, daemon_id: &str) -> FileRegistry {
        FileRegistry {
            path: Arc::new(path),
            daemon_id: daemon_id.into(),
        }
    }

    /// `file:<daemon-id>`.
    pub fn id(&self) -> String {
        format!("file:{}", self.daemon_id)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The record under `key`.
    pub async fn get(&self, key: &str) -> Result<Option<Record>, RegistryError> {
        let key = key.to_owned();
        self.locked(move |c| Ok((None, c.records.get(&key).cloned())))
            .await
    }

    /// Writes `record` if the stored version is `expect`.
    pub async fn put(&self, record: &Record, expect: Option<u64>) -> Result<(), RegistryError> {
        let record = record.clone();
        self.locked(move |mut c| {
            let stored = c.records.get(&record.key).map(|r| r.version);
            if stored != expect {
                return Err(RegistryError::Conflict(record.key));
            }
            c.records.insert(record.key.clone(), record);
            Ok((Some(c), ()))
        })
        .await
    }

    /// Deletes the record under `key` if its version is `expect`.
    pub async fn delete(&self, key: &str, expect: u64) -> Result<(), RegistryError> {
        let key = key.to_owned();
        self.locked(move |mut c| {
            if c.records.get(&key).map(|r| r.version) != Some(expect) {
                return Err(RegistryError::Conflict(key));
            }
            c.records.remove(&key);
            Ok((Some(c), ()))
        })
        .await
    }

    /// Every record.
    pub async fn list(&self) -> Result<Vec<Record>, RegistryError> {
        self.locked(|c| Ok((None, c.records.into_values().collect())))
            .await
    }

    /// Runs `f` on the file's contents under the lock; writes back what it returns.
    async fn locked<T, F>(&self, f: F) -> Result<T, RegistryError>
    where
        T: Send + 'static,
        F: FnOnce(Contents) -> Result<(Option<Contents>, T), RegistryError> + Send + 'static,
    {
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let _lock = lock(&path)?;
            let contents = read(&path)?;
            let (new, out) = f(contents)?;
            if let Some(new) = new {
                write_atomically(&path, &new)?;
            }
            Ok(out)
        })
        .await
        .map_err(|e| RegistryError::Io(format!("registry task failed: {e}")))?
    }
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> RegistryError {
    RegistryError::Io(format!("{what} {}: {e}", path.display()))
}

/// Takes the exclusive lock (released when the file closes).
fn lock(path: &Path) -> Result<File, RegistryError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("cannot create", dir, e))?;
    }
    let lock_path = path.with_extension("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| io_err("cannot open", &lock_path, e))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
        .map_err(|e| io_err("cannot lock", &lock_path, e.into()))?;
    Ok(file)
}

fn read(path: &Path) -> Result<Contents, RegistryError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Contents::default()),
        Err(e) => return Err(io_err("cannot read", path, e)),
    };
    serde_json::from_str(&text)
        .map_err(|e| RegistryError::Corrupt(format!("{}: {e}", path.display())))
}

fn write_atomically(path: &Path, contents: &Contents) -> Result<(), RegistryError> {
    let tmp = path.with_extension("tmp");
    let mut text = serde_json::to_vec_pretty(contents)
        .map_err(|e| RegistryError::Io(format!("cannot encode the registry: {e}")))?;
    text.push(b'\n');
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| io_err("cannot create", &tmp, e))?;
    file.write_all(&text)
        .and_then(|()| file.sync_all())
        .map_err(|e| io_err("cannot write", &tmp, e))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| io_err("cannot replace", path, e))?;
    if let Some(dir) = path.parent() {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_err("cannot sync", dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ondemand::registry::{Phase, ProviderKind};

    fn record(key: &str, version: u64) -> Record {
        Record {
            key: key.into(),
            version,
            launch_id: "0b1d".into(),
            provider: ProviderKind::Ec2,
            phase: Phase::Launching,
            resource: None,
            target: None,
            profile: "pg".into(),
            owner: "arn:aws:iam::123456789012:user/dev".into(),
            holder: "d1".into(),
            lease_until_ms: 1,
            created_ms: 1,
            expires_ms: 2,
            last_used_ms: 1,
        }
    }

    #[tokio::test]
    async fn compare_and_swap() {
        let dir = std::env::temp_dir().join(format!("bastion-reg-{}", uuid::Uuid::new_v4()));
        let reg = FileRegistry::new(dir.join("registry.json"), "d1");
        assert_eq!(reg.get("pg").await.unwrap(), None);
        reg.put(&record("pg", 1), None).await.unwrap();
        assert_eq!(
            reg.put(&record("pg", 1), None).await,
            Err(RegistryError::Conflict("pg".into()))
        );
        assert_eq!(
            reg.put(&record("pg", 3), Some(2)).await,
            Err(RegistryError::Conflict("pg".into()))
        );
        let mut next = record("pg", 2);
        next.phase = Phase::Ready;
        reg.put(&next, Some(1)).await.unwrap();
        let again = FileRegistry::new(dir.join("registry.json"), "d1");
        assert_eq!(again.get("pg").await.unwrap(), Some(next));
        assert_eq!(again.list().await.unwrap().len(), 1);
        assert_eq!(
            again.delete("pg", 1).await,
            Err(RegistryError::Conflict("pg".into()))
        );
        again.delete("pg", 2).await.unwrap();
        assert!(again.list().await.unwrap().is_empty());
        std::fs::write(dir.join("registry.json"), b"{not json").unwrap();
        assert!(matches!(again.list().await, Err(RegistryError::Corrupt(_))));
        let _ = std::fs::remove_dir_all(dir);
    }
}
