//! Client library for the control API (what `bastionctl` is built on): HTTP/1.1 over
//! the daemon's Unix socket, one connection per request.
//!
//! ```no_run
//! # async fn demo() -> Result<(), bastion::ctl::CtlError> {
//! let client = bastion::ctl::Client::new(bastion::ctl::default_socket_path());
//! for p in client.list().await? {
//!     println!("{} {:?}", p.name, p.state);
//! }
//! # Ok(()) }
//! ```

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::net::UnixStream;

use crate::api::{
    API_VERSION, ApiError, ErrorCode, Health, OpenEvent, OpenRequest, ProfileStatus, Progress,
    ReloadResult, SYSTEM_SOCKET_PATH,
};

/// Largest response body the client reads (a line of the progress stream included).
pub const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

/// Default time limit of one request (`open --warm` streams have none: the daemon's own
/// session timeouts end them).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// The socket `bastionctl` talks to when none is given: this user's daemon socket
/// (see [`crate::api::default_socket_path`]) when it exists, else the
/// system daemon's `/run/bastion/control.sock` when that exists, else this user's path
/// (so that "not running" names the socket a user service would create).
pub fn default_socket_path() -> PathBuf {
    let own = crate::api::default_socket_path();
    if own.exists() {
        return own;
    }
    let system = PathBuf::from(SYSTEM_SOCKET_PATH);
    if system.exists() { system } else { own }
}

/// What went wrong talking to the daemon.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing listens at the socket path.
    #[error("{}", not_running_message(socket))]
    NotRunning {
        /// The socket path tried.
        socket: PathBuf,
    },
    /// The daemon answered with an error.
    #[error("{}", error.message)]
    Api {
        /// HTTP status.
        status: u16,
        /// The error body.
        error: ApiError,
    },
    /// The socket exists but connecting failed for another reason (permissions, ...).
    #[error("cannot connect to bastiond at {}: {source}", socket.display())]
    Connect {
        /// The socket path.
        socket: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The daemon took too long.
    #[error("bastiond did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    /// The answer was not what the API specifies.
    #[error("unexpected answer from bastiond: {0}")]
    Protocol(String),
}

/// The one line printed when the daemon is not running.
pub fn not_running_message(socket: &Path) -> String {
    let start = if socket == Path::new(SYSTEM_SOCKET_PATH) {
        "sudo systemctl start bastiond"
    } else {
        "systemctl --user start bastiond"
    };
    format!(
        "bastiond is not running (no control socket at {}); start it with: {start} (or run: bastiond run)",
        socket.display()
    )
}

fn protocol(e: impl std::fmt::Display) -> CtlError {
    CtlError::Protocol(e.to_string())
}

/// Percent-encodes one path segment (everything but unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The route of a profile (`/v1/profiles/NAME`), or of an action on it
/// (`/v1/profiles/NAME/open`).
pub fn profile_route(name: &str, action: Option<&str>) -> String {
    let base = format!("/{API_VERSION}/profiles/{}", encode_segment(name));
    match action {
        Some(a) => format!("{base}/{a}"),
        None => base,
    }
}

/// A control API client. Cheap to clone; connects anew for every request.
#[derive(Clone, Debug)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the daemon at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Client {
        Client {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Changes the per-request time limit.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn connect(
        &self,
    ) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, CtlError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
                    CtlError::NotRunning {
                        socket: self.socket.clone(),
                    }
                }
                _ => CtlError::Connect {
                    socket: self.socket.clone(),
                    source: e,
                },
            })?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(protocol)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends one request and returns the response head with its streaming body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::Response<Incoming>, CtlError> {
        let mut sender = self.connect().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(
                header::USER_AGENT,
                concat!("bastionctl/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "application/json, application/x-ndjson");
        if body.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(protocol)?;
        sender.send_request(req).await.map_err(protocol)
    }

    /// One request with a JSON answer: `T` on success, [`CtlError::Api`] otherwise.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + Sync)>,
    ) -> Result<T, CtlError> {
        let bytes = self.call_raw(method, path, body).await?;
        serde_json::from_slice(&bytes)
            .map_err(|e| protocol(format!("invalid JSON from {path}: {e}")))
    }

    /// Like [`Client::call`], returning the successful answer's body as the daemon sent
    /// it (checked to be JSON); `bastionctl --json` prints it verbatim.
    pub async fn call_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + Sync)>,
    ) -> Result<Bytes, CtlError> {
        let body = body.map(serde_json::to_vec).transpose().map_err(protocol)?;
        let work = async {
            let resp = self.send(method, path, body).await?;
            let status = resp.status();
            let bytes = read_all(resp.into_body()).await?;
            if !status.is_success() {
                return Err(api_error(status, &bytes));
            }
            serde_json::from_slice::<serde::de::IgnoredAny>(&bytes)
                .map_err(|e| protocol(format!("invalid JSON from {path}: {e}")))?;
            Ok(bytes)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| CtlError::Timeout(self.timeout))?
    }

    /// `GET /v1/health`.
    pub async fn health(&self) -> Result<Health, CtlError> {
        self.call(Method::GET, &format!("/{API_VERSION}/health"), None::<&()>)
            .await
    }

    /// `GET /v1/profiles`.
    pub async fn list(&self) -> Result<Vec<ProfileStatus>, CtlError> {
        self.call(
            Method::GET,
            &format!("/{API_VERSION}/profiles"),
            None::<&()>,
        )
        .await
    }

    /// `GET /v1/profiles/{name}`.
    pub async fn status(&self, name: &str) -> Result<ProfileStatus, CtlError> {
        self.call(Method::GET, &profile_route(name, None), None::<&()>)
            .await
    }

    /// `POST /v1/profiles/{name}/open` without `warm`: the listeners open, the session
    /// starts on the first connection.
    pub async fn open(&self, name: &str) -> Result<ProfileStatus, CtlError> {
        self.call(
            Method::POST,
            &profile_route(name, Some("open")),
            Some(&OpenRequest { warm: false }),
        )
        .await
    }

    /// `POST /v1/profiles/{name}/open` with `warm`: returns the progress stream once the
    /// listeners are open (listener errors, such as a port in use, come back here as
    /// [`CtlError::Api`]).
    pub async fn open_warm(&self, name: &str) -> Result<WarmOpen, CtlError> {
        let body = serde_json::to_vec(&OpenRequest { warm: true }).map_err(protocol)?;
        let resp = tokio::time::timeout(
            self.timeout,
            self.send(Method::POST, &profile_route(name, Some("open")), Some(body)),
        )
        .await
        .map_err(|_| CtlError::Timeout(self.timeout))??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = read_all(resp.into_body()).await?;
            return Err(api_error(status, &bytes));
        }
        let ndjson = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(crate::api::NDJSON_CONTENT_TYPE));
        if !ndjson {
            // An older daemon that answers warm opens with the plain status.
            let bytes = read_all(resp.into_body()).await?;
            let status: ProfileStatus = serde_json::from_slice(&bytes).map_err(protocol)?;
            let mut line = serde_json::to_vec(&OpenEvent::Status {
                status: Box::new(status),
            })
            .map_err(protocol)?;
            line.push(b'\n');
            return Ok(WarmOpen {
                body: None,
                buf: line,
                finished: false,
                open_ended: false,
            });
        }
        Ok(WarmOpen {
            body: Some(resp.into_body()),
            buf: Vec::new(),
            finished: false,
            open_ended: false,
        })
    }

    /// `GET /v1/profiles/{name}/events`: the on-demand bastion's lifecycle events as
    /// they happen (progress lines only; the stream ends when the daemon closes it).
    pub async fn events(&self, name: &str) -> Result<WarmOpen, CtlError> {
        let resp = tokio::time::timeout(
            self.timeout,
            self.send(Method::GET, &profile_route(name, Some("events")), None),
        )
        .await
        .map_err(|_| CtlError::Timeout(self.timeout))??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = read_all(resp.into_body()).await?;
            return Err(api_error(status, &bytes));
        }
        Ok(WarmOpen {
            body: Some(resp.into_body()),
            buf: Vec::new(),
            finished: false,
            open_ended: true,
        })
    }

    /// `POST /v1/profiles/{name}/close`.
    pub async fn close(&self, name: &str) -> Result<ProfileStatus, CtlError> {
        self.call(
            Method::POST,
            &profile_route(name, Some("close")),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/reload`.
    pub async fn reload(&self) -> Result<ReloadResult, CtlError> {
        self.call(Method::POST, &format!("/{API_VERSION}/reload"), None::<&()>)
            .await
    }
}

async fn read_all(body: Incoming) -> Result<Bytes, CtlError> {
    Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(protocol)
}

fn api_error(status: StatusCode, body: &[u8]) -> CtlError {
    let error = serde_json::from_slice::<ApiError>(body).unwrap_or_else(|_| ApiError {
        code: ErrorCode::Other(format!("http_{}", status.as_u16())),
        message: format!(
            "bastiond answered {status}{}",
            match String::from_utf8_lossy(body).trim() {
                "" => String::new(),
                text => format!(": {}", text.chars().take(200).collect::<String>()),
            }
        ),
    });
    CtlError::Api {
        status: status.as_u16(),
        error,
    }
}

/// The progress stream of a warm open (or of `events`).
#[derive(Debug)]
pub struct WarmOpen {
    body: Option<Incoming>,
    buf: Vec<u8>,
    finished: bool,
    /// An `events` stream: it has no final line, and its end is not an error.
    open_ended: bool,
}

/// One line of a [`WarmOpen`] stream.
#[derive(Clone, Debug)]
pub struct WarmLine {
    /// The line as the daemon sent it, without the newline.
    pub raw: String,
    /// The parsed event.
    pub event: OpenEvent,
}

impl WarmOpen {
    /// The next line; `None` after the final `status` or `error` line. Cancel-safe.
    pub async fn next_line(&mut self) -> Result<Option<WarmLine>, CtlError> {
        if self.finished {
            return Ok(None);
        }
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                let raw = String::from_utf8_lossy(&line[..end]).trim().to_owned();
                if raw.is_empty() {
                    continue;
                }
                let event: OpenEvent = serde_json::from_str(&raw)
                    .map_err(|e| protocol(format!("bad progress line {raw:?}: {e}")))?;
                if !matches!(event, OpenEvent::Progress(_)) {
                    self.finished = true;
                }
                return Ok(Some(WarmLine { raw, event }));
            }
            if self.buf.len() > MAX_RESPONSE_BYTES {
                return Err(protocol("progress line too long"));
            }
            let Some(body) = self.body.as_mut() else {
                if self.open_ended {
                    return Ok(None);
                }
                return Err(protocol("the progress stream ended without a result"));
            };
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => return Err(protocol(e)),
                None => {
                    self.body = None;
                    if !self.buf.is_empty() && !self.buf.ends_with(b"\n") {
                        self.buf.push(b'\n');
                    }
                }
            }
        }
    }

    /// Reads the stream to its end, calling `on_progress` for every progress event.
    pub async fn finish(
        mut self,
        mut on_progress: impl FnMut(&Progress),
    ) -> Result<ProfileStatus, CtlError> {
        while let Some(line) = self.next_line().await? {
            match line.event {
                OpenEvent::Progress(p) => on_progress(&p),
                OpenEvent::Status { status } => return Ok(*status),
                OpenEvent::Error { error } => {
                    return Err(CtlError::Api {
                        status: error.code.http_status(),
                        error,
                    });
                }
            }
        }
        Err(protocol("the progress stream ended without a result"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_encoded() {
        assert_eq!(profile_route("pg-prod_1", None), "/v1/profiles/pg-prod_1");
        assert_eq!(
            profile_route("a b/c", Some("open")),
            "/v1/profiles/a%20b%2Fc/open"
        );
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[test]
    fn not_running_line() {
        let m = not_running_message(Path::new("/x/control.sock"));
        assert_eq!(
            m,
            "bastiond is not running (no control socket at /x/control.sock); start it with: systemctl --user start bastiond (or run: bastiond run)"
        );
        assert!(!m.contains('\n'));
    }
}
