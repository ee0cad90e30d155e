//! The agent side of a simulated Session Manager session, modelled on amazon-ssm-agent
//! ("[A]", `aws/amazon-ssm-agent` at `1c217c89`, after release 3.3.987.0).
//!
//! Every rule names the [A] file and function it comes from. The agent's reliability
//! layer is implemented here from the agent source, independently of the client's
//! `proto::channel`/`proto::session`, so that a client bug cannot be mirrored; the
//! ClientMessage codec, payload types, version rules and the smux session are shared
//! (they are pinned by golden vectors and interop tests).
//!
//! * `datachannel`: sequence numbers, outgoing buffer and resend scheduler, RTT/RTO, acks.
//! * `core`: the event loop, frame validation, `handleStreamDataMessage`, the handshake,
//!   the session lifecycle, and every client protocol violation we can see.
//! * `port`: the port plugin, mux (smux v1 server, one dial per stream) and basic.
//! * `shell`: Standard_Stream, `sh` in a pty.
//! * `pacer`: the pumps' 1 ms pause with the precision of Go's `time.Sleep`.
//!
//! Not modelled: KMS encryption (port sessions are never encrypted; shell sessions here
//! run unencrypted), InteractiveCommands/NonInteractiveCommands, RunAs users, session
//! logging, `agent_session_state` messages to the service, the VPC-resolver part of the
//! deny list, and the behaviour of agents older than 3.0.222.0 beyond the version gates
//! noted in `port`.

mod core;
mod datachannel;
mod pacer;
mod port;
mod shell;
#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::report::SessionReport;

/// How the simulated agent behaves.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// The `AgentVersion` sent in the HandshakeRequest; also gates version-dependent
    /// agent behaviour (mux needs > 3.0.196.0; smux keepalive rules; remote host ≥
    /// 3.1.1188.0; DNS once per session ≥ 3.2.1041.0; TerminateSession flag ≥ 2.3.756.0;
    /// DisconnectToPort ≥ 2.3.714.0). Default `3.3.987.0`.
    pub agent_version: String,
    /// Sleep after each send in the port and shell read pumps ([A] `port_mux.go` fn
    /// `transferDataToMgs`, `port_basic.go` fn `WritePump`: `time.Sleep(time.Millisecond)`).
    /// Default 1 ms; zero turns pacing off.
    pub pacing: Duration,
    /// Fault knob: delay before the HandshakeRequest. Default 0.
    pub handshake_delay: Duration,
    /// Fault knob: how long after receiving a client message the agent sends its
    /// acknowledgement, as an agent emulator that acks late does. Default 0 (the agent
    /// acks at once, on its websocket reader, [A] fn `handleStreamDataMessage`).
    pub ack_delay: AckDelay,
    /// The session document's plugin.
    pub kind: SessionKind,
    /// A HandshakeResponse ClientVersion below this is a `ClientVersionUnsupported`
    /// violation (the session goes on). Default `None` (no floor).
    pub min_client_version: Option<String>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            agent_version: "3.3.987.0".to_owned(),
            pacing: Duration::from_millis(1),
            handshake_delay: Duration::ZERO,
            ack_delay: AckDelay::default(),
            kind: SessionKind::Shell,
            min_client_version: None,
        }
    }
}

/// Where the agent reads its ack delay: read again for every acknowledgement, so that
/// the simulator's fault knob (`POST /sim/faults` `ack_delay_ms`) applies to running
/// sessions at once, as the other message faults do.
#[derive(Clone)]
pub struct AckDelay(Arc<dyn Fn() -> Duration + Send + Sync>);

impl AckDelay {
    /// Always `delay`.
    pub fn fixed(delay: Duration) -> AckDelay {
        AckDelay(Arc::new(move || delay))
    }

    /// Whatever `read` answers when an acknowledgement is made.
    pub fn live(read: impl Fn() -> Duration + Send + Sync + 'static) -> AckDelay {
        AckDelay(Arc::new(read))
    }

    /// The current delay.
    pub fn get(&self) -> Duration {
        (self.0)()
    }
}

impl Default for AckDelay {
    fn default() -> Self {
        AckDelay::fixed(Duration::ZERO)
    }
}

impl std::fmt::Debug for AckDelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AckDelay({:?})", self.get())
    }
}

/// The plugin a session runs.
#[derive(Clone, Debug)]
pub enum SessionKind {
    /// Port plugin; `properties` = the document properties after substitution, e.g.
    /// `{"portNumber":"5432","type":"LocalPortForwarding","localPortNumber":"0","host":"db.example"}`
    /// (`host` absent for AWS-StartPortForwardingSession).
    Port {
        /// The document properties.
        properties: serde_json::Value,
    },
    /// Standard_Stream: `/bin/sh` in a pty (no handshake, since there is no KMS).
    Shell,
}

/// How and why a session ended.
#[derive(Clone, Debug)]
pub struct AgentExit {
    /// Text for the `channel_closed` Output; empty on a clean exit.
    pub output: String,
    /// Why.
    pub reason: ExitReason,
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The session ended normally from inside: the client's TerminateSession flag (port
    /// sessions), or the shell exited (shell sessions), or the destination closed an SSH
    /// style (non-LocalPortForwarding) basic port session.
    TerminateFlag,
    /// The HandshakeResponse failed an action ([A] fn `handleHandshakeResponse`).
    HandshakeFailed,
    /// No HandshakeResponse within 15 s ([A] fn `PerformHandshake`).
    HandshakeTimeout,
    /// The plugin failed: bad properties, forbidden address, basic-mode dial failure,
    /// smux protocol error or keepalive timeout, pty start failure.
    PluginFailed,
    /// The input closed (TerminateSession API, idle timeout) or `channel_closed` arrived.
    InputClosed,
}

/// Runs one agent session.
///
/// Frames (one ClientMessage per websocket binary frame, already decoded from the
/// websocket by the caller; TEXT frames are passed as bytes too) arrive on `from_client`;
/// frames the agent sends go to `to_client` (the caller forwards them to whichever client
/// websocket is attached, or drops them when none is: retransmission must recover). The
/// service also injects `pause_publication` / `start_publication` ClientMessages into
/// `from_client` when the client websocket detaches/attaches. When `from_client` is
/// closed (TerminateSession API, idle timeout) the agent stops. The function returns when
/// the session ends; after a plugin-side end (flag, failure) it first waits up to 2 s for
/// its unacknowledged messages ([A] fn `PrepareToCloseChannel`).
///
/// The caller must drain `to_client` independently of feeding `from_client`: like the
/// agent, this stops reading its input while a destination or smux is backed up (the Go
/// agent's websocket reader blocks in the plugin's write), while it keeps sending.
///
/// Counters touched: `data_messages_*`, `data_bytes_*`, `acks_*`, `retransmissions`,
/// `duplicates_from_client`, `out_of_order_from_client`, `streams_opened`,
/// `dials_failed` (not the frame, connection or fault counters, which are the service's).
pub async fn run_agent(
    cfg: AgentConfig,
    session_id: String,
    report: Arc<SessionReport>,
    from_client: mpsc::Receiver<Bytes>,
    to_client: mpsc::Sender<Bytes>,
) -> AgentExit {
    let span = tracing::debug_span!("sim_agent", session = %session_id);
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let (data_tx, data_rx) = mpsc::channel(4);
    let agent = core::Agent::new(
        cfg,
        report,
        to_client,
        events_tx,
        data_tx,
        tokio::time::Instant::now(),
    );
    agent
        .run(from_client, events_rx, data_rx)
        .instrument(span)
        .await
}
