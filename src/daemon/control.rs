//! The control API server: HTTP/1.1 with JSON bodies on a Unix socket, a thin layer
//! over [`Daemon`]. The protocol is specified in `proto-docs/control-api.md`.
//!
//! Wiring it into `bastiond run`:
//!
//! ```no_run
//! # async fn run(daemon: std::sync::Arc<bastion::daemon::Daemon>) -> Result<(), bastion::daemon::control::ControlError> {
//! use bastion::api::default_socket_path;
//! use bastion::daemon::control::{SocketAccess, serve};
//! let socket = default_socket_path();
//! let stop = async { let _ = tokio::signal::ctrl_c().await; };
//! serve(daemon, &socket, SocketAccess::default(), stop).await?;
//! # Ok(()) }
//! ```
//!
//! [`serve`] binds the socket (refusing to start when another daemon answers on it),
//! serves until `shutdown` completes, then stops accepting, removes the socket file
//! and waits up to [`SHUTDOWN_GRACE`] for requests in flight. Callers that want to
//! know when the socket is ready (tests, readiness notification) use [`bind`] and
//! [`serve_listener`] instead.
//!
//! Every accepted connection's peer credentials (SO_PEERCRED / getpeereid) are checked
//! against [`PeerPolicy`]; other users' connections are closed before a byte is read.

use std::convert::Infallible;
use std::future::{Future, IntoFuture};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::profile::ProfileError;
use super::{Daemon, DaemonError};
use crate::api::{
    ApiError, ErrorCode, Health, MAX_REQUEST_BYTES, NDJSON_CONTENT_TYPE, OpenEvent, OpenRequest,
    ProfileStatus, ReloadResult, current_uid,
};
use crate::ondemand::cloud::CloudErrorKind;
use crate::ondemand::manager::BastionError;

/// How long [`serve`] waits for requests in flight after the shutdown signal.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the control server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Another daemon answers on the socket.
    #[error(
        "another bastiond{} is already serving the control socket {}; stop it first (systemctl --user stop bastiond) or pass a different --socket",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        path.display()
    )]
    AlreadyRunning {
        /// The socket path.
        path: PathBuf,
        /// The pid of the process listening on the socket, where the platform reports
        /// peer credentials.
        pid: Option<u32>,
    },
    /// Something that is not a socket sits at the socket path.
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// The socket's directory could be tampered with by other users.
    #[error("refusing to put the control socket in {}: {reason}", path.display())]
    InsecureDirectory {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A system call failed.
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        /// What was being done (`create`, `bind`, `set permissions on`, ...).
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ControlError + use<> {
    let path = path.to_path_buf();
    move |source| ControlError::Io {
        action,
        path,
        source,
    }
}

/// Permissions of the control socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketAccess {
    /// File mode of the socket (0600 by default).
    pub mode: u32,
    /// A group whose members may also connect: the socket (and a directory the server
    /// creates) get this group, and peers in it pass the peer check.
    pub gid: Option<u32>,
}

impl Default for SocketAccess {
    fn default() -> Self {
        SocketAccess {
            mode: 0o600,
            gid: None,
        }
    }
}

impl SocketAccess {
    /// Mode 0660 with group `gid`.
    pub fn group(gid: u32) -> Self {
        SocketAccess {
            mode: 0o660,
            gid: Some(gid),
        }
    }
}

/// Who may talk to the daemon: its own uid, root, and (when configured) members of
/// one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerPolicy {
    /// The daemon's uid.
    pub uid: u32,
    /// The configured group, if any.
    pub gid: Option<u32>,
}

impl PeerPolicy {
    /// The policy for this process with `access`.
    pub fn for_access(access: &SocketAccess) -> Self {
        PeerPolicy {
            uid: current_uid(),
            gid: access.gid,
        }
    }

    /// Whether a peer with this uid, primary gid and supplementary groups may connect.
    pub fn allows(&self, peer_uid: u32, peer_gid: u32, supplementary: &[u32]) -> bool {
        if peer_uid == 0 || peer_uid == self.uid {
            return true;
        }
        match self.gid {
            Some(g) => peer_gid == g || supplementary.contains(&g),
            None => false,
        }
    }
}

/// The credentials of an accepted control connection (the listener's `Addr`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerCredentials {
    /// Peer uid.
    pub uid: u32,
    /// Peer gid.
    pub gid: u32,
    /// Peer pid, where the platform reports it.
    pub pid: Option<i32>,
}

/// Supplementary groups of a process (Linux `/proc`; empty elsewhere or on error).
fn supplementary_groups(pid: Option<i32>) -> Vec<u32> {
    let Some(pid) = pid else { return Vec::new() };
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return Vec::new();
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| {
            g.split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The control socket's listener: an [`axum::serve::Listener`] that closes every
/// connection whose peer fails [`PeerPolicy`], and removes the socket file when dropped
/// (if it is still the one it created).
#[derive(Debug)]
pub struct ControlListener {
    inner: UnixListener,
    policy: PeerPolicy,
    path: PathBuf,
    identity: (u64, u64),
}

impl ControlListener {
    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The peer policy applied to every connection.
    pub fn policy(&self) -> PeerPolicy {
        self.policy
    }

    fn check(&self, stream: &UnixStream) -> Option<PeerCredentials> {
        let cred = match stream.peer_cred() {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot read the peer credentials of a control connection; closing it");
                return None;
            }
        };
        let peer = PeerCredentials {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        };
        let supplementary = match self.policy.gid {
            Some(g) if peer.uid != 0 && peer.uid != self.policy.uid && peer.gid != g => {
                supplementary_groups(peer.pid)
            }
            _ => Vec::new(),
        };
        if self.policy.allows(peer.uid, peer.gid, &supplementary) {
            Some(peer)
        } else {
            warn!(
                peer_uid = peer.uid,
                peer_gid = peer.gid,
                peer_pid = ?peer.pid,
                daemon_uid = self.policy.uid,
                "refused a control connection from another user"
            );
            None
        }
    }
}

impl axum::serve::Listener for ControlListener {
    type Io = UnixStream;
    type Addr = PeerCredentials;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, _)) => {
                    if let Some(peer) = self.check(&stream) {
                        return (stream, peer);
                    }
                    // Dropping the stream closes the connection unanswered.
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accepting a control connection failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(PeerCredentials {
            uid: self.policy.uid,
            gid: rustix::process::getegid().as_raw(),
            pid: i32::try_from(std::process::id()).ok(),
        })
    }
}

impl Drop for ControlListener {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path)
            && (m.dev(), m.ino()) == self.identity
        {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn prepare_dir(dir: &Path, access: &SocketAccess) -> Result<(), ControlError> {
    match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let mode = if access.gid.is_some() { 0o750 } else { 0o700 };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(mode)
                .create(dir)
                .map_err(io_err("create", dir))?;
            // The umask may have narrowed the mode; set it exactly.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))
                .map_err(io_err("set permissions on", dir))?;
            if let Some(gid) = access.gid {
                std::os::unix::fs::chown(dir, None, Some(gid))
                    .map_err(io_err("change the group of", dir))?;
            }
            Ok(())
        }
        Err(e) => Err(io_err("inspect", dir)(e)),
        Ok(m) => {
            let insecure = |reason: String| ControlError::InsecureDirectory {
                path: dir.to_path_buf(),
                reason,
            };
            if !m.is_dir() {
                return Err(insecure("it is not a directory".into()));
            }
            let me = current_uid();
            if m.uid() != me && m.uid() != 0 {
                return Err(insecure(format!(
                    "it belongs to uid {}, not to uid {me}",
                    m.uid()
                )));
            }
            let mode = m.mode();
            if mode & 0o002 != 0 && mode & 0o1000 == 0 {
                return Err(insecure(format!(
                    "anyone may write to it (mode {:o})",
                    mode & 0o7777
                )));
            }
            Ok(())
        }
    }
}

/// Binds the control socket at `path` with `access` permissions.
///
/// Creates the parent directory (0700, or 0750 with a group) when missing and refuses
/// a directory other users can tamper with. A socket left by a dead daemon is removed;
/// when a live daemon answers on it, this fails with [`ControlError::AlreadyRunning`].
pub async fn bind(path: &Path, access: SocketAccess) -> Result<ControlListener, ControlError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        prepare_dir(dir, &access)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(ControlError::NotASocket {
                path: path.to_path_buf(),
            });
        }
        Ok(_) => match UnixStream::connect(path).await {
            Ok(stream) => {
                // The listener's credentials, as the kernel recorded them at listen():
                // no request that a busy or foreign server might leave unanswered.
                let pid = stream
                    .peer_cred()
                    .ok()
                    .and_then(|c| c.pid())
                    .and_then(|p| u32::try_from(p).ok());
                return Err(ControlError::AlreadyRunning {
                    path: path.to_path_buf(),
                    pid,
                });
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                info!(socket = %path.display(), "removing a stale control socket");
                std::fs::remove_file(path).map_err(io_err("remove the stale socket", path))?;
            }
            Err(e) => return Err(io_err("probe the existing socket", path)(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("inspect", path)(e)),
    }
    let inner = UnixListener::bind(path).map_err(io_err("bind", path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode & 0o777))
        .map_err(io_err("set permissions on", path))?;
    if let Some(gid) = access.gid {
        std::os::unix::fs::chown(path, None, Some(gid))
            .map_err(io_err("change the group of", path))?;
    }
    let m = std::fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    Ok(ControlListener {
        inner,
        policy: PeerPolicy::for_access(&access),
        path: path.to_path_buf(),
        identity: (m.dev(), m.ino()),
    })
}

/// Binds `socket` (see [`bind`]) and serves the control API for `daemon` until
/// `shutdown` completes (see [`serve_listener`]).
pub async fn serve(
    daemon: Arc<Daemon>,
    socket: &Path,
    access: SocketAccess,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    let listener = bind(socket, access).await?;
    info!(socket = %socket.display(), mode = format!("{:o}", access.mode), "control API listening");
    serve_listener(daemon, listener, shutdown).await
}

/// Serves the control API on an already bound listener until `shutdown` completes;
/// then stops accepting, removes the socket file and waits up to [`SHUTDOWN_GRACE`]
/// for requests in flight (a slow `open --warm` stream is cut after that).
pub async fn serve_listener(
    daemon: Arc<Daemon>,
    listener: ControlListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ControlError> {
    let path = listener.path().to_path_buf();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let server = axum::serve(listener, router(daemon)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopped_tx.send(());
    });
    let grace = async move {
        if stopped_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
            debug!("control API: grace period over; dropping the remaining connections");
        } else {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        r = server.into_future() => r.map_err(io_err("serve on", &path)),
        () = grace => Ok(()),
    }
}

/// The control API's routes over `daemon` (also usable with any other listener).
pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/profiles", get(list))
        .route("/v1/profiles/{name}", get(status))
        .route("/v1/profiles/{name}/open", post(open))
        .route("/v1/profiles/{name}/close", post(close))
        .route("/v1/profiles/{name}/events", get(events))
        .route("/v1/reload", post(reload))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .with_state(daemon)
}

/// An error answer.
struct Failure(ApiError);

fn failure(code: ErrorCode, message: impl Into<String>) -> Failure {
    Failure(ApiError {
        code,
        message: message.into(),
    })
}

impl From<DaemonError> for Failure {
    fn from(e: DaemonError) -> Self {
        Failure(to_api(&e))
    }
}

/// The wire form of a daemon failure: its code and its message. The daemon's errors
/// stay typed up to here; this is the one place that decides which code each gets.
fn to_api(e: &DaemonError) -> ApiError {
    ApiError {
        code: error_code(e),
        message: e.to_string(),
    }
}

fn error_code(e: &DaemonError) -> ErrorCode {
    match e {
        DaemonError::UnknownProfile(_) => ErrorCode::UnknownProfile,
        DaemonError::NoBastion(_) => ErrorCode::NoBastion,
        DaemonError::BadConfig(_) => ErrorCode::BadConfig,
        DaemonError::Profile(e) => profile_error_code(e),
    }
}

fn profile_error_code(e: &ProfileError) -> ErrorCode {
    match e {
        ProfileError::PortInUse { .. } => ErrorCode::PortInUse,
        ProfileError::Listen { .. } => ErrorCode::ListenFailed,
        ProfileError::Ec2Lookup(_) => ErrorCode::Ec2LookupFailed,
        ProfileError::NoMatchingInstance(_) => ErrorCode::NoMatchingInstance,
        ProfileError::StartSession(_) => ErrorCode::StartSessionFailed,
        ProfileError::NoStateDir { .. } => ErrorCode::NoStateDir,
        ProfileError::Session(_) | ProfileError::EndedAtOnce => ErrorCode::SessionFailed,
        ProfileError::AgentTooOld { .. } => ErrorCode::AgentTooOld,
        ProfileError::Bastion(e) => bastion_error_code(e),
    }
}

fn bastion_error_code(e: &BastionError) -> ErrorCode {
    match e {
        BastionError::Identity(_) => ErrorCode::Credentials,
        BastionError::Ec2Client(_) => ErrorCode::AwsError,
        BastionError::Cloud(c) => match c.kind {
            CloudErrorKind::MissingPermission => ErrorCode::MissingPermission,
            CloudErrorKind::Capacity => ErrorCode::Capacity,
            CloudErrorKind::Quota => ErrorCode::Quota,
            CloudErrorKind::InvalidConfig => ErrorCode::InvalidBastionConfig,
            CloudErrorKind::Credentials => ErrorCode::Credentials,
            CloudErrorKind::Throttled => ErrorCode::Throttled,
            CloudErrorKind::Aws => ErrorCode::AwsError,
        },
        BastionError::Registry(_) => ErrorCode::RegistryFailed,
        BastionError::NotOnline(_) => ErrorCode::BastionNotOnline,
        BastionError::Timeout(_) => ErrorCode::BastionTimeout,
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(self.0)).into_response()
    }
}

type Shared = State<Arc<Daemon>>;

fn profile_name(path: Result<UrlPath<String>, PathRejection>) -> Result<String, Failure> {
    path.map(|UrlPath(name)| name).map_err(|e| {
        failure(
            ErrorCode::BadRequest,
            format!("bad profile name in the path: {}", e.body_text()),
        )
    })
}

/// Parses an optional JSON body: empty means `T::default()`.
fn json_body<T: DeserializeOwned + Default>(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<T, Failure> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            failure(
                ErrorCode::PayloadTooLarge,
                format!("request body larger than {MAX_REQUEST_BYTES} bytes"),
            )
        } else {
            failure(
                ErrorCode::BadRequest,
                format!("cannot read the request body: {}", e.body_text()),
            )
        }
    })?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    if let Some(ct) = headers.get(header::CONTENT_TYPE) {
        let essence = ct
            .to_str()
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        if essence != "application/json" {
            return Err(failure(
                ErrorCode::UnsupportedMediaType,
                "request bodies are JSON: send Content-Type: application/json (curl: --json '{...}')",
            ));
        }
    }
    let value: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| failure(ErrorCode::BadRequest, format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(failure(
            ErrorCode::BadRequest,
            "the request body must be a JSON object",
        ));
    }
    serde_json::from_value(value)
        .map_err(|e| failure(ErrorCode::BadRequest, format!("invalid request: {e}")))
}

#[derive(Default, Deserialize)]
struct NoFields {}

async fn health() -> Json<Health> {
    Json(Health {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
    })
}

async fn list(State(daemon): Shared) -> Json<Vec<ProfileStatus>> {
    Json(daemon.list())
}

async fn status(
    State(daemon): Shared,
    path: Result<UrlPath<String>, PathRejection>,
) -> Result<Json<ProfileStatus>, Failure> {
    let name = profile_name(path)?;
    Ok(Json(daemon.status(&name)?))
}

async fn open(
    State(daemon): Shared,
    path: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Failure> {
    let name = profile_name(path)?;
    let request: OpenRequest = json_body(&headers, body)?;
    // Listener problems (unknown profile, port in use) get their own HTTP status
    // before any streaming starts.
    let status = daemon.open(&name, false, None).await?;
    if !request.warm {
        return Ok(Json(status).into_response());
    }
    Ok(warm_stream(daemon, name))
}

fn ndjson_line(event: &OpenEvent) -> Bytes {
    let mut line = serde_json::to_vec(event).unwrap_or_else(|_| b"{}".to_vec());
    line.push(b'\n');
    Bytes::from(line)
}

/// Streams the progress of a warm open as NDJSON. The open runs in its own task: a
/// client that goes away does not cancel it halfway.
fn warm_stream(daemon: Arc<Daemon>, name: String) -> Response {
    let (lines_tx, lines_rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(async move {
        let (progress_tx, mut progress_rx) = mpsc::channel(64);
        let opening = daemon.open(&name, true, Some(progress_tx));
        tokio::pin!(opening);
        let result = loop {
            tokio::select! {
                biased;
                Some(p) = progress_rx.recv() => {
                    // A slow reader loses progress lines, never the final one.
                    let _ = lines_tx.try_send(ndjson_line(&OpenEvent::Progress(p)));
                }
                r = &mut opening => break r,
            }
        };
        while let Ok(p) = progress_rx.try_recv() {
            let _ = lines_tx.try_send(ndjson_line(&OpenEvent::Progress(p)));
        }
        let last = match result {
            Ok(status) => OpenEvent::Status {
                status: Box::new(status),
            },
            Err(e) => OpenEvent::Error { error: to_api(&e) },
        };
        let _ = lines_tx.send(ndjson_line(&last)).await;
    });
    let stream = futures_util::stream::unfold(lines_rx, |mut rx| async move {
        rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
    });
    (
        [
            (header::CONTENT_TYPE, NDJSON_CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Streams the on-demand bastion's lifecycle events as NDJSON progress lines until the
/// client goes away. Events are not stored: a reader sees what happens while it reads
/// (a reader too slow for 64 events misses some, never blocks the daemon).
async fn events(
    State(daemon): Shared,
    path: Result<UrlPath<String>, PathRejection>,
) -> Result<Response, Failure> {
    let name = profile_name(path)?;
    let rx = daemon.bastion_events(&name)?;
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(p) => {
                    return Some((
                        Ok::<_, Infallible>(ndjson_line(&OpenEvent::Progress(p))),
                        rx,
                    ));
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, NDJSON_CONTENT_TYPE),
            (header::CACHE_CONTROL, "no-store"),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn close(
    State(daemon): Shared,
    path: Result<UrlPath<String>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ProfileStatus>, Failure> {
    let name = profile_name(path)?;
    let NoFields {} = json_body(&headers, body)?;
    Ok(Json(daemon.close(&name).await?))
}

async fn reload(
    State(daemon): Shared,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ReloadResult>, Failure> {
    let NoFields {} = json_body(&headers, body)?;
    Ok(Json(daemon.reload().await?))
}

async fn not_found(uri: axum::http::Uri) -> Failure {
    failure(
        ErrorCode::NotFound,
        format!(
            "no route {}; the API is under /v1 (see proto-docs/control-api.md)",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Failure {
    failure(
        ErrorCode::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ondemand::cloud::CloudError;

    #[test]
    fn daemon_errors_get_their_wire_codes_at_the_edge() {
        let in_use = |kind| std::io::Error::new(kind, "in use");
        let tcp = DaemonError::from(ProfileError::PortInUse {
            profile: "pg".into(),
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 5432)),
            source: in_use(io::ErrorKind::AddrInUse),
        });
        assert_eq!(
            to_api(&tcp),
            ApiError {
                code: ErrorCode::PortInUse,
                message: "profile pg: cannot listen on 127.0.0.1:5432: in use".into(),
            }
        );
        // A Unix socket someone listens on has always been `listen_failed`.
        let unix = DaemonError::from(ProfileError::Listen {
            profile: "pg".into(),
            addr: "/run/pg.sock".into(),
            source: in_use(io::ErrorKind::AddrInUse),
        });
        assert_eq!(to_api(&unix).code, ErrorCode::ListenFailed);
        let quota = DaemonError::from(ProfileError::from(BastionError::Cloud(CloudError {
            kind: CloudErrorKind::Quota,
            message: "profile pg: cannot launch a bastion: vCPU limit".into(),
            retryable: false,
        })));
        assert_eq!(
            to_api(&quota),
            ApiError {
                code: ErrorCode::Quota,
                message: "profile pg: cannot launch a bastion: vCPU limit".into(),
            }
        );
        let unknown = to_api(&DaemonError::UnknownProfile("nope".into()));
        assert_eq!(unknown.code, ErrorCode::UnknownProfile);
        assert_eq!(
            unknown.message,
            "no profile named \"nope\"; `bastionctl list` shows the configured ones"
        );
    }

    /// `bastiond run` spawns the server: its future must be `Send`.
    #[test]
    fn serve_future_is_send() {
        fn is_send<T: Send>(_: &T) {}
        let daemon = Daemon::new(Path::new("t.toml"), crate::config::Config::default(), None);
        let socket = PathBuf::from("/nonexistent/control.sock");
        let fut = async move { serve(daemon, &socket, SocketAccess::default(), async {}).await };
        is_send(&fut);
    }
}
