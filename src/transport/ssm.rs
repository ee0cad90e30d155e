//! The IO driver of one Session Manager session: a tokio task that owns the websocket,
//! the sans-IO [`ClientSession`] and (in mux mode) the smux client, and hands out one
//! [`TunnelStream`] per tunnelled connection ([`super::relay`] connects it to a socket).
//!
//! Data path: user bytes -> [`Upstream`] -> smux PSH frames -> 1 KiB PT 1 messages ->
//! websocket; and back: websocket -> in-order PT 1 payloads -> smux -> [`Downstream`]
//! -> user. Every buffer on the way is bounded; when one fills,
//! the stage before it stops (the channel window for uploads, withheld acks for
//! downloads, see [`crate::proto::channel::Channel::set_receive_ready`]).

use std::collections::HashMap;
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
use crate::proto::kind::Flag;
use crate::proto::session::{
    ClientConfig, ClientSession, DataMode, SessionEnd, SessionEvent, SessionInfo,
};
use crate::proto::smux::{self, StreamId, StreamRead};

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
    /// Largest payload per `input_stream_data` message. The plugin sends at most 1024
    /// bytes ([P] `config.go` `StreamDataPayloadSize`); the service's limit is not
    /// documented, so the default stays there.
    pub max_payload: usize,
    /// Bound for connecting the websocket and for the handshake.
    pub connect_timeout: Duration,
    /// Keepalive ping interval of an idle websocket. It keeps NAT and VPN mappings
    /// alive (VPNs drop flows idle for 60 s; the agent pings every 54 s, \[A\]
    /// `WebSocketPingInterval`) and costs one small frame each way per interval. The
    /// service answers pings, so a websocket silent for `dead_after` is half-open and
    /// is resumed. `proto-docs/tunnel.md` (liveness) gives the reasoning.
    pub ping_interval: Duration,
    /// Silence (no frame read, while we could read and write) after which an idle
    /// websocket counts as dead: two keepalives unanswered, plus slack.
    pub dead_after: Duration,
    /// A websocket quiet for longer than this is checked with a ping (a probe) when a
    /// new connection arrives or while our messages wait for acknowledgement, and
    /// resumed if nothing answers within `probe_timeout`: a user who is waiting learns
    /// of a dead path in seconds, not at the next keepalive.
    pub probe_idle: Duration,
    /// See `probe_idle`.
    pub probe_timeout: Duration,
    /// Received bytes the smux session may hold for connections that have not read them
    /// yet, all streams together; past it the websocket is not read. smux v1 has no
    /// per-stream flow control, so this is what one stalled reader may take before the
    /// other connections of its session stall too. It is purely local (the plugin uses
    /// xtaci's default of 4 MiB); memory per session stays bounded by it.
    pub smux_receive_buffer: usize,
}

impl Default for TunnelConfig {
    fn default() -> Self {
        TunnelConfig {
            client_version: crate::proto::version::DEFAULT_CLIENT_VERSION.to_owned(),
            client_id: uuid::Uuid::new_v4().hyphenated().to_string(),
            signer: None,
            stream_url_hosts: Vec::new(),
            max_payload: 1024,
            connect_timeout: Duration::from_secs(30),
            ping_interval: Duration::from_secs(20),
            dead_after: Duration::from_secs(45),
            probe_idle: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(5),
            smux_receive_buffer: 16 * 1024 * 1024,
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
            let smux = (info.mode == DataMode::Mux)
                .then(|| {
                    smux::Session::new(
                        smux::Role::Client,
                        smux::Config {
                            max_receive_buffer: config.smux_receive_buffer,
                            ..smux::Config::for_ssm(info.agent_disables_smux_keepalive)
                        },
                        Instant::now(),
                    )
                    .ok()
                })
                .flatten();
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
                session,
                smux,
                streams: HashMap::new(),
                basic: None,
                basic_waiters: Vec::new(),
                next_basic_id: 0,
                queues: BasicQueues::default(),
                input_tx,
                input_rx,
                commands: command_rx,
                capacity: Arc::new(Notify::new()),
                stats: stats_tx,
                counters: TunnelStats::default(),
                last_traffic: Instant::now(),
                probe_sent_at: None,
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

struct Slot {
    to_user: mpsc::Sender<Bytes>,
    remote_fin: bool,
    /// Mux mode: when the local client shut down its sending side. The FIN waits
    /// (see [`HALF_CLOSE_LINGER`]).
    local_eof_at: Option<Instant>,
    /// When data from the remote host last reached this connection.
    last_remote_data: Instant,
}

impl Slot {
    /// When a lingering half-closed connection gets its FIN.
    fn fin_due(&self) -> Option<Instant> {
        self.local_eof_at
            .map(|eof| eof.max(self.last_remote_data) + HALF_CLOSE_LINGER)
    }
}

/// What waits to go up in basic mode, in order.
enum Upload {
    Data(Bytes),
    /// The local connection ended: DisconnectToPort.
    Disconnect,
}

/// Basic mode's buffers (mux mode keeps the same data inside the smux session).
#[derive(Default)]
struct BasicQueues {
    up: std::collections::VecDeque<Upload>,
    up_bytes: usize,
    down: std::collections::VecDeque<Bytes>,
    down_bytes: usize,
}

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
    session: ClientSession,
    smux: Option<smux::Session>,
    streams: HashMap<Key, Slot>,
    basic: Option<Key>,
    basic_waiters: Vec<oneshot::Sender<Result<TunnelStream, TunnelError>>>,
    next_basic_id: Key,
    queues: BasicQueues,
    input_tx: mpsc::Sender<(Key, Option<Bytes>)>,
    input_rx: mpsc::Receiver<(Key, Option<Bytes>)>,
    commands: mpsc::Receiver<Command>,
    capacity: Arc<Notify>,
    stats: watch::Sender<TunnelStats>,
    counters: TunnelStats,
    last_traffic: Instant,
    /// When a liveness ping went out for a new connection, until traffic answers it.
    probe_sent_at: Option<Instant>,
}

/// Bytes of smux output allowed to wait for the channel window before user reads pause.
const MAX_PENDING_UPLOAD: usize = 256 * 1024;
/// Bytes received in basic mode allowed to wait for the connection before reads pause.
const MAX_PENDING_DOWNLOAD: usize = 256 * 1024;
/// Frames queued for a websocket's writer task.
const WRITER_QUEUE: usize = 256;
/// How long a connection whose client shut down its sending side stays open for the
/// reply once the remote host goes quiet. The agent turns a smux FIN into a full close
/// of its TCP connection ([A] `port_mux.go` fn `handleDataTransfer`: `io.Copy` then
/// `Close`), which would discard a reply still on its way; so the FIN waits until the
/// remote host closes or has sent nothing for this long.
pub const HALF_CLOSE_LINGER: Duration = Duration::from_secs(3);
/// Chunk size moved from smux to a connection's [`Downstream`].
const DELIVERY_CHUNK: usize = 16 * 1024;
/// Chunks a connection's [`Downstream`] may hold before delivery to it pauses.
const DELIVERY_QUEUE: usize = 8;

impl Driver {
    async fn run(mut self) -> TunnelEnd {
        let mut ping = tokio::time::interval(self.config.ping_interval);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Before this turn's inputs: messages made in it carry the wall clock of now.
            self.session.set_wall_clock(Instant::now(), unix_ms());
            self.pump_session();
            self.pump_upload();
            self.deliver();
            self.update_receive_ready();
            self.publish_stats();
            if let Some(why) = self.check_end() {
                return why;
            }
            if let Err(e) = self.push_frames() {
                if let Some(why) = self.reconnect(e).await {
                    return why;
                }
                continue;
            }
            let pending_upload = match &self.smux {
                Some(s) => s.pending_transmit(),
                None => self.queues.up_bytes,
            };
            let upload_room = pending_upload < MAX_PENDING_UPLOAD;
            // Receive backpressure the way the references get it: while the
            // connections' buffers are full, stop reading the websocket (their writes
            // block their websocket reader). Refusing messages instead would leave the
            // agent to resend them one per 100 ms tick.
            let download_room = self.download_room();
            let blocked_write = self.outbox.is_some();
            // Silence proves nothing while we do not read (the answer waits in the
            // socket) or while our writer is stuck behind a full socket (our ping is
            // queued behind the data): the clock restarts when both flow again. A
            // socket dead while writes are blocked ends in a write error.
            if !download_room || blocked_write {
                self.last_traffic = Instant::now();
                self.probe_sent_at = None;
            }
            // Messages waiting for acknowledgement on a quiet socket: probe it.
            let busy_probe_at = (self.probe_sent_at.is_none()
                && self.session.channel().in_flight_messages() > 0
                && self.writer.as_ref().is_some_and(|w| w.capacity() > 0))
            .then(|| self.last_traffic + self.config.probe_idle);
            if self.probe_sent_at.is_some_and(|t| self.last_traffic >= t) {
                self.probe_sent_at = None;
            }
            let probe_due = self.probe_sent_at.map(|t| t + self.config.probe_timeout);
            let deadline = [
                probe_due,
                busy_probe_at,
                self.session.poll_timeout(),
                self.smux.as_ref().and_then(smux::Session::poll_timeout),
                self.streams.values().filter_map(Slot::fin_due).min(),
            ]
            .into_iter()
            .flatten()
            .min();
            let capacity = self.capacity.clone();
            let (Some(reader), Some(writer)) = (self.reader.as_mut(), self.writer.clone()) else {
                return TunnelEnd::WebsocketLost("no websocket".into());
            };
            tokio::select! {
                permit = writer.reserve(), if blocked_write => match (permit, self.outbox.take()) {
                    (Ok(permit), Some(m)) => permit.send(m),
                    _ => {
                        if let Some(why) = self.reconnect("websocket writer stopped".into()).await { return why; }
                    }
                },
                msg = reader.next(), if download_room => match msg {
                    Some(Ok(Message::Binary(b))) => {
                        self.last_traffic = Instant::now();
                        log_frame_error(self.session.handle_frame(b, Instant::now()));
                    }
                    Some(Ok(Message::Text(t))) => {
                        self.last_traffic = Instant::now();
                        log_frame_error(self.session.handle_frame(Bytes::from(t.as_bytes().to_vec()), Instant::now()));
                    }
                    Some(Ok(Message::Close(frame))) => {
                        let why = format!("websocket closed by the service: {frame:?}");
                        if let Some(why) = self.reconnect(why).await { return why; }
                    }
                    Some(Ok(_)) => self.last_traffic = Instant::now(),
                    Some(Err(e)) => {
                        if let Some(why) = self.reconnect(e.to_string()).await { return why; }
                    }
                    None => {
                        if let Some(why) = self.reconnect("websocket closed".into()).await { return why; }
                    }
                },
                cmd = self.commands.recv() => match cmd {
                    Some(Command::Open(reply)) => self.open(reply),
                    Some(Command::Terminate(done)) => {
                        self.session.terminate(Instant::now());
                        self.drain_frames().await;
                        let _ = done.send(());
                        return TunnelEnd::Terminated;
                    }
                    None => {
                        self.session.terminate(Instant::now());
                        self.drain_frames().await;
                        return TunnelEnd::Dropped;
                    }
                },
                input = self.input_rx.recv(), if upload_room => {
                    if let Some((key, data)) = input { self.on_user_input(key, data); }
                }
                _ = capacity.notified() => {}
                _ = sleep_until(deadline) => {
                    let now = Instant::now();
                    if busy_probe_at.is_some_and(|d| d <= now) {
                        self.send_probe();
                    }
                    if probe_due.is_some_and(|d| d <= now) {
                        self.probe_sent_at = None;
                        // Unanswered only counts while we read: with reads paused for
                        // backpressure the pong simply waits in the socket.
                        if download_room {
                            if let Some(why) = self.reconnect("no answer to a ping on the websocket".into()).await { return why; }
                            continue;
                        }
                    }
                    self.session.handle_timeout(now);
                    if let Some(s) = self.smux.as_mut() { s.handle_timeout(now); }
                }
                _ = ping.tick() => {
                    debug!(
                        download_room,
                        upload_room,
                        smux_buffered = self.smux.as_ref().map(smux::Session::buffered_total),
                        smux_pending = self.smux.as_ref().map(smux::Session::pending_transmit),
                        in_flight = self.session.channel().in_flight_messages(),
                        to_send = self.session.channel().pending_transmit(),
                        expected = self.session.channel().expected_sequence_number(),
                        streams = self.streams.len(),
                        "data channel state"
                    );
                    if self.last_traffic.elapsed() > self.config.dead_after {
                        if let Some(why) = self.reconnect("no traffic on the websocket".into()).await { return why; }
                    } else if let Some(w) = &self.writer {
                        let _ = w.try_send(Message::Ping(Bytes::from_static(b"keepalive")));
                    }
                }
            }
        }
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

    /// Hands queued frames to the writer task without waiting; what does not fit stays
    /// in the session's queue (and one frame in `outbox`).
    fn push_frames(&mut self) -> Result<(), String> {
        let Some(writer) = &self.writer else {
            return Err("no websocket".into());
        };
        while self.outbox.is_none() {
            let Some(frame) = self.session.poll_transmit() else {
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

    /// Sends everything queued, waiting for the writer (used on the way out).
    async fn drain_frames(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let queued = self.outbox.take().into_iter();
        let rest: Vec<Message> = std::iter::from_fn(|| self.session.poll_transmit())
            .map(Message::Binary)
            .collect();
        for m in queued.chain(rest) {
            if writer.send(m).await.is_err() {
                return;
            }
        }
        // Dropping the sender lets the pump write what is queued, then close the socket.
        drop(writer);
        if let Some(task) = self.writer_task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
        }
    }

    /// Resumes the session after the websocket failed; `Some(reason)` ends the tunnel.
    async fn reconnect(&mut self, why: String) -> Option<TunnelEnd> {
        warn!(reason = %why, "data channel websocket lost");
        self.counters.last_error = Some(why.clone());
        self.session.on_disconnect();
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
        let outcome = self.resume_loop(resumer, why).await;
        self.counters.reconnecting = false;
        self.publish_stats();
        outcome
    }

    /// Retries ResumeSession and the websocket with capped, jittered exponential backoff
    /// until it works, the service refuses, or the channel gives up.
    async fn resume_loop(&mut self, resumer: Resumer, why: String) -> Option<TunnelEnd> {
        let mut attempt: u32 = 0;
        loop {
            self.publish_stats();
            if self.session.channel().close_reason().is_some() {
                return self.check_end().or(Some(TunnelEnd::WebsocketLost(why)));
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
                    let open = self.session.open_data_channel_message(&resumed.token_value);
                    if socket.send(Message::text(open)).await.is_err() {
                        continue;
                    }
                    self.attach_socket(socket);
                    self.last_traffic = Instant::now();
                    self.session.set_wall_clock(Instant::now(), unix_ms());
                    self.session.on_reconnect(Instant::now());
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

    /// Pings the websocket and expects some frame back within `probe_timeout`; not
    /// while reads are paused for backpressure or the writer is blocked (silence
    /// proves nothing then), nor with a probe already out.
    fn send_probe(&mut self) {
        if self.probe_sent_at.is_none()
            && self.outbox.is_none()
            && self.download_room()
            && let Some(w) = &self.writer
            && w.try_send(Message::Ping(Bytes::from_static(b"probe")))
                .is_ok()
        {
            debug!("probing a quiet websocket");
            self.probe_sent_at = Some(Instant::now());
        }
    }

    fn open(&mut self, reply: oneshot::Sender<Result<TunnelStream, TunnelError>>) {
        if let Some(why) = self.session.channel().close_reason() {
            let _ = reply.send(Err(TunnelError::Ended(format!("{why:?}"))));
            return;
        }
        // After a laptop sleep the websocket may be dead without knowing it: check.
        if self.last_traffic.elapsed() > self.config.probe_idle {
            self.send_probe();
        }
        match self.smux.as_mut() {
            Some(smux) => match smux.open_stream() {
                Ok(id) => {
                    let user = self.attach(id.get());
                    let _ = reply.send(Ok(user));
                }
                Err(e) => {
                    let _ = reply.send(Err(TunnelError::Ended(e.to_string())));
                }
            },
            None => {
                self.basic_waiters.push(reply);
                self.start_next_basic();
            }
        }
    }

    fn start_next_basic(&mut self) {
        while self.basic.is_none() && !self.basic_waiters.is_empty() {
            let reply = self.basic_waiters.remove(0);
            if reply.is_closed() {
                continue;
            }
            let key = self.next_basic_id;
            self.next_basic_id = self.next_basic_id.wrapping_add(1);
            let user = self.attach(key);
            if reply.send(Ok(user)).is_ok() {
                self.basic = Some(key);
            } else {
                self.streams.remove(&key);
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
        self.streams.insert(
            key,
            Slot {
                to_user,
                remote_fin: false,
                local_eof_at: None,
                last_remote_data: Instant::now(),
            },
        );
        self.counters.open_streams = self.streams.len();
        self.counters.total_streams += 1;
        user
    }

    fn on_user_input(&mut self, key: Key, data: Option<Bytes>) {
        if !self.streams.contains_key(&key) {
            return;
        }
        match (&mut self.smux, data) {
            (Some(smux), Some(d)) => {
                self.counters.bytes_up += d.len() as u64;
                let _ = smux.write_bytes(StreamId(key), d);
            }
            (Some(_), None) => {
                // Half-close: keep receiving; the FIN goes out in `finish_half_closed`.
                if let Some(slot) = self.streams.get_mut(&key) {
                    slot.local_eof_at = Some(Instant::now());
                }
            }
            (None, Some(d)) => {
                self.counters.bytes_up += d.len() as u64;
                self.queues.up_bytes += d.len();
                self.queues.up.push_back(Upload::Data(d));
            }
            (None, None) => {
                // [P] `basicportforwarding.go` fn `ReadStream`: local EOF → DisconnectToPort,
                // after everything read before it.
                self.queues.up.push_back(Upload::Disconnect);
                self.drop_stream(key);
                self.basic = None;
                self.queues.down.clear();
                self.queues.down_bytes = 0;
                self.start_next_basic();
            }
        }
    }

    fn drop_stream(&mut self, key: Key) {
        self.streams.remove(&key);
        self.counters.open_streams = self.streams.len();
    }

    fn pump_session(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                SessionEvent::Output(bytes) => {
                    self.counters.bytes_down += bytes.len() as u64;
                    match (&mut self.smux, self.basic) {
                        (Some(smux), _) => {
                            if let Err(e) = smux.handle_input(&bytes) {
                                self.counters.last_error = Some(e.to_string());
                            }
                        }
                        (None, Some(_)) => {
                            self.queues.down_bytes += bytes.len();
                            self.queues.down.push_back(bytes);
                        }
                        // The receive gate refuses output while no connection is open.
                        (None, None) => {}
                    }
                }
                SessionEvent::Flag(Flag::ConnectToPortError) => {
                    self.counters.connect_to_port_errors += 1;
                    warn!("the agent could not connect to the remote port");
                    self.counters.last_error =
                        Some("the agent could not connect to the remote host and port".into());
                }
                SessionEvent::Closed(end) => {
                    self.counters.last_error = Some(end.to_string());
                }
                _ => {}
            }
        }
    }

    /// Moves queued upload bytes into the channel while its window has room.
    fn pump_upload(&mut self) {
        let now = Instant::now();
        let max = self.config.max_payload;
        while self.session.can_send(max) {
            let result = match self.smux.as_mut() {
                Some(smux) => match smux.poll_transmit(max) {
                    Some(chunk) => self.session.send_output(chunk, now),
                    None => break,
                },
                None => match self.queues.up.pop_front() {
                    Some(Upload::Data(mut d)) => {
                        let piece = d.split_to(d.len().min(max));
                        self.queues.up_bytes -= piece.len();
                        if !d.is_empty() {
                            self.queues.up.push_front(Upload::Data(d));
                        }
                        self.session.send_output(piece, now)
                    }
                    Some(Upload::Disconnect) => self.session.send_flag(Flag::DisconnectToPort, now),
                    None => break,
                },
            };
            if let Err(e) = result {
                // Only a closed session refuses once the window has room.
                self.counters.last_error = Some(e.to_string());
                break;
            }
        }
    }

    /// Basic mode: moves received bytes to the connection's writer task.
    fn deliver_basic(&mut self) {
        let Some(slot) = self.basic.and_then(|k| self.streams.get(&k)) else {
            return;
        };
        while let Some(front) = self.queues.down.front() {
            let Ok(permit) = slot.to_user.try_reserve() else {
                break;
            };
            self.queues.down_bytes -= front.len();
            permit.send(self.queues.down.pop_front().unwrap_or_default());
        }
    }

    /// Moves received smux data to the connections' writer tasks while they have room.
    fn deliver(&mut self) {
        let Some(smux) = self.smux.as_mut() else {
            return self.deliver_basic();
        };
        while let Some(ev) = smux.poll_event() {
            match ev {
                smux::Event::Finished(id) => {
                    if let Some(slot) = self.streams.get_mut(&id.get()) {
                        slot.remote_fin = true;
                    }
                }
                smux::Event::Closed(reason) => {
                    self.counters.last_error = Some(format!("smux: {reason}"));
                }
                smux::Event::Readable(_) | smux::Event::Accepted(_) => {}
            }
        }
        let mut finished = Vec::new();
        let now = Instant::now();
        for (&key, slot) in self.streams.iter_mut() {
            loop {
                let Ok(permit) = slot.to_user.try_reserve() else {
                    break;
                };
                match smux.read(StreamId(key), DELIVERY_CHUNK) {
                    Ok(StreamRead::Data(b)) => {
                        slot.last_remote_data = now;
                        permit.send(b);
                    }
                    Ok(StreamRead::Blocked) => break,
                    Ok(StreamRead::Eof) | Err(_) => {
                        finished.push(key);
                        break;
                    }
                }
            }
            if slot.remote_fin && smux.buffered(StreamId(key)) == 0 && !finished.contains(&key) {
                finished.push(key);
            }
            // Nobody reads this connection any more (the client closed it entirely):
            // no reply can reach anyone, so no linger.
            if slot.to_user.is_closed() && !finished.contains(&key) {
                finished.push(key);
            }
            if slot.fin_due().is_some_and(|due| due <= now) && !finished.contains(&key) {
                debug!(stream = key, "half-closed connection quiet; sending FIN");
                finished.push(key);
            }
        }
        for key in finished {
            let _ = smux.close(StreamId(key));
            self.streams.remove(&key);
        }
        self.counters.open_streams = self.streams.len();
    }

    /// True while received data has somewhere to go. (Reading never waits for writing:
    /// the peer may be blocked writing to us; the channel bounds its ack queue instead.)
    fn download_room(&self) -> bool {
        match &self.smux {
            Some(smux) => smux.wants_input(),
            None => self.queues.down_bytes < MAX_PENDING_DOWNLOAD,
        }
    }

    /// In basic mode with no connection open, output is refused unacknowledged, as [P]
    /// drops it until a local client connects (`portsession.go` fn `Initialize`,
    /// `IsStreamNotSet`); the agent sends it again later.
    fn update_receive_ready(&mut self) {
        let ready = self.smux.is_some() || self.basic.is_some();
        self.session.set_receive_ready(ready);
    }

    fn publish_stats(&mut self) {
        self.counters.retransmissions = self.session.channel().stats().retransmissions;
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

    fn check_end(&self) -> Option<TunnelEnd> {
        if let Some(reason) = self.session.channel().close_reason() {
            return Some(match reason {
                crate::proto::channel::CloseReason::ChannelClosed(c) => TunnelEnd::ChannelClosed {
                    output: c.output.clone(),
                },
                crate::proto::channel::CloseReason::ResendTimeout { sequence_number } => {
                    TunnelEnd::ResendTimeout {
                        sequence_number: *sequence_number,
                    }
                }
            });
        }
        if let Some(smux) = &self.smux
            && let Some(reason) = smux.close_reason()
        {
            return Some(TunnelEnd::Smux(reason.to_string()));
        }
        None
    }
}
