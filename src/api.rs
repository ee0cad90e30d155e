//! Control-API types shared by `bastiond` and `bastionctl` (JSON over HTTP on a Unix
//! socket; the protocol is specified in `proto-docs/control-api.md`): the request and
//! answer bodies, the error codes with their HTTP statuses, and where the socket is.
//!
//! Both the server ([`crate::daemon::control`]) and the client ([`crate::ctl`]) depend on
//! this module and not on each other, so the wire contract lives in one place.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The API version, the first path segment of every route (`/v1/...`).
pub const API_VERSION: &str = "v1";

/// Largest request body the daemon reads.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The system service's socket (`bastiond` as root without `XDG_RUNTIME_DIR`).
pub const SYSTEM_SOCKET_PATH: &str = "/run/bastion/control.sock";

/// File name of the socket inside its directory.
pub const SOCKET_FILE_NAME: &str = "control.sock";

/// The effective uid of this process.
pub fn current_uid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// The socket path `bastiond` binds when it is given none (computed; nothing is
/// created): `$XDG_RUNTIME_DIR/bastion/control.sock` when `XDG_RUNTIME_DIR` is set to an
/// absolute path; otherwise [`SYSTEM_SOCKET_PATH`] for root, and
/// `$TMPDIR/bastion-$UID/control.sock` for other users (e.g. macOS, which has no
/// `XDG_RUNTIME_DIR`). `bastionctl` starts from the same path
/// (see [`crate::ctl::default_socket_path`]).
pub fn default_socket_path() -> PathBuf {
    socket_path_for(
        std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from),
        current_uid(),
        &std::env::temp_dir(),
    )
}

/// [`default_socket_path`] from explicit inputs.
pub fn socket_path_for(xdg_runtime_dir: Option<PathBuf>, uid: u32, temp_dir: &Path) -> PathBuf {
    match xdg_runtime_dir.filter(|d| d.is_absolute()) {
        Some(dir) => dir.join("bastion").join(SOCKET_FILE_NAME),
        None if uid == 0 => PathBuf::from(SYSTEM_SOCKET_PATH),
        None => temp_dir
            .join(format!("bastion-{uid}"))
            .join(SOCKET_FILE_NAME),
    }
}

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

/// The machine-readable `code` of an [`ApiError`]: what kind of failure it is, which
/// decides the HTTP status ([`ErrorCode::http_status`]). On the wire it is the
/// snake_case name (`unknown_profile`, `port_in_use`, ...).
///
/// New codes may appear within `v1`, so a client must read codes it does not know:
/// they arrive as [`ErrorCode::Other`] with the daemon's string, which is written back
/// unchanged (`bastionctl --json` prints the error as the daemon sent it).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed: bad JSON, a body that is not an object, wrong field
    /// types, a profile name that is not UTF-8. Fix the request.
    BadRequest,
    /// No profile has that name. `bastionctl list` shows the configured ones.
    UnknownProfile,
    /// No such route (including other API versions). The API is under `/v1`.
    NotFound,
    /// `events` on a profile without a `bastion` section: there is no on-demand bastion
    /// whose lifecycle could be followed.
    NoBastion,
    /// Wrong method on a route; the `Allow` header lists the right ones.
    MethodNotAllowed,
    /// A profile's local TCP port is taken by another process; the message names the
    /// address. Stop that process or change `local_port`.
    PortInUse,
    /// The request body is over [`MAX_REQUEST_BYTES`].
    PayloadTooLarge,
    /// A request body with a `Content-Type` other than JSON; send
    /// `Content-Type: application/json`.
    UnsupportedMediaType,
    /// `reload`: the configuration file has errors (each listed in the message with its
    /// place); nothing changed. Fix the file and reload again.
    BadConfig,
    /// The on-demand bastion cannot be launched as configured (a subnet, security group,
    /// AMI parameter, cluster or user data the provider refuses). Fix the profile's
    /// `bastion` section.
    InvalidBastionConfig,
    /// The caller's AWS identity lacks an IAM permission; the message names the action.
    MissingPermission,
    /// No usable AWS credentials (not logged in, expired SSO session, refused key).
    /// Log in again (`aws sso login`) or fix the profile's AWS settings.
    Credentials,
    /// StartSession failed (access denied, target not connected, credentials, ...); the
    /// message says which and what to check.
    StartSessionFailed,
    /// The session started but its websocket or handshake failed, or it ended at once.
    /// Usually transient: the next connection retries.
    SessionFailed,
    /// The provider has no capacity for the bastion's instance type or task now; try
    /// later or another type or subnet.
    Capacity,
    /// An account quota (vCPUs, instances, tasks) stops the bastion's launch; raise it
    /// or end other resources.
    Quota,
    /// AWS throttled the calls; retried later, and the next connection tries again.
    Throttled,
    /// Another AWS call failed; the message has AWS's own words.
    AwsError,
    /// The on-demand bastion's registry (the local state file or the DynamoDB table)
    /// could not be read or written.
    RegistryFailed,
    /// The on-demand bastion runs but never came online with Session Manager within
    /// `ready_timeout`; the message says what to check (network path to the SSM
    /// endpoints, instance profile or task role).
    BastionNotOnline,
    /// The on-demand bastion was not ready within `ready_timeout` for another reason
    /// (another daemon still launching or ending it).
    BastionTimeout,
    /// A profile's listener could not be opened for a reason other than a taken TCP port
    /// (a `local_socket` another process listens on or that cannot be created, an
    /// address the host does not have).
    ListenFailed,
    /// `target_tags`: the EC2 lookup failed (no region, credentials, permissions,
    /// endpoint); the message says which.
    Ec2LookupFailed,
    /// `target_tags`: no running instance carries every listed tag in the region.
    NoMatchingInstance,
    /// A profile with an on-demand bastion needs a state directory, and the daemon has
    /// none: start `bastiond` with `--state-dir` or set `XDG_STATE_HOME`.
    NoStateDir,
    /// The SSM agent on the target is too old for the profile's document (remote host
    /// port forwarding); update the agent (AWS-UpdateSSMAgent).
    AgentTooOld,
    /// A code this build does not know (from a newer daemon), or `http_NNN` for an error
    /// answer that carried no API error body; kept as received. The daemon never sends
    /// it for a failure of its own.
    #[serde(untagged)]
    Other(String),
}

impl ErrorCode {
    /// The code as it is on the wire.
    pub fn as_str(&self) -> &str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownProfile => "unknown_profile",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoBastion => "no_bastion",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PortInUse => "port_in_use",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::BadConfig => "bad_config",
            ErrorCode::InvalidBastionConfig => "invalid_bastion_config",
            ErrorCode::MissingPermission => "missing_permission",
            ErrorCode::Credentials => "credentials",
            ErrorCode::StartSessionFailed => "start_session_failed",
            ErrorCode::SessionFailed => "session_failed",
            ErrorCode::Capacity => "capacity",
            ErrorCode::Quota => "quota",
            ErrorCode::Throttled => "throttled",
            ErrorCode::AwsError => "aws_error",
            ErrorCode::RegistryFailed => "registry_failed",
            ErrorCode::BastionNotOnline => "bastion_not_online",
            ErrorCode::BastionTimeout => "bastion_timeout",
            ErrorCode::ListenFailed => "listen_failed",
            ErrorCode::Ec2LookupFailed => "ec2_lookup_failed",
            ErrorCode::NoMatchingInstance => "no_matching_instance",
            ErrorCode::NoStateDir => "no_state_dir",
            ErrorCode::AgentTooOld => "agent_too_old",
            ErrorCode::Other(code) => code,
        }
    }

    /// The HTTP status the daemon answers with for this code (the table of
    /// `proto-docs/control-api.md` §3). A client uses it for the final `error` line of
    /// a progress stream, which arrives under a `200`.
    pub fn http_status(&self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::MissingPermission | ErrorCode::Credentials => 403,
            ErrorCode::UnknownProfile | ErrorCode::NotFound | ErrorCode::NoBastion => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PortInUse => 409,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::BadConfig | ErrorCode::InvalidBastionConfig => 422,
            ErrorCode::StartSessionFailed
            | ErrorCode::SessionFailed
            | ErrorCode::Capacity
            | ErrorCode::Quota
            | ErrorCode::Throttled
            | ErrorCode::AwsError
            | ErrorCode::RegistryFailed => 502,
            ErrorCode::BastionNotOnline | ErrorCode::BastionTimeout => 504,
            ErrorCode::ListenFailed
            | ErrorCode::Ec2LookupFailed
            | ErrorCode::NoMatchingInstance
            | ErrorCode::NoStateDir
            | ErrorCode::AgentTooOld
            | ErrorCode::Other(_) => 500,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answer: HTTP status ([`ErrorCode::http_status`]) plus this body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What kind of failure, for programs.
    pub code: ErrorCode,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every code the daemon sends, with the status of the contract's table.
    const TABLE: &[(ErrorCode, &str, u16)] = &[
        (ErrorCode::BadRequest, "bad_request", 400),
        (ErrorCode::UnknownProfile, "unknown_profile", 404),
        (ErrorCode::NotFound, "not_found", 404),
        (ErrorCode::NoBastion, "no_bastion", 404),
        (ErrorCode::MethodNotAllowed, "method_not_allowed", 405),
        (ErrorCode::PortInUse, "port_in_use", 409),
        (ErrorCode::PayloadTooLarge, "payload_too_large", 413),
        (
            ErrorCode::UnsupportedMediaType,
            "unsupported_media_type",
            415,
        ),
        (ErrorCode::BadConfig, "bad_config", 422),
        (
            ErrorCode::InvalidBastionConfig,
            "invalid_bastion_config",
            422,
        ),
        (ErrorCode::MissingPermission, "missing_permission", 403),
        (ErrorCode::Credentials, "credentials", 403),
        (ErrorCode::StartSessionFailed, "start_session_failed", 502),
        (ErrorCode::SessionFailed, "session_failed", 502),
        (ErrorCode::Capacity, "capacity", 502),
        (ErrorCode::Quota, "quota", 502),
        (ErrorCode::Throttled, "throttled", 502),
        (ErrorCode::AwsError, "aws_error", 502),
        (ErrorCode::RegistryFailed, "registry_failed", 502),
        (ErrorCode::BastionNotOnline, "bastion_not_online", 504),
        (ErrorCode::BastionTimeout, "bastion_timeout", 504),
        (ErrorCode::ListenFailed, "listen_failed", 500),
        (ErrorCode::Ec2LookupFailed, "ec2_lookup_failed", 500),
        (ErrorCode::NoMatchingInstance, "no_matching_instance", 500),
        (ErrorCode::NoStateDir, "no_state_dir", 500),
        (ErrorCode::AgentTooOld, "agent_too_old", 500),
    ];

    #[test]
    fn codes_on_the_wire_and_their_statuses() {
        for (code, wire, status) in TABLE {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, serde_json::json!(wire), "{code:?}");
            assert_eq!(code.as_str(), *wire, "as_str of {code:?}");
            assert_eq!(code.to_string(), *wire);
            assert_eq!(code.http_status(), *status, "{code:?}");
            let back: ErrorCode = serde_json::from_value(json).unwrap();
            assert_eq!(&back, code);
        }
    }

    #[test]
    fn unknown_codes_are_kept_as_received() {
        let body = r#"{"code":"bastion_on_fire","message":"m"}"#;
        let e: ApiError = serde_json::from_str(body).unwrap();
        assert_eq!(e.code, ErrorCode::Other("bastion_on_fire".into()));
        assert_eq!(e.code.http_status(), 500);
        assert_eq!(serde_json::to_string(&e).unwrap(), body);
    }

    #[test]
    fn socket_paths() {
        let tmp = Path::new("/tmp");
        assert_eq!(
            socket_path_for(Some("/run/user/1000".into()), 1000, tmp),
            Path::new("/run/user/1000/bastion/control.sock")
        );
        assert_eq!(socket_path_for(None, 0, tmp), Path::new(SYSTEM_SOCKET_PATH));
        assert_eq!(
            socket_path_for(Some("relative".into()), 1000, tmp),
            Path::new("/tmp/bastion-1000/control.sock")
        );
        assert_eq!(
            socket_path_for(Some("/run/user/0".into()), 0, tmp),
            Path::new("/run/user/0/bastion/control.sock")
        );
    }
}
