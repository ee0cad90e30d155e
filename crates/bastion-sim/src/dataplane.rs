//! The data plane: `GET /v1/data-channel/{session_id}` websockets and the relay between
//! the client and the agent of each session.
//!
//! Per session, once the first websocket has opened the data channel:
//!
//! ```text
//!  client ws ─reader─▶ pipe ─to_agent pump (faults)─▶ from_client ─▶ agent
//!  client ws ◀─writer─ attachment ◀─to_client pump (faults)◀─ to_client ◀─ agent
//! ```
//!
//! * Before the upgrade, [`admission`] checks the request's SigV4 signature and
//!   cell-number; a refused upgrade gets HTTP 403 and never becomes a websocket.
//! * The first websocket message must be the TEXT `OpenDataChannelInput` with the
//!   session's current token; tokens are single-use and expire ([`SimConfig::token_ttl`]).
//!   A bad token is a [`ViolationKind::BadToken`] and the socket is closed with 1008.
//! * The first attach starts the agent; a later attach (after ResumeSession) replaces the
//!   previous websocket and, if it had gone, sends `start_publication` to the agent. A
//!   websocket that goes away sends `pause_publication` to the agent; agent messages sent
//!   while no websocket is attached are lost, as on a real network.
//! * Every websocket is closed with code 1000 after [`SimConfig::ws_recycle`].
//! * When the agent ends, the service sends `channel_closed` to the attached client, then
//!   closes the socket with 1000, and the session is Terminated.
//! * TerminateSession, the idle timeout and the maximum session duration close the
//!   agent's input; the agent then ends.
//!
//! [`SimConfig::token_ttl`]: super::SimConfig::token_ttl
//! [`SimConfig::ws_recycle`]: super::SimConfig::ws_recycle

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use uuid::Uuid;

use super::Shared;
use super::admission;
use super::agent::{self, AckDelay, AgentConfig, AgentExit, SessionKind};
use super::clock;
use super::faults::{Direction, FaultPipe};
use super::report::ViolationKind;
use super::session::{Attachment, SimSession, Status, ToAgent, WsCommand};
use super::sigv4;
use bastion_proto::kind::{MessageType, PayloadType};
use bastion_proto::message::ClientMessage;
use bastion_proto::payload::{ChannelClosed, OpenDataChannelInput, to_json};

/// Close code for a policy violation (bad OpenDataChannel or token).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code for a normal close (recycle, end of session).
pub const CLOSE_NORMAL: u16 = 1000;
/// `channel_closed` Output when the idle timeout ends a session.
pub const IDLE_TIMEOUT_OUTPUT: &str =
    "Your session timed out due to inactivity and has been terminated.";
/// `channel_closed` Output when the maximum session duration ends a session.
pub const MAX_DURATION_OUTPUT: &str =
    "Your session has been terminated because it reached the maximum session duration.";

/// How long a stopping agent may take before it is abandoned, and how long a stopping
/// session waits for a websocket that does not read.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for the client's close frame after ours.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// Capacity of the per-session and per-websocket queues.
const QUEUE: usize = 1024;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/data-channel/{session_id}", get(upgrade))
        .with_state(shared)
}

/// Checks the upgrade ([`admission::admit`]: signature, cell-number) before upgrading;
/// a refusal is a 403 with a one-line text body.
async fn upgrade(
    State(shared): State<Arc<Shared>>,
    Path(session_id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(session) = shared.session(&session_id) else {
        return (StatusCode::NOT_FOUND, "unknown session").into_response();
    };
    let req = sigv4::Request {
        method: method.as_str(),
        path: uri.path(),
        query: uri.query().unwrap_or_default(),
        headers: &headers,
    };
    if let Err(refusal) = admission::admit(&shared, &session, &req, clock::unix_secs()) {
        return (StatusCode::FORBIDDEN, format!("{refusal}\n")).into_response();
    }
    ws.on_upgrade(move |socket| connection(shared, session, socket))
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// True for `input_stream_data` / `output_stream_data` frames (the idle timeout counts
/// only these).
fn is_stream_data(frame: &[u8]) -> bool {
    frame.get(4..36).is_some_and(|t| {
        let end = t
            .iter()
            .rposition(|&b| b != 0 && b != b' ')
            .map_or(0, |e| e + 1);
        let t = &t[..end];
        t == b"input_stream_data" || t == b"output_stream_data"
    })
}

/// A service-originated message: seq 0, Flags 3, as the agent's control messages.
fn service_message(
    message_type: MessageType,
    payload_type: PayloadType,
    payload: Vec<u8>,
) -> Bytes {
    let msg = ClientMessage {
        message_type,
        schema_version: 1,
        created_date: clock::unix_ms(),
        sequence_number: 0,
        flags: 3,
        message_id: Uuid::new_v4(),
        payload_type,
        payload: Bytes::from(payload),
    };
    msg.encode().unwrap_or_default()
}

/// True for the service's `pause_publication` / `start_publication` (not client frames).
fn is_publication(frame: &[u8]) -> bool {
    frame.get(4..36).is_some_and(|t| {
        t.starts_with(b"pause_publication ") || t.starts_with(b"start_publication ")
    })
}

fn publication(message_type: MessageType) -> Bytes {
    service_message(message_type, PayloadType::Undefined, b"{}".to_vec())
}

/// The `channel_closed` message for `session` (golden vector `channel_closed_example`).
pub fn channel_closed(session_id: &str, target: &str, output: &str) -> Bytes {
    let message_id = Uuid::new_v4();
    let now = clock::unix_ms();
    let payload = ChannelClosed {
        message_id: message_id.to_string(),
        created_date: clock::iso8601(now),
        destination_id: target.to_owned(),
        session_id: session_id.to_owned(),
        message_type: "channel_closed".to_owned(),
        schema_version: 1,
        output: output.to_owned(),
    };
    let msg = ClientMessage {
        message_type: MessageType::ChannelClosed,
        schema_version: 1,
        created_date: now,
        sequence_number: 0,
        flags: 3,
        message_id,
        payload_type: PayloadType::Undefined,
        payload: Bytes::from(to_json(&payload)),
    };
    msg.encode().unwrap_or_default()
}

async fn close_with(socket: &mut WebSocket, code: u16, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, socket.send(Message::Close(Some(frame)))).await;
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        while let Some(Ok(m)) = socket.recv().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
    })
    .await;
}

/// Reads and checks OpenDataChannel. Returns the input if the token is good.
async fn open_data_channel(
    shared: &Shared,
    session: &SimSession,
    socket: &mut WebSocket,
) -> Option<OpenDataChannelInput> {
    let report = &session.report;
    let deadline = Instant::now() + shared.config.open_timeout;
    let text = loop {
        let msg = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => {
                report.violation(
                    ViolationKind::BadOpenDataChannel,
                    format!(
                        "no OpenDataChannel message within {:?} of the websocket upgrade",
                        shared.config.open_timeout
                    ),
                );
                close_with(socket, CLOSE_POLICY, "OpenDataChannel expected").await;
                return None;
            }
            Ok(None) | Ok(Some(Err(_))) | Ok(Some(Ok(Message::Close(_)))) => {
                tracing::debug!(session_id = %session.id, "websocket closed before OpenDataChannel");
                return None;
            }
            Ok(Some(Ok(m))) => m,
        };
        match msg {
            Message::Text(t) => break t,
            Message::Ping(_) | Message::Pong(_) => continue,
            other => {
                let len = match &other {
                    Message::Binary(b) => b.len(),
                    _ => 0,
                };
                report.violation(
                    ViolationKind::BadOpenDataChannel,
                    format!("first websocket message is binary ({len} bytes), not the OpenDataChannel TEXT message"),
                );
                close_with(socket, CLOSE_POLICY, "OpenDataChannel expected").await;
                return None;
            }
        }
    };
    let input: OpenDataChannelInput = match serde_json::from_str(text.as_str()) {
        Ok(i) => i,
        Err(e) => {
            report.violation(
                ViolationKind::BadOpenDataChannel,
                format!("OpenDataChannel is not valid JSON of the expected shape: {e}"),
            );
            close_with(socket, CLOSE_POLICY, "malformed OpenDataChannel").await;
            return None;
        }
    };
    if input.message_schema_version != "1.0" {
        report.violation(
            ViolationKind::BadOpenDataChannel,
            format!(
                "MessageSchemaVersion is {:?}, expected \"1.0\"",
                input.message_schema_version
            ),
        );
    }
    if input.request_id.len() < 16 {
        report.violation(
            ViolationKind::BadOpenDataChannel,
            format!(
                "RequestId {:?} is shorter than 16 characters",
                input.request_id
            ),
        );
    }
    if input.client_id.is_empty() {
        report.violation(ViolationKind::BadOpenDataChannel, "ClientId is missing");
    }
    if input.client_version.is_empty() {
        report.violation(
            ViolationKind::BadOpenDataChannel,
            "ClientVersion is missing",
        );
    }
    admission::check_client_version(
        report,
        shared.config.min_client_version.as_deref(),
        "OpenDataChannel",
        &input.client_version,
    );
    if let Err(e) = session.consume_token(&input.token_value) {
        report.violation(
            ViolationKind::BadToken,
            format!("OpenDataChannel refused: {}", e.detail()),
        );
        tracing::info!(session_id = %session.id, reason = e.detail(), "data channel refused");
        close_with(socket, CLOSE_POLICY, "invalid token").await;
        return None;
    }
    Some(input)
}

/// How one websocket ended.
enum End {
    /// The client closed or dropped it.
    Gone,
    /// Drop it without a close frame.
    Abrupt,
    /// A newer websocket of the session replaced it (a resume): drop it without a
    /// close frame, after looking at what the client sent last.
    Superseded,
    /// Close it with this code.
    Close(u16, &'static str),
}

async fn connection(shared: Arc<Shared>, session: Arc<SimSession>, mut socket: WebSocket) {
    let Some(input) = open_data_channel(&shared, &session, &mut socket).await else {
        return;
    };
    let conn_id = shared.next_conn_id.fetch_add(1, Ordering::SeqCst);
    let (tx, mut rx) = mpsc::channel::<WsCommand>(QUEUE);
    let kill = Arc::new(Notify::new());
    let Some(to_agent) = attach(&shared, &session, conn_id, tx, kill.clone(), &input) else {
        close_with(&mut socket, CLOSE_POLICY, "session terminated").await;
        return;
    };
    tracing::info!(
        session_id = %session.id,
        conn_id,
        client_version = %input.client_version,
        "data channel attached"
    );

    let attached_at = Instant::now();
    let recycle_at = shared.config.ws_recycle.map(|d| attached_at + d);
    let mut cut_at = shared
        .faults_mut()
        .cut_after_ms
        .map(|ms| attached_at + Duration::from_millis(ms));
    let bytes = AtomicU64::new(0);
    let over_budget = |n: usize| {
        let total = bytes.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        shared
            .faults_mut()
            .cut_after_bytes
            .is_some_and(|limit| total >= limit)
    };

    let (mut sink, mut stream) = socket.split();
    let end = {
        let reader = async {
            loop {
                frozen(&shared).await;
                let frame = match stream.next().await {
                    Some(Ok(Message::Binary(b))) => b,
                    Some(Ok(Message::Text(t))) => Bytes::from(t),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(Message::Close(_))) => {
                        session.report.count(|c| c.close_frames_from_client += 1);
                        return End::Gone;
                    }
                    Some(Err(_)) | None => return End::Gone,
                };
                let n = frame.len();
                if to_agent.send(ToAgent::Client(frame)).await.is_err() {
                    // The agent is gone; the session is ending. Keep reading so the
                    // channel_closed and the close frame can still go out.
                    continue;
                }
                if over_budget(n) && may_cut(&shared, &session) {
                    return End::Abrupt;
                }
            }
        };
        let writer = async {
            loop {
                let command = rx.recv().await;
                frozen(&shared).await;
                match command {
                    Some(WsCommand::Frame(b)) => {
                        let n = b.len();
                        if sink.send(Message::Binary(b)).await.is_err() {
                            return End::Gone;
                        }
                        if over_budget(n) && may_cut(&shared, &session) {
                            return End::Abrupt;
                        }
                    }
                    Some(WsCommand::Close(code, reason)) => return End::Close(code, reason),
                    None => return End::Abrupt,
                }
            }
        };
        tokio::pin!(reader, writer);
        loop {
            tokio::select! {
                e = &mut reader => break e,
                e = &mut writer => break e,
                _ = kill.notified() => break End::Superseded,
                _ = sleep_until(recycle_at.unwrap_or_else(far_future)), if recycle_at.is_some() => {
                    break End::Close(CLOSE_NORMAL, "websocket recycled");
                }
                _ = sleep_until(cut_at.unwrap_or_else(far_future)), if cut_at.is_some() => {
                    if may_cut(&shared, &session) {
                        break End::Abrupt;
                    }
                    cut_at = None;
                }
            }
        }
    };
    // Detach first: the session must not wait for a client that does not answer our
    // close frame.
    detach(&session, conn_id);
    let how = match end {
        End::Gone => "client closed",
        End::Abrupt => "dropped",
        End::Superseded => "superseded",
        End::Close(code, reason) => {
            let frame = CloseFrame {
                code,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = tokio::time::timeout(CLOSE_GRACE, sink.send(Message::Close(Some(frame)))).await;
            let _ = tokio::time::timeout(CLOSE_GRACE, async {
                while let Some(Ok(m)) = stream.next().await {
                    if matches!(m, Message::Close(_)) {
                        break;
                    }
                }
            })
            .await;
            reason
        }
    };
    if matches!(end, End::Superseded) {
        // What the client sent last on the websocket it left: a Close frame here is
        // one the references never send when they reconnect.
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            while let Some(Ok(m)) = stream.next().await {
                if matches!(m, Message::Close(_)) {
                    session.report.count(|c| c.close_frames_from_client += 1);
                    break;
                }
            }
        })
        .await;
    }
    drop((sink, stream));
    tracing::info!(session_id = %session.id, conn_id, how, "data channel detached");
}

/// Waits while the `freeze_websockets` knob is set (a dead path).
async fn frozen(shared: &Shared) {
    while shared.faults().freeze_websockets {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts a cut if the session may still be cut (`max_cuts`).
fn may_cut(shared: &Shared, session: &SimSession) -> bool {
    let max = shared.faults_mut().max_cuts;
    let mut inner = session.lock();
    if max.is_some_and(|m| inner.cuts >= m) {
        return false;
    }
    inner.cuts += 1;
    drop(inner);
    session.report.count(|c| c.faults_injected += 1);
    tracing::info!(session_id = %session.id, "fault: cutting the websocket");
    true
}

fn attach(
    shared: &Arc<Shared>,
    session: &Arc<SimSession>,
    conn_id: u64,
    tx: mpsc::Sender<WsCommand>,
    kill: Arc<Notify>,
    input: &OpenDataChannelInput,
) -> Option<mpsc::Sender<ToAgent>> {
    let mut inner = session.lock();
    if matches!(inner.status, Status::Terminating | Status::Terminated) {
        return None;
    }
    if !inner.request_ids.insert(input.request_id.clone()) {
        session.report.violation(
            ViolationKind::BadOpenDataChannel,
            format!(
                "RequestId {} reused (a new one is expected per connection)",
                input.request_id
            ),
        );
    }
    if let Some(prev) = &inner.client_id
        && *prev != input.client_id
    {
        session.report.violation(
            ViolationKind::BadOpenDataChannel,
            format!(
                "ClientId changed from {prev} to {} on reconnect",
                input.client_id
            ),
        );
    }
    inner.client_id = Some(input.client_id.clone());
    inner.client_version = Some(input.client_version.clone());
    if let Some(old) = inner.attached.replace(Attachment { conn_id, tx, kill }) {
        old.kill.notify_one();
    }
    inner.status = Status::Connected;
    session.report.count(|c| c.connections += 1);
    if !inner.agent_started {
        inner.agent_started = true;
        start_runtime(shared, session, &mut inner);
    } else if inner.paused {
        inner.paused = false;
        enqueue_service(&inner, publication(MessageType::StartPublication));
    }
    inner.to_agent.clone()
}

/// Queues a service message for the agent, after every earlier one.
fn enqueue_service(inner: &super::session::Inner, frame: Bytes) {
    if let Some(q) = &inner.to_agent_service {
        let _ = q.send(frame);
    }
}

fn detach(session: &SimSession, conn_id: u64) {
    let mut inner = session.lock();
    if inner.attached.as_ref().is_none_or(|a| a.conn_id != conn_id) {
        return;
    }
    inner.attached = None;
    if inner.status == Status::Connected {
        inner.status = Status::Disconnected;
        if inner.to_agent.is_some() {
            inner.paused = true;
            enqueue_service(&inner, publication(MessageType::PausePublication));
        }
    }
}

fn start_runtime(
    shared: &Arc<Shared>,
    session: &Arc<SimSession>,
    inner: &mut super::session::Inner,
) {
    let (pipe_tx, pipe_rx) = mpsc::channel::<ToAgent>(QUEUE);
    let (in_tx, in_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (out_tx, out_rx) = mpsc::channel::<Bytes>(QUEUE);
    let (exit_tx, exit_rx) = oneshot::channel();
    let (service_tx, mut service_rx) = mpsc::unbounded_channel::<Bytes>();
    {
        let pipe = pipe_tx.clone();
        tokio::spawn(async move {
            while let Some(frame) = service_rx.recv().await {
                if pipe.send(ToAgent::Service(frame)).await.is_err() {
                    return;
                }
            }
        });
    }
    inner.to_agent_service = Some(service_tx);
    inner.to_agent = Some(pipe_tx);

    let faults = shared.faults();
    #[allow(clippy::field_reassign_with_default)]
    let cfg = {
        let mut cfg = AgentConfig::default();
        cfg.agent_version = shared.config.agent_version.clone();
        cfg.pacing = shared.config.agent_pacing;
        cfg.min_client_version = shared.config.min_client_version.clone();
        cfg.handshake_delay = faults
            .handshake_delay_ms
            .map_or(shared.config.agent_handshake_delay, Duration::from_millis);
        let knobs = shared.clone();
        cfg.ack_delay = AckDelay::live(move || {
            knobs
                .faults_mut()
                .ack_delay_ms
                .map_or(knobs.config.agent_ack_delay, Duration::from_millis)
        });
        cfg.kind = match &session.properties {
            Some(p) => SessionKind::Port {
                properties: p.clone(),
            },
            None => SessionKind::Shell,
        };
        cfg
    };
    tokio::spawn(to_agent_pump(
        shared.clone(),
        session.clone(),
        pipe_rx,
        in_tx,
    ));
    tokio::spawn(agent_task(session.clone(), cfg, in_rx, out_tx, exit_tx));
    tokio::spawn(to_client_pump(
        shared.clone(),
        session.clone(),
        out_rx,
        exit_rx,
    ));
}

async fn to_agent_pump(
    shared: Arc<Shared>,
    session: Arc<SimSession>,
    mut rx: mpsc::Receiver<ToAgent>,
    agent_in: mpsc::Sender<Bytes>,
) {
    let mut pipe = FaultPipe::new(Direction::ToAgent, session.ordinal, shared.faults().seed);
    let mut stop = session.stop.subscribe();
    'run: loop {
        let deadline = pipe.next_deadline();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break 'run,
            item = rx.recv() => match item {
                None => break 'run,
                Some(ToAgent::Client(frame)) => {
                    if is_stream_data(&frame) {
                        session.touch();
                    }
                    let faults = shared.faults();
                    pipe.push(frame, &faults, Instant::now(), &session.report);
                }
                Some(ToAgent::Service(frame)) => pipe.push_clean(frame, Instant::now()),
            },
            _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {}
        }
        while let Some(frame) = pipe.pop_ready(Instant::now()) {
            if !is_publication(&frame) {
                session.report.count(|c| c.frames_from_client += 1);
            }
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break 'run,
                r = agent_in.send(frame) => if r.is_err() { break 'run },
            }
        }
    }
    // Dropping `agent_in` closes the agent's input: the agent ends.
}

async fn agent_task(
    session: Arc<SimSession>,
    cfg: AgentConfig,
    from_client: mpsc::Receiver<Bytes>,
    to_client: mpsc::Sender<Bytes>,
    exit_tx: oneshot::Sender<Option<AgentExit>>,
) {
    let mut stop = session.stop.subscribe();
    let run = agent::run_agent(
        cfg,
        session.id.clone(),
        session.report.clone(),
        from_client,
        to_client,
    );
    tokio::pin!(run);
    let exit = tokio::select! {
        e = &mut run => Some(e),
        _ = async {
            let _ = stop.wait_for(|s| *s).await;
            tokio::time::sleep(STOP_GRACE).await;
        } => {
            tracing::warn!(session_id = %session.id, "agent did not stop within {STOP_GRACE:?}; abandoned");
            None
        }
    };
    let _ = exit_tx.send(exit);
}

/// Sends a command to the attached websocket, giving up [`STOP_GRACE`] after the session
/// started stopping (a client that does not read must not hold the session forever).
async fn send_to_ws(session: &SimSession, tx: &mpsc::Sender<WsCommand>, cmd: WsCommand) -> bool {
    let mut stop = session.stop.subscribe();
    let send = tx.send(cmd);
    tokio::pin!(send);
    tokio::select! {
        r = &mut send => return r.is_ok(),
        _ = stop.wait_for(|s| *s) => {}
    }
    matches!(tokio::time::timeout(STOP_GRACE, send).await, Ok(Ok(())))
}

async fn deliver_ready(session: &SimSession, pipe: &mut FaultPipe) {
    while let Some(frame) = pipe.pop_ready(Instant::now()) {
        let tx = session.lock().attached.as_ref().map(|a| a.tx.clone());
        // No websocket attached: the message is lost (the agent retransmits).
        if let Some(tx) = tx {
            if is_stream_data(&frame) {
                session.touch();
            }
            send_to_ws(session, &tx, WsCommand::Frame(frame)).await;
        }
    }
}

async fn to_client_pump(
    shared: Arc<Shared>,
    session: Arc<SimSession>,
    mut rx: mpsc::Receiver<Bytes>,
    mut exit_rx: oneshot::Receiver<Option<AgentExit>>,
) {
    let mut pipe = FaultPipe::new(Direction::ToClient, session.ordinal, shared.faults().seed);
    let exit = loop {
        let deadline = pipe.next_deadline();
        tokio::select! {
            biased;
            frame = rx.recv() => match frame {
                Some(frame) => {
                    session.report.count(|c| c.frames_to_client += 1);
                    let faults = shared.faults();
                    pipe.push(frame, &faults, Instant::now(), &session.report);
                }
                None => break (&mut exit_rx).await.ok().flatten(),
            },
            e = &mut exit_rx => break e.ok().flatten(),
            _ = sleep_until(deadline.unwrap_or_else(far_future)), if deadline.is_some() => {}
        }
        deliver_ready(&session, &mut pipe).await;
    };
    // What the agent queued before it returned still goes out, then channel_closed.
    while let Ok(frame) = rx.try_recv() {
        session.report.count(|c| c.frames_to_client += 1);
        let faults = shared.faults();
        pipe.push(frame, &faults, Instant::now(), &session.report);
    }
    pipe.release_held();
    while let Some(at) = pipe.next_deadline() {
        sleep_until(at).await;
        deliver_ready(&session, &mut pipe).await;
    }
    finish(&session, exit).await;
}

/// Ends a session whose agent has returned: `channel_closed` to the attached client,
/// close 1000, status Terminated.
async fn finish(session: &SimSession, exit: Option<AgentExit>) {
    let (agent_output, reason) = match exit {
        Some(e) => (e.output, format!("{:?}", e.reason)),
        None => (String::new(), "Abandoned".to_owned()),
    };
    let (output, attached) = {
        let mut inner = session.lock();
        let output = inner.termination_output.clone().unwrap_or(agent_output);
        inner.status = Status::Terminated;
        inner.end_unix_ms = Some(clock::unix_ms());
        inner.token = None;
        inner.to_agent = None;
        inner.to_agent_service = None;
        inner.final_output = Some(output.clone());
        inner.exit_reason = Some(reason.clone());
        (output, inner.attached.take())
    };
    session.stop.send_replace(true);
    tracing::info!(session_id = %session.id, exit = %reason, "session terminated");
    if let Some(att) = attached {
        let frame = channel_closed(&session.id, &session.target, &output);
        if send_to_ws(session, &att.tx, WsCommand::Frame(frame)).await {
            send_to_ws(
                session,
                &att.tx,
                WsCommand::Close(CLOSE_NORMAL, "session terminated"),
            )
            .await;
        }
    }
    session.done.send_replace(true);
}

/// Requests the end of a session. `output` (if any) becomes the `channel_closed`
/// Output; otherwise the agent's is used. Idempotent.
pub(crate) fn terminate(session: &SimSession, output: Option<String>) {
    let mut inner = session.lock();
    if matches!(inner.status, Status::Terminating | Status::Terminated) {
        return;
    }
    if output.is_some() {
        inner.termination_output = output;
    }
    if inner.agent_started {
        inner.status = Status::Terminating;
        drop(inner);
        session.stop.send_replace(true);
    } else {
        inner.status = Status::Terminated;
        inner.end_unix_ms = Some(clock::unix_ms());
        inner.token = None;
        inner.final_output = inner.termination_output.clone();
        drop(inner);
        session.stop.send_replace(true);
        session.done.send_replace(true);
    }
}

/// Starts the idle-timeout / maximum-duration watchdog of a new session.
pub(crate) fn supervise(shared: &Shared, session: &Arc<SimSession>) {
    let idle = shared.config.idle_timeout;
    let max = shared.config.max_session_duration;
    if idle.is_none() && max.is_none() {
        return;
    }
    let session = session.clone();
    tokio::spawn(async move {
        let mut stop = session.stop.subscribe();
        let max_at = max.map(|d| session.started_at + d);
        loop {
            let idle_at = idle.map(|d| session.last_activity() + d);
            let at = match (idle_at, max_at) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or_else(far_future),
            };
            tokio::select! {
                _ = stop.wait_for(|s| *s) => return,
                _ = sleep_until(at) => {}
            }
            let now = Instant::now();
            if max_at.is_some_and(|t| now >= t) {
                tracing::info!(session_id = %session.id, "maximum session duration reached");
                terminate(&session, Some(MAX_DURATION_OUTPUT.to_owned()));
                return;
            }
            if idle.is_some_and(|d| now >= session.last_activity() + d) {
                tracing::info!(session_id = %session.id, "idle timeout");
                terminate(&session, Some(IDLE_TIMEOUT_OUTPUT.to_owned()));
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_closed_matches_golden_shape() {
        let frame = channel_closed("user-0123456789abcdef0", "i-0123456789abcdef0", "bye");
        let msg = ClientMessage::decode(frame).unwrap();
        assert_eq!(msg.message_type, MessageType::ChannelClosed);
        assert_eq!(msg.flags, 3);
        assert_eq!(msg.sequence_number, 0);
        assert_eq!(msg.payload_type, PayloadType::Undefined);
        let v: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        let mut expected = vec![
            "CreatedDate",
            "DestinationId",
            "MessageId",
            "MessageType",
            "Output",
            "SchemaVersion",
            "SessionId",
        ];
        expected.sort();
        assert_eq!(keys, expected);
        assert_eq!(v["MessageId"], msg.message_id.to_string());
        assert_eq!(v["Output"], "bye");
        assert_eq!(v["SchemaVersion"], 1);
        // Field order as the plugin's struct (golden vector).
        let s = std::str::from_utf8(&msg.payload).unwrap();
        assert!(s.starts_with("{\"MessageId\":"), "{s}");
    }

    #[test]
    fn publication_messages() {
        for t in [MessageType::PausePublication, MessageType::StartPublication] {
            let msg = ClientMessage::decode(publication(t.clone())).unwrap();
            assert_eq!(msg.message_type, t);
            assert_eq!(msg.flags, 3);
            assert_eq!(msg.sequence_number, 0);
            assert!(!msg.payload.is_empty());
        }
        assert!(is_stream_data(
            &ClientMessage {
                message_type: MessageType::OutputStreamData,
                schema_version: 1,
                created_date: 1,
                sequence_number: 0,
                flags: 0,
                message_id: Uuid::nil(),
                payload_type: PayloadType::Output,
                payload: Bytes::from_static(b"x"),
            }
            .encode()
            .unwrap()
        ));
        assert!(!is_stream_data(&publication(MessageType::StartPublication)));
    }
}
