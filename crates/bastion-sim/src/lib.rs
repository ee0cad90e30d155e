//! SSM simulator: the Session Manager service API (AWS JSON 1.1), the data-channel
//! websocket endpoint, and the agent side of the data channel, on 127.0.0.1, for tests,
//! benchmarks and demos without an AWS account.
//!
//! * [`service`]: `POST /` with `X-Amz-Target: AmazonSSM.<Op>`: StartSession,
//!   ResumeSession, TerminateSession, DescribeSessions, DescribeInstanceInformation.
//! * [`admission`]: what a websocket upgrade must show before it is upgraded (a SigV4
//!   signature checked by [`sigv4`], a current cell-number) and the ClientVersion floor.
//! * [`dataplane`]: `GET /v1/data-channel/{session_id}`: websocket, OpenDataChannel and
//!   token check, relay to and from the agent ([`agent`]), resume, recycle, idle timeout.
//! * [`faults`]: drop / duplicate / reorder / delay messages, cut websockets, refuse
//!   ResumeSession, fail StartSession, slow the handshake.
//! * [`introspect`]: `GET /sim/health`, `GET /sim/sessions[/{id}]`,
//!   `GET|POST /sim/faults`, `GET|POST /sim/targets`.
//! * [`report`]: per-session counters and protocol violations.
//! * [`process`]: logging and signals of the `bastion-sim` and `bastion-demo` binaries.
//!
//! Tokens are never logged by this module (only session ids). Note that tungstenite logs
//! whole websocket messages at TRACE, which would include the OpenDataChannel token: a
//! subscriber should cap the `tungstenite` and `tokio_tungstenite` targets at INFO, as
//! `bastion-sim` does.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use bastion_sim::{SimConfig, Simulator};
//! let sim = Simulator::bind(SimConfig::default()).await?.spawn();
//! println!("endpoint {}", sim.endpoint_url());
//! // ... drive it with the SDK or a websocket client ...
//! assert!(sim.sessions().iter().all(|s| s.violations.is_empty()));
//! sim.shutdown().await;
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod report;

pub mod admission;
pub mod clock;
pub mod dataplane;
pub mod ec2;
pub mod faults;
pub mod introspect;
pub mod process;
pub mod service;
pub mod session;
pub mod sigv4;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use admission::{Refusal, RefusalKind, UpgradeRecord};
pub use ec2::Ec2Targets;
pub use faults::{DirectionFaults, Faults};
pub use report::{Counters, SessionReport, Violation, ViolationKind};
pub use session::SessionSnapshot;
pub use sigv4::{AuthKind, Credential, Credentials};

use session::SimSession;

/// The agent version the simulator reports by default (the \[A\] revision of the facts
/// sheet).
pub const DEFAULT_AGENT_VERSION: &str = "3.3.987.0";

/// Which StartSession targets the simulator accepts (others fail with
/// `TargetNotConnected`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetPolicy {
    /// Any id matching `^(i|mi)-[0-9a-f]{8,17}$`, and any `ecs:` target.
    AnyValid,
    /// Exactly these ids.
    Only(Vec<String>),
}

impl TargetPolicy {
    /// True if StartSession may start a session on `target`.
    pub fn accepts(&self, target: &str) -> bool {
        match self {
            TargetPolicy::AnyValid => is_valid_target(target),
            TargetPolicy::Only(list) => list.iter().any(|t| t == target),
        }
    }
}

/// `^(i|mi)-[0-9a-f]{8,17}$` or an `ecs:` target.
pub fn is_valid_target(target: &str) -> bool {
    if target.starts_with("ecs:") {
        return target.len() > 4;
    }
    is_instance_id(target)
}

/// `^(i|mi)-[0-9a-f]{8,17}$`.
pub fn is_instance_id(target: &str) -> bool {
    let hex = target
        .strip_prefix("i-")
        .or_else(|| target.strip_prefix("mi-"));
    hex.is_some_and(|h| {
        (8..=17).contains(&h.len()) && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// Configuration of a [`Simulator`].
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Address to listen on; port 0 picks a free port. Default `127.0.0.1:0`.
    pub listen: SocketAddr,
    /// AgentVersion the agent reports (HandshakeRequest, DescribeInstanceInformation).
    /// Default [`DEFAULT_AGENT_VERSION`]; decides mux (> 3.0.196.0) or basic mode.
    pub agent_version: String,
    /// Agent pause after each message it sends (the reference's 1 ms). Zero turns pacing
    /// off. Default 1 ms.
    pub agent_pacing: Duration,
    /// Agent delay before its HandshakeRequest. Default 0.
    pub agent_handshake_delay: Duration,
    /// How long after receiving a client message the agent sends its acknowledgement
    /// (the data itself is processed at once), as agent emulators that ack late do.
    /// Default 0: the agent acks at once. [`Faults::ack_delay_ms`] overrides it.
    pub agent_ack_delay: Duration,
    /// Accepted targets. Default [`TargetPolicy::AnyValid`].
    pub targets: TargetPolicy,
    /// Consult this EC2 endpoint for `i-` targets: such a target (also accepted by
    /// `targets`) is Online only while it is `running` there and `boot_delay` has passed
    /// since its `launchTime`. Default `None` (every accepted target is Online at once).
    pub ec2: Option<Ec2Targets>,
    /// Terminate a session after this long without stream data either way. Default 20
    /// min (the service default); `None` never.
    pub idle_timeout: Option<Duration>,
    /// Terminate a session this long after StartSession. Default `None`.
    pub max_session_duration: Option<Duration>,
    /// Close every client websocket with code 1000 this long after it attached; the
    /// client must ResumeSession and reconnect. Default 60 min; `None` never.
    pub ws_recycle: Option<Duration>,
    /// Lifetime of a StartSession / ResumeSession token (each is also single-use).
    /// Default 60 s.
    pub token_ttl: Duration,
    /// Time a new websocket has to send its OpenDataChannel message. Default 30 s.
    pub open_timeout: Duration,
    /// Fault knobs at start. Default none.
    pub faults: Faults,
    /// Account id used in Owner ARNs. Default `123456789012`.
    pub account_id: String,
    /// The region of this endpoint: upgrade signatures must be scoped to it (the plugin
    /// signs for argv\[2\], the CLI's region). Default `us-east-1`.
    pub region: String,
    /// The secrets the data plane knows, by access key id. Default empty: register
    /// the credentials the client under test is given ([`SimConfig::with_credential`]).
    pub credentials: Credentials,
    /// Refuse (403) a websocket upgrade that is not SigV4-signed by one of
    /// `credentials` (or, with `presigned_stream_urls`, by the simulator's presigned
    /// URL). Default true; false for clients that do not sign (plugin before 1.2.764.0).
    pub require_signed_upgrades: bool,
    /// StartSession / ResumeSession StreamUrls carry query-string SigV4 auth made by
    /// the simulator; an upgrade must present it and no `Authorization` header.
    /// Default false (the service's StreamUrls seen in 2025-2026 are not presigned).
    pub presigned_stream_urls: bool,
    /// Refuse (403) an upgrade whose cell-number a later ResumeSession replaced.
    /// Default true; false for plugins 1.2.764.0-1.2.814.0, which re-dial the original
    /// StreamUrl.
    pub expire_superseded_cells: bool,
    /// A ClientVersion (OpenDataChannel, HandshakeResponse) below this is a
    /// `ClientVersionUnsupported` violation. Default `Some("1.2.764.0")`; `None` off.
    pub min_client_version: Option<String>,
}

/// The oldest client AWS supports (the first plugin that signs upgrades, delta sheet
/// §2.6).
pub const DEFAULT_MIN_CLIENT_VERSION: &str = "1.2.764.0";

impl SimConfig {
    /// Registers a credential (`session_token` for temporary credentials).
    pub fn with_credential(
        mut self,
        access_key_id: &str,
        secret_access_key: &str,
        session_token: Option<&str>,
    ) -> SimConfig {
        self.credentials.insert(
            access_key_id.to_owned(),
            Credential {
                secret_access_key: secret_access_key.to_owned(),
                session_token: session_token.map(str::to_owned),
            },
        );
        self
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            agent_version: DEFAULT_AGENT_VERSION.to_owned(),
            agent_pacing: Duration::from_millis(1),
            agent_handshake_delay: Duration::ZERO,
            agent_ack_delay: Duration::ZERO,
            targets: TargetPolicy::AnyValid,
            ec2: None,
            idle_timeout: Some(Duration::from_secs(20 * 60)),
            max_session_duration: None,
            ws_recycle: Some(Duration::from_secs(60 * 60)),
            token_ttl: Duration::from_secs(60),
            open_timeout: Duration::from_secs(30),
            faults: Faults::default(),
            account_id: "123456789012".to_owned(),
            region: "us-east-1".to_owned(),
            credentials: Credentials::new(),
            require_signed_upgrades: true,
            presigned_stream_urls: false,
            expire_superseded_cells: true,
            min_client_version: Some(DEFAULT_MIN_CLIENT_VERSION.to_owned()),
        }
    }
}

/// State shared by the HTTP handlers, the session tasks and the handle.
#[derive(Debug)]
pub(crate) struct Shared {
    pub config: SimConfig,
    pub local_addr: SocketAddr,
    pub faults: Mutex<Faults>,
    pub targets: Mutex<TargetPolicy>,
    pub sessions: Mutex<Vec<Arc<SimSession>>>,
    /// EC2 instances once reported Online (later reported ConnectionLost when not).
    pub seen_online: Mutex<std::collections::BTreeSet<String>>,
    pub next_ordinal: AtomicU64,
    pub next_conn_id: AtomicU64,
    pub shutting_down: AtomicBool,
    /// The simulator's own key for presigned StreamUrls.
    pub presign_keys: Credentials,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub fn faults(&self) -> Faults {
        relock(&self.faults).clone()
    }

    pub fn faults_mut(&self) -> MutexGuard<'_, Faults> {
        relock(&self.faults)
    }

    pub fn targets(&self) -> MutexGuard<'_, TargetPolicy> {
        relock(&self.targets)
    }

    pub fn sessions(&self) -> MutexGuard<'_, Vec<Arc<SimSession>>> {
        relock(&self.sessions)
    }

    pub fn seen_online(&self) -> MutexGuard<'_, std::collections::BTreeSet<String>> {
        relock(&self.seen_online)
    }

    pub fn session(&self, id: &str) -> Option<Arc<SimSession>> {
        self.sessions().iter().find(|s| s.id == id).cloned()
    }

    pub fn all_sessions(&self) -> Vec<Arc<SimSession>> {
        self.sessions().clone()
    }
}

/// A bound, not yet serving, simulator.
#[derive(Debug)]
pub struct Simulator {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Simulator {
    /// Binds `config.listen`.
    pub async fn bind(config: SimConfig) -> std::io::Result<Simulator> {
        if let Err(e) = config.faults.validate() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, e));
        }
        let listener = TcpListener::bind(config.listen).await?;
        let local_addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            faults: Mutex::new(config.faults.clone()),
            targets: Mutex::new(config.targets.clone()),
            config,
            local_addr,
            sessions: Mutex::new(Vec::new()),
            seen_online: Mutex::new(std::collections::BTreeSet::new()),
            next_ordinal: AtomicU64::new(0),
            next_conn_id: AtomicU64::new(1),
            shutting_down: AtomicBool::new(false),
            presign_keys: admission::new_presigner(),
        });
        Ok(Simulator { listener, shared })
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    fn router(&self) -> axum::Router {
        service::router(self.shared.clone())
            .merge(dataplane::router(self.shared.clone()))
            .merge(introspect::router(self.shared.clone()))
    }

    /// Serves until `shutdown` completes, then terminates every session (sending
    /// `channel_closed` to attached clients) and returns.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let (tx, rx) = watch::channel(false);
        let handle = self.spawn_with(tx, rx);
        shutdown.await;
        handle.shutdown().await;
    }

    /// Starts serving in the background.
    pub fn spawn(self) -> SimHandle {
        let (tx, rx) = watch::channel(false);
        self.spawn_with(tx, rx)
    }

    fn spawn_with(self, tx: watch::Sender<bool>, mut rx: watch::Receiver<bool>) -> SimHandle {
        let router = self.router();
        let shared = self.shared.clone();
        let listener = self.listener;
        tracing::info!(addr = %shared.local_addr, "ssm simulator listening");
        let server = tokio::spawn(async move {
            // TCP_NODELAY on every connection, as a real service's websocket endpoint:
            // without it Nagle and delayed acks add ~40 ms to every small round trip.
            let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let serve = axum::serve(listener, router).with_graceful_shutdown(async move {
                let _ = rx.wait_for(|v| *v).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "ssm simulator server failed");
            }
        });
        SimHandle {
            shared,
            stop: tx,
            server: Some(server),
        }
    }
}

/// A running simulator. Dropping it stops the server (without waiting); prefer
/// [`SimHandle::shutdown`].
#[derive(Debug)]
pub struct SimHandle {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    server: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// `http://127.0.0.1:PORT`: the SSM endpoint URL and the base of `/sim/*`.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.shared.local_addr)
    }

    /// Snapshots of every session, oldest first.
    pub fn sessions(&self) -> Vec<SessionSnapshot> {
        self.shared
            .all_sessions()
            .iter()
            .map(|s| s.snapshot())
            .collect()
    }

    /// Snapshot of one session.
    pub fn session(&self, session_id: &str) -> Option<SessionSnapshot> {
        self.shared.session(session_id).map(|s| s.snapshot())
    }

    /// The live report of one session.
    pub fn report(&self, session_id: &str) -> Option<Arc<SessionReport>> {
        self.shared.session(session_id).map(|s| s.report.clone())
    }

    /// Every violation of every session, with its session id.
    pub fn violations(&self) -> Vec<(String, Violation)> {
        self.shared
            .all_sessions()
            .iter()
            .flat_map(|s| {
                let id = s.id.clone();
                s.report
                    .violations()
                    .into_iter()
                    .map(move |v| (id.clone(), v))
            })
            .collect()
    }

    /// The current fault knobs.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Replaces the fault knobs (rejects invalid ones).
    pub fn set_faults(&self, faults: Faults) -> Result<(), String> {
        faults.validate()?;
        *self.shared.faults_mut() = faults;
        Ok(())
    }

    /// Changes the fault knobs in place (rejects an invalid result, keeping the old).
    pub fn update_faults(&self, f: impl FnOnce(&mut Faults)) -> Result<(), String> {
        let mut guard = self.shared.faults_mut();
        let mut next = guard.clone();
        f(&mut next);
        next.validate()?;
        *guard = next;
        Ok(())
    }

    /// The accepted targets.
    pub fn targets(&self) -> TargetPolicy {
        self.shared.targets().clone()
    }

    /// Replaces the accepted targets.
    pub fn set_targets(&self, targets: TargetPolicy) {
        *self.shared.targets() = targets;
    }

    /// Terminates a session as TerminateSession does (`channel_closed` with `output`,
    /// or the agent's output when `None`). Returns false for an unknown session.
    pub fn terminate_session(&self, session_id: &str, output: Option<String>) -> bool {
        match self.shared.session(session_id) {
            Some(s) => {
                dataplane::terminate(&s, output);
                true
            }
            None => false,
        }
    }

    /// Waits until the session is Terminated (or `timeout` passes); true if it is.
    pub async fn wait_terminated(&self, session_id: &str, timeout: Duration) -> bool {
        let Some(s) = self.shared.session(session_id) else {
            return false;
        };
        let mut rx = s.done.subscribe();
        tokio::time::timeout(timeout, rx.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Terminates every session (waiting up to 5 s for them to end) and stops the
    /// server.
    pub async fn shutdown(mut self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        let sessions = self.shared.all_sessions();
        for s in &sessions {
            dataplane::terminate(s, Some("Simulator shutting down".to_owned()));
        }
        let wait_all = async {
            for s in &sessions {
                let mut rx = s.done.subscribe();
                let _ = rx.wait_for(|d| *d).await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), wait_all).await;
        let _ = self.stop.send(true);
        if let Some(server) = self.server.take() {
            let abort = server.abort_handle();
            if tokio::time::timeout(Duration::from_secs(2), server)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            self.shared.shutting_down.store(true, Ordering::SeqCst);
            for s in self.shared.all_sessions() {
                dataplane::terminate(&s, Some("Simulator shutting down".to_owned()));
            }
            let _ = self.stop.send(true);
            server.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_patterns() {
        assert!(is_valid_target("i-0123456789abcdef0"));
        assert!(is_valid_target("i-01234567"));
        assert!(is_valid_target("mi-0123456789abcdef0"));
        assert!(is_valid_target("ecs:cluster_task_runtime"));
        assert!(!is_valid_target("i-0123456"));
        assert!(!is_valid_target("i-0123456789abcdef01"));
        assert!(!is_valid_target("i-0123456789ABCDEF0"));
        assert!(!is_valid_target("host.example.com"));
        assert!(!is_valid_target("ecs:"));
        let only = TargetPolicy::Only(vec!["i-0123456789abcdef0".into()]);
        assert!(only.accepts("i-0123456789abcdef0"));
        assert!(!only.accepts("i-0123456789abcdef1"));
    }
}
