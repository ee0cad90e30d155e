//! Control-API types shared by `bastiond` and `bastionctl` (JSON over HTTP on a Unix
//! socket; the protocol is specified in `proto-docs/control-api.md`).

use serde::{Deserialize, Serialize};

/// The API version, the first path segment of every route (`/v1/...`).
pub const API_VERSION: &str = "v1";

/// Largest request body the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The state of a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileState {
    /// Not listening.
    Closed,
    /// Listening; no session yet (one starts on the first connection).
    Listening,
    /// Starting a session (StartSession, websocket, handshake).
    Connecting,
    /// A session is up.
    Ready,
    /// A session's websocket dropped and is being resumed; connections wait.
    Resuming,
    /// The last attempt failed; still listening, the next connection retries.
    Error,
}

/// Everything `bastionctl status` shows about a profile.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProfileStatus {
    /// Profile name.
    pub name: String,
    /// State.
    pub state: ProfileState,
    /// Local listen addresses (`127.0.0.1:5432`, `[::1]:5432`, `unix:/path`).
    pub listen: Vec<String>,
    /// Session target (instance id, `ecs:` target or tag filter).
    pub target: String,
    /// Remote host and port as the agent dials them.
    pub remote: String,
    /// The first live session, if any.
    pub session_id: Option<String>,
    /// Every live session of the profile's pool (connections are striped over them).
    #[serde(default)]
    pub sessions: Vec<String>,
    /// The agent's version, once known.
    pub agent_version: Option<String>,
    /// `mux`, `basic` (or `stream` for a non-port session), once known.
    pub mode: Option<String>,
    /// Open client connections.
    pub connections: usize,
    /// Connections accepted since the profile opened.
    pub total_connections: u64,
    /// Bytes sent to the remote host.
    pub bytes_up: u64,
    /// Bytes received from the remote host.
    pub bytes_down: u64,
    /// Seconds since the session became ready.
    pub uptime_secs: Option<u64>,
    /// Successful websocket resumes since the profile opened.
    pub resumes: u64,
    /// Resume attempts since the profile opened (successful or not).
    #[serde(default)]
    pub resume_attempts: u64,
    /// The last error, in words a user can act on.
    pub last_error: Option<String>,
    /// The on-demand bastion, for profiles with a `bastion` section.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bastion: Option<BastionStatus>,
}

/// A progress event while `open --warm` brings a session up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Phase name (`listening`, `starting_session`, `connecting`, `ready`, `failed`).
    pub phase: String,
    /// Seconds since the request started.
    pub elapsed_secs: f64,
    /// Details (session id, error text).
    pub detail: Option<String>,
    /// The on-demand bastion's instance id or task ARN, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// An on-demand bastion, as `status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BastionStatus {
    /// `ec2` or `fargate`.
    pub provider: String,
    /// `none`, `launching`, `waiting_online`, `ready`, `idle` or `terminating`.
    pub phase: String,
    /// Instance id or task ARN.
    pub resource: Option<String>,
    /// Session Manager target.
    pub target: Option<String>,
    /// `local` or `dynamodb:<table>`.
    pub registry: String,
    /// Shared by the team (else one per caller).
    pub shared: bool,
    /// The daemon that holds the registry record's lease.
    pub holder: Option<String>,
    /// Seconds since launch.
    pub age_secs: Option<u64>,
    /// Seconds until the max lifetime ends.
    pub expires_in_secs: Option<u64>,
    /// Seconds without a connection (while idle).
    pub idle_secs: Option<u64>,
    /// The lifetime warning, once given.
    pub warning: Option<String>,
    /// The last lifecycle error.
    pub last_error: Option<String>,
}

/// Request body of `POST /v1/profiles/{name}/open`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// Start the session now instead of on the first connection.
    #[serde(default)]
    pub warm: bool,
}

/// An error answer: HTTP status plus this body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// Machine-readable code (`unknown_profile`, `bad_request`, `port_in_use`, ...).
    pub code: String,
    /// A sentence for the user.
    pub message: String,
}

/// Answer of `POST /v1/reload`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadResult {
    /// Profiles added.
    pub added: Vec<String>,
    /// Profiles removed (their listeners closed).
    pub removed: Vec<String>,
    /// Profiles whose settings changed (reopened).
    pub changed: Vec<String>,
    /// Profiles left untouched.
    pub unchanged: Vec<String>,
    /// Profiles that could not be reopened after the reload, with the reason.
    #[serde(default)]
    pub failed: Vec<String>,
}

/// Content type of the `open` progress stream (one JSON value per line).
pub const NDJSON_CONTENT_TYPE: &str = "application/x-ndjson";

/// Answer of `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// The daemon's version (`CARGO_PKG_VERSION`).
    pub version: String,
    /// The daemon's process id.
    pub pid: u32,
}

/// One line of the `POST /v1/profiles/{name}/open` stream when `warm` is true: progress
/// events, then exactly one final `status` or `error` line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OpenEvent {
    /// The session is coming up.
    Progress(Progress),
    /// Final line: the profile is open and its session ready.
    Status {
        /// The profile's status.
        status: Box<ProfileStatus>,
    },
    /// Final line: the open failed.
    Error {
        /// Why.
        error: ApiError,
    },
}
