//! The IO driver of one Session Manager session: a tokio task that owns the websocket,
//! the sans-IO [`ClientSession`] and (in mux mode) the smux client, and hands out one
//! [`TunnelStream`] per tunnelled connection ([`super::relay`] connects it to a socket).
//!
//! Data path: user bytes -> [`Upstream`] -> smux PSH frames -> 1 KiB PT 1 messages ->
//! websocket; and back: websocket -> in-order PT 1 payloads -> smux -> [`Downstream`]
//! -> user. Every buffer on the way is bounded; when one fills,
//! the stage before it stops (the channel window for uploads, withheld acks for
//! downloads, see [`crate::proto::channel::Channel::set_receive_ready`]).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use thiserror::Error;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_tungstenite::tungstenite::Message;
use tracing::{Instrument, debug, info, info_span, warn};

use super::websocket::{self, DataChannelSocket, DialError};
use crate::aws::ssm::{Resumed, SessionTicket};
use crate::aws::upgrade_sign::{SignError, UpgradeHeaders, UpgradeSigner};
use crate::proto::liveness::PingKind;
use crate::proto::port::{PortConfig, PortEnd, PortEvent, PortSession};
use crate::proto::session::{
    ClientConfig, ClientSession, DataMode, SessionEnd, SessionEvent, SessionInfo,
};
use crate::proto::smux::StreamRead;

/// Why a resume attempt failed.
#[derive(Debug, Error, Clone)]
pub enum ResumeError {
    /// Try again later (network, throttling).
    #[error("resume failed, will retry: {0}")]
    Retry(String),
    /// The session cannot be resumed (terminated, timed out, access denied).
    #[error("session cannot be resumed: {0}")]
    Fatal(String),
}

/// Calls ResumeSession.
pub type Resumer = Arc<
    dyn Fn() -> Pin<Box<dyn Future<Output = Result<Resumed, ResumeError>> + Send>> + Send + Sync,
>;

/// How a tunnel ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TunnelEnd {
    /// The agent sent `channel_closed`; `output` is its message (may be empty).
    ChannelClosed {
        /// The agent's Output field.
        output: String,
    },
    /// A message was never acknowledged within the resend limit.
    ResendTimeout {
        /// The message's sequence number.
        sequence_number: i64,
    },
    /// The smux session failed (protocol error from the agent's side).
    Smux(String),
    /// ResumeSession returned an empty token: the session timed out at the service.
    ResumeTimedOut,
    /// ResumeSession was refused (terminated, access denied).
    ResumeRefused(String),
    /// The websocket was lost and the tunnel has no way to resume.
    WebsocketLost(String),
    /// We ended it ([`Tunnel::terminate`]).
    Terminated,
    /// The [`Tunnel`] was dropped.
    Dropped,
}

impl TunnelEnd {
    /// True when the session ended without us asking: it may still exist at the
    /// service, which must be told (TerminateSession API) so it does not linger.
    pub fn ended_on_its_own(&self) -> bool {
        !matches!(self, TunnelEnd::Terminated | TunnelEnd::Dropped)
    }
}

impl From<PortEnd> for TunnelEnd {
    fn from(end: PortEnd) -> Self {
        match end {
            PortEnd::ChannelClosed { output } => TunnelEnd::ChannelClosed { output },
            PortEnd::ResendTimeout { sequence_number } => {
                TunnelEnd::ResendTimeout { sequence_number }
            }
            PortEnd::Smux(reason) => TunnelEnd::Smux(reason.to_string()),
        }
    }
}

impl fmt::Display for TunnelEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TunnelEnd::ChannelClosed { output } => SessionEnd::ChannelClosed {
                output: output.clone(),
            }
            .fmt(f),
            TunnelEnd::ResendTimeout { sequence_number } => SessionEnd::ResendTimeout {
                sequence_number: *sequence_number,
            }
            .fmt(f),
            TunnelEnd::Smux(why) => write!(f, "smux session closed: {why}"),
            TunnelEnd::ResumeTimedOut => write!(f, "session timed out (empty resume token)"),
            TunnelEnd::ResumeRefused(why) => write!(f, "resume refused: {why}"),
            TunnelEnd::WebsocketLost(why) => write!(f, "websocket lost: {why}"),
            TunnelEnd::Terminated => write!(f, "terminated by the user"),
            TunnelEnd::Dropped => write!(f, "tunnel dropped"),
        }
    }
}

/// Settings of a tunnel.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// ClientVersion to report.
    pub client_version: String,
    /// ClientId: one per process.
    pub client_id: String,
    /// Signs every websocket upgrade (first dial, retries, resumes). `None` dials
    /// unsigned, as the plugin does when it has no credentials; products always set it.
    pub signer: Option<UpgradeSigner>,
    /// Host names besides Session Manager's own that a StreamUrl may point to (a
    /// private endpoint name); see [`websocket::check_stream_url`].
    pub stream_url_hosts: Vec<String>,
    /// Bound for connecting the websocket and for the handshake.
    pub connect_timeout: Duration,
    /// The session's protocol settings: payload size, buffers, half-close linger,
    /// liveness (`proto-docs/tunnel.md` §2 gives the reasoning for the defaults).
    pub port: PortConfig,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            client_version: crate::proto::version::DEFAULT_CLIENT_VERSION.to_owned(),
            client_id: uuid::Uuid::new_v4().hyphenated().to_string(),
            signer: None,
            stream_url_hosts: Vec::new(),
            connect_timeout: Duration::from_secs(30),
            port: PortConfig::default(),
        }
    }
}

/// Why a tunnel could not be opened or used.
#[derive(Debug, Error, Clone)]
pub enum TunnelError {
    /// The websocket could not be opened.
    #[error("{0}")]
    Dial(String),
    /// The session ended.
    #[error("session ended: {0}")]
    Ended(String),
    /// The handshake did not complete in time.
    #[error("handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
    /// The agent requested KMS encryption, which port sessions never use.
    #[error("the agent requested KMS encryption; bastion supports it only for shell sessions")]
    KmsUnsupported,
    /// The session is not a port-forwarding session.
    #[error("the session is not port forwarding (type {0}); check the document")]
    NotPortForwarding(String),
}

impl From<DialError> for TunnelError {
    fn from(e: DialError) -> Self {
        TunnelError::Dial(e.to_string())
    }
}

impl From<SignError> for TunnelError {
    fn from(e: SignError) -> Self {
        TunnelError::Dial(e.to_string())
    }
}

/// Checks the URL, signs the upgrade afresh (new date, freshly resolved credentials)
/// and dials.
async fn dial_signed(url: &str, config: &TunnelConfig) -> Result<DataChannelSocket, TunnelError> {
    websocket::check_stream_url(url, &config.stream_url_hosts)?;
    let headers = match &config.signer {
        Some(signer) => signer.headers_for(url).await?,
        None => UpgradeHeaders::default(),
    };
    Ok(websocket::dial(url, &headers, config.connect_timeout).await?)
}

enum Command {
    Open(oneshot::Sender<Result<TunnelStream, TunnelError>>),
    Terminate(oneshot::Sender<()>),
}

/// Counters of one tunnel, updated by its driver.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TunnelStats {
    /// Bytes sent to the remote host.
    pub bytes_up: u64,
    /// Bytes received from the remote host.
    pub bytes_down: u64,
    /// Connections currently open.
    pub open_streams: usize,
    /// Connections opened since the start.
    pub total_streams: u64,
    /// Successful websocket resumes.
    pub resumes: u64,
    /// Resume attempts (successful or not).
    pub resume_attempts: u64,
    /// True while the websocket is down and being resumed.
    pub reconnecting: bool,
    /// Retransmitted messages.
    pub retransmissions: u64,
    /// ConnectToPortError flags from the agent (it could not reach the remote port).
    pub connect_to_port_errors: u64,
    /// The last problem seen, for `bastionctl status`.
    pub last_error: Option<String>,
}

/// A live session with its driver task. Dropping it terminates the session.
#[derive(Debug)]
pub struct Tunnel {
    info: SessionInfo,
    session_id: String,
    commands: mpsc::Sender<Command>,
    stats: watch::Receiver<TunnelStats>,
    ended: watch::Receiver<Option<TunnelEnd>>,
}

impl Tunnel {
    /// Connects the websocket, runs the handshake and starts the driver.
    pub async fn connect(
        ticket: SessionTicket,
        config: TunnelConfig,
        resumer: Option<Resumer>,
    ) -> Result<Tunnel, TunnelError> {
        let span = info_span!("ssm_session", session_id = %ticket.session_id);
        async move {
            let mut socket = dial_signed(&ticket.stream_url, &config).await?;
            let now = Instant::now();
            let mut client_config = ClientConfig::new(&ticket.session_id, &ticket.target);
            client_config.client_version = config.client_version.clone();
            client_config.client_id = config.client_id.clone();
            let mut session = ClientSession::new(client_config, now, unix_ms());
            let open = session.open_data_channel_message(&ticket.token_value);
            socket
                .send(Message::text(open))
                .await
                .map_err(|e| TunnelError::Dial(e.to_string()))?;
            let info =
                tokio::time::timeout(config.connect_timeout, handshake(&mut socket, &mut session))
                    .await
                    .map_err(|_| TunnelError::HandshakeTimeout(config.connect_timeout))??;
            if info.mode == DataMode::StandardStream {
                return Err(TunnelError::NotPortForwarding(info.session_type.clone()));
            }
            info!(agent_version = %info.agent_version, mode = ?info.mode, "session ready");
            let port = PortSession::new(session, config.port.clone(), Instant::now())
                .map_err(|e| TunnelError::Ended(e.to_string()))?;
            let (commands, command_rx) = mpsc::channel(16);
            let (stats_tx, stats) = watch::channel(TunnelStats::default());
            let (ended_tx, ended) = watch::channel(None);
            let (input_tx, input_rx) = mpsc::channel(64);
            let driver = Driver {
                ticket: ticket.clone(),
                config,
                resumer,
                reader: None,
                writer: None,
                outbox: None,
                writer_task: None,
                port,
                slots: HashMap::new(),
                readable: BTreeSet::new(),
                waiters: VecDeque::new(),
                input_tx,
                input_rx,
                commands: command_rx,
                capacity: Arc::new(Notify::new()),
                stats: stats_tx,
                counters: TunnelStats::default(),
            };
            let mut driver = driver;
            driver.attach_socket(socket);
            tokio::spawn(
                async move {
                    let why = driver.run().await;
                    info!(reason = %why, "session ended");
                    let _ = ended_tx.send(Some(why));
                }
                .in_current_span(),
            );
            Ok(Tunnel {
                session_id: ticket.session_id.clone(),
                info,
                commands,
                stats,
                ended,
            })
        }
        .instrument(span)
        .await
    }

    /// What the handshake established.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The SessionId.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// Opens a tunnelled connection to the session's remote host. In basic mode this
    /// waits until the previous connection has closed (one at a time, as the agent).
    pub async fn open_stream(&self) -> Result<TunnelStream, TunnelError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Open(tx))
            .await
            .map_err(|_| self.ended_error())?;
        rx.await.map_err(|_| self.ended_error())?
    }

    /// Sends the TerminateSession flag (when the agent supports it) and stops the
    /// driver. The caller should also call the TerminateSession API.
    pub async fn terminate(&self) {
        let (tx, rx) = oneshot::channel();
        if self.commands.send(Command::Terminate(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Current counters.
    pub fn stats(&self) -> TunnelStats {
        self.stats.borrow().clone()
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<TunnelEnd> {
        self.ended.borrow().clone()
    }

    /// Why the session ended, once it has, for people.
    pub fn end_reason(&self) -> Option<String> {
        self.end().map(|e| e.to_string())
    }

    /// Waits until the session ends and returns how.
    pub async fn wait_end(&self) -> TunnelEnd {
        self.end_watch().wait().await
    }

    /// A handle that waits for the end without keeping the tunnel alive (the tunnel
    /// ends when its last owner drops it, so a watcher must not own it).
    pub fn end_watch(&self) -> EndWatch {
        EndWatch {
            ended: self.ended.clone(),
        }
    }

    fn ended_error(&self) -> TunnelError {
        TunnelError::Ended(self.end_reason().unwrap_or_else(|| "driver stopped".into()))
    }
}

/// Waits for a [`Tunnel`]'s end ([`Tunnel::end_watch`]).
#[derive(Clone, Debug)]
pub struct EndWatch {
    ended: watch::Receiver<Option<TunnelEnd>>,
}

impl EndWatch {
    /// How the session ended, once it has; [`TunnelEnd::Dropped`] if its driver
    /// vanished without saying.
    pub async fn wait(mut self) -> TunnelEnd {
        loop {
            if let Some(end) = self.ended.borrow().clone() {
                return end;
            }
            if self.ended.changed().await.is_err() {
                return TunnelEnd::Dropped;
            }
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
}

async fn flush(socket: &mut DataChannelSocket, session: &mut ClientSession) -> Result<(), String> {
    let mut any = false;
    while let Some(frame) = session.poll_transmit() {
        socket
            .feed(Message::Binary(frame))
            .await
            .map_err(|e| e.to_string())?;
        any = true;
    }
    if any {
        socket.flush().await.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Runs the handshake until the session is ready.
async fn handshake(
    socket: &mut DataChannelSocket,
    session: &mut ClientSession,
) -> Result<SessionInfo, TunnelError> {
    loop {
        session.set_wall_clock(Instant::now(), unix_ms());
        flush(socket, session).await.map_err(TunnelError::Dial)?;
        while let Some(ev) = session.poll_event() {
            match ev {
                SessionEvent::Ready(info) => {
                    if !info.customer_message.is_empty() {
                        info!(message = %info.customer_message, "agent message");
                    }
                    return Ok(info);
                }
                SessionEvent::DataKeyRequired { .. } => {
                    let _ = session.fail_data_key(
                        "KMS encryption is not supported for port sessions by this client",
                        Instant::now(),
                    );
                    flush(socket, session).await.map_err(TunnelError::Dial)?;
                    return Err(TunnelError::KmsUnsupported);
                }
                SessionEvent::Closed(end) => return Err(TunnelError::Ended(end.to_string())),
                _ => {}
            }
        }
        let deadline = session.poll_timeout();
        tokio::select! {
            msg = socket.next() => match msg {
                Some(Ok(Message::Binary(b))) => log_frame_error(session.handle_frame(b, Instant::now())),
                Some(Ok(Message::Text(t))) => log_frame_error(session.handle_frame(Bytes::from(t.as_bytes().to_vec()), Instant::now())),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(TunnelError::Dial(e.to_string())),
                None => return Err(TunnelError::Ended("websocket closed during the handshake".into())),
            },
            _ = sleep_until(deadline) => session.handle_timeout(Instant::now()),
        }
    }
}

/// Writes frames to the websocket, flushing when the queue runs dry. Ends when the
/// driver drops its sender or on a write error. It never sends a websocket Close
/// frame: neither reference does (\[P\] `websocketutil.go` fn `CloseConnection` is
/// gorilla's `Conn.Close`, a plain TCP close; the agent likewise on reconnect), and the
/// session's end is said in-band (TerminateSession flag, `channel_closed`). Dropping
/// the sink with the driver's read half closes the TCP connection.
async fn write_pump(
    mut sink: SplitSink<DataChannelSocket, Message>,
    mut rx: mpsc::Receiver<Message>,
) {
    while let Some(m) = rx.recv().await {
        if sink.feed(m).await.is_err() {
            return;
        }
        if rx.is_empty() && sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.flush().await;
}

fn log_frame_error(r: Result<(), crate::proto::channel::FrameError>) {
    if let Err(e) = r {
        warn!(error = %e, "dropped a malformed frame");
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// Identifies a tunnelled connection: the smux stream id, or a counter in basic mode.
type Key = u32;

/// One tunnelled connection as the driver hands it out: [`Upstream`] takes the local
/// client's bytes, [`Downstream`] yields the remote host's. Dropping both closes the
/// connection on the remote side.
pub struct TunnelStream {
    /// Bytes toward the remote host.
    pub up: Upstream,
    /// Bytes from the remote host.
    pub down: Downstream,
}

/// The sending half of a [`TunnelStream`].
pub struct Upstream {
    key: Key,
    input: mpsc::Sender<(Key, Option<Bytes>)>,
    capacity: Arc<Notify>,
    finished: bool,
}

/// The session behind a [`TunnelStream`] has ended.
#[derive(Debug, Error)]
#[error("the session ended")]
pub struct StreamClosed;

impl Upstream {
    /// Queues bytes for the remote host, waiting while the session's upload buffer is
    /// full.
    pub async fn send(&mut self, data: Bytes) -> Result<(), StreamClosed> {
        self.input
            .send((self.key, Some(data)))
            .await
            .map_err(|_| StreamClosed)
    }

    /// The local client has nothing more to send (a half-close: replies still come).
    pub async fn finish(&mut self) {
        if !std::mem::replace(&mut self.finished, true) {
            let _ = self.input.send((self.key, None)).await;
        }
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        // The end of input must follow the data already queued, never overtake it.
        if let Err(mpsc::error::TrySendError::Full(m)) = self.input.try_send((self.key, None))
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            let input = self.input.clone();
            runtime.spawn(async move {
                let _ = input.send(m).await;
            });
        }
        self.capacity.notify_one();
    }
}

/// The receiving half of a [`TunnelStream`].
pub struct Downstream {
    rx: mpsc::Receiver<Bytes>,
    capacity: Arc<Notify>,
}

impl Downstream {
    /// The next bytes from the remote host; `None` once it has finished sending (or
    /// the session ended).
    pub async fn recv(&mut self) -> Option<Bytes> {
        let chunk = self.rx.recv().await;
        // Room for the driver to deliver more.
        self.capacity.notify_one();
        chunk
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        // The driver sees the closed queue on its next turn: wake it.
        self.capacity.notify_one();
    }
}

/// The driver's end of one connection: where its received bytes go.
struct Slot {
    to_user: mpsc::Sender<Bytes>,
}

/// Frames queued for a websocket's writer task.
const WRITER_QUEUE: usize = 256;
/// Chunk size moved from the session to a connection's [`Downstream`].
const DELIVERY_CHUNK: usize = 16 * 1024;
/// Chunks a connection's [`Downstream`] may hold before delivery to it pauses.
const DELIVERY_QUEUE: usize = 8;

/// The IO around one [`PortSession`]: the websocket (a reader here, a writer task),
/// the local connections' queues, commands, and resume. Every protocol decision is the
/// session's; this loop reads, writes, sleeps until the session's next timer, and
/// executes what its events say.
struct Driver {
    ticket: SessionTicket,
    config: TunnelConfig,
    resumer: Option<Resumer>,
    /// The read half of the current websocket.
    reader: Option<SplitStream<DataChannelSocket>>,
    /// Feeds the current websocket's writer task.
    writer: Option<mpsc::Sender<Message>>,
    /// A frame the writer had no room for yet.
    outbox: Option<Message>,
    /// The current websocket's writer task.
    writer_task: Option<tokio::task::JoinHandle<()>>,
    port: PortSession,
    slots: HashMap<Key, Slot>,
    /// Connections the session said are readable and that have not been drained.
    readable: BTreeSet<Key>,
    /// Basic mode: connections waiting for the one before them to end.
    waiters: VecDeque<oneshot::Sender<Result<TunnelStream, TunnelError>>>,
    input_tx: mpsc::Sender<(Key, Option<Bytes>)>,
    input_rx: mpsc::Receiver<(Key, Option<Bytes>)>,
    commands: mpsc::Receiver<Command>,
    capacity: Arc<Notify>,
    stats: watch::Sender<TunnelStats>,
    counters: TunnelStats,
}

impl Driver {
    async fn run(mut self) -> TunnelEnd {
        loop {
            let now = Instant::now();
            // Before this turn's inputs: messages made in it carry the wall clock of now.
            self.port.set_wall_clock(now, unix_ms());
            self.port.set_writer_blocked(now, self.outbox.is_some());
            if let Some(why) = self.handle_events() {
                if let Some(end) = self.reconnect(why).await {
                    return end;
                }
                continue;
            }
            self.deliver();
            self.serve_waiters();
            self.publish_stats();
            if let Some(end) = self.port.end() {
                return TunnelEnd::from(end);
            }
            if let Err(e) = self.push_frames() {
                if let Some(end) = self.reconnect(e).await {
                    return end;
                }
                continue;
            }
            let blocked_write = self.outbox.is_some();
            let wants_input = self.port.wants_input();
            let upload_room = self.port.upload_room();
            let deadline = self.port.poll_timeout();
            let capacity = self.capacity.clone();
            let (Some(reader), Some(writer)) = (self.reader.as_mut(), self.writer.clone()) else {
                return TunnelEnd::WebsocketLost("no websocket".into());
            };
            let lost = tokio::select! {
                permit = writer.reserve(), if blocked_write => match (permit, self.outbox.take()) {
                    (Ok(permit), Some(m)) => { permit.send(m); None }
                    _ => Some("websocket writer stopped".to_owned()),
                },
                // Receive backpressure the way the references get it: while the
                // connections' buffers are full, the websocket is not read (their
                // writes block their websocket reader).
                msg = reader.next(), if wants_input => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        log_frame_error(self.port.handle_frame(Instant::now(), b));
                        None
                    }
                    Some(Ok(Message::Text(t))) => {
                        let frame = Bytes::from(t.as_bytes().to_vec());
                        log_frame_error(self.port.handle_frame(Instant::now(), frame));
                        None
                    }
                    Some(Ok(Message::Close(frame))) => Some(format!("websocket closed by the service: {frame:?}")),
                    Some(Ok(_)) => { self.port.on_traffic(Instant::now()); None }
                    Some(Err(e)) => Some(e.to_string()),
                    None => Some("websocket closed".to_owned()),
                },
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Open(reply)) => { self.open(reply); None }
                    Some(Command::Terminate(done)) => {
                        self.port.terminate(Instant::now());
                        self.drain_frames().await;
                        let _ = done.send(());
                        return TunnelEnd::Terminated;
                    }
                    None => {
                        self.port.terminate(Instant::now());
                        self.drain_frames().await;
                        return TunnelEnd::Dropped;
                    }
                },
                input = self.input_rx.recv(), if upload_room => {
                    if let Some((key, data)) = input { self.on_user_input(key, data); }
                    None
                }
                _ = capacity.notified() => None,
                _ = sleep_until(deadline) => { self.port.handle_timeout(Instant::now()); None }
            };
            if let Some(why) = lost
                && let Some(end) = self.reconnect(why).await
            {
                return end;
            }
        }
    }

    /// Acts on the session's events; `Some(reason)` when the websocket must be
    /// replaced.
    fn handle_events(&mut self) -> Option<String> {
        while let Some(ev) = self.port.poll_event() {
            match ev {
                PortEvent::Readable(key) => {
                    self.readable.insert(key);
                }
                PortEvent::Closed(key) => {
                    debug!(
                        stream = key,
                        "connection closed by the session (half-close linger)"
                    );
                    self.drop_slot(key);
                }
                PortEvent::Ping(kind) => {
                    if kind == PingKind::Keepalive {
                        self.log_state();
                    } else {
                        debug!("probing a quiet websocket");
                    }
                    let payload = match kind {
                        PingKind::Keepalive => &b"keepalive"[..],
                        PingKind::Probe => &b"probe"[..],
                    };
                    let queued = self.writer.as_ref().is_some_and(|w| {
                        w.try_send(Message::Ping(Bytes::from_static(payload)))
                            .is_ok()
                    });
                    if !queued {
                        // The writer queue is full: our ping would wait behind data, so
                        // silence proves nothing now (as while the writer is blocked).
                        self.port.on_traffic(Instant::now());
                    }
                }
                PortEvent::WebsocketDead(why) => return Some(why.to_string()),
                PortEvent::ConnectToPortError => {
                    warn!("the agent could not connect to the remote port");
                    self.counters.last_error =
                        Some("the agent could not connect to the remote host and port".into());
                }
                PortEvent::SmuxError(e) => self.counters.last_error = Some(e.to_string()),
            }
        }
        None
    }

    fn log_state(&self) {
        let channel = self.port.session().channel();
        debug!(
            wants_input = self.port.wants_input(),
            upload_room = self.port.upload_room(),
            buffered = self.port.buffered(),
            pending_upload = self.port.pending_upload(),
            in_flight = channel.in_flight_messages(),
            to_send = channel.pending_transmit(),
            expected = channel.expected_sequence_number(),
            streams = self.slots.len(),
            "data channel state"
        );
    }

    /// Splits a new websocket: this task reads, a writer task writes, so that a full
    /// send buffer never stops us from reading (both peers blocked in writes would
    /// deadlock).
    fn attach_socket(&mut self, socket: DataChannelSocket) {
        let (sink, stream) = socket.split();
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        self.writer_task = Some(tokio::spawn(write_pump(sink, rx).in_current_span()));
        self.reader = Some(stream);
        self.writer = Some(tx);
        self.outbox = None;
    }

    /// Hands the session's frames to the writer task without waiting; what does not
    /// fit stays in the session (and one frame in `outbox`).
    fn push_frames(&mut self) -> Result<(), String> {
        let Some(writer) = &self.writer else {
            return Err("no websocket".into());
        };
        let now = Instant::now();
        while self.outbox.is_none() {
            let Some(frame) = self.port.poll_transmit(now) else {
                break;
            };
            match writer.try_send(Message::Binary(frame)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) => self.outbox = Some(m),
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    return Err("websocket writer stopped".into());
                }
            }
        }
        Ok(())
    }

    /// Sends everything queued, waiting for the writer (used on the way out), for at
    /// most [`DRAIN_LIMIT`] in all: a dead path must not hold up a close.
    async fn drain_frames(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let now = Instant::now();
        let queued = self.outbox.take().into_iter();
        let rest: Vec<Message> = std::iter::from_fn(|| self.port.poll_transmit(now))
            .map(Message::Binary)
            .collect();
        let task = self.writer_task.take();
        let _ = tokio::time::timeout(DRAIN_LIMIT, async move {
            for m in queued.chain(rest) {
                if writer.send(m).await.is_err() {
                    return;
                }
            }
            // Dropping the sender lets the pump write what is queued, then close the
            // socket.
            drop(writer);
            if let Some(task) = task {
                let _ = task.await;
            }
        })
        .await;
    }

    /// Resumes the session after the websocket failed; `Some(end)` ends the tunnel.
    async fn reconnect(&mut self, why: String) -> Option<TunnelEnd> {
        warn!(reason = %why, "data channel websocket lost");
        self.counters.last_error = Some(why.clone());
        self.port.on_disconnect();
        // Drop the TCP connection now, without a Close frame and without writing what
        // is queued (the channel retransmits it on the next websocket).
        if let Some(task) = self.writer_task.take() {
            task.abort();
        }
        self.reader = None;
        self.writer = None;
        self.outbox = None;
        let resumer = self.resumer.clone()?;
        self.counters.reconnecting = true;
        let outcome = self.resume_loop(resumer).await;
        self.counters.reconnecting = false;
        self.publish_stats();
        outcome
    }

    /// Retries ResumeSession and the websocket with capped, jittered exponential backoff
    /// until it works, the service refuses, or the channel gives up.
    async fn resume_loop(&mut self, resumer: Resumer) -> Option<TunnelEnd> {
        let mut attempt: u32 = 0;
        loop {
            self.publish_stats();
            if let Some(end) = self.port.end() {
                return Some(TunnelEnd::from(end));
            }
            let base = Duration::from_millis(100 + fastrand::u64(0..100));
            let delay = base
                .saturating_mul(1 << attempt.min(6))
                .min(Duration::from_secs(5));
            if attempt > 0 {
                tokio::time::sleep(delay).await;
            }
            attempt = attempt.saturating_add(1);
            self.counters.resume_attempts += 1;
            let resumed = match resumer().await {
                Ok(r) if r.token_value.is_empty() => return Some(TunnelEnd::ResumeTimedOut),
                Ok(r) => r,
                Err(ResumeError::Fatal(e)) => return Some(TunnelEnd::ResumeRefused(e)),
                Err(ResumeError::Retry(e)) => {
                    warn!(attempt, error = %e, "ResumeSession failed; retrying");
                    self.counters.last_error = Some(format!("resume attempt {attempt}: {e}"));
                    continue;
                }
            };
            // [P] 1.2.835.0: the StreamUrl ResumeSession returned, when it is not empty.
            if let Some(url) = resumed.stream_url.filter(|u| !u.is_empty()) {
                self.ticket.stream_url = url;
            }
            match dial_signed(&self.ticket.stream_url, &self.config).await {
                Ok(mut socket) => {
                    let open = self.port.open_data_channel_message(&resumed.token_value);
                    if socket.send(Message::text(open)).await.is_err() {
                        continue;
                    }
                    self.attach_socket(socket);
                    let now = Instant::now();
                    self.port.set_wall_clock(now, unix_ms());
                    self.port.on_reconnect(now);
                    self.counters.resumes += 1;
                    info!(attempt, "data channel resumed");
                    return None;
                }
                Err(e) => {
                    warn!(attempt, error = %e, "websocket reconnect failed; retrying");
                    self.counters.last_error = Some(format!("resume attempt {attempt}: {e}"));
                }
            }
        }
    }

    fn open(&mut self, reply: oneshot::Sender<Result<TunnelStream, TunnelError>>) {
        if let Some(end) = self.port.end() {
            let _ = reply.send(Err(TunnelError::Ended(end.to_string())));
            return;
        }
        if self.port.is_mux() {
            match self.port.open_stream(Instant::now()) {
                Ok(key) => {
                    let user = self.attach(key);
                    let _ = reply.send(Ok(user));
                }
                Err(e) => {
                    let _ = reply.send(Err(TunnelError::Ended(e.to_string())));
                }
            }
        } else {
            self.waiters.push_back(reply);
            self.serve_waiters();
        }
    }

    /// Basic mode: hands the session to the next waiting connection once the one
    /// before it has ended.
    fn serve_waiters(&mut self) {
        while !self.waiters.is_empty() && self.port.can_open() {
            let Some(reply) = self.waiters.pop_front() else {
                break;
            };
            if reply.is_closed() {
                continue;
            }
            let Ok(key) = self.port.open_stream(Instant::now()) else {
                self.waiters.push_front(reply);
                break;
            };
            let user = self.attach(key);
            if let Err(Ok(unused)) = reply.send(Ok(user)) {
                // The connection went away while it waited.
                drop(unused);
                self.port.finish(key, Instant::now());
                self.slots.remove(&key);
            }
        }
    }

    /// Creates the user's ends of a connection (no task, no buffer until bytes move).
    fn attach(&mut self, key: Key) -> TunnelStream {
        let (to_user, from_driver) = mpsc::channel::<Bytes>(DELIVERY_QUEUE);
        let user = TunnelStream {
            up: Upstream {
                key,
                input: self.input_tx.clone(),
                capacity: self.capacity.clone(),
                finished: false,
            },
            down: Downstream {
                rx: from_driver,
                capacity: self.capacity.clone(),
            },
        };
        self.slots.insert(key, Slot { to_user });
        self.counters.total_streams += 1;
        user
    }

    fn on_user_input(&mut self, key: Key, data: Option<Bytes>) {
        if !self.slots.contains_key(&key) {
            return;
        }
        match data {
            Some(d) => {
                let _ = self.port.write(key, d);
            }
            None => {
                self.port.finish(key, Instant::now());
                if !self.port.is_mux() {
                    // Basic mode: the connection is over once its DisconnectToPort is
                    // queued; the next waiting connection may start.
                    self.drop_slot(key);
                }
            }
        }
    }

    fn drop_slot(&mut self, key: Key) {
        self.slots.remove(&key);
        self.readable.remove(&key);
    }

    /// Moves received bytes to the connections while their queues have room; closes
    /// the connections whose client is gone.
    fn deliver(&mut self) {
        let now = Instant::now();
        let keys: Vec<Key> = self.readable.iter().copied().collect();
        for key in keys {
            let Some(slot) = self.slots.get(&key) else {
                self.readable.remove(&key);
                continue;
            };
            let mut ended = false;
            loop {
                let Ok(permit) = slot.to_user.try_reserve() else {
                    break;
                };
                match self.port.read(key, DELIVERY_CHUNK, now) {
                    StreamRead::Data(b) => permit.send(b),
                    StreamRead::Blocked => {
                        self.readable.remove(&key);
                        break;
                    }
                    StreamRead::Eof => {
                        ended = true;
                        break;
                    }
                }
            }
            if ended {
                // Dropping the sender ends the connection's Downstream.
                self.drop_slot(key);
            }
        }
        // Nobody reads these any more (the client closed entirely): no reply can reach
        // anyone, so no linger.
        let gone: Vec<Key> = self
            .slots
            .iter()
            .filter(|(_, s)| s.to_user.is_closed())
            .map(|(&k, _)| k)
            .collect();
        for key in gone {
            self.port.close(key, now);
            self.drop_slot(key);
        }
    }

    fn publish_stats(&mut self) {
        let s = self.port.stats();
        self.counters.bytes_up = s.bytes_up;
        self.counters.bytes_down = s.bytes_down;
        self.counters.connect_to_port_errors = s.connect_to_port_errors;
        self.counters.retransmissions = s.retransmissions;
        self.counters.open_streams = self.slots.len();
        let snapshot = self.counters.clone();
        self.stats.send_if_modified(|s| {
            if *s == snapshot {
                false
            } else {
                *s = snapshot;
                true
            }
        });
    }
}

/// How long ending a session may wait for its last frames to be written.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);
