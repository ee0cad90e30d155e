//! The agent's event loop: frame intake and validation, the receive side of the data
//! channel ([A] `agent/session/datachannel/datachannel.go` fn
//! `dataChannelIncomingMessageHandler`, `handleStreamDataMessage`,
//! `processStreamDataMessage`, `handleAcknowledgeMessage`), the handshake ([A] fn
//! `PerformHandshake`, `handleHandshakeResponse`), the session lifecycle ([A]
//! `agent/session/plugins/sessionplugin/sessionplugin.go` fn `Execute`) and the dispatch to
//! the port and shell plugins.
//!
//! The Go agent runs the websocket reader, the resend scheduler and the plugin pumps as
//! goroutines; here one task owns all the state and `select!`s over their inputs, which
//! gives the same observable behaviour without data races (where the Go code races, the
//! order chosen is noted).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior, interval_at};

use super::datachannel::{DataChannel, HandlerResult, RESEND_INTERVAL};
use super::pacer::sleep_precise;
use super::port::{Basic, Mux, PortParams};
use super::shell::Shell;
use super::{AgentConfig, AgentExit, ExitReason, SessionKind};
use crate::report::{SessionReport, ViolationKind};
use bastion_proto::kind::{MessageType, PayloadType};
use bastion_proto::message::{
    ClientMessage, DecodeError, PAYLOAD_DIGEST_OFFSET, PAYLOAD_LENGTH_OFFSET, sha256,
};
use bastion_proto::payload::{
    ActionStatus, HandshakeComplete, HandshakeResponse, SessionTypeRequest, action_type, from_json,
    to_json,
};

/// [A] `datachannel.go` const `handshakeTimeout`.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// [A] fn `PrepareToCloseChannel`: wait at most this long for the outgoing buffer to empty.
const PREPARE_TO_CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// [A] fn `PerformHandshake`: the timeout error text.
pub(super) const HANDSHAKE_TIMED_OUT: &str = "Handshake timed out. Please ensure that you have the latest version of the session manager plugin.";
/// [A] `sessionplugin.go` fn `Execute` wraps every handshake error in this prefix.
pub(super) const HANDSHAKE_ERROR_PREFIX: &str = "Encountered error while initiating handshake. ";

/// Something a helper task reports to the agent loop.
pub(super) enum TaskEvent {
    /// The one DNS lookup of the session ([A] `port.go` fn `validateParameters`).
    Resolved(Result<Vec<IpAddr>, String>),
    /// A dial of the destination finished.
    Dialed {
        conn: u64,
        result: Result<TcpStream, String>,
    },
    /// A connection writer wrote `n` bytes.
    Wrote { conn: u64, n: usize },
    /// A connection writer stopped: its input ended (after writing everything) or a write
    /// failed.
    WriterDone { conn: u64, error: Option<String> },
}

/// Bytes read from a destination connection (or the pty), through a bounded channel so
/// that the reader stops reading when the agent does not take them.
pub(super) enum RemoteData {
    Data {
        conn: u64,
        bytes: Bytes,
    },
    /// End of the read side (EOF if `!error`).
    Eof {
        conn: u64,
        error: bool,
    },
}

/// What plugins need besides the data channel.
pub(super) struct Env {
    pub report: Arc<SessionReport>,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    pub data: mpsc::Sender<RemoteData>,
    pub agent_version: String,
    /// Set by plugins to end the session (first request wins).
    end_request: Option<(ExitReason, String)>,
    next_conn: u64,
}

impl Env {
    /// An environment for unit tests of plugins.
    #[cfg(test)]
    pub fn for_test(
        events: mpsc::UnboundedSender<TaskEvent>,
        data: mpsc::Sender<RemoteData>,
    ) -> Env {
        Env {
            report: Arc::new(SessionReport::default()),
            events,
            data,
            agent_version: "3.3.987.0".into(),
            end_request: None,
            next_conn: 0,
        }
    }

    /// Asks the loop to end the session; the first request wins.
    pub fn request_end(&mut self, reason: ExitReason, output: impl Into<String>) {
        if self.end_request.is_none() {
            self.end_request = Some((reason, output.into()));
        }
    }

    /// A fresh connection id.
    pub fn conn_id(&mut self) -> u64 {
        self.next_conn += 1;
        self.next_conn
    }

    /// Records a protocol violation by the client.
    pub fn violation(&self, kind: ViolationKind, detail: impl Into<String>) {
        self.report.violation(kind, detail);
    }
}

/// The session plugin.
pub(super) enum Plugin {
    /// Not started or not initialised yet: input is `ErrHandlerNotReady`.
    NotReady,
    Mux(Box<Mux>),
    Basic(Box<Basic>),
    Shell(Box<Shell>),
    /// The plugin ended; the data channel is closing.
    Stopped,
}

/// Handshake progress ([A] `datachannel.go` `Handshake`).
enum Handshake {
    /// Fault knob: waiting before sending the HandshakeRequest.
    Delay { until: Instant },
    /// HandshakeRequest sent, waiting for the HandshakeResponse ([A] fn `PerformHandshake`
    /// blocks on `responseChan` for at most 15 s).
    Waiting { started: Instant, deadline: Instant },
    /// A valid HandshakeResponse was processed; HandshakeComplete goes out after its ack.
    Responded { started: Instant, ended: Instant },
    /// `handshake.complete`.
    Complete,
    /// `handshake.skipped` ([A] fn `SkipHandshake`).
    Skipped,
    /// The handshake failed or timed out.
    Failed,
}

/// A message whose processing stalled ([`HandlerResult::Stall`]).
enum Stalled {
    Frame(ClientMessage),
    Drain,
}

/// How the session is ending.
struct Ending {
    exit: AgentExit,
    /// [A] `PrepareToCloseChannel` deadline; `None`: return at once.
    deadline: Option<Instant>,
}

/// The agent of one session.
pub(super) struct Agent {
    pub cfg: AgentConfig,
    pub env: Env,
    pub dc: DataChannel,
    pub plugin: Plugin,
    to_client: mpsc::Sender<Bytes>,
    hs: Handshake,
    /// The client's version from its HandshakeResponse ([A] fn `GetClientVersion`).
    pub client_version: String,
    stalled: Option<Stalled>,
    ending: Option<Ending>,
    /// When the plugin's read pump may send next (pacing).
    pub next_pump: Instant,
    to_client_closed: bool,
    /// Port parameters waiting for the DNS lookup.
    pub pending_params: Option<PortParams>,
}

impl Agent {
    pub fn new(
        cfg: AgentConfig,
        report: Arc<SessionReport>,
        to_client: mpsc::Sender<Bytes>,
        events: mpsc::UnboundedSender<TaskEvent>,
        data: mpsc::Sender<RemoteData>,
        now: Instant,
    ) -> Agent {
        Agent {
            env: Env {
                report: report.clone(),
                events,
                data,
                agent_version: cfg.agent_version.clone(),
                end_request: None,
                next_conn: 0,
            },
            cfg,
            dc: DataChannel::new(report),
            plugin: Plugin::NotReady,
            to_client,
            hs: Handshake::Failed,
            client_version: String::new(),
            stalled: None,
            ending: None,
            next_pump: now,
            to_client_closed: false,
            pending_params: None,
        }
    }

    /// The event loop; returns when the session ends.
    pub async fn run(
        mut self,
        mut from_client: mpsc::Receiver<Bytes>,
        mut events: mpsc::UnboundedReceiver<TaskEvent>,
        mut data: mpsc::Receiver<RemoteData>,
    ) -> AgentExit {
        let start = Instant::now();
        self.start(start);
        let mut resend = interval_at(start + RESEND_INTERVAL, RESEND_INTERVAL);
        resend.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            let now = Instant::now();
            self.settle(now);
            self.pump(now);
            self.dc.release_acks(now);
            self.flush().await;
            if let Some(exit) = self.done(now) {
                self.final_checks();
                self.stop_plugin();
                return exit;
            }
            let accepting = self.accepting_input();
            let remote_ok = self.accepting_remote_data(now);
            let wake = self.next_wakeup(now);
            // Unbiased: a client that keeps the input busy must not starve the
            // destination side (the agent runs them on separate goroutines).
            tokio::select! {
                Some(ev) = events.recv() => self.on_task_event(ev, Instant::now()),
                r = from_client.recv(), if accepting => match r {
                    Some(frame) => self.on_frame(frame, Instant::now()),
                    None => self.input_closed(),
                },
                _ = resend.tick() => {
                    self.dc.resend_tick(Instant::now());
                    // While the reader is blocked we do not see the input close: check.
                    if !accepting && from_client.is_closed() {
                        self.input_closed();
                    }
                }
                Some(d) = data.recv(), if remote_ok => self.on_remote_data(d, Instant::now()),
                _ = sleep_precise(wake.unwrap_or(now)), if wake.is_some() => {
                    self.on_timers(Instant::now());
                }
            }
        }
    }

    /// Session start: [A] `sessionplugin.go` fn `Execute`. A Port session always does
    /// the handshake ([A] `port.go` fn `RequireHandshake`); Standard_Stream without KMS
    /// skips it ([A] `shell` plugin `RequireHandshake` is false, `isEncryptionEnabled`).
    fn start(&mut self, now: Instant) {
        match &self.cfg.kind {
            SessionKind::Port { .. } => {
                if self.cfg.handshake_delay.is_zero() {
                    self.send_handshake_request(now);
                } else {
                    self.hs = Handshake::Delay {
                        until: now + self.cfg.handshake_delay,
                    };
                }
            }
            SessionKind::Shell => {
                self.hs = Handshake::Skipped;
                self.start_shell(now);
            }
        }
    }

    /// [A] fn `PerformHandshake` / `buildHandshakeRequestPayload` / `sendHandshakeRequest`:
    /// `{"AgentVersion":…,"RequestedClientActions":[{"ActionType":"SessionType",
    /// "ActionParameters":{"SessionType":"Port","Properties":…}}]}` as stream data
    /// (PayloadType 5). Port sessions are never encrypted ([A] `sessionplugin.go` fn
    /// `isEncryptionEnabled`), so there is no KMSEncryption action.
    fn send_handshake_request(&mut self, now: Instant) {
        let (session_type, properties) = match &self.cfg.kind {
            SessionKind::Port { properties } => ("Port", properties.clone()),
            SessionKind::Shell => ("Standard_Stream", Value::Null),
        };
        let params = SessionTypeRequest {
            session_type: session_type.to_owned(),
            // [A] `port.go` fn `GetPluginParameters` returns the properties unchanged;
            // Go marshals that map with sorted keys, as serde_json's default map does.
            properties,
        };
        // Go marshals the structs in field order ([A] `model.go`
        // `HandshakeRequestPayload`, `RequestedClientAction`, `SessionTypeRequest`):
        // `proto::payload::RequestedClientAction` holds its parameters as a JSON value,
        // whose keys serde_json would sort, so the request is written through borrowed
        // structs instead (checked against golden `agent_handshake_request`).
        #[derive(serde::Serialize)]
        struct Action<'a> {
            #[serde(rename = "ActionType")]
            action_type: &'a str,
            #[serde(rename = "ActionParameters")]
            action_parameters: &'a SessionTypeRequest,
        }
        #[derive(serde::Serialize)]
        struct Request<'a> {
            #[serde(rename = "AgentVersion")]
            agent_version: &'a str,
            #[serde(rename = "RequestedClientActions")]
            requested_client_actions: [Action<'a>; 1],
        }
        let req = Request {
            agent_version: &self.cfg.agent_version,
            requested_client_actions: [Action {
                action_type: action_type::SESSION_TYPE,
                action_parameters: &params,
            }],
        };
        self.dc.send_stream_data(
            PayloadType::HandshakeRequest,
            Bytes::from(to_json(&req)),
            now,
        );
        self.hs = Handshake::Waiting {
            started: now,
            deadline: now + HANDSHAKE_TIMEOUT,
        };
    }

    /// Work that follows a processed message: HandshakeComplete after the ack of the
    /// HandshakeResponse, then the plugin start; end requests from plugins.
    fn settle(&mut self, now: Instant) {
        if let Handshake::Responded { started, ended } = self.hs {
            // [A] fn `buildHandshakeCompletePayload`: the time from the start of the
            // handshake to the response, in ns (Go `time.Duration`); no customer
            // message (no KMS, no separate output streams).
            let payload = HandshakeComplete {
                handshake_time_to_complete_ns: ended.duration_since(started).as_nanos() as i64,
                customer_message: String::new(),
            };
            self.dc.send_stream_data(
                PayloadType::HandshakeComplete,
                Bytes::from(to_json(&payload)),
                now,
            );
            // [A] fn `PerformHandshake` sets `complete` only after sending.
            self.hs = Handshake::Complete;
            self.start_port(now);
        }
        if let Some((reason, output)) = self.env.end_request.take() {
            let wait = reason != ExitReason::InputClosed;
            self.end(reason, output, wait);
        }
    }

    /// Ends the session (first call wins). Unless the input is gone, the data channel
    /// then waits up to 2 s for the outgoing buffer to drain ([A] `sessionplugin.go` fn
    /// `Execute` defers `PrepareToCloseChannel` and `Close`).
    pub fn ending(&self) -> bool {
        self.ending.is_some() || self.env.end_request.is_some()
    }

    pub fn end(&mut self, reason: ExitReason, output: String, wait: bool) {
        if self.ending.is_some() {
            return;
        }
        tracing::debug!(?reason, %output, "agent: session ending");
        self.stop_plugin();
        if matches!(self.hs, Handshake::Delay { .. } | Handshake::Waiting { .. }) {
            self.hs = Handshake::Failed;
        }
        self.stalled = None;
        let deadline = wait.then(|| Instant::now() + PREPARE_TO_CLOSE_TIMEOUT);
        self.ending = Some(Ending {
            exit: AgentExit { output, reason },
            deadline,
        });
    }

    /// The service closed our input (TerminateSession API, idle timeout): nothing can be
    /// acked any more, so the session ends at once, even if it was already closing.
    fn input_closed(&mut self) {
        self.end(ExitReason::InputClosed, String::new(), false);
        if let Some(e) = &mut self.ending {
            e.deadline = None;
        }
    }

    fn stop_plugin(&mut self) {
        if let Plugin::Shell(s) = &mut self.plugin {
            s.kill();
        }
        // Dropping the plugin drops its connections, which aborts their tasks.
        self.plugin = Plugin::Stopped;
    }

    fn done(&mut self, now: Instant) -> Option<AgentExit> {
        let e = self.ending.as_ref()?;
        let finished = match e.deadline {
            None => true,
            // Delayed acks (the ack-delay knob) still go out: the client may be waiting
            // for the one of its TerminateSession flag.
            Some(d) => (self.dc.outgoing.is_empty() && !self.dc.acks_delayed()) || now >= d,
        };
        if finished {
            return self.ending.take().map(|e| e.exit);
        }
        None
    }

    /// Violations only visible at the end: a sequence gap never filled.
    fn final_checks(&self) {
        if !self.dc.incoming.is_empty() {
            let mut seqs: Vec<i64> = self.dc.incoming.keys().copied().collect();
            seqs.sort_unstable();
            let shown: Vec<String> = seqs.iter().take(10).map(|s| s.to_string()).collect();
            self.env.violation(
                ViolationKind::SequenceGap,
                format!(
                    "session ended while waiting for client seq {}; {} later message(s) were \
                     acked and buffered but never processed (seq {}{})",
                    self.dc.expected_seq,
                    seqs.len(),
                    shown.join(", "),
                    if seqs.len() > 10 { ", …" } else { "" }
                ),
            );
        }
    }

    async fn flush(&mut self) {
        for frame in std::mem::take(&mut self.dc.out) {
            if self.to_client_closed {
                break;
            }
            if self.to_client.send(frame).await.is_err() {
                // Nobody forwards our frames any more: like the agent's failed websocket
                // writes, this is logged and otherwise ignored.
                tracing::debug!("agent: to_client closed");
                self.to_client_closed = true;
            }
        }
    }

    /// The websocket reader runs unless a handler is blocked ([A]: handlers run on the
    /// reader goroutine, so a blocking plugin write stops it).
    fn accepting_input(&self) -> bool {
        if self.stalled.is_some() {
            return false;
        }
        match &self.plugin {
            Plugin::Mux(m) => !m.input_blocked(),
            Plugin::Basic(b) => !b.input_blocked(),
            Plugin::Shell(s) => !s.input_blocked(),
            Plugin::NotReady | Plugin::Stopped => true,
        }
    }

    fn accepting_remote_data(&self, now: Instant) -> bool {
        let paced = !self.dc.paused && now >= self.next_pump;
        match &self.plugin {
            Plugin::Mux(m) => m.accepts_remote_data(),
            Plugin::Basic(_) => paced,
            Plugin::Shell(s) => paced && s.output_started(now),
            // Leftovers of closed connections: drain and drop.
            Plugin::NotReady | Plugin::Stopped => true,
        }
    }

    fn next_wakeup(&self, now: Instant) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |x: Instant| t = Some(t.map_or(x, |y: Instant| y.min(x)));
        match self.hs {
            Handshake::Delay { until } => at(until),
            Handshake::Waiting { deadline, .. } => at(deadline),
            _ => {}
        }
        if let Some(e) = &self.ending
            && let Some(d) = e.deadline
        {
            at(d);
        }
        if let Some(a) = self.dc.next_ack_due() {
            at(a);
        }
        let paced_wake = !self.dc.paused && self.next_pump > now;
        match &self.plugin {
            Plugin::Mux(m) => {
                if !self.dc.paused && m.has_output() {
                    at(self.next_pump.max(now));
                }
                if let Some(k) = m.keepalive_deadline() {
                    at(k);
                }
            }
            Plugin::Basic(_) if paced_wake => at(self.next_pump),
            Plugin::Shell(s) => {
                if let Some(o) = s.output_start().filter(|o| *o > now) {
                    at(o);
                } else if paced_wake {
                    at(self.next_pump);
                }
            }
            _ => {}
        }
        t
    }

    fn on_timers(&mut self, now: Instant) {
        match self.hs {
            Handshake::Delay { until } if now >= until => self.send_handshake_request(now),
            Handshake::Waiting { deadline, .. } if now >= deadline => {
                // [A] fn `PerformHandshake`, `case <-time.After(handshakeTimeout)`.
                self.hs = Handshake::Failed;
                self.end(
                    ExitReason::HandshakeTimeout,
                    format!("{HANDSHAKE_ERROR_PREFIX}{HANDSHAKE_TIMED_OUT}"),
                    true,
                );
            }
            _ => {}
        }
        if let Plugin::Mux(m) = &mut self.plugin {
            m.on_timeout(&mut self.env, now);
        }
    }

    /// The plugin's read pump (see [`Mux::pump`]; the basic and shell pumps take their
    /// data from the `data` channel in [`Agent::on_remote_data`]).
    fn pump(&mut self, now: Instant) {
        if self.dc.paused || self.ending.is_some() {
            return;
        }
        if let Plugin::Mux(m) = &mut self.plugin {
            m.pump(&mut self.dc, &mut self.next_pump, self.cfg.pacing, now);
        }
    }

    fn on_task_event(&mut self, ev: TaskEvent, now: Instant) {
        match ev {
            TaskEvent::Resolved(r) => self.on_resolved(r, now),
            TaskEvent::Dialed { conn, result } => match &mut self.plugin {
                Plugin::Mux(m) => m.on_dialed(&mut self.env, &mut self.dc, conn, result, now),
                Plugin::Basic(b) => b.on_dialed(&mut self.env, conn, result),
                _ => {}
            },
            TaskEvent::Wrote { conn, n } => match &mut self.plugin {
                Plugin::Mux(m) => m.on_wrote(conn, n),
                Plugin::Basic(b) => b.on_wrote(conn, n),
                Plugin::Shell(s) => s.on_wrote(n),
                _ => {}
            },
            TaskEvent::WriterDone { conn, error } => match &mut self.plugin {
                Plugin::Mux(m) => m.on_writer_done(conn),
                Plugin::Basic(b) => b.on_writer_done(conn, error),
                _ => {}
            },
        }
        self.maybe_resume(now);
    }

    fn on_remote_data(&mut self, d: RemoteData, now: Instant) {
        match &mut self.plugin {
            Plugin::Mux(m) => m.on_remote_data(d),
            Plugin::Basic(b) => {
                if let RemoteData::Data { bytes, .. } = &d {
                    self.dc
                        .send_stream_data(PayloadType::Output, bytes.clone(), now);
                    self.next_pump = now + self.cfg.pacing;
                }
                b.on_remote_data(&mut self.env, d);
            }
            Plugin::Shell(s) => {
                if let Some(out) = s.on_remote_data(&mut self.env, d) {
                    self.dc.send_stream_data(PayloadType::Output, out, now);
                    self.next_pump = now + self.cfg.pacing;
                }
            }
            Plugin::NotReady | Plugin::Stopped => {}
        }
        self.maybe_resume(now);
    }

    fn maybe_resume(&mut self, now: Instant) {
        if self.ending.is_some() || self.env.end_request.is_some() {
            self.stalled = None;
            return;
        }
        let ready = match &self.plugin {
            Plugin::Basic(b) => !b.dialing(),
            Plugin::Stopped => {
                self.stalled = None;
                false
            }
            _ => true,
        };
        if !ready {
            return;
        }
        match self.stalled.take() {
            Some(Stalled::Frame(msg)) => self.on_stream_data(msg, now, true),
            Some(Stalled::Drain) => self.drain(now),
            None => {}
        }
    }

    // ---------------------------------------------------------------- frame intake

    /// One websocket frame from the client (or a service message).
    pub fn on_frame(&mut self, frame: Bytes, now: Instant) {
        let Some(msg) = self.decode(frame) else {
            return;
        };
        if !msg.message_type.is_publication() && msg.schema_version != 1 {
            self.env.violation(
                ViolationKind::UnexpectedHeader,
                format!(
                    "{} seq {} has SchemaVersion {} (the references always write 1)",
                    msg.message_type, msg.sequence_number, msg.schema_version
                ),
            );
        }
        // [A] fn `dataChannelIncomingMessageHandler`.
        match &msg.message_type {
            MessageType::InputStreamData => {
                self.check_stream_data_header(&msg);
                self.env.report.count(|c| c.data_messages_from_client += 1);
                self.on_stream_data(msg, now, false);
            }
            MessageType::Acknowledge => self.on_ack(msg, now),
            MessageType::ChannelClosed => {
                // [A] fn `handleChannelClosedMessage`: cancel the session.
                self.end(ExitReason::InputClosed, String::new(), true);
            }
            // [A] fn `handlePausePublicationMessage` / `handleStartPublicationMessage`.
            MessageType::PausePublication => self.dc.paused = true,
            MessageType::StartPublication => self.dc.paused = false,
            other => {
                // [A] logs "Invalid message type received" and ignores it.
                self.env.violation(
                    ViolationKind::Other,
                    format!(
                        "unexpected MessageType {other:?} from the client (the agent ignores it)"
                    ),
                );
            }
        }
    }

    /// Decodes a frame with the project codec. The agent itself checks less ([A]
    /// `agentmessage.go` fn `Deserialize`, `Validate`: HeaderLength ≠ 0, MessageType
    /// set, CreatedDate ≠ 0; no digest or PayloadLength check), so a frame that fails only
    /// our digest or PayloadLength check is flagged and then processed as the agent would.
    fn decode(&mut self, frame: Bytes) -> Option<ClientMessage> {
        let err = match ClientMessage::decode(frame.clone()) {
            Ok(m) => return Some(m),
            Err(e) => e,
        };
        match err {
            DecodeError::DigestMismatch | DecodeError::PayloadLengthMismatch { .. } => {
                let start =
                    u32::from_be_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize + 4;
                let payload = &frame[start..];
                let digest = sha256(payload);
                if !payload.is_empty()
                    && digest[..] != frame[PAYLOAD_DIGEST_OFFSET..PAYLOAD_DIGEST_OFFSET + 32]
                {
                    self.env.violation(
                        ViolationKind::BadDigest,
                        "PayloadDigest is not the SHA-256 of the payload (the agent does not check it; MGS may)",
                    );
                }
                if let DecodeError::PayloadLengthMismatch { declared, actual } = err {
                    self.env.violation(
                        ViolationKind::MalformedFrame,
                        format!("PayloadLength {declared} but {actual} payload bytes (the agent ignores PayloadLength)"),
                    );
                }
                let mut fixed = frame.to_vec();
                fixed[PAYLOAD_DIGEST_OFFSET..PAYLOAD_DIGEST_OFFSET + 32].copy_from_slice(&digest);
                fixed[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4]
                    .copy_from_slice(&(payload.len() as u32).to_be_bytes());
                ClientMessage::decode(Bytes::from(fixed)).ok()
            }
            e => {
                self.env.violation(
                    ViolationKind::MalformedFrame,
                    format!("{e} (the agent drops the frame)"),
                );
                None
            }
        }
    }

    /// Header fields the plugin always sets the same way ([P] fn `SendInputDataMessage`:
    /// SchemaVersion 1, Flags 0, non-negative sequence numbers, non-empty payloads).
    fn check_stream_data_header(&self, msg: &ClientMessage) {
        if msg.flags != 0 {
            self.env.violation(
                ViolationKind::UnexpectedHeader,
                format!(
                    "input_stream_data seq {} has Flags {} (the plugin always sends 0)",
                    msg.sequence_number, msg.flags
                ),
            );
        }
        if msg.sequence_number < 0 {
            self.env.violation(
                ViolationKind::UnexpectedHeader,
                format!("input_stream_data has negative seq {}", msg.sequence_number),
            );
        }
        if msg.payload.is_empty() {
            self.env.violation(
                ViolationKind::EmptyPayload,
                format!(
                    "input_stream_data seq {} has an empty payload (no reference can send one)",
                    msg.sequence_number
                ),
            );
        }
    }

    /// [A] fn `handleStreamDataMessage`.
    fn on_stream_data(&mut self, msg: ClientMessage, now: Instant, retry: bool) {
        self.dc.paused = false;
        let seq = msg.sequence_number;
        let expected = self.dc.expected_seq;
        if seq == expected {
            match self.process_stream_data(&msg, now) {
                HandlerResult::Ok => {}
                HandlerResult::NotReady => {
                    tracing::trace!(seq, "agent: handler not ready, message rejected");
                    return;
                }
                HandlerResult::Failed(e) => {
                    tracing::debug!(seq, error = %e, "agent: unable to process stream data");
                    return;
                }
                HandlerResult::Stall => {
                    self.stalled = Some(Stalled::Frame(msg));
                    return;
                }
            }
            self.dc.send_ack(&msg, now, self.cfg.ack_delay.get());
            self.dc.expected_seq += 1;
            self.drain(now);
        } else if seq > expected {
            if !retry {
                self.env.report.count(|c| c.out_of_order_from_client += 1);
            }
            // Ack and buffer only if the buffer has room; else drop silently.
            if self.dc.incoming.len() < super::datachannel::INCOMING_CAPACITY {
                self.dc.send_ack(&msg, now, self.cfg.ack_delay.get());
                self.dc.incoming.insert(seq, msg);
            }
        } else {
            // "Resending acknowledge for already processed message".
            if !retry {
                self.env.report.count(|c| c.duplicates_from_client += 1);
            }
            self.dc.send_ack(&msg, now, self.cfg.ack_delay.get());
        }
    }

    /// [A] fn `processIncomingMessageBufferItems`. Any handler error (not-ready included)
    /// stops the drain and leaves the message buffered, as there.
    fn drain(&mut self, now: Instant) {
        while let Some(msg) = self.dc.incoming.get(&self.dc.expected_seq).cloned() {
            match self.process_stream_data(&msg, now) {
                HandlerResult::Ok => {
                    self.dc.incoming.remove(&msg.sequence_number);
                    self.dc.expected_seq += 1;
                }
                HandlerResult::Stall => {
                    self.stalled = Some(Stalled::Drain);
                    return;
                }
                HandlerResult::NotReady | HandlerResult::Failed(_) => return,
            }
        }
    }

    /// [A] fn `processStreamDataMessage`.
    fn process_stream_data(&mut self, msg: &ClientMessage, now: Instant) -> HandlerResult {
        match msg.payload_type {
            PayloadType::HandshakeResponse => self.on_handshake_response(msg, now),
            PayloadType::EncChallengeResponse => {
                self.env.violation(
                    ViolationKind::BadHandshakeResponse,
                    format!(
                        "EncChallengeResponse seq {} but this session is not encrypted (the agent \
                         would dereference its nil block cipher)",
                        msg.sequence_number
                    ),
                );
                HandlerResult::Failed("no encryption challenge was sent".into())
            }
            _ => {
                if !matches!(self.hs, Handshake::Complete | Handshake::Skipped) {
                    // "Handshake still in progress, ignore stream data message": acked and
                    // discarded by the agent; the client loses that data.
                    self.env.violation(
                        ViolationKind::DataBeforeHandshakeComplete,
                        format!(
                            "input_stream_data seq {} (PayloadType {}) before HandshakeComplete: \
                             the agent acks and discards it",
                            msg.sequence_number,
                            msg.payload_type.as_u32()
                        ),
                    );
                    return HandlerResult::Ok;
                }
                self.check_payload_type(msg);
                let r = match &mut self.plugin {
                    Plugin::NotReady => HandlerResult::NotReady,
                    Plugin::Stopped => HandlerResult::Failed("the session is closing".into()),
                    Plugin::Mux(m) => m.on_input(&mut self.env, msg),
                    Plugin::Basic(b) => b.on_input(&mut self.env, msg),
                    Plugin::Shell(s) => s.on_input(&mut self.env, msg),
                };
                if matches!(r, HandlerResult::Ok) && msg.payload_type == PayloadType::Output {
                    let n = msg.payload.len() as u64;
                    self.env.report.count(|c| c.data_bytes_from_client += n);
                }
                r
            }
        }
    }

    /// PayloadTypes the plugin sends in each session type ([P] `portsession`: Output and
    /// Flag; `shellsession`: Output and Size).
    fn check_payload_type(&self, msg: &ClientMessage) {
        let ok = matches!(
            (&self.cfg.kind, msg.payload_type),
            (_, PayloadType::Output)
                | (SessionKind::Port { .. }, PayloadType::Flag)
                | (SessionKind::Shell, PayloadType::Size)
        );
        if !ok {
            self.env.violation(
                ViolationKind::Other,
                format!(
                    "input_stream_data seq {} has PayloadType {} which the plugin never sends in \
                     this session type (the agent ignores it)",
                    msg.sequence_number,
                    msg.payload_type.as_u32()
                ),
            );
        }
    }

    /// [A] fn `handleHandshakeResponse`.
    fn on_handshake_response(&mut self, msg: &ClientMessage, now: Instant) -> HandlerResult {
        let started = match self.hs {
            Handshake::Waiting { started, .. } => started,
            Handshake::Delay { .. } => {
                self.env.violation(
                    ViolationKind::BadHandshakeResponse,
                    "HandshakeResponse before the HandshakeRequest was sent",
                );
                now
            }
            _ => {
                // The agent signals an unbuffered channel nobody reads any more: its
                // websocket reader would block for ever. We flag it and ignore it.
                self.env.violation(
                    ViolationKind::BadHandshakeResponse,
                    format!(
                        "unexpected HandshakeResponse seq {} (no handshake in progress; the \
                         agent's reader would hang)",
                        msg.sequence_number
                    ),
                );
                return HandlerResult::Ok;
            }
        };
        let resp: HandshakeResponse = match from_json("HandshakeResponse", &msg.payload) {
            Ok(r) => r,
            Err(e) => {
                // The agent returns the unmarshal error: no ack; it keeps waiting.
                self.env
                    .violation(ViolationKind::BadHandshakeResponse, e.to_string());
                return HandlerResult::Failed(e.to_string());
            }
        };
        let mut error = None;
        let mut saw_session_type = false;
        for action in &resp.processed_client_actions {
            if action.action_status != ActionStatus::Success {
                // Every failed action overwrites `handshake.error`: the last one wins.
                error = Some(format!(
                    "{} failed on client with status {} error: {}",
                    action.action_type,
                    i64::from(action.action_status),
                    action.error
                ));
            } else if action.action_type == action_type::SESSION_TYPE {
                saw_session_type = true;
            } else {
                // "Unknown handshake client action found" (a warning in the agent).
                self.env.violation(
                    ViolationKind::BadHandshakeResponse,
                    format!("unknown processed action {:?}", action.action_type),
                );
            }
        }
        self.client_version = resp.client_version.clone();
        crate::admission::check_client_version(
            &self.env.report,
            self.cfg.min_client_version.as_deref(),
            "HandshakeResponse",
            &self.client_version,
        );
        if let Some(e) = error {
            self.env
                .violation(ViolationKind::BadHandshakeResponse, e.clone());
            self.hs = Handshake::Failed;
            self.env.request_end(
                ExitReason::HandshakeFailed,
                format!("{HANDSHAKE_ERROR_PREFIX}{e}"),
            );
            return HandlerResult::Ok;
        }
        if !saw_session_type {
            self.env.violation(
                ViolationKind::BadHandshakeResponse,
                "HandshakeResponse does not answer the SessionType action (the agent does not \
                 notice; the plugin always answers it)",
            );
        }
        self.hs = Handshake::Responded {
            started,
            ended: now,
        };
        HandlerResult::Ok
    }

    /// [A] fn `handleAcknowledgeMessage`: clear the pause, parse, [A] fn
    /// `ProcessAcknowledgedMessage`. The checks of MessageId, MessageType and range are
    /// ours (the agent only matches the sequence number).
    fn on_ack(&mut self, msg: ClientMessage, now: Instant) {
        self.dc.paused = false;
        self.env.report.count(|c| c.acks_from_client += 1);
        if msg.flags != 3 || msg.sequence_number != 0 || msg.payload_type != PayloadType::Undefined
        {
            self.env.violation(
                ViolationKind::UnexpectedHeader,
                format!(
                    "acknowledge with Flags {}, SequenceNumber {}, PayloadType {} (the references \
                     send 3, 0, 0)",
                    msg.flags,
                    msg.sequence_number,
                    msg.payload_type.as_u32()
                ),
            );
        }
        if msg.payload.is_empty() {
            self.env.violation(
                ViolationKind::EmptyPayload,
                "acknowledge with an empty payload",
            );
            return;
        }
        let Some(ack) = parse_ack(&msg.payload) else {
            self.env.violation(
                ViolationKind::MalformedFrame,
                format!(
                    "acknowledge payload is not an AcknowledgeContent: {}",
                    String::from_utf8_lossy(&msg.payload)
                ),
            );
            return;
        };
        if ack.exact_case_missing {
            self.env.violation(
                ViolationKind::UnexpectedHeader,
                "acknowledge JSON keys differ in case from the references (Go matches them anyway)",
            );
        }
        let seq = ack.seq;
        if seq < 0 || seq >= self.dc.next_seq {
            self.env.violation(
                ViolationKind::AckForUnknownMessage,
                format!(
                    "ack for output seq {seq}, but only 0..{} were sent",
                    self.dc.next_seq
                ),
            );
        } else {
            if ack.message_type != MessageType::OutputStreamData.as_str() {
                self.env.violation(
                    ViolationKind::AckMismatch,
                    format!(
                        "ack for seq {seq} names AcknowledgedMessageType {:?}",
                        ack.message_type
                    ),
                );
            }
            if let Some(id) = self.dc.sent_id(seq)
                && ack.message_id != id.to_string()
            {
                self.env.violation(
                    ViolationKind::AckMismatch,
                    format!(
                        "ack for seq {seq} names AcknowledgedMessageId {:?}, sent {id}",
                        ack.message_id
                    ),
                );
            }
            if !ack.sequential {
                self.env.violation(
                    ViolationKind::AckMismatch,
                    format!("ack for seq {seq} has IsSequentialMessage false"),
                );
            }
        }
        self.dc.process_ack(seq, now);
    }
}

/// The fields of an AcknowledgeContent, matched as Go's `encoding/json` does (exact key,
/// else a case-insensitive one).
struct Ack {
    message_type: String,
    message_id: String,
    seq: i64,
    sequential: bool,
    exact_case_missing: bool,
}

fn parse_ack(payload: &[u8]) -> Option<Ack> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let obj = v.as_object()?;
    let mut inexact = false;
    let mut field = |name: &str| -> Option<&Value> {
        if let Some(x) = obj.get(name) {
            return Some(x);
        }
        let x = obj
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, x)| x);
        inexact |= x.is_some();
        x
    };
    let str_of = |x: Option<&Value>| -> Option<String> {
        match x {
            None | Some(Value::Null) => Some(String::new()),
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    };
    let message_type = str_of(field("AcknowledgedMessageType"))?;
    let message_id = str_of(field("AcknowledgedMessageId"))?;
    let seq = match field("AcknowledgedMessageSequenceNumber") {
        None | Some(Value::Null) => 0,
        Some(x) => x.as_i64()?,
    };
    let sequential = match field("IsSequentialMessage") {
        None | Some(Value::Null) => false,
        Some(x) => x.as_bool()?,
    };
    Some(Ack {
        message_type,
        message_id,
        seq,
        sequential,
        exact_case_missing: inexact,
    })
}
