//! A port-forwarding session after its handshake: the tunnelled connections (smux
//! streams in mux mode, one connection at a time in basic mode), half-close, the
//! receive gate, upload and download backpressure, and the websocket's liveness.
//!
//! # Contract (sans-IO, in the manner of quinn-proto's `Connection`)
//!
//! [`PortSession`] never reads a socket or a clock and never sleeps. Its driver:
//!
//! * feeds inputs: websocket frames to [`PortSession::handle_frame`], any other frame
//!   read (pong, close) to [`PortSession::on_traffic`], expired timers to
//!   [`PortSession::handle_timeout`], the local connections' actions to
//!   [`PortSession::open_stream`], [`PortSession::write`], [`PortSession::finish`] and
//!   [`PortSession::close`], and whether its websocket writer is blocked to
//!   [`PortSession::set_writer_blocked`];
//! * after every input, drains the outputs: [`PortSession::poll_transmit`] until `None`
//!   (binary websocket frames, in order), [`PortSession::poll_event`] until `None`
//!   (read [`PortSession::read`] on [`PortEvent::Readable`] until it returns
//!   [`StreamRead::Blocked`] or [`StreamRead::Eof`]), then [`PortSession::end`], and
//!   sleeps until [`PortSession::poll_timeout`] or the next input;
//! * stops reading the websocket while [`PortSession::wants_input`] is false (receive
//!   backpressure: the agent's writes block, as they would against the plugin) and
//!   stops taking upload bytes while [`PortSession::upload_room`] is false.
//!
//! `now` must never go backwards between calls. The wall clock for CreatedDate is set
//! with [`PortSession::set_wall_clock`] before each turn's inputs.
//!
//! A second session kind (an interactive shell: `Standard_Stream`, optionally with
//! KMS) sits beside this type on the same [`ClientSession`] (channel, handshake,
//! crypto) and [`Liveness`]; only the stream table is port-specific.
//!
//! Sources: \[P\] `src/sessionmanagerplugin/session/portsession/` (`muxportforwarding.go`,
//! `basicportforwarding.go`, `portsession.go`), \[A\]
//! `agent/session/plugins/port/port_mux.go`; `proto-docs/tunnel.md` has the rules.

mod basic;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;

use self::basic::{Basic, Upload};
use crate::channel::{CloseReason as ChannelCloseReason, FrameError};
use crate::kind::Flag;
use crate::liveness::{DeadReason, Liveness, LivenessAction, LivenessConfig, PingKind};
use crate::session::{ClientSession, DataMode, SessionEvent, SessionInfo};
use crate::smux::{self, StreamId, StreamRead};

/// Identifies a tunnelled connection: its smux stream id, or a counter in basic mode.
pub type StreamKey = u32;

/// Settings of a [`PortSession`].
#[derive(Clone, Debug)]
pub struct PortConfig {
    /// Largest payload per `input_stream_data` message. The plugin sends at most 1024
    /// bytes ([P] `config.go` `StreamDataPayloadSize`); the service's limit is not
    /// documented, so the default stays there.
    pub max_payload: usize,
    /// Upload bytes allowed to wait for the channel window before
    /// [`PortSession::upload_room`] turns false.
    pub max_pending_upload: usize,
    /// Basic mode: received bytes allowed to wait for the connection before
    /// [`PortSession::wants_input`] turns false.
    pub max_pending_download: usize,
    /// How long a connection whose client shut down its sending side stays open for
    /// the reply once the remote host goes quiet. The agent turns a smux FIN into a
    /// full close of its TCP connection ([A] `port_mux.go` fn `handleDataTransfer`:
    /// `io.Copy` then `Close`), which would discard a reply still on its way; so the FIN
    /// waits until the remote host closes or has sent nothing for this long.
    pub half_close_linger: Duration,
    /// Received bytes the smux session may hold for connections that have not read
    /// them, all streams together; past it [`PortSession::wants_input`] is false. smux
    /// v1 has no per-stream flow control, so this is what one stalled reader may take
    /// before the other connections of its session stall too (the plugin uses xtaci's
    /// default of 4 MiB).
    pub smux_receive_buffer: usize,
    /// Keepalive, dead websocket, probes.
    pub liveness: LivenessConfig,
}

impl Default for PortConfig {
    fn default() -> Self {
        PortConfig {
            max_payload: 1024,
            max_pending_upload: 256 * 1024,
            max_pending_download: 256 * 1024,
            half_close_linger: Duration::from_secs(3),
            smux_receive_buffer: 16 * 1024 * 1024,
            liveness: LivenessConfig::default(),
        }
    }
}

/// Something the driver must act on, from [`PortSession::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// The connection has bytes (or its end) to read: call [`PortSession::read`] until
    /// it returns [`StreamRead::Blocked`] or [`StreamRead::Eof`].
    Readable(StreamKey),
    /// The connection is over on the remote side (its half-close linger ran out, or
    /// smux forgot it): no more bytes come; close the local connection.
    Closed(StreamKey),
    /// Send a websocket ping now.
    Ping(PingKind),
    /// The websocket stopped answering: drop it and resume the session.
    WebsocketDead(DeadReason),
    /// The agent could not connect to the remote host and port
    /// (`ConnectToPortError` flag).
    ConnectToPortError,
    /// The agent's smux stream is not valid smux v1 (the session ends; see
    /// [`PortSession::end`]).
    SmuxError(smux::SessionError),
}

/// How a port session ended on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PortEnd {
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
    /// The smux session ended (protocol error from the agent's side).
    Smux(smux::CloseReason),
}

impl fmt::Display for PortEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PortEnd::ChannelClosed { output } if output.is_empty() => {
                f.write_str("the agent closed the channel")
            }
            PortEnd::ChannelClosed { output } => {
                write!(f, "the agent closed the channel: {output}")
            }
            PortEnd::ResendTimeout { sequence_number } => write!(
                f,
                "message {sequence_number} was never acknowledged; the data channel gave up"
            ),
            PortEnd::Smux(reason) => write!(f, "smux session closed: {reason}"),
        }
    }
}

/// Why a [`PortSession`] cannot be made.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PortError {
    /// The handshake has not completed.
    #[error("the session's handshake has not completed")]
    NotReady,
    /// The session is a shell (`Standard_Stream`), not port forwarding.
    #[error("the session is not port forwarding (type {0}); check the document")]
    NotPortForwarding(String),
    /// The smux settings are invalid.
    #[error("invalid smux settings: {0}")]
    Smux(#[from] smux::ConfigError),
}

/// Why a connection could not be opened.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Basic mode carries one connection at a time, as the agent does: wait until
    /// [`PortSession::can_open`].
    #[error("basic mode: another connection is open")]
    BasicBusy,
    /// The session has ended.
    #[error("the session has ended: {0}")]
    Ended(PortEnd),
    /// smux refused (ids exhausted, session closed).
    #[error(transparent)]
    Smux(#[from] smux::StreamError),
}

/// The connection is not open (any more).
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
#[error("connection {0} is not open")]
pub struct UnknownStream(pub StreamKey);

/// Counters of a [`PortSession`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortStats {
    /// User bytes taken for the remote host.
    pub bytes_up: u64,
    /// Stream bytes received from the agent (smux framing included in mux mode).
    pub bytes_down: u64,
    /// Connections open now.
    pub open_streams: usize,
    /// Connections opened since the start.
    pub total_streams: u64,
    /// ConnectToPortError flags from the agent.
    pub connect_to_port_errors: u64,
    /// Retransmitted messages (the channel's count).
    pub retransmissions: u64,
}

/// One tunnelled connection as the session sees it.
#[derive(Debug)]
struct Stream {
    /// Mux mode: the agent sent FIN (the remote host closed).
    remote_fin: bool,
    /// Mux mode: when the local client shut down its sending side; the FIN waits (see
    /// [`PortConfig::half_close_linger`]).
    local_eof_at: Option<Instant>,
    /// When data from the remote host last reached this connection.
    last_remote_data: Instant,
}

impl Stream {
    fn fin_due(&self, linger: Duration) -> Option<Instant> {
        self.local_eof_at
            .map(|eof| eof.max(self.last_remote_data) + linger)
    }
}

enum Mode {
    Mux(Box<smux::Session>),
    Basic(Basic),
}

/// A port-forwarding session: see the module documentation for the call contract.
pub struct PortSession {
    session: ClientSession,
    info: SessionInfo,
    mode: Mode,
    streams: BTreeMap<StreamKey, Stream>,
    liveness: Liveness,
    config: PortConfig,
    events: VecDeque<PortEvent>,
    stats: PortStats,
    writer_blocked: bool,
}

impl fmt::Debug for PortSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PortSession")
            .field("mode", &self.info.mode)
            .field("streams", &self.streams.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl PortSession {
    /// Takes over a session whose handshake completed. The data mode was decided there
    /// (both sides' version gates, `proto-docs/handshake.md` §9): mux uses smux with the
    /// keepalive the agent expects; basic carries one connection at a time.
    pub fn new(
        session: ClientSession,
        config: PortConfig,
        now: Instant,
    ) -> Result<PortSession, PortError> {
        let info = session.info().cloned().ok_or(PortError::NotReady)?;
        if !session.is_ready() {
            return Err(PortError::NotReady);
        }
        let mode = match info.mode {
            DataMode::Mux => Mode::Mux(Box::new(smux::Session::new(
                smux::Role::Client,
                smux::Config {
                    max_receive_buffer: config.smux_receive_buffer,
                    ..smux::Config::for_ssm(info.agent_disables_smux_keepalive)
                },
                now,
            )?)),
            DataMode::Basic => Mode::Basic(Basic::default()),
            DataMode::StandardStream => {
                return Err(PortError::NotPortForwarding(info.session_type.clone()));
            }
        };
        let mut port = PortSession {
            session,
            info,
            mode,
            streams: BTreeMap::new(),
            liveness: Liveness::new(config.liveness, now),
            config,
            events: VecDeque::new(),
            stats: PortStats::default(),
            writer_blocked: false,
        };
        // Output that arrived with the handshake is processed like any other.
        port.pump(now);
        Ok(port)
    }

    /// What the handshake established.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// True in mux mode (smux streams), false in basic mode.
    pub fn is_mux(&self) -> bool {
        matches!(self.mode, Mode::Mux(_))
    }

    /// Sets the wall clock that CreatedDate is stamped from (see
    /// [`ClientSession::set_wall_clock`]).
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.session.set_wall_clock(now, unix_ms);
    }

    /// Processes one websocket frame (TEXT or BINARY).
    pub fn handle_frame(&mut self, now: Instant, frame: Bytes) -> Result<(), FrameError> {
        self.liveness.on_traffic(now);
        let result = self.session.handle_frame(frame, now);
        self.pump(now);
        result
    }

    /// A websocket frame that carries no message (pong, ping) was read: the websocket
    /// is alive.
    pub fn on_traffic(&mut self, now: Instant) {
        self.liveness.on_traffic(now);
    }

    /// Whether the websocket writer is blocked (a full socket): silence does not count
    /// against the websocket while it is.
    pub fn set_writer_blocked(&mut self, now: Instant, blocked: bool) {
        self.writer_blocked = blocked;
        self.refresh_liveness(now);
    }

    /// Runs the timers due at `now`: retransmissions, smux keepalive, half-close
    /// lingers, liveness.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.session.handle_timeout(now);
        if let Mode::Mux(smux) = &mut self.mode {
            smux.handle_timeout(now);
        }
        self.finish_lingering(now);
        self.refresh_liveness(now);
        while let Some(action) = self.liveness.handle_timeout(now) {
            self.events.push_back(match action {
                LivenessAction::Ping(kind) => PortEvent::Ping(kind),
                LivenessAction::Dead(why) => PortEvent::WebsocketDead(why),
            });
            if matches!(action, LivenessAction::Dead(_)) {
                break;
            }
        }
        self.pump(now);
    }

    /// True if a connection can be opened now (always in mux mode; in basic mode when
    /// no other connection is open).
    pub fn can_open(&self) -> bool {
        self.end().is_none()
            && match &self.mode {
                Mode::Mux(_) => true,
                Mode::Basic(b) => b.current.is_none(),
            }
    }

    /// Opens a tunnelled connection to the session's remote host. A websocket that
    /// has been quiet is probed first (after a laptop sleep it may be dead without
    /// knowing it).
    pub fn open_stream(&mut self, now: Instant) -> Result<StreamKey, OpenError> {
        if let Some(end) = self.end() {
            return Err(OpenError::Ended(end));
        }
        let key = match &mut self.mode {
            Mode::Mux(smux) => smux.open_stream()?.get(),
            Mode::Basic(b) => b.open().ok_or(OpenError::BasicBusy)?,
        };
        if let Some(LivenessAction::Ping(kind)) = self.liveness.on_new_connection(now) {
            self.events.push_back(PortEvent::Ping(kind));
        }
        self.streams.insert(
            key,
            Stream {
                remote_fin: false,
                local_eof_at: None,
                last_remote_data: now,
            },
        );
        self.stats.total_streams += 1;
        self.stats.open_streams = self.streams.len();
        self.pump(now);
        Ok(key)
    }

    /// True while more upload bytes may be written (the bytes already queued for the
    /// channel window are below [`PortConfig::max_pending_upload`]).
    pub fn upload_room(&self) -> bool {
        let pending = match &self.mode {
            Mode::Mux(smux) => smux.pending_transmit(),
            Mode::Basic(b) => b.up_bytes,
        };
        pending < self.config.max_pending_upload
    }

    /// Queues the local client's bytes for the remote host.
    pub fn write(&mut self, key: StreamKey, data: Bytes) -> Result<(), UnknownStream> {
        if !self.streams.contains_key(&key) {
            return Err(UnknownStream(key));
        }
        self.stats.bytes_up += data.len() as u64;
        match &mut self.mode {
            Mode::Mux(smux) => {
                smux.write_bytes(StreamId(key), data)
                    .map_err(|_| UnknownStream(key))?;
            }
            Mode::Basic(b) => b.push_up(data),
        }
        Ok(())
    }

    /// The local client shut down its sending side (a half-close: replies still come).
    ///
    /// Mux mode: the FIN waits for the reply (see [`PortConfig::half_close_linger`]).
    /// Basic mode: DisconnectToPort, after everything written before it ([P]
    /// `basicportforwarding.go` fn `ReadStream`); the connection is over.
    pub fn finish(&mut self, key: StreamKey, now: Instant) {
        if !self.streams.contains_key(&key) {
            return;
        }
        match &mut self.mode {
            Mode::Mux(_) => {
                if let Some(s) = self.streams.get_mut(&key) {
                    s.local_eof_at.get_or_insert(now);
                }
            }
            Mode::Basic(b) => {
                b.disconnect();
                self.streams.remove(&key);
            }
        }
        self.stats.open_streams = self.streams.len();
        self.pump(now);
    }

    /// The local client is gone entirely (nobody reads any more): no reply can reach
    /// anyone, so the connection closes now, without a linger.
    pub fn close(&mut self, key: StreamKey, now: Instant) {
        match &mut self.mode {
            Mode::Mux(smux) => {
                if self.streams.remove(&key).is_some() {
                    let _ = smux.close(StreamId(key));
                }
                self.stats.open_streams = self.streams.len();
                self.pump(now);
            }
            Mode::Basic(_) => self.finish(key, now),
        }
    }

    /// Reads up to `max` received bytes of a connection. [`StreamRead::Eof`] means the
    /// remote side is done and the connection is over (it is forgotten).
    pub fn read(&mut self, key: StreamKey, max: usize, now: Instant) -> StreamRead {
        let Some(stream) = self.streams.get_mut(&key) else {
            return StreamRead::Eof;
        };
        let read = match &mut self.mode {
            Mode::Mux(smux) => match smux.read(StreamId(key), max) {
                Ok(StreamRead::Blocked) if stream.remote_fin => StreamRead::Eof,
                Ok(r) => r,
                Err(_) => StreamRead::Eof,
            },
            Mode::Basic(b) => b.pop_down(max),
        };
        match &read {
            StreamRead::Data(_) => stream.last_remote_data = now,
            StreamRead::Eof => {
                self.streams.remove(&key);
                if let Mode::Mux(smux) = &mut self.mode {
                    let _ = smux.close(StreamId(key));
                }
                self.stats.open_streams = self.streams.len();
            }
            StreamRead::Blocked => {}
        }
        // Reading made room: the gate and the liveness rules may change.
        self.pump(now);
        read
    }

    /// The next binary websocket frame to send. Upload bytes move into the channel
    /// here, while its window has room.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        self.pump_upload(now);
        self.session.poll_transmit()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<PortEvent> {
        self.events.pop_front()
    }

    /// When [`PortSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        let linger = self.config.half_close_linger;
        [
            self.session.poll_timeout(),
            match &self.mode {
                Mode::Mux(smux) => smux.poll_timeout(),
                Mode::Basic(_) => None,
            },
            self.streams
                .values()
                .filter_map(|s| s.fin_due(linger))
                .min(),
            self.liveness.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// True while received data has somewhere to go. While false the driver stops
    /// reading the websocket: the agent's writes block, as they do against the plugin,
    /// instead of messages being refused and resent one per 100 ms.
    pub fn wants_input(&self) -> bool {
        match &self.mode {
            Mode::Mux(smux) => smux.wants_input(),
            Mode::Basic(b) => b.down_bytes < self.config.max_pending_download,
        }
    }

    /// The websocket is gone: nothing is sent until [`PortSession::on_reconnect`].
    pub fn on_disconnect(&mut self) {
        self.session.on_disconnect();
    }

    /// The OpenDataChannel message for a new websocket (resume) with `token`.
    pub fn open_data_channel_message(&self, token: &str) -> String {
        self.session.open_data_channel_message(token)
    }

    /// A new websocket is open and its OpenDataChannel message was sent: every
    /// unacknowledged message goes again, and liveness starts afresh.
    pub fn on_reconnect(&mut self, now: Instant) {
        self.session.on_reconnect(now);
        self.liveness.restart(now);
        self.pump(now);
    }

    /// Queues the TerminateSession flag when the agent supports it (past a full
    /// window: see [`ClientSession::terminate`]); the driver also calls the
    /// TerminateSession API.
    pub fn terminate(&mut self, now: Instant) -> bool {
        self.session.terminate(now)
    }

    /// How the session ended on its own, once it has.
    pub fn end(&self) -> Option<PortEnd> {
        if let Some(reason) = self.session.channel().close_reason() {
            return Some(match reason {
                ChannelCloseReason::ChannelClosed(c) => PortEnd::ChannelClosed {
                    output: c.output.clone(),
                },
                ChannelCloseReason::ResendTimeout { sequence_number } => PortEnd::ResendTimeout {
                    sequence_number: *sequence_number,
                },
            });
        }
        match &self.mode {
            Mode::Mux(smux) => smux.close_reason().cloned().map(PortEnd::Smux),
            Mode::Basic(_) => None,
        }
    }

    /// Counters.
    pub fn stats(&self) -> PortStats {
        PortStats {
            retransmissions: self.session.channel().stats().retransmissions,
            ..self.stats.clone()
        }
    }

    /// The session underneath (channel state for diagnostics).
    pub fn session(&self) -> &ClientSession {
        &self.session
    }

    /// Received bytes held for connections that have not read them.
    pub fn buffered(&self) -> usize {
        match &self.mode {
            Mode::Mux(smux) => smux.buffered_total(),
            Mode::Basic(b) => b.down_bytes,
        }
    }

    /// Upload bytes waiting for the channel window.
    pub fn pending_upload(&self) -> usize {
        match &self.mode {
            Mode::Mux(smux) => smux.pending_transmit(),
            Mode::Basic(b) => b.up_bytes,
        }
    }

    /// Moves what the session produced to the stream table and the events; keeps the
    /// receive gate and the liveness inputs current.
    fn pump(&mut self, now: Instant) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                SessionEvent::Output(bytes) => {
                    self.stats.bytes_down += bytes.len() as u64;
                    match &mut self.mode {
                        Mode::Mux(smux) => {
                            if let Err(e) = smux.handle_input(&bytes) {
                                self.events.push_back(PortEvent::SmuxError(e));
                            }
                        }
                        Mode::Basic(b) => {
                            if let Some(key) = b.current
                                && b.push_down(bytes)
                            {
                                self.events.push_back(PortEvent::Readable(key));
                            }
                        }
                    }
                }
                SessionEvent::Flag(Flag::ConnectToPortError) => {
                    self.stats.connect_to_port_errors += 1;
                    self.events.push_back(PortEvent::ConnectToPortError);
                }
                // The end is read from `end()`; the rest concerns shells.
                _ => {}
            }
        }
        if let Mode::Mux(smux) = &mut self.mode {
            while let Some(ev) = smux.poll_event() {
                match ev {
                    smux::Event::Readable(id) => {
                        self.events.push_back(PortEvent::Readable(id.get()));
                    }
                    smux::Event::Finished(id) => {
                        if let Some(s) = self.streams.get_mut(&id.get()) {
                            s.remote_fin = true;
                            // Reading drains what is buffered, then finds the end.
                            self.events.push_back(PortEvent::Readable(id.get()));
                        }
                    }
                    // The agent never opens streams; the end is read from `end()`.
                    smux::Event::Accepted(_) | smux::Event::Closed(_) => {}
                }
            }
        }
        // In basic mode with no connection open, output is refused unacknowledged, as
        // [P] drops it until a local client connects (`portsession.go` fn
        // `Initialize`, `IsStreamNotSet`); the agent sends it again later.
        let ready = match &self.mode {
            Mode::Mux(_) => true,
            Mode::Basic(b) => b.current.is_some(),
        };
        self.session.set_receive_ready(ready);
        self.refresh_liveness(now);
    }

    fn refresh_liveness(&mut self, now: Instant) {
        let stalled = self.writer_blocked || !self.wants_input();
        self.liveness.set_stalled(now, stalled);
        self.liveness
            .set_waiting(self.session.channel().in_flight_messages() > 0);
    }

    /// Sends the FIN of half-closed connections whose remote host has been quiet for
    /// the linger time.
    fn finish_lingering(&mut self, now: Instant) {
        let linger = self.config.half_close_linger;
        let due: Vec<StreamKey> = self
            .streams
            .iter()
            .filter(|(_, s)| s.fin_due(linger).is_some_and(|d| d <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in due {
            self.streams.remove(&key);
            if let Mode::Mux(smux) = &mut self.mode {
                let _ = smux.close(StreamId(key));
            }
            self.events.push_back(PortEvent::Closed(key));
        }
        self.stats.open_streams = self.streams.len();
    }

    /// Moves queued upload bytes into the channel while its window has room.
    fn pump_upload(&mut self, now: Instant) {
        let max = self.config.max_payload;
        while self.session.can_send(max) {
            let result = match &mut self.mode {
                Mode::Mux(smux) => match smux.poll_transmit(max) {
                    Some(chunk) => self.session.send_output(chunk, now),
                    None => break,
                },
                Mode::Basic(b) => match b.pop_up(max) {
                    Some(Upload::Data(piece)) => self.session.send_output(piece, now),
                    Some(Upload::Disconnect) => self.session.send_flag(Flag::DisconnectToPort, now),
                    None => break,
                },
            };
            // Only a closed session refuses once the window has room; `end()` says so.
            if result.is_err() {
                break;
            }
        }
    }
}
