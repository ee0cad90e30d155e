//! The port plugin: [A] `agent/session/plugins/port/port.go` (parameters, DNS, dialing,
//! mux/basic choice), `port_mux.go` (smux server, one dial per accepted stream) and
//! `port_basic.go` (one TCP connection, DisconnectToPort, lazy redial).

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::ExitReason;
use super::core::{Agent, Env, Plugin, RemoteData, TaskEvent};
use super::datachannel::{DataChannel, HandlerResult, STREAM_DATA_PAYLOAD_SIZE};
use crate::report::ViolationKind;
use bastion_proto::kind::{Flag, PayloadType};
use bastion_proto::message::ClientMessage;
use bastion_proto::smux::{self, CloseReason, Event, Role, StreamId, StreamRead};
use bastion_proto::version::{
    agent_disables_keepalive_for_client, agent_uses_mux_for_client, agent_version_compare,
};

/// [A] `agent/session/config/config.go` const `LocalPortForwarding`.
const LOCAL_PORT_FORWARDING: &str = "LocalPortForwarding";
/// Go's `io.Copy` buffer: the agent copies destination → smux stream in ≤ 32 KiB writes.
const COPY_BUFFER: usize = 32 * 1024;
/// Stand-in for the kernel buffer of the agent's local unix socket between smux and the
/// pump ([A] `port_mux.go` fn `initialize`): once this much smux output waits for the pump,
/// smux stream writes block, so the destination is not read further.
const SMUX_TX_HIGH_WATER: usize = 208 * 1024;
/// Bytes handed to a destination writer and not yet written, beyond which the agent's
/// copy would be blocked in `Write` (Go's `io.Copy` holds one 32 KiB buffer; the kernel
/// socket buffer comes on top, as in the agent).
const TCP_WRITE_HIGH_WATER: usize = 32 * 1024;
/// Resolved addresses the agent refuses to forward to ([A]
/// `agent/appconfig/constants.go` `DefaultDeniedPortForwardingRemoteIPs`).
const DENIED_REMOTE_IPS: [&str; 9] = [
    "169.254.169.254",
    "fd00:ec2::254",
    "169.254.169.253",
    "fd00:ec2::253",
    "169.254.169.123",
    "fd00:ec2::123",
    "169.254.169.250",
    "169.254.169.251",
    "fd00:ec2::240",
];

fn agent_at_least(agent: &str, v: &str) -> bool {
    agent_version_compare(agent, v) != Ordering::Less
}

/// The first agent release with TCP multiplexing is 3.0.222.0 ([A] `RELEASENOTES.md`); the
/// plugin's own rule is "strictly greater than 3.0.196.0" ([P] `config.go`).
pub(super) fn agent_has_mux(agent: &str) -> bool {
    agent_version_compare(agent, "3.0.196.0") == Ordering::Greater
}

/// Does the agent run smux without keepalive? ([A] `port_mux.go` fn `initialize` since
/// 3.1.1575.0: iff `Compare(clientVersion, "1.2.331.0") > 0`; [A] `RELEASENOTES.md`:
/// 3.1.1446.0 "Disable smux keep alive", 3.1.1575.0 "…based on CLI version". Agents in
/// between disabled it unconditionally; older agents always kept it.)
pub(super) fn agent_keepalive_disabled(agent: &str, client: &str) -> bool {
    if !agent_at_least(agent, "3.1.1446.0") {
        false
    } else if !agent_at_least(agent, "3.1.1575.0") {
        true
    } else {
        agent_disables_keepalive_for_client(client)
    }
}

/// [A] `port.go` `PortParameters` (`jsonutil.Remarshal` of the document properties).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct PortParams {
    pub host: String,
    pub port_number: String,
    pub port_type: String,
}

/// [A] `port.go` fn `initializeParameters` (remarshal: every field a string or absent) and
/// the first rule of fn `validateParameters` (port number required).
pub(super) fn parse_params(props: &Value) -> Result<PortParams, String> {
    let field = |name: &str| -> Result<String, String> {
        match props.get(name) {
            None | Some(Value::Null) => Ok(String::new()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(format!(
                "Unable to remarshal session properties. json: cannot unmarshal {} into Go \
                 struct field PortParameters.{name} of type string",
                json_kind(other)
            )),
        }
    };
    if !(props.is_object() || props.is_null()) {
        return Err(format!(
            "Unable to remarshal session properties. json: cannot unmarshal {} into Go value \
             of type port.PortParameters",
            json_kind(props)
        ));
    }
    let p = PortParams {
        host: field("host")?,
        port_number: field("portNumber")?,
        port_type: field("type")?,
    };
    if p.port_number.is_empty() {
        return Err(format!(
            "Port number is empty in session properties. {props}"
        ));
    }
    Ok(p)
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Where [A] `port.go` fn `DialCall` connects.
#[derive(Clone, Debug)]
pub(super) enum DialTarget {
    /// `host == ""`: `localhost:<port>`, resolved by each dial.
    Localhost,
    /// The address list resolved once per session; walked in order, first success wins,
    /// else the first error ("missing address" when the list is empty).
    Addrs(Vec<IpAddr>),
    /// Agents before 3.2.1041.0 ([A] commit 2b7ab82b "Use IP address to connect to dest
    /// server in port session"): the host name, resolved by each dial.
    Name(String),
}

/// [A] `port.go` fn `DialCall` (`net.Dial("tcp", …)`, no timeout).
pub(super) async fn dial(target: DialTarget, port: String) -> Result<TcpStream, String> {
    let Ok(p) = port.parse::<u16>() else {
        return Err(format!("dial tcp: address {port}: invalid port"));
    };
    match target {
        DialTarget::Localhost => TcpStream::connect(("localhost", p))
            .await
            .map_err(|e| format!("dial tcp localhost:{p}: connect: {e}")),
        DialTarget::Name(h) => TcpStream::connect((h.as_str(), p))
            .await
            .map_err(|e| format!("dial tcp {h}:{p}: {e}")),
        DialTarget::Addrs(list) => {
            let mut first = None;
            for a in list {
                let sa = SocketAddr::new(a, p);
                match TcpStream::connect(sa).await {
                    Ok(s) => return Ok(s),
                    Err(e) => {
                        first.get_or_insert(format!("dial tcp {sa}: connect: {e}"));
                    }
                }
            }
            Err(first.unwrap_or_else(|| "missing address".to_owned()))
        }
    }
}

/// A destination connection with its reader and writer tasks. Dropping it aborts both
/// tasks, which closes the socket (Go `conn.Close()`).
pub(super) struct TcpConn {
    pub id: u64,
    writer: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes handed to the writer and not yet written.
    queued: usize,
    reader: AbortHandle,
    writer_task: AbortHandle,
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer_task.abort();
    }
}

impl TcpConn {
    /// Starts the reader (≤ `read_size` bytes per read, into the bounded `data` channel)
    /// and the writer of `stream`.
    pub fn spawn(stream: TcpStream, id: u64, read_size: usize, env: &Env) -> TcpConn {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let data = env.data.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; read_size];
            loop {
                let read = rd.read(&mut buf).await;
                match read {
                    Ok(0) | Err(_) => {
                        let error = read.is_err();
                        let _ = data.send(RemoteData::Eof { conn: id, error }).await;
                        return;
                    }
                    Ok(n) => {
                        let bytes = Bytes::copy_from_slice(&buf[..n]);
                        if data
                            .send(RemoteData::Data { conn: id, bytes })
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
        })
        .abort_handle();
        let (tx, mut rx) = mpsc::unbounded_channel::<Bytes>();
        let events = env.events.clone();
        let writer_task = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if let Err(e) = wr.write_all(&b).await {
                    let _ = events.send(TaskEvent::WriterDone {
                        conn: id,
                        error: Some(e.to_string()),
                    });
                    return;
                }
                let _ = events.send(TaskEvent::Wrote {
                    conn: id,
                    n: b.len(),
                });
            }
            let _ = events.send(TaskEvent::WriterDone {
                conn: id,
                error: None,
            });
        })
        .abort_handle();
        TcpConn {
            id,
            writer: Some(tx),
            queued: 0,
            reader,
            writer_task,
        }
    }

    fn write(&mut self, b: Bytes) {
        if let Some(w) = &self.writer {
            self.queued += b.len();
            let _ = w.send(b);
        }
    }

    /// Ends the write side once everything queued is written (the writer then reports
    /// `WriterDone`).
    fn finish_writes(&mut self) {
        self.writer = None;
    }
}

// ------------------------------------------------------------------------------- mux

/// [A] `port_mux.go` `MuxPortSession`.
pub(super) struct Mux {
    smux: smux::Session,
    target: DialTarget,
    port: String,
    /// Streams accepted and not yet dialed ([A] fn `handleServerConnections` runs
    /// `AcceptStream` then `DialCall` synchronously, one stream at a time).
    accept_queue: VecDeque<StreamId>,
    /// The dial in progress: (connection id, stream, task).
    dialing: Option<(u64, StreamId, AbortHandle)>,
    streams: HashMap<StreamId, TcpConn>,
    by_conn: HashMap<u64, StreamId>,
}

impl Drop for Mux {
    fn drop(&mut self) {
        if let Some((_, _, t)) = &self.dialing {
            t.abort();
        }
    }
}

impl Mux {
    fn new(target: DialTarget, port: String, keepalive_disabled: bool, now: Instant) -> Mux {
        // [A] `port_mux.go` fn `initialize`: `smux.DefaultConfig()`, `KeepAliveDisabled`
        // per the client version; the keepalive both sends NOPs and enforces the timeout.
        let config = if keepalive_disabled {
            smux::Config::keepalive_disabled()
        } else {
            smux::Config::default()
        };
        let smux = smux::Session::new(Role::Server, config, now.into_std())
            .unwrap_or_else(|_| unreachable!("the reference DefaultConfig is valid"));
        Mux {
            smux,
            target,
            port,
            accept_queue: VecDeque::new(),
            dialing: None,
            streams: HashMap::new(),
            by_conn: HashMap::new(),
        }
    }

    /// The agent stops reading its websocket when smux stops reading its connection: the
    /// Go smux `recvLoop` does not read while 4 MiB (`MaxReceiveBuffer`) are unread, so
    /// the agent's `mgsConn.conn.Write` in fn `HandleStreamMessage` blocks, and that runs
    /// on the websocket reader goroutine. We model this by not taking further frames
    /// (rather than by refusing to ack, which the agent never does).
    pub fn input_blocked(&self) -> bool {
        !self.smux.is_closed() && !self.smux.wants_input()
    }

    pub fn accepts_remote_data(&self) -> bool {
        self.smux.is_closed() || self.smux.pending_transmit() < SMUX_TX_HIGH_WATER
    }

    pub fn has_output(&self) -> bool {
        self.smux.pending_transmit() > 0
    }

    pub fn keepalive_deadline(&self) -> Option<Instant> {
        self.smux.poll_timeout().map(Instant::from_std)
    }

    /// [A] `port_mux.go` fn `transferDataToMgs`: while the channel is active, read at most
    /// `StreamDataPayloadSize` bytes of smux output, send them as one Output message,
    /// sleep 1 ms (`pacing`). With pacing off, up to 64 messages per loop turn.
    pub fn pump(
        &mut self,
        dc: &mut DataChannel,
        next_pump: &mut Instant,
        pacing: Duration,
        now: Instant,
    ) {
        let mut budget = if pacing.is_zero() { 64 } else { 1 };
        while budget > 0 && now >= *next_pump {
            let Some(chunk) = self.smux.poll_transmit(STREAM_DATA_PAYLOAD_SIZE) else {
                break;
            };
            dc.send_stream_data(PayloadType::Output, chunk, now);
            *next_pump = now + pacing;
            budget -= 1;
        }
    }

    /// [A] `port_mux.go` fn `HandleStreamMessage`: Output bytes go into smux; the
    /// TerminateSession flag cancels the session; every other flag (DisconnectToPort
    /// included) and payload type is ignored.
    pub fn on_input(&mut self, env: &mut Env, msg: &ClientMessage) -> HandlerResult {
        match msg.payload_type {
            PayloadType::Output => {
                if self.smux.is_closed() {
                    return HandlerResult::Failed("io: read/write on closed pipe".into());
                }
                if let Err(e) = self.smux.handle_input(&msg.payload) {
                    // The write into the local pipe succeeds; smux's recvLoop then fails.
                    env.violation(
                        ViolationKind::SmuxProtocol,
                        format!("input seq {}: {e}", msg.sequence_number),
                    );
                }
                self.process_events(env);
                HandlerResult::Ok
            }
            PayloadType::Flag => {
                match read_flag(&msg.payload) {
                    Some(2) if agent_at_least(&env.agent_version, "2.3.756.0") => {
                        env.request_end(ExitReason::TerminateFlag, "");
                    }
                    Some(1) => env.violation(
                        ViolationKind::Other,
                        format!(
                            "DisconnectToPort flag seq {} in mux mode (the agent ignores it; the \
                             client and agent disagree on mux)",
                            msg.sequence_number
                        ),
                    ),
                    _ => {}
                }
                HandlerResult::Ok
            }
            _ => HandlerResult::Ok,
        }
    }

    fn process_events(&mut self, env: &mut Env) {
        while let Some(ev) = self.smux.poll_event() {
            match ev {
                Event::Accepted(sid) => {
                    env.report.count(|c| c.streams_opened += 1);
                    self.accept_queue.push_back(sid);
                }
                Event::Readable(sid) | Event::Finished(sid) => self.copy_to_destination(sid),
                Event::Closed(reason) => {
                    // [A]: `AcceptStream` fails, `handleServerConnections` returns an
                    // error, the WritePump ends with exit code 1.
                    let why = match &reason {
                        CloseReason::KeepaliveTimeout => {
                            "smux keepalive timeout: no frame from the client for 30 s".to_owned()
                        }
                        r => format!("smux session closed: {r}"),
                    };
                    env.request_end(ExitReason::PluginFailed, why);
                }
            }
        }
        self.start_dial(env);
    }

    /// One dial at a time, in accept order.
    fn start_dial(&mut self, env: &mut Env) {
        if self.dialing.is_some() || self.smux.is_closed() {
            return;
        }
        let Some(sid) = self.accept_queue.pop_front() else {
            return;
        };
        let conn = env.conn_id();
        let (target, port, events) = (self.target.clone(), self.port.clone(), env.events.clone());
        let task = tokio::spawn(async move {
            let result = dial(target, port).await;
            let _ = events.send(TaskEvent::Dialed { conn, result });
        })
        .abort_handle();
        self.dialing = Some((conn, sid, task));
    }

    /// smux stream → destination: [A] fn `handleDataTransfer`, `io.Copy(conn, stream)`,
    /// then `conn.Close()` at the stream's EOF.
    fn copy_to_destination(&mut self, sid: StreamId) {
        let Some(conn) = self.streams.get_mut(&sid) else {
            return; // not dialed yet: the data waits in smux, counting against 4 MiB
        };
        while conn.writer.is_some() && conn.queued < TCP_WRITE_HIGH_WATER {
            match self.smux.read(sid, COPY_BUFFER) {
                Ok(StreamRead::Data(b)) => conn.write(b),
                Ok(StreamRead::Eof) => conn.finish_writes(),
                Ok(StreamRead::Blocked) | Err(_) => break,
            }
        }
    }

    /// [A] fn `handleServerConnections` after `DialCall`.
    pub fn on_dialed(
        &mut self,
        env: &mut Env,
        dc: &mut DataChannel,
        conn: u64,
        result: Result<TcpStream, String>,
        now: Instant,
    ) {
        let Some((id, sid, _)) = self.dialing.take_if(|(id, _, _)| *id == conn) else {
            return;
        };
        match result {
            Ok(stream) if self.smux.contains(sid) => {
                self.streams
                    .insert(sid, TcpConn::spawn(stream, id, COPY_BUFFER, env));
                self.by_conn.insert(id, sid);
                self.copy_to_destination(sid);
            }
            Ok(_) => {}
            Err(e) => {
                // "Unable to dial connection to server": Flag ConnectToPortError as stream
                // data, then `stream.Close()` (FIN). The session stays up.
                tracing::debug!(%sid, error = %e, "agent: mux dial failed");
                env.report.count(|c| c.dials_failed += 1);
                dc.send_stream_data(
                    PayloadType::Flag,
                    Bytes::copy_from_slice(&Flag::ConnectToPortError.to_payload()),
                    now,
                );
                let _ = self.smux.close(sid);
            }
        }
        self.start_dial(env);
    }

    pub fn on_wrote(&mut self, conn: u64, n: usize) {
        let Some(&sid) = self.by_conn.get(&conn) else {
            return;
        };
        if let Some(c) = self.streams.get_mut(&sid) {
            c.queued = c.queued.saturating_sub(n);
        }
        self.copy_to_destination(sid);
    }

    /// The stream → destination copy ended (stream EOF written, or a write error): Go
    /// closes the connection, which ends the other copy, which closes the stream (FIN).
    pub fn on_writer_done(&mut self, conn: u64) {
        if let Some(sid) = self.by_conn.remove(&conn) {
            self.streams.remove(&sid);
            let _ = self.smux.close(sid);
        }
    }

    /// Destination → smux stream: [A] fn `handleDataTransfer`, `io.Copy(stream, conn)`
    /// then `stream.Close()` (FIN) at EOF or error; the other copy then fails and closes
    /// the connection (unwritten client data is dropped).
    pub fn on_remote_data(&mut self, d: RemoteData) {
        match d {
            RemoteData::Data { conn, bytes } => {
                if let Some(&sid) = self.by_conn.get(&conn) {
                    let _ = self.smux.write_bytes(sid, bytes);
                }
            }
            RemoteData::Eof { conn, .. } => {
                if let Some(sid) = self.by_conn.remove(&conn) {
                    self.streams.remove(&sid);
                    let _ = self.smux.close(sid);
                }
            }
        }
    }

    pub fn on_timeout(&mut self, env: &mut Env, now: Instant) {
        if self
            .smux
            .poll_timeout()
            .is_some_and(|t| now.into_std() >= t)
        {
            self.smux.handle_timeout(now.into_std());
            self.process_events(env);
        }
    }
}

/// [A] `binary.Read(buf, BigEndian, &flag)`: the first four bytes; a shorter payload
/// leaves the flag 0 (ignored).
fn read_flag(payload: &[u8]) -> Option<u32> {
    let b: [u8; 4] = payload.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

// ----------------------------------------------------------------------------- basic

/// [A] `port_basic.go` `BasicPortSession`.
pub(super) struct Basic {
    target: DialTarget,
    port: String,
    port_type: String,
    conn: Option<TcpConn>,
    /// [A] `reconnectToPort`.
    reconnect: bool,
    /// Whether a connection was ever made (before that, input is not-ready).
    connected_once: bool,
    dialing: Option<(u64, AbortHandle)>,
    /// Whether to look for an smux SYN in the first payload of a connection.
    fresh: bool,
}

impl Drop for Basic {
    fn drop(&mut self) {
        if let Some((_, t)) = &self.dialing {
            t.abort();
        }
    }
}

impl Basic {
    pub fn dialing(&self) -> bool {
        self.dialing.is_some()
    }

    fn start_dial(&mut self, env: &mut Env) {
        if self.dialing.is_some() {
            return;
        }
        let conn = env.conn_id();
        let (target, port, events) = (self.target.clone(), self.port.clone(), env.events.clone());
        let task = tokio::spawn(async move {
            let result = dial(target, port).await;
            let _ = events.send(TaskEvent::Dialed { conn, result });
        })
        .abort_handle();
        self.dialing = Some((conn, task));
    }

    /// A blocking `conn.Write` stops the websocket reader.
    pub fn input_blocked(&self) -> bool {
        self.conn
            .as_ref()
            .is_some_and(|c| c.queued > TCP_WRITE_HIGH_WATER)
    }

    /// [A] `port.go` fn `InputStreamMessageHandler` (`IsConnectionAvailable`: not-ready
    /// until the first dial succeeded) and `port_basic.go` fn `HandleStreamMessage`.
    pub fn on_input(&mut self, env: &mut Env, msg: &ClientMessage) -> HandlerResult {
        if !self.connected_once {
            return HandlerResult::NotReady;
        }
        match msg.payload_type {
            PayloadType::Output => {
                if self.reconnect {
                    // The handler dials inline ([A] fn `InitializeSession`): the reader
                    // waits, and the message is written (and acked) once connected.
                    self.start_dial(env);
                    return HandlerResult::Stall;
                }
                let Some(conn) = self.conn.as_mut() else {
                    return HandlerResult::Failed("use of closed network connection".into());
                };
                if std::mem::take(&mut self.fresh) && looks_like_smux_syn(&msg.payload) {
                    env.violation(
                        ViolationKind::Other,
                        format!(
                            "basic-mode input seq {} starts with an smux SYN frame: the client \
                             uses mux but the agent chose basic",
                            msg.sequence_number
                        ),
                    );
                }
                conn.write(msg.payload.clone());
                HandlerResult::Ok
            }
            PayloadType::Flag => {
                match read_flag(&msg.payload) {
                    // "DisconnectToPort flag is sent by client when tcp connection on client
                    // side is closed": close ours; the read pump then fails and waits to
                    // reconnect on the next data ([A] fn `handlePortError`).
                    Some(1) if agent_at_least(&env.agent_version, "2.3.714.0") => {
                        self.conn = None;
                        self.reconnect = true;
                    }
                    Some(2) if agent_at_least(&env.agent_version, "2.3.756.0") => {
                        env.request_end(ExitReason::TerminateFlag, "");
                    }
                    _ => {}
                }
                HandlerResult::Ok
            }
            _ => HandlerResult::Ok,
        }
    }

    pub fn on_dialed(&mut self, env: &mut Env, conn: u64, result: Result<TcpStream, String>) {
        if self.dialing.as_ref().is_none_or(|(id, _)| *id != conn) {
            return;
        }
        self.dialing = None;
        match result {
            Ok(stream) => {
                env.report.count(|c| c.streams_opened += 1);
                self.conn = Some(TcpConn::spawn(stream, conn, STREAM_DATA_PAYLOAD_SIZE, env));
                self.connected_once = true;
                self.reconnect = false;
                self.fresh = true;
            }
            Err(e) => {
                // Initial dial: the plugin fails ([A] fn `InitializeSession`). Redial: the
                // write pump returns ErrorExitCode and the session ends.
                env.report.count(|c| c.dials_failed += 1);
                env.request_end(
                    ExitReason::PluginFailed,
                    format!("Unable to connect to specified port: {e}"),
                );
            }
        }
    }

    pub fn on_wrote(&mut self, conn: u64, n: usize) {
        if let Some(c) = self.conn.as_mut().filter(|c| c.id == conn) {
            c.queued = c.queued.saturating_sub(n);
        }
    }

    /// A failed write: the agent's handler would return the error (no ack) until the read
    /// pump notices the broken connection and arms the reconnect.
    pub fn on_writer_done(&mut self, conn: u64, error: Option<String>) {
        if error.is_some() && self.conn.as_ref().is_some_and(|c| c.id == conn) {
            self.conn = None;
            self.reconnect = true;
        }
    }

    /// [A] `port_basic.go` fn `WritePump` read errors: for LocalPortForwarding, close and
    /// wait for the next client data to reconnect (the client is not told); for other
    /// types (SSH), EOF ends the session successfully, an error fails it.
    pub fn on_remote_data(&mut self, env: &mut Env, d: RemoteData) {
        let RemoteData::Eof { conn, error } = d else {
            return;
        };
        if self.conn.as_ref().is_none_or(|c| c.id != conn) {
            return;
        }
        if self.port_type == LOCAL_PORT_FORWARDING {
            self.conn = None;
            self.reconnect = true;
        } else if error {
            env.request_end(ExitReason::PluginFailed, "Failed to read from port");
        } else {
            env.request_end(ExitReason::TerminateFlag, "");
        }
    }
}

/// An 8-byte smux v1 SYN header for an odd (client) stream id.
fn looks_like_smux_syn(p: &[u8]) -> bool {
    p.len() >= 8
        && p[0] == 1
        && p[1] == 0
        && p[2] == 0
        && p[3] == 0
        && u32::from_le_bytes([p[4], p[5], p[6], p[7]]) % 2 == 1
}

// ------------------------------------------------------------------------ lifecycle

impl Agent {
    /// [A] `port.go` fn `execute` → `initializeParameters` (after the handshake).
    pub(super) fn start_port(&mut self, now: Instant) {
        let super::SessionKind::Port { properties } = &self.cfg.kind else {
            return;
        };
        let params = match parse_params(properties) {
            Ok(p) => p,
            Err(e) => {
                self.env.request_end(ExitReason::PluginFailed, e);
                return;
            }
        };
        let agent = self.env.agent_version.clone();
        // Agents before 3.1.1188.0 have no `host` parameter ([A] `RELEASENOTES.md`
        // "Added support for port forwarding to remote host"): they dial localhost.
        if params.host.is_empty() || !agent_at_least(&agent, "3.1.1188.0") {
            self.init_port(params, DialTarget::Localhost, now);
        } else if agent_at_least(&agent, "3.2.1041.0") {
            // [A] fn `validateParameters`: `net.LookupHost` once per session.
            let events = self.env.events.clone();
            let host = params.host.clone();
            self.pending_params = Some(params);
            tokio::spawn(async move {
                let r = match tokio::net::lookup_host((host.as_str(), 0)).await {
                    Ok(it) => {
                        let mut v: Vec<IpAddr> = Vec::new();
                        for a in it {
                            if !v.contains(&a.ip()) {
                                v.push(a.ip());
                            }
                        }
                        Ok(v)
                    }
                    Err(e) => Err(e.to_string()),
                };
                let _ = events.send(TaskEvent::Resolved(r));
            });
        } else {
            let host = params.host.clone();
            self.init_port(params, DialTarget::Name(host), now);
        }
    }

    /// The lookup finished: deny-list check, then the session ([A] fn
    /// `validateParameters`; a failed lookup leaves the address list empty, so every dial
    /// fails with "missing address").
    pub(super) fn on_resolved(&mut self, r: Result<Vec<IpAddr>, String>, now: Instant) {
        let Some(params) = self.pending_params.take() else {
            return;
        };
        if self.ending() {
            return;
        }
        let addrs = match r {
            Ok(v) => v,
            Err(e) => {
                tracing::debug!(host = %params.host, error = %e, "agent: lookup failed");
                Vec::new()
            }
        };
        let denied: Vec<IpAddr> = DENIED_REMOTE_IPS
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect();
        if addrs.iter().any(|a| denied.contains(a)) {
            self.env.request_end(
                ExitReason::PluginFailed,
                format!("Forwarding to IP address {} is forbidden.", params.host),
            );
            return;
        }
        self.init_port(params, DialTarget::Addrs(addrs), now);
    }

    /// [A] `port.go` fn `GetSession` and `InitializeSession`.
    fn init_port(&mut self, params: PortParams, target: DialTarget, now: Instant) {
        if self.ending() {
            return;
        }
        let agent = self.env.agent_version.clone();
        let mux = params.port_type == LOCAL_PORT_FORWARDING
            && agent_uses_mux_for_client(&self.client_version)
            && agent_has_mux(&agent);
        tracing::debug!(mux, client = %self.client_version, "agent: port session");
        if mux {
            let ka_off = agent_keepalive_disabled(&agent, &self.client_version);
            self.plugin = Plugin::Mux(Box::new(Mux::new(target, params.port_number, ka_off, now)));
        } else {
            let mut b = Basic {
                target,
                port: params.port_number,
                port_type: params.port_type,
                conn: None,
                reconnect: false,
                connected_once: false,
                dialing: None,
                fresh: true,
            };
            b.start_dial(&mut self.env);
            self.plugin = Plugin::Basic(Box::new(b));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn params_follow_the_agent_struct() {
        let p = parse_params(&json!({"portNumber":"5432","type":"LocalPortForwarding",
            "localPortNumber":"0","host":"db"}))
        .unwrap();
        assert_eq!(
            p,
            PortParams {
                host: "db".into(),
                port_number: "5432".into(),
                port_type: "LocalPortForwarding".into()
            }
        );
        assert!(
            parse_params(&json!({"type":"LocalPortForwarding"}))
                .unwrap_err()
                .starts_with("Port number is empty in session properties.")
        );
        assert!(
            parse_params(&json!({"portNumber":5432}))
                .unwrap_err()
                .starts_with("Unable to remarshal session properties.")
        );
    }

    #[test]
    fn keepalive_rules_by_agent_release() {
        // Conditional since 3.1.1575.0.
        assert!(agent_keepalive_disabled("3.3.987.0", "1.2.650.0"));
        assert!(!agent_keepalive_disabled("3.3.987.0", "1.2.331.0"));
        // Unconditionally off in 3.1.1446.0 .. 3.1.1511.0.
        assert!(agent_keepalive_disabled("3.1.1511.0", "1.2.0.0"));
        // Always on before.
        assert!(!agent_keepalive_disabled("3.1.1374.0", "1.2.650.0"));
        assert!(agent_has_mux("3.0.222.0"));
        assert!(!agent_has_mux("3.0.196.0"));
    }

    #[test]
    fn basic_input_is_not_ready_until_the_first_dial_succeeded() {
        // [A] `port.go` fn `InputStreamMessageHandler`: `!IsConnectionAvailable()` →
        // ErrHandlerNotReady, for data and flags alike.
        let (ev, _ev_rx) = mpsc::unbounded_channel();
        let (data, _data_rx) = mpsc::channel(1);
        let mut env = Env::for_test(ev, data);
        let mut b = Basic {
            target: DialTarget::Localhost,
            port: "1".into(),
            port_type: LOCAL_PORT_FORWARDING.into(),
            conn: None,
            reconnect: false,
            connected_once: false,
            dialing: None,
            fresh: true,
        };
        for (pt, p) in [
            (PayloadType::Output, &b"x"[..]),
            (PayloadType::Flag, &Flag::TerminateSession.to_payload()[..]),
        ] {
            let m = ClientMessage {
                message_type: bastion_proto::kind::MessageType::InputStreamData,
                schema_version: 1,
                created_date: 1,
                sequence_number: 1,
                flags: 0,
                message_id: uuid::Uuid::new_v4(),
                payload_type: pt,
                payload: Bytes::copy_from_slice(p),
            };
            assert!(matches!(b.on_input(&mut env, &m), HandlerResult::NotReady));
        }
    }

    #[test]
    fn smux_syn_heuristic() {
        assert!(looks_like_smux_syn(&[1, 0, 0, 0, 3, 0, 0, 0]));
        assert!(!looks_like_smux_syn(&[1, 2, 0, 0, 3, 0, 0, 0]));
        assert!(!looks_like_smux_syn(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"));
    }

    #[tokio::test]
    async fn dial_walks_the_address_list() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port().to_string();
        // 127.0.0.2 is loopback too, but nothing listens there: refused, then the next.
        let list = vec!["127.0.0.2".parse().unwrap(), "127.0.0.1".parse().unwrap()];
        let s = dial(DialTarget::Addrs(list), port.clone()).await.unwrap();
        assert_eq!(s.peer_addr().unwrap().ip().to_string(), "127.0.0.1");
        let refused = dial(
            DialTarget::Addrs(vec!["127.0.0.2".parse().unwrap()]),
            port.clone(),
        )
        .await
        .unwrap_err();
        assert!(refused.starts_with("dial tcp 127.0.0.2:"), "{refused}");
        assert_eq!(
            dial(DialTarget::Addrs(vec![]), port).await.unwrap_err(),
            "missing address"
        );
        assert!(dial(DialTarget::Localhost, "x".into()).await.is_err());
    }
}
