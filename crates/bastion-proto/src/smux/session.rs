//! The sans-IO smux v1 session: stream ids, open/close, receive buffering, send
//! scheduling and keepalive.
//!
//! The caller moves bytes and time in and out:
//!
//! * peer bytes, in pieces of any size → [`Session::handle_input`];
//! * [`Session::poll_transmit`] → bytes for the peer;
//! * [`Session::poll_event`] → [`Event`]s (stream accepted / readable / finished,
//!   session closed);
//! * [`Session::read`] pulls a stream's received data; reading is what frees the
//!   session-wide receive budget ([`Session::buffered_total`],
//!   [`Session::wants_input`]), as `Stream.Read` returning tokens does in the reference;
//! * [`Session::poll_timeout`] / [`Session::handle_timeout`] drive the keepalive.
//!
//! Rules and their sources (file names relative to [P]
//! `vendor/src/github.com/xtaci/smux/`) are on each method; `proto-docs/smux.md` has the
//! full list.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use thiserror::Error;

use super::StreamId;
use super::config::{Config, ConfigError};
use super::frame::Frame;
use super::frame::{Cmd, FrameDecoder, FrameError, HEADER_SIZE, put_header};

/// Which end of the connection this session is; it only decides stream-id parity
/// (`session.go` fn `newSession`: `nextStreamID` 1 for a client, 0 for a server).
///
/// Both roles can open and accept streams, as in the reference. In SSM the plugin (and
/// we) are the [`Role::Client`]; the agent is the server and never opens streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Opens odd ids: 3, 5, 7, … (`smux.Client`).
    Client,
    /// Opens even ids: 2, 4, 6, … (`smux.Server`).
    Server,
}

/// Something the driver must react to, from [`Session::poll_event`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The peer opened a stream (SYN for an id not in use; `session.go` fn `recvLoop`,
    /// `cmdSYN` → `chAccepts`). The reference's `AcceptStream` returns it.
    Accepted(StreamId),
    /// The stream's receive buffer went from empty to non-empty. Call
    /// [`Session::read`] until it returns [`StreamRead::Blocked`] or
    /// [`StreamRead::Eof`]; the next Readable for this stream comes only after the
    /// buffer has been emptied.
    Readable(StreamId),
    /// The peer sent FIN for the stream (`recvLoop`, `cmdFIN` → `stream.fin()`). Data
    /// already buffered can still be read, then [`Session::read`] returns
    /// [`StreamRead::Eof`]. The stream stays open for writing until
    /// [`Session::close`]; the reference has no half-close, and a peer that sent FIN
    /// drops further data for that stream, so drivers normally close it now.
    Finished(StreamId),
    /// The session ended; no further events follow.
    Closed(CloseReason),
}

impl Event {
    /// The stream the event is about, if any.
    pub fn stream_id(&self) -> Option<StreamId> {
        match self {
            Event::Accepted(id) | Event::Readable(id) | Event::Finished(id) => Some(*id),
            Event::Closed(_) => None,
        }
    }
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer's byte stream is not valid smux v1 (`recvLoop` →
    /// `notifyProtoError(ErrInvalidProtocol)`).
    Protocol(FrameError),
    /// No frame arrived for a whole keepalive period (`session.go` fn `keepalive`,
    /// `tickerTimeout` → `s.Close()`).
    KeepaliveTimeout,
    /// [`Session::close_session`] was called (`Session.Close`).
    Local,
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::Protocol(e) => write!(f, "protocol error: {e}"),
            CloseReason::KeepaliveTimeout => f.write_str("keepalive timeout"),
            CloseReason::Local => f.write_str("closed locally"),
        }
    }
}

/// What [`Session::read`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamRead {
    /// Received bytes, in order (at most the requested amount, never more than one
    /// frame's worth).
    Data(Bytes),
    /// Nothing buffered; more may come.
    Blocked,
    /// Nothing buffered and the peer sent FIN: end of stream (`stream.go` fn `waitRead`,
    /// `chFinEvent` with empty buffers → `io.EOF`).
    Eof,
}

/// Why a stream operation failed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The id was never opened or accepted, or was closed locally ([`Session::close`]
    /// forgets a stream at once, as `stream.go` fn `Close` → `streamClosed` does).
    #[error("smux stream {0} is not open")]
    UnknownStream(StreamId),
    /// The session has ended.
    #[error("smux session is closed ({0})")]
    SessionClosed(CloseReason),
    /// The id space of this role is used up (`session.go` fn `OpenStream`,
    /// `ErrGoAway`: "stream id overflows, should start a new connection").
    #[error("smux stream ids exhausted; open a new session")]
    IdsExhausted,
}

/// Why [`Session::handle_input`] failed. Either way the session is closed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SessionError {
    /// The input is not valid smux v1; the session has just closed.
    #[error("smux protocol error: {0}")]
    Protocol(#[from] FrameError),
    /// The session was already closed; the input was ignored.
    #[error("smux session is closed ({0})")]
    Closed(CloseReason),
}

/// Counters for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Whole frames decoded from the peer.
    pub frames_received: u64,
    /// NOP frames among them.
    pub nops_received: u64,
    /// PSH/FIN frames for ids not open here, dropped (`recvLoop`), SYNs for ids
    /// already open, ignored, and UPD frames, ignored by version 1.
    pub frames_ignored: u64,
    /// Stream bytes received into open streams.
    pub data_bytes_received: u64,
    /// Frames handed out by [`Session::poll_transmit`] (counted when encoded).
    pub frames_sent: u64,
    /// NOP frames among them.
    pub nops_sent: u64,
    /// Stream bytes accepted by [`Session::write`] / [`Session::write_bytes`].
    pub data_bytes_written: u64,
}

/// A queued outgoing stream frame. PSH bodies are at most `Session::frame_size` bytes,
/// which fits the u16 length field.
#[derive(Debug)]
enum Out {
    Syn,
    Fin,
    Psh { len: u16, data: Bytes },
}

impl Out {
    fn encoded_len(&self) -> usize {
        match self {
            Out::Syn | Out::Fin => HEADER_SIZE,
            Out::Psh { len, .. } => HEADER_SIZE + usize::from(*len),
        }
    }
}

#[derive(Debug, Default)]
struct SendQueue {
    frames: VecDeque<Out>,
    /// Encoded size of `frames`.
    bytes: usize,
}

#[derive(Debug, Default)]
struct Stream {
    recv: VecDeque<Bytes>,
    buffered: usize,
    remote_fin: bool,
    readable_signalled: bool,
}

/// A smux v1 session, without IO. See the [module docs](self).
#[derive(Debug)]
pub struct Session {
    role: Role,
    config: Config,
    /// `config.max_frame_size` as the u16 it is validated to fit.
    frame_size: u16,
    decoder: FrameDecoder,
    streams: HashMap<StreamId, Stream>,
    /// Last id handed out (or the role's starting value).
    next_id: u32,
    ids_exhausted: bool,
    events: VecDeque<Event>,
    nop_pending: bool,
    sendq: HashMap<StreamId, SendQueue>,
    /// Round-robin order of the ids with a non-empty entry in `sendq`.
    ready: VecDeque<StreamId>,
    /// Encoded bytes not yet handed out (at most one frame beyond the last limit).
    out: BytesMut,
    /// Encoded size of everything queued but not yet in `out`.
    queued: usize,
    buffered_total: usize,
    next_ping: Option<Instant>,
    next_check: Option<Instant>,
    /// A frame header arrived since the last keepalive check (`session.go`
    /// `dataReady`).
    data_ready: bool,
    closed: Option<CloseReason>,
    stats: Stats,
}

/// The first tick of a `period` ticker that started at `t` and is strictly after `now`.
/// A Go `time.Ticker` drops ticks a slow receiver missed; so do we.
fn next_tick(t: Instant, period: Duration, now: Instant) -> Option<Instant> {
    let behind = now.saturating_duration_since(t).as_nanos();
    let k = behind / period.as_nanos().max(1) + 1;
    u32::try_from(k)
        .ok()
        .and_then(|k| period.checked_mul(k))
        .and_then(|d| t.checked_add(d))
        .or_else(|| now.checked_add(period))
}

impl Session {
    /// A new session. `now` starts the keepalive tickers (`session.go` fn `newSession`
    /// → `keepalive`, which creates both tickers on start).
    pub fn new(role: Role, config: Config, now: Instant) -> Result<Session, ConfigError> {
        config.validate()?;
        let frame_size = u16::try_from(config.max_frame_size)
            .map_err(|_| ConfigError::FrameSizeTooLarge(config.max_frame_size))?;
        let next_ping = if config.send_keepalive {
            now.checked_add(config.keepalive_interval)
        } else {
            None
        };
        let next_check = if config.enforce_keepalive_timeout {
            now.checked_add(config.keepalive_timeout)
        } else {
            None
        };
        Ok(Session {
            role,
            frame_size,
            decoder: FrameDecoder::new(),
            streams: HashMap::new(),
            next_id: match role {
                Role::Client => 1,
                Role::Server => 0,
            },
            ids_exhausted: false,
            events: VecDeque::new(),
            nop_pending: false,
            sendq: HashMap::new(),
            ready: VecDeque::new(),
            out: BytesMut::new(),
            queued: 0,
            buffered_total: 0,
            next_ping,
            next_check,
            data_ready: false,
            closed: None,
            stats: Stats::default(),
            config,
        })
    }

    /// This session's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// This session's configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// True once the session has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// Why the session ended, if it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// Streams open here (opened or accepted, not yet closed locally), as the
    /// reference's `NumStreams`.
    pub fn num_streams(&self) -> usize {
        self.streams.len()
    }

    /// True if `id` is open here.
    pub fn contains(&self, id: StreamId) -> bool {
        self.streams.contains_key(&id)
    }

    /// True if `id` is open here and the peer has sent FIN for it.
    pub fn is_finished(&self, id: StreamId) -> bool {
        self.streams.get(&id).is_some_and(|s| s.remote_fin)
    }

    fn check_open(&self) -> Result<(), StreamError> {
        match &self.closed {
            Some(r) => Err(StreamError::SessionClosed(r.clone())),
            None => Ok(()),
        }
    }

    fn enqueue(&mut self, id: StreamId, frame: Out) {
        let n = frame.encoded_len();
        let q = self.sendq.entry(id).or_default();
        if q.frames.is_empty() {
            self.ready.push_back(id);
        }
        q.frames.push_back(frame);
        q.bytes += n;
        self.queued += n;
    }

    /// Opens a stream and queues its SYN (`session.go` fn `OpenStream`).
    ///
    /// Ids advance by 2 from the role's start, so a client gets 3, 5, 7, … and a server
    /// 2, 4, 6, …; ids are never reused. When the u32 wraps (the reference's
    /// `sid == sid%2` check) every later call fails with
    /// [`StreamError::IdsExhausted`]. Unlike the reference, an id the peer has already
    /// opened (a peer using our parity) is skipped instead of overwritten.
    pub fn open_stream(&mut self) -> Result<StreamId, StreamError> {
        self.check_open()?;
        loop {
            if self.ids_exhausted {
                return Err(StreamError::IdsExhausted);
            }
            let sid = self.next_id.wrapping_add(2);
            self.next_id = sid;
            if sid < 2 {
                self.ids_exhausted = true;
                continue;
            }
            let id = StreamId(sid);
            if let Entry::Vacant(v) = self.streams.entry(id) {
                v.insert(Stream::default());
                self.enqueue(id, Out::Syn);
                return Ok(id);
            }
        }
    }

    /// Queues `data` for stream `id`, copying it; see [`Session::write_bytes`].
    pub fn write(&mut self, id: StreamId, data: &[u8]) -> Result<usize, StreamError> {
        self.write_bytes(id, Bytes::copy_from_slice(data))
    }

    /// Queues `data` for stream `id` as PSH frames of at most `max_frame_size` bytes
    /// (`stream.go` fn `Write`, the version-1 branch) and returns its length. Never
    /// blocks: watch [`Session::pending_transmit`] for backpressure.
    ///
    /// * Empty data queues nothing (the reference's split loop runs zero times).
    /// * Writing after the peer's FIN is allowed, as in the reference v1 `Write`;
    ///   the peer will drop the data.
    /// * Writing to a stream closed locally, or never opened, is
    ///   [`StreamError::UnknownStream`] (the reference: `io.ErrClosedPipe`).
    pub fn write_bytes(&mut self, id: StreamId, mut data: Bytes) -> Result<usize, StreamError> {
        self.check_open()?;
        if !self.streams.contains_key(&id) {
            return Err(StreamError::UnknownStream(id));
        }
        let total = data.len();
        while !data.is_empty() {
            // A body longer than u16::MAX is longer than frame_size too.
            let len = u16::try_from(data.len()).map_or(self.frame_size, |l| l.min(self.frame_size));
            let chunk = data.split_to(usize::from(len));
            self.enqueue(id, Out::Psh { len, data: chunk });
        }
        self.stats.data_bytes_written += total as u64;
        Ok(total)
    }

    /// Closes stream `id`: queues FIN after the stream's pending data and forgets the
    /// stream at once (`stream.go` fn `Close` → `writeFrame(cmdFIN)`,
    /// `Session.streamClosed`).
    ///
    /// There is no half-close: unread received data is discarded and its bytes return
    /// to the session budget (`streamClosed` → `recycleTokens`); later frames from the
    /// peer for this id are dropped as for any unknown id; events for it still queued
    /// are withdrawn. A later SYN with the same id from the peer opens a new stream, as
    /// in the reference.
    pub fn close(&mut self, id: StreamId) -> Result<(), StreamError> {
        self.check_open()?;
        let Some(s) = self.streams.remove(&id) else {
            return Err(StreamError::UnknownStream(id));
        };
        self.buffered_total -= s.buffered;
        self.events.retain(|e| e.stream_id() != Some(id));
        self.enqueue(id, Out::Fin);
        Ok(())
    }

    /// Ends the session (`Session.Close`): queued output is discarded, since the
    /// reference closes the connection without sending anything, and an
    /// [`Event::Closed`] with [`CloseReason::Local`] is queued. The driver should then
    /// close the transport. Idempotent.
    pub fn close_session(&mut self) {
        self.shutdown(CloseReason::Local);
    }

    fn shutdown(&mut self, reason: CloseReason) {
        if self.closed.is_some() {
            return;
        }
        self.events.push_back(Event::Closed(reason.clone()));
        self.closed = Some(reason);
        self.sendq.clear();
        self.ready.clear();
        self.out.clear();
        self.queued = 0;
        self.nop_pending = false;
        self.next_ping = None;
        self.next_check = None;
    }

    /// Reads up to `max` received bytes of stream `id` (`stream.go` fn `tryRead`,
    /// version-1 branch). Reading frees session receive budget.
    ///
    /// After the session closed, bytes that had already arrived can still be read; then
    /// [`StreamRead::Eof`] if the peer had sent FIN, else
    /// [`StreamError::SessionClosed`].
    pub fn read(&mut self, id: StreamId, max: usize) -> Result<StreamRead, StreamError> {
        let Some(s) = self.streams.get_mut(&id) else {
            return Err(match &self.closed {
                Some(r) => StreamError::SessionClosed(r.clone()),
                None => StreamError::UnknownStream(id),
            });
        };
        let Some(front) = s.recv.front_mut() else {
            if s.remote_fin {
                return Ok(StreamRead::Eof);
            }
            if let Some(r) = &self.closed {
                return Err(StreamError::SessionClosed(r.clone()));
            }
            return Ok(StreamRead::Blocked);
        };
        let chunk = if front.len() <= max {
            s.recv.pop_front().unwrap_or_default()
        } else {
            front.split_to(max)
        };
        s.buffered -= chunk.len();
        self.buffered_total -= chunk.len();
        if s.buffered == 0 {
            s.readable_signalled = false;
        }
        Ok(StreamRead::Data(chunk))
    }

    /// Received-but-unread bytes of stream `id` (0 if it is not open).
    pub fn buffered(&self, id: StreamId) -> usize {
        self.streams.get(&id).map_or(0, |s| s.buffered)
    }

    /// Received-but-unread bytes of all streams: `max_receive_buffer` minus this is the
    /// reference's token `bucket` (`session.go`).
    pub fn buffered_total(&self) -> usize {
        self.buffered_total
    }

    /// False when the driver should stop reading the transport until streams are read:
    /// the reference `recvLoop` reads the next frame only while
    /// `bucket = MaxReceiveBuffer - unread > 0`. Advisory: [`Session::handle_input`]
    /// still accepts everything it is given.
    pub fn wants_input(&self) -> bool {
        self.closed.is_none() && self.buffered_total < self.config.max_receive_buffer
    }

    /// Feeds bytes received from the peer, cut anywhere (the SSM data channel delivers
    /// the smux byte stream in ~1 KiB pieces unrelated to frame boundaries).
    ///
    /// Receiver rules (`session.go` fn `recvLoop`):
    /// * version ≠ 1 or cmd > 4: protocol error; the session closes
    ///   ([`CloseReason::Protocol`]) and the error is returned;
    /// * NOP: nothing (but it counts for the keepalive);
    /// * SYN for an id not open: new stream, [`Event::Accepted`]; for an open id:
    ///   ignored;
    /// * FIN for an open id: [`Event::Finished`] (once); unknown id: dropped;
    /// * PSH for an open id: data buffered, [`Event::Readable`]; unknown id or empty
    ///   body: dropped;
    /// * UPD: ignored (version 2 flow control; it has no effect on a v1 stream).
    pub fn handle_input(&mut self, data: &[u8]) -> Result<(), SessionError> {
        if let Some(r) = &self.closed {
            return Err(SessionError::Closed(r.clone()));
        }
        self.decoder.push(data);
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => {
                    self.data_ready = true;
                    self.on_frame(frame);
                }
                Ok(None) => break,
                Err(e) => {
                    self.shutdown(CloseReason::Protocol(e.clone()));
                    return Err(SessionError::Protocol(e));
                }
            }
        }
        // recvLoop sets dataReady as soon as a header is read, before the body.
        if self.decoder.has_header() {
            self.data_ready = true;
        }
        Ok(())
    }

    fn on_frame(&mut self, frame: Frame) {
        self.stats.frames_received += 1;
        match frame {
            Frame::Nop { .. } => self.stats.nops_received += 1,
            Frame::Syn { sid } => match self.streams.entry(sid) {
                Entry::Vacant(v) => {
                    v.insert(Stream::default());
                    self.events.push_back(Event::Accepted(sid));
                }
                Entry::Occupied(_) => self.stats.frames_ignored += 1,
            },
            Frame::Fin { sid } => match self.streams.get_mut(&sid) {
                Some(s) => {
                    if !s.remote_fin {
                        s.remote_fin = true;
                        self.events.push_back(Event::Finished(sid));
                    }
                }
                None => self.stats.frames_ignored += 1,
            },
            Frame::Psh { sid, data } => match self.streams.get_mut(&sid) {
                Some(s) if !data.is_empty() => {
                    let n = data.len();
                    s.recv.push_back(data);
                    s.buffered += n;
                    self.buffered_total += n;
                    self.stats.data_bytes_received += n as u64;
                    if !s.readable_signalled {
                        s.readable_signalled = true;
                        self.events.push_back(Event::Readable(sid));
                    }
                }
                Some(_) => {}
                None => self.stats.frames_ignored += 1,
            },
            Frame::Upd { .. } => self.stats.frames_ignored += 1,
        }
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Up to `max_len` bytes to send to the peer, `None` when there is nothing to send
    /// (or the session is closed, or `max_len` is 0). Frames may be cut across calls;
    /// the byte stream is what matters.
    ///
    /// Order: a pending NOP first (the reference gives keepalive priority 0 in its
    /// shaper, `session.go` fn `shaperLoop`), then one frame per stream in round-robin
    /// order, so one busy stream cannot starve the others. Each stream's own frames
    /// (SYN, PSH…, FIN) keep their order.
    pub fn poll_transmit(&mut self, max_len: usize) -> Option<Bytes> {
        if self.closed.is_some() || max_len == 0 {
            return None;
        }
        while self.out.len() < max_len {
            if self.nop_pending {
                self.nop_pending = false;
                self.queued -= HEADER_SIZE;
                put_header(&mut self.out, Cmd::Nop, 0, StreamId(0));
                self.stats.frames_sent += 1;
                self.stats.nops_sent += 1;
                continue;
            }
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let Some(q) = self.sendq.get_mut(&id) else {
                continue;
            };
            let Some(frame) = q.frames.pop_front() else {
                self.sendq.remove(&id);
                continue;
            };
            let n = frame.encoded_len();
            q.bytes -= n;
            self.queued -= n;
            if q.frames.is_empty() {
                self.sendq.remove(&id);
            } else {
                self.ready.push_back(id);
            }
            match frame {
                Out::Syn => put_header(&mut self.out, Cmd::Syn, 0, id),
                Out::Fin => put_header(&mut self.out, Cmd::Fin, 0, id),
                Out::Psh { len, data } => {
                    put_header(&mut self.out, Cmd::Psh, len, id);
                    self.out.extend_from_slice(&data);
                }
            }
            self.stats.frames_sent += 1;
        }
        if self.out.is_empty() {
            return None;
        }
        let n = self.out.len().min(max_len);
        Some(self.out.split_to(n).freeze())
    }

    /// Bytes waiting to be handed out by [`Session::poll_transmit`].
    pub fn pending_transmit(&self) -> usize {
        self.queued + self.out.len()
    }

    /// Queued (not yet encoded) bytes of stream `id`, frame headers included. Lets a
    /// driver stop reading one local socket while its stream is backed up.
    pub fn pending_transmit_for(&self, id: StreamId) -> usize {
        self.sendq.get(&id).map_or(0, |q| q.bytes)
    }

    /// When [`Session::handle_timeout`] next needs to run; `None` if never (keepalive
    /// off or session closed).
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        match (self.next_ping, self.next_check) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Runs due keepalive work (`session.go` fn `keepalive`). Calling it early, late or
    /// repeatedly is harmless; like a Go ticker, missed ticks are not replayed.
    ///
    /// * Ping tick (`send_keepalive`, every `keepalive_interval` from creation): queue a
    ///   NOP with stream id 0 (one at most: a NOP not yet sent is not doubled).
    /// * Check tick (`enforce_keepalive_timeout`, every `keepalive_timeout` from
    ///   creation): if no frame header arrived since the previous check, and the receive
    ///   buffer is not full (a full buffer means the reference has stopped reading, so
    ///   silence proves nothing), close with [`CloseReason::KeepaliveTimeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if let Some(t) = self.next_ping
            && now >= t
        {
            if !self.nop_pending {
                self.nop_pending = true;
                self.queued += HEADER_SIZE;
            }
            self.next_ping = next_tick(t, self.config.keepalive_interval, now);
        }
        if let Some(t) = self.next_check
            && now >= t
        {
            let alive = std::mem::replace(&mut self.data_ready, false);
            if !alive && self.buffered_total < self.config.max_receive_buffer {
                self.shutdown(CloseReason::KeepaliveTimeout);
                return;
            }
            self.next_check = next_tick(t, self.config.keepalive_timeout, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> Instant {
        Instant::now()
    }

    fn client() -> Session {
        Session::new(Role::Client, Config::keepalive_disabled(), t0()).unwrap()
    }

    fn server() -> Session {
        Session::new(Role::Server, Config::keepalive_disabled(), t0()).unwrap()
    }

    fn frames_of(bytes: &[u8]) -> Vec<Frame> {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        let mut v = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            v.push(f);
        }
        assert_eq!(d.buffered(), 0, "trailing partial frame");
        v
    }

    fn drain_tx(s: &mut Session) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(b) = s.poll_transmit(usize::MAX) {
            v.extend_from_slice(&b);
        }
        v
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn enc(f: Frame) -> Vec<u8> {
        f.to_bytes().unwrap().to_vec()
    }

    fn syn(id: u32) -> Vec<u8> {
        enc(Frame::Syn { sid: StreamId(id) })
    }
    fn fin(id: u32) -> Vec<u8> {
        enc(Frame::Fin { sid: StreamId(id) })
    }
    fn psh(id: u32, d: &[u8]) -> Vec<u8> {
        enc(Frame::Psh {
            sid: StreamId(id),
            data: Bytes::copy_from_slice(d),
        })
    }

    fn read_all(s: &mut Session, id: StreamId) -> (Vec<u8>, StreamRead) {
        let mut v = Vec::new();
        loop {
            match s.read(id, usize::MAX).unwrap() {
                StreamRead::Data(b) => v.extend_from_slice(&b),
                other => return (v, other),
            }
        }
    }

    #[test]
    fn client_ids_are_3_5_7_and_syn_is_golden() {
        let mut c = client();
        let ids: Vec<u32> = (0..3).map(|_| c.open_stream().unwrap().0).collect();
        assert_eq!(ids, [3, 5, 7]);
        let wire = drain_tx(&mut c);
        assert_eq!(hex::encode(&wire[..8]), "0100000003000000");
        assert_eq!(
            frames_of(&wire),
            ids.iter()
                .map(|&i| Frame::Syn { sid: StreamId(i) })
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn server_ids_are_even() {
        let mut s = server();
        assert_eq!(s.open_stream(), Ok(StreamId(2)));
        assert_eq!(s.open_stream(), Ok(StreamId(4)));
    }

    #[test]
    fn ids_are_never_reused_and_exhaust_on_wrap() {
        let mut c = client();
        c.next_id = u32::MAX - 2;
        assert_eq!(c.open_stream(), Ok(StreamId(u32::MAX)));
        assert_eq!(c.open_stream(), Err(StreamError::IdsExhausted));
        assert_eq!(c.open_stream(), Err(StreamError::IdsExhausted));
        let mut s = server();
        s.next_id = u32::MAX - 3;
        assert_eq!(s.open_stream(), Ok(StreamId(u32::MAX - 1)));
        assert_eq!(s.open_stream(), Err(StreamError::IdsExhausted));
    }

    #[test]
    fn ids_opened_by_the_peer_are_skipped() {
        let mut c = client();
        c.handle_input(&syn(3)).unwrap();
        assert_eq!(events(&mut c), [Event::Accepted(StreamId(3))]);
        assert_eq!(c.open_stream(), Ok(StreamId(5)));
    }

    #[test]
    fn writes_split_at_32768() {
        let mut c = client();
        let id = c.open_stream().unwrap();
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        assert_eq!(c.write(id, &data), Ok(100_000));
        assert_eq!(c.pending_transmit(), 8 + 4 * 8 + 100_000);
        let wire = drain_tx(&mut c);
        let frames = frames_of(&wire);
        let sizes: Vec<usize> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Psh { data, .. } => Some(data.len()),
                _ => None,
            })
            .collect();
        assert_eq!(sizes, [32768, 32768, 32768, 1696]);
        let joined: Vec<u8> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Psh { data, .. } => Some(data.to_vec()),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(joined, data);
        assert_eq!(c.pending_transmit(), 0);
    }

    #[test]
    fn frame_size_is_configurable_up_to_65535() {
        let cfg = Config {
            max_frame_size: 65535,
            ..Config::keepalive_disabled()
        };
        let mut c = Session::new(Role::Client, cfg, t0()).unwrap();
        let id = c.open_stream().unwrap();
        c.write(id, &vec![1u8; 70_000]).unwrap();
        let frames = frames_of(&drain_tx(&mut c));
        assert!(matches!(&frames[1], Frame::Psh { data, .. } if data.len() == 65535));
        assert!(matches!(&frames[2], Frame::Psh { data, .. } if data.len() == 4465));
    }

    #[test]
    fn empty_write_sends_nothing() {
        let mut c = client();
        let id = c.open_stream().unwrap();
        drain_tx(&mut c);
        assert_eq!(c.write(id, b""), Ok(0));
        assert_eq!(c.poll_transmit(usize::MAX), None);
    }

    #[test]
    fn poll_transmit_respects_max_len_and_cuts_frames() {
        let mut c = client();
        let id = c.open_stream().unwrap();
        c.write(id, b"hello").unwrap();
        c.close(id).unwrap();
        let mut wire = Vec::new();
        while let Some(b) = c.poll_transmit(3) {
            assert!(b.len() <= 3);
            wire.extend_from_slice(&b);
        }
        assert_eq!(
            hex::encode(&wire),
            "0100000003000000010205000300000068656c6c6f0101000003000000"
        );
        assert_eq!(c.poll_transmit(0), None);
    }

    #[test]
    fn streams_are_scheduled_round_robin() {
        let mut c = client();
        let a = c.open_stream().unwrap();
        let b = c.open_stream().unwrap();
        c.write(a, &vec![0u8; 3 * 32768]).unwrap();
        c.write(b, &vec![1u8; 3 * 32768]).unwrap();
        let order: Vec<(Cmd, u32)> = frames_of(&drain_tx(&mut c))
            .iter()
            .map(|f| (f.cmd(), f.sid().0))
            .collect();
        use Cmd::*;
        assert_eq!(
            order,
            [
                (Syn, 3),
                (Syn, 5),
                (Psh, 3),
                (Psh, 5),
                (Psh, 3),
                (Psh, 5),
                (Psh, 3),
                (Psh, 5)
            ]
        );
    }

    #[test]
    fn accept_read_and_fin_to_eof() {
        let mut s = server();
        let mut input = syn(3);
        input.extend(psh(3, b"hel"));
        input.extend(psh(3, b"lo"));
        input.extend(fin(3));
        s.handle_input(&input).unwrap();
        let id = StreamId(3);
        assert_eq!(
            events(&mut s),
            [
                Event::Accepted(id),
                Event::Readable(id),
                Event::Finished(id)
            ]
        );
        assert_eq!(s.buffered(id), 5);
        assert_eq!(s.buffered_total(), 5);
        assert!(s.is_finished(id));
        assert_eq!(
            s.read(id, 2),
            Ok(StreamRead::Data(Bytes::from_static(b"he")))
        );
        let (rest, end) = read_all(&mut s, id);
        assert_eq!(rest, b"llo");
        assert_eq!(end, StreamRead::Eof);
        assert_eq!(s.buffered_total(), 0);
        // Writing after the peer's FIN is allowed in v1.
        assert_eq!(s.write(id, b"late"), Ok(4));
        s.close(id).unwrap();
        assert_eq!(
            frames_of(&drain_tx(&mut s)),
            [
                Frame::Psh {
                    sid: id,
                    data: Bytes::from_static(b"late")
                },
                Frame::Fin { sid: id }
            ]
        );
    }

    #[test]
    fn readable_is_signalled_again_only_after_draining() {
        let mut s = server();
        s.handle_input(&syn(3)).unwrap();
        s.handle_input(&psh(3, b"a")).unwrap();
        s.handle_input(&psh(3, b"b")).unwrap();
        let id = StreamId(3);
        assert_eq!(events(&mut s), [Event::Accepted(id), Event::Readable(id)]);
        assert_eq!(read_all(&mut s, id), (b"ab".to_vec(), StreamRead::Blocked));
        s.handle_input(&psh(3, b"c")).unwrap();
        assert_eq!(events(&mut s), [Event::Readable(id)]);
    }

    #[test]
    fn duplicate_syn_is_ignored() {
        let mut s = server();
        let mut input = syn(3);
        input.extend(psh(3, b"x"));
        input.extend(syn(3));
        input.extend(psh(3, b"y"));
        s.handle_input(&input).unwrap();
        let id = StreamId(3);
        assert_eq!(events(&mut s), [Event::Accepted(id), Event::Readable(id)]);
        assert_eq!(read_all(&mut s, id).0, b"xy");
        assert_eq!(s.stats().frames_ignored, 1);
    }

    #[test]
    fn frames_for_unknown_ids_are_dropped() {
        let mut s = server();
        let mut input = psh(7, b"nobody");
        input.extend(fin(7));
        input.extend(enc(Frame::Upd {
            sid: StreamId(7),
            consumed: 1,
            window: 2,
        }));
        s.handle_input(&input).unwrap();
        assert_eq!(events(&mut s), []);
        assert_eq!(s.buffered_total(), 0);
        assert_eq!(s.stats().frames_ignored, 3);
        assert_eq!(
            s.read(StreamId(7), 10),
            Err(StreamError::UnknownStream(StreamId(7)))
        );
        assert_eq!(
            s.write(StreamId(7), b"x"),
            Err(StreamError::UnknownStream(StreamId(7)))
        );
        assert_eq!(
            s.close(StreamId(7)),
            Err(StreamError::UnknownStream(StreamId(7)))
        );
        assert!(!s.is_closed());
    }

    #[test]
    fn local_close_discards_unread_data_and_withdraws_events() {
        let mut s = server();
        let mut input = syn(3);
        input.extend(psh(3, &[0u8; 100]));
        s.handle_input(&input).unwrap();
        assert_eq!(s.buffered_total(), 100);
        s.close(StreamId(3)).unwrap();
        assert_eq!(s.buffered_total(), 0);
        assert_eq!(events(&mut s), []);
        assert_eq!(
            frames_of(&drain_tx(&mut s)),
            [Frame::Fin { sid: StreamId(3) }]
        );
        // Later data for the id is dropped; a new SYN opens it again.
        s.handle_input(&psh(3, b"x")).unwrap();
        assert_eq!(events(&mut s), []);
        s.handle_input(&syn(3)).unwrap();
        assert_eq!(events(&mut s), [Event::Accepted(StreamId(3))]);
        assert_eq!(s.close(StreamId(3)), Ok(()));
        assert_eq!(
            s.close(StreamId(3)),
            Err(StreamError::UnknownStream(StreamId(3)))
        );
    }

    #[test]
    fn fin_follows_queued_data() {
        let mut c = client();
        let id = c.open_stream().unwrap();
        c.write(id, &[9u8; 40_000]).unwrap();
        c.close(id).unwrap();
        assert_eq!(c.write(id, b"x"), Err(StreamError::UnknownStream(id)));
        let cmds: Vec<Cmd> = frames_of(&drain_tx(&mut c))
            .iter()
            .map(Frame::cmd)
            .collect();
        assert_eq!(cmds, [Cmd::Syn, Cmd::Psh, Cmd::Psh, Cmd::Fin]);
    }

    #[test]
    fn bad_version_closes_the_session() {
        let mut c = client();
        let id = c.open_stream().unwrap();
        let mut input = psh(3, b"ok");
        input.extend([2, 0, 0, 0, 3, 0, 0, 0]);
        let e = FrameError::BadVersion {
            found: 2,
            offset: 10,
        };
        assert_eq!(
            c.handle_input(&input),
            Err(SessionError::Protocol(e.clone()))
        );
        let reason = CloseReason::Protocol(e);
        assert_eq!(
            events(&mut c),
            [Event::Readable(id), Event::Closed(reason.clone())]
        );
        assert!(c.is_closed());
        assert_eq!(c.poll_transmit(usize::MAX), None);
        assert_eq!(
            c.handle_input(&syn(9)),
            Err(SessionError::Closed(reason.clone()))
        );
        assert_eq!(
            c.open_stream(),
            Err(StreamError::SessionClosed(reason.clone()))
        );
        assert_eq!(
            c.write(id, b"x"),
            Err(StreamError::SessionClosed(reason.clone()))
        );
        // Data that arrived before the error is still readable.
        assert_eq!(
            c.read(id, 10),
            Ok(StreamRead::Data(Bytes::from_static(b"ok")))
        );
        assert_eq!(c.read(id, 10), Err(StreamError::SessionClosed(reason)));
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn unknown_cmd_closes_the_session() {
        let mut c = client();
        let mut input = syn(2);
        input.extend([1, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            c.handle_input(&input),
            Err(SessionError::Protocol(FrameError::UnknownCmd {
                cmd: 5,
                offset: 8
            }))
        );
        assert!(matches!(
            c.close_reason(),
            Some(CloseReason::Protocol(FrameError::UnknownCmd { .. }))
        ));
    }

    #[test]
    fn close_session_is_local_and_idempotent() {
        let mut c = client();
        c.open_stream().unwrap();
        c.close_session();
        c.close_session();
        assert_eq!(events(&mut c), [Event::Closed(CloseReason::Local)]);
        assert_eq!(c.pending_transmit(), 0);
        assert_eq!(c.poll_transmit(100), None);
    }

    #[test]
    fn byte_at_a_time_input_loses_nothing() {
        let mut input = syn(3);
        input.extend(syn(5));
        input.extend(psh(5, b"five"));
        input.extend(psh(3, &[3u8; 1000]));
        input.extend(enc(Frame::Nop { sid: StreamId(0) }));
        input.extend(fin(5));
        input.extend(psh(3, b"!"));
        let mut whole = server();
        whole.handle_input(&input).unwrap();
        let expected = events(&mut whole);
        let mut piecewise = server();
        for b in &input {
            piecewise.handle_input(std::slice::from_ref(b)).unwrap();
        }
        assert_eq!(events(&mut piecewise), expected);
        assert_eq!(read_all(&mut piecewise, StreamId(3)).0.len(), 1001);
        assert_eq!(
            read_all(&mut piecewise, StreamId(5)),
            (b"five".to_vec(), StreamRead::Eof)
        );
        assert_eq!(piecewise.stats().nops_received, 1);
    }

    #[test]
    fn receive_budget_tracks_unread_bytes() {
        let cfg = Config {
            max_receive_buffer: 1000,
            ..Config::keepalive_disabled()
        };
        let mut s = Session::new(Role::Server, cfg, t0()).unwrap();
        s.handle_input(&syn(3)).unwrap();
        s.handle_input(&syn(5)).unwrap();
        s.handle_input(&psh(3, &[0u8; 600])).unwrap();
        assert!(s.wants_input());
        s.handle_input(&psh(5, &[0u8; 400])).unwrap();
        assert!(!s.wants_input());
        assert_eq!(
            (s.buffered(StreamId(3)), s.buffered(StreamId(5))),
            (600, 400)
        );
        s.read(StreamId(5), 1).unwrap();
        assert!(s.wants_input());
        assert_eq!(s.buffered_total(), 999);
    }

    fn ka(send: bool, enforce: bool) -> Config {
        Config {
            send_keepalive: send,
            enforce_keepalive_timeout: enforce,
            ..Config::default()
        }
    }

    const NOP: &str = "0103000000000000";

    #[test]
    fn nop_every_ten_seconds() {
        let start = t0();
        let s10 = Duration::from_secs(10);
        let mut c = Session::new(Role::Client, ka(true, false), start).unwrap();
        assert_eq!(c.poll_timeout(), Some(start + s10));
        c.handle_timeout(start + Duration::from_millis(9999));
        assert_eq!(c.poll_transmit(usize::MAX), None);
        c.handle_timeout(start + s10);
        assert_eq!(c.poll_timeout(), Some(start + 2 * s10));
        assert_eq!(hex::encode(c.poll_transmit(usize::MAX).unwrap()), NOP);
        // An unsent NOP is not doubled; missed ticks are not replayed.
        c.handle_timeout(start + 2 * s10);
        c.handle_timeout(start + Duration::from_secs(55));
        assert_eq!(c.poll_timeout(), Some(start + 6 * s10));
        assert_eq!(hex::encode(c.poll_transmit(usize::MAX).unwrap()), NOP);
        assert_eq!(c.stats().nops_sent, 2);
        // Without enforcement, silence never closes the session.
        c.handle_timeout(start + Duration::from_secs(3600));
        assert!(!c.is_closed());
    }

    #[test]
    fn nop_goes_before_queued_stream_data() {
        let start = t0();
        let mut c = Session::new(Role::Client, ka(true, false), start).unwrap();
        let id = c.open_stream().unwrap();
        c.write(id, b"x").unwrap();
        c.handle_timeout(start + Duration::from_secs(10));
        let wire = drain_tx(&mut c);
        assert_eq!(hex::encode(&wire[..8]), NOP);
    }

    #[test]
    fn silence_for_a_timeout_period_closes() {
        let start = t0();
        let mut c = Session::new(Role::Client, ka(true, true), start).unwrap();
        assert_eq!(c.poll_timeout(), Some(start + Duration::from_secs(10)));
        c.handle_timeout(start + Duration::from_secs(29));
        assert!(!c.is_closed());
        c.handle_timeout(start + Duration::from_secs(30));
        assert_eq!(c.close_reason(), Some(&CloseReason::KeepaliveTimeout));
        assert_eq!(
            events(&mut c),
            [Event::Closed(CloseReason::KeepaliveTimeout)]
        );
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn any_frame_per_period_keeps_the_session_alive() {
        let start = t0();
        let s = Duration::from_secs;
        let mut c = Session::new(Role::Client, ka(false, true), start).unwrap();
        assert_eq!(c.poll_timeout(), Some(start + s(30)));
        c.handle_input(&hex::decode(NOP).unwrap()).unwrap();
        c.handle_timeout(start + s(30));
        assert!(!c.is_closed());
        assert_eq!(c.poll_timeout(), Some(start + s(60)));
        // Half a header is not a frame; a whole header (body pending) is.
        c.handle_input(&psh(3, b"abc")[..7]).unwrap();
        c.handle_timeout(start + s(60));
        assert!(c.is_closed());

        let mut c = Session::new(Role::Client, ka(false, true), start).unwrap();
        c.handle_input(&psh(3, b"abc")[..8]).unwrap();
        c.handle_timeout(start + s(30));
        assert!(!c.is_closed());
        c.handle_timeout(start + s(59));
        assert!(!c.is_closed());
        c.handle_timeout(start + s(60));
        assert!(c.is_closed());
    }

    #[test]
    fn a_late_wakeup_runs_one_check() {
        let start = t0();
        let s = Duration::from_secs;
        let mut c = Session::new(Role::Client, ka(false, true), start).unwrap();
        c.handle_input(&hex::decode(NOP).unwrap()).unwrap();
        // Woken at 95 s: one check (sees the NOP), next check realigned to 120 s.
        c.handle_timeout(start + s(95));
        assert!(!c.is_closed());
        assert_eq!(c.poll_timeout(), Some(start + s(120)));
    }

    #[test]
    fn a_full_receive_buffer_suspends_the_timeout() {
        let start = t0();
        let cfg = Config {
            max_receive_buffer: 10,
            ..ka(false, true)
        };
        let mut c = Session::new(Role::Server, cfg, start).unwrap();
        let mut input = syn(3);
        input.extend(psh(3, &[0u8; 10]));
        c.handle_input(&input).unwrap();
        c.handle_timeout(start + Duration::from_secs(30));
        c.handle_timeout(start + Duration::from_secs(60));
        assert!(!c.is_closed());
        read_all(&mut c, StreamId(3));
        c.handle_timeout(start + Duration::from_secs(90));
        assert!(c.is_closed());
    }

    #[test]
    fn disabled_keepalive_has_no_timer() {
        let c = client();
        assert_eq!(c.poll_timeout(), None);
        let old_agent = Session::new(Role::Client, Config::for_ssm(false), t0()).unwrap();
        assert!(old_agent.poll_timeout().is_some());
        let new_agent = Session::new(Role::Client, Config::for_ssm(true), t0()).unwrap();
        assert_eq!(new_agent.poll_timeout(), None);
    }

    #[test]
    fn invalid_config_is_rejected() {
        let cfg = Config {
            max_frame_size: 0,
            ..Config::default()
        };
        assert_eq!(
            Session::new(Role::Client, cfg, t0()).err(),
            Some(ConfigError::ZeroFrameSize)
        );
    }

    #[test]
    fn pending_transmit_for_tracks_one_stream() {
        let mut c = client();
        let a = c.open_stream().unwrap();
        let b = c.open_stream().unwrap();
        c.write(a, &[0u8; 100]).unwrap();
        assert_eq!(c.pending_transmit_for(a), 8 + 108);
        assert_eq!(c.pending_transmit_for(b), 8);
        drain_tx(&mut c);
        assert_eq!(c.pending_transmit_for(a), 0);
    }
}
