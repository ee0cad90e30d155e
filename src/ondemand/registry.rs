//! The bastion registry: one [`Record`] per on-demand bastion, written before every
//! lifecycle step is acted on, so that a daemon killed at any point can reconcile what it
//! finds in EC2/ECS with what it meant to do.
//!
//! Two stores with the same compare-and-swap contract ([`Registry`]):
//!
//! * [`FileRegistry`]: a JSON file in the daemon's state directory (one daemon per user
//!   and machine), replaced atomically (write a temporary file, fsync it, rename it over
//!   the old one, fsync the directory) under an advisory lock.
//! * [`DynamoRegistry`]: a DynamoDB table shared by a team; every write is a conditional
//!   write on the record's `ver`, so two daemons never both launch or both reap.
//!
//! Every write names the version it expects (`None`: the record must not exist); the
//! store refuses it with [`RegistryError::Conflict`] when someone else wrote first. The
//! lease (`holder`, `lease_until_ms`) says which daemon acts on the record; a lease that
//! expired (its daemon died) may be taken over by writing with the version read.

use serde::{Deserialize, Serialize};
use thiserror::Error;

pub mod dynamodb;
pub mod file;

pub use dynamodb::DynamoRegistry;
pub use file::FileRegistry;

/// Where a bastion is in its life. Each phase is recorded before the step it names is
/// taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Recorded before RunInstances/RunTask; `resource` may still be unknown.
    Launching,
    /// The instance or task exists; waiting for Session Manager to report it online.
    WaitingOnline,
    /// Online; sessions may start.
    Ready,
    /// No connection through the owning daemon; counting towards the idle timeout.
    Idle,
    /// Recorded before TerminateInstances/StopTask.
    Terminating,
}

impl Phase {
    /// The name used in status, progress events and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Launching => "launching",
            Phase::WaitingOnline => "waiting_online",
            Phase::Ready => "ready",
            Phase::Idle => "idle",
            Phase::Terminating => "terminating",
        }
    }
}

/// What kind of bastion a record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// An EC2 instance.
    Ec2,
    /// A Fargate task.
    Fargate,
}

/// One bastion, as the registry stores it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Registry key: the bastion's scope, `<profile>` for a team-shared bastion or
    /// `<profile>@<owner-arn>` for a personal one (see [`record_key`]).
    pub key: String,
    /// Incremented by every write; the compare-and-swap token.
    pub version: u64,
    /// The launch's UUID: the EC2 `ClientToken`/ECS `clientToken`, and the
    /// `bastion:launch-id` tag on the instance or task.
    pub launch_id: String,
    /// EC2 or Fargate.
    pub provider: ProviderKind,
    /// Current phase.
    pub phase: Phase,
    /// `i-…` or the task ARN, once known.
    pub resource: Option<String>,
    /// The Session Manager target (`i-…` or `ecs:<cluster>_<task>_<runtime>`), once known.
    pub target: Option<String>,
    /// The profile that launched it.
    pub profile: String,
    /// ARN of the caller that launched it (STS GetCallerIdentity).
    pub owner: String,
    /// The daemon holding the lease (its persistent id).
    pub holder: String,
    /// Until when the lease holds (Unix ms); the holder renews it while it lives.
    pub lease_until_ms: u64,
    /// When the record was created (Unix ms).
    pub created_ms: u64,
    /// When the bastion must be gone at the latest (Unix ms): the max lifetime.
    pub expires_ms: u64,
    /// When a connection last used it through the holder (Unix ms).
    pub last_used_ms: u64,
}

/// The registry key of a profile's bastion: shared by the team, or one per owner.
pub fn record_key(profile: &str, owner: &str, shared: bool) -> String {
    if shared {
        profile.to_owned()
    } else {
        format!("{profile}@{owner}")
    }
}

/// A registry operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// Someone else wrote the record first (the expected version did not match).
    #[error("registry record {0:?} was changed by another daemon")]
    Conflict(String),
    /// The store does not exist or cannot be used as configured.
    #[error("bastion registry unavailable: {0}")]
    Unavailable(String),
    /// The store could not be read or written.
    #[error("bastion registry I/O failed: {0}")]
    Io(String),
    /// A stored record could not be understood.
    #[error("bastion registry holds an unreadable record: {0}")]
    Corrupt(String),
}

/// A registry store: local file or DynamoDB table.
#[derive(Clone, Debug)]
pub enum Registry {
    /// A JSON file (one daemon).
    File(FileRegistry),
    /// A DynamoDB table (shared by a team).
    Dynamo(DynamoRegistry),
}

impl Registry {
    /// An identifier of the store, tagged onto every bastion it owns
    /// (`bastion:registry`): `file:<daemon-id>` or `dynamodb:<table>`.
    pub fn id(&self) -> String {
        match self {
            Registry::File(f) => f.id(),
            Registry::Dynamo(d) => d.id(),
        }
    }

    /// The record under `key`, read consistently.
    pub async fn get(&self, key: &str) -> Result<Option<Record>, RegistryError> {
        match self {
            Registry::File(f) => f.get(key).await,
            Registry::Dynamo(d) => d.get(key).await,
        }
    }

    /// Writes `record` if the stored version is `expect` (`None`: no record may exist).
    /// The caller sets `record.version` to `expect + 1` (1 for a new record).
    pub async fn put(&self, record: &Record, expect: Option<u64>) -> Result<(), RegistryError> {
        match self {
            Registry::File(f) => f.put(record, expect).await,
            Registry::Dynamo(d) => d.put(record, expect).await,
        }
    }

    /// Deletes the record under `key` if its stored version is `expect`.
    pub async fn delete(&self, key: &str, expect: u64) -> Result<(), RegistryError> {
        match self {
            Registry::File(f) => f.delete(key, expect).await,
            Registry::Dynamo(d) => d.delete(key, expect).await,
        }
    }

    /// Every record.
    pub async fn list(&self) -> Result<Vec<Record>, RegistryError> {
        match self {
            Registry::File(f) => f.list().await,
            Registry::Dynamo(d) => d.list().await,
        }
    }
}
