//! The reliable, ordered data channel on top of ClientMessages: sequence numbers,
//! per-message acknowledgements, the in-order delivery buffer, retransmission and
//! pause/start publication.
//!
//! Sans-IO: frames go in through [`Channel::handle_frame`], frames to send come out of
//! [`Channel::poll_transmit`], timers are driven by [`Channel::poll_timeout`] /
//! [`Channel::handle_timeout`], and in-order payloads come out of
//! [`Channel::poll_event`]. The rules, with their reference sources, are in
//! `proto-docs/channel.md`; the main ones:
//!
//! * Each direction has its own sequence space starting at 0; every stream-data message
//!   (any PayloadType) takes the next number ([P] `streaming.go` fn
//!   `SendInputDataMessage`; [A] `datachannel.go` fn `SendStreamDataMessage`).
//! * Every accepted stream-data message is acknowledged once; duplicates (seq below
//!   the expected one) are acknowledged again, as the agent does ([A] `datachannel.go`
//!   fn `handleStreamDataMessage`); messages ahead of the expected one are acknowledged
//!   and buffered while the buffer has room, and dropped unacknowledged otherwise.
//! * Acks are selective: an ack removes exactly the message with its sequence number
//!   ([P] fn `ProcessAcknowledgedMessage`).
//! * Every unacknowledged message has its own retransmission timer (one RTO, doubled on
//!   each retransmission of that message up to 8 RTO), but an expiry resends only what
//!   is evidently lost: a message the peer has passed (it acknowledged a later one), or,
//!   when the peer acknowledged nothing for an RTO (a stall), only the oldest
//!   unacknowledged message, as both references do ([P] `streaming.go` / [A]
//!   `datachannel.go` fn `ResendStreamDataMessageScheduler`). See
//!   [`Channel::handle_timeout`].
//! * CreatedDate is the wall clock at the message's creation ([P] fn
//!   `SendInputDataMessage`: `time.Now()`); the driver supplies it with
//!   [`Channel::set_wall_clock`], and a retransmission resends the stored bytes, so it
//!   keeps the original CreatedDate (and MessageId), as the references do.
//! * Unlike the references' unbounded (plugin: evicting) outgoing buffer, the number
//!   and bytes of unacknowledged messages are bounded; [`Channel::send`] refuses with
//!   [`SendError::WindowFull`] instead of dropping data.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use thiserror::Error;
use uuid::Uuid;

use super::kind::{MessageType, PayloadType, header_flags};
use super::message::{ClientMessage, DecodeError, EncodeError, SCHEMA_VERSION};
use super::payload::{self, AcknowledgeContent, AcknowledgedSequence, ChannelClosed, PayloadError};
use super::rtt::RttEstimator;

/// Retransmission backoff cap: at most 2^3 = 8 times the RTO.
const MAX_BACKOFF_SHIFT: u32 = 3;

/// Most acks waiting to be sent (about 1.2 MB); beyond it the oldest is discarded. The
/// references queue without bound ([P] sends each ack synchronously on the websocket).
pub const MAX_QUEUED_ACKS: usize = 4096;

/// Which end of the data channel this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The client (the plugin's role): sends `input_stream_data`.
    Client,
    /// The agent: sends `output_stream_data` (used by the simulator).
    Agent,
}

impl Role {
    /// The stream-data MessageType this role sends.
    pub fn outgoing_type(self) -> MessageType {
        match self {
            Role::Client => MessageType::InputStreamData,
            Role::Agent => MessageType::OutputStreamData,
        }
    }

    /// The stream-data MessageType this role receives.
    pub fn incoming_type(self) -> MessageType {
        match self {
            Role::Client => MessageType::OutputStreamData,
            Role::Agent => MessageType::InputStreamData,
        }
    }
}

/// Limits of a [`Channel`].
#[derive(Clone, Debug)]
pub struct ChannelConfig {
    /// Most unacknowledged outgoing messages. The agent buffers 100 000 incoming
    /// messages and the plugin 10 000; the default keeps well inside both.
    pub max_in_flight_messages: usize,
    /// Most unacknowledged outgoing payload bytes.
    pub max_in_flight_bytes: usize,
    /// Most out-of-order incoming messages held for in-order delivery (the plugin's
    /// `IncomingMessageBufferCapacity` is 10 000).
    pub reorder_capacity: usize,
    /// Close the channel when a message stays unacknowledged this long while connected
    /// ([P] gives up after `ResendMaxAttempt` 3000 ticks of 100 ms, about 300 s, and then
    /// calls TerminateSession). `None` never gives up, as the agent.
    pub give_up_after: Option<Duration>,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            max_in_flight_messages: 4096,
            max_in_flight_bytes: 4 * 1024 * 1024,
            reorder_capacity: 10_000,
            give_up_after: Some(Duration::from_secs(300)),
        }
    }
}

/// Why a channel ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The service sent `channel_closed`.
    ChannelClosed(ChannelClosed),
    /// A message was not acknowledged within [`ChannelConfig::give_up_after`].
    ResendTimeout {
        /// The sequence number that was never acknowledged.
        sequence_number: i64,
    },
}

/// What the channel reports to its user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelEvent {
    /// A stream-data payload, delivered exactly once and in sequence order.
    Data {
        /// Its sequence number.
        sequence_number: i64,
        /// Its PayloadType.
        payload_type: PayloadType,
        /// Its payload, as on the wire (still encrypted if KMS encryption is on).
        payload: Bytes,
    },
    /// The service sent `pause_publication` (the agent's side is inactive). Sending
    /// continues as in [P], which ignores the message: what is lost meanwhile is
    /// retransmitted. Reported for status displays.
    Paused,
    /// Publication resumed (`start_publication`, or inbound traffic, as in [A]).
    Resumed,
    /// The channel ended; no further events follow.
    Closed(CloseReason),
}

/// Why a frame was not accepted.
#[derive(Debug, Error)]
pub enum FrameError {
    /// The frame is not a valid ClientMessage.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// An acknowledge or channel_closed payload is malformed.
    #[error(transparent)]
    Payload(#[from] PayloadError),
}

/// Why a message could not be queued.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SendError {
    /// The in-flight window is full: wait for acknowledgements (backpressure).
    #[error("in-flight window full")]
    WindowFull,
    /// The channel has ended.
    #[error("channel closed")]
    Closed,
    /// The message cannot be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Counters for status displays and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Stream-data messages queued by [`Channel::send`].
    pub messages_sent: u64,
    /// Payload bytes queued by [`Channel::send`].
    pub bytes_sent: u64,
    /// Retransmissions (timer expiry or reconnect).
    pub retransmissions: u64,
    /// Timer expiries that did not resend: the message was only queued behind others,
    /// or the peer stalled and the message is not the oldest unacknowledged one (see
    /// [`Channel::handle_timeout`]).
    pub deferred_retransmissions: u64,
    /// Stream-data messages delivered in order.
    pub messages_delivered: u64,
    /// Payload bytes delivered in order.
    pub bytes_delivered: u64,
    /// Acknowledgements sent (including re-acks).
    pub acks_sent: u64,
    /// Acknowledgements discarded unsent because [`MAX_QUEUED_ACKS`] were waiting.
    pub acks_dropped: u64,
    /// Acknowledgements received that matched an unacknowledged message.
    pub acks_received: u64,
    /// Acknowledgements received for no unacknowledged message.
    pub unknown_acks: u64,
    /// Stream-data messages received again after delivery or buffering.
    pub duplicates: u64,
    /// Stream-data messages received ahead of the expected sequence number.
    pub out_of_order: u64,
    /// Messages dropped unacknowledged (receiver not ready or reorder buffer full).
    pub refused: u64,
    /// Frames that failed to decode.
    pub malformed: u64,
    /// Well-formed messages of a type this role ignores.
    pub ignored: u64,
}

#[derive(Debug)]
struct Outgoing {
    frame: Bytes,
    payload_len: usize,
    first_sent: Option<Instant>,
    last_sent: Option<Instant>,
    transmissions: u32,
    deadline: Option<Instant>,
    /// Its timer expired without a resend (see [`Channel::handle_timeout`]): it is
    /// overdue, and is resent as soon as it becomes the oldest during a recovery.
    overdue: bool,
}

/// Maps the monotonic `now` the caller passes to the wall-clock milliseconds written
/// into CreatedDate: `base_unix_ms` at `base`, advancing with `now` from there.
///
/// The monotonic clock stops while a laptop sleeps (CLOCK_MONOTONIC on Linux, and
/// `Instant` on macOS), so a mapping fixed at construction falls behind the wall clock
/// by every suspend; the driver therefore rebases it with [`Channel::set_wall_clock`]
/// each time it reads the clocks.
#[derive(Clone, Copy, Debug)]
struct WallClock {
    base: Instant,
    base_unix_ms: u64,
}

impl WallClock {
    fn unix_ms(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.base).as_millis();
        let elapsed = u64::try_from(elapsed).unwrap_or(u64::MAX);
        // CreatedDate must not be 0 ([P] `Validate`).
        self.base_unix_ms.saturating_add(elapsed).max(1)
    }
}

/// What an expired retransmission timer does.
enum Expiry {
    /// Resend: the message is lost (a hole, or the oldest during a recovery).
    Resend,
    /// Resend the oldest message of a stalled peer, and start a recovery.
    StallResend,
    /// Re-arm the timer without resending.
    Defer,
}

/// One end of a data channel. See the module documentation.
#[derive(Debug)]
pub struct Channel {
    role: Role,
    config: ChannelConfig,
    clock: WallClock,
    next_seq: i64,
    expected_seq: i64,
    unacked: BTreeMap<i64, Outgoing>,
    unacked_bytes: usize,
    timers: BinaryHeap<Reverse<(Instant, i64)>>,
    transmit: VecDeque<Bytes>,
    /// Acks waiting to be sent, at most [`MAX_QUEUED_ACKS`].
    acks: VecDeque<Bytes>,
    reorder: BTreeMap<i64, ClientMessage>,
    events: VecDeque<ChannelEvent>,
    rtt: RttEstimator,
    /// When an acknowledgement last matched an unacknowledged message.
    last_ack_at: Option<Instant>,
    /// The highest sequence number acknowledged so far.
    highest_acked: Option<i64>,
    /// Set by a stall resend of the oldest message, cleared by an ack of a message sent
    /// only once: while set, the oldest message is resent as soon as it is overdue.
    recovering: bool,
    paused: bool,
    connected: bool,
    receive_ready: bool,
    closed: Option<CloseReason>,
    stats: ChannelStats,
}

impl Channel {
    /// A new channel. `now` and `unix_ms` are the same instant on the monotonic and on
    /// the wall clock; CreatedDate values are derived from them until the next
    /// [`Channel::set_wall_clock`].
    pub fn new(role: Role, config: ChannelConfig, now: Instant, unix_ms: u64) -> Channel {
        Channel {
            role,
            config,
            clock: WallClock {
                base: now,
                base_unix_ms: unix_ms,
            },
            next_seq: 0,
            expected_seq: 0,
            unacked: BTreeMap::new(),
            unacked_bytes: 0,
            timers: BinaryHeap::new(),
            transmit: VecDeque::new(),
            acks: VecDeque::new(),
            reorder: BTreeMap::new(),
            events: VecDeque::new(),
            rtt: RttEstimator::default(),
            last_ack_at: None,
            highest_acked: None,
            recovering: false,
            paused: false,
            connected: true,
            receive_ready: true,
            closed: None,
            stats: ChannelStats::default(),
        }
    }

    /// Rebases the CreatedDate clock: a message created at `now` is stamped `unix_ms`,
    /// one created later `unix_ms` plus the monotonic time since `now`.
    ///
    /// [P] stamps `time.Now()` when it builds each message (fn `SendInputDataMessage`,
    /// `SerializeClientMessageWithAcknowledgeContent`). To stay clock-free, the channel
    /// takes the wall clock as an input instead: the driver calls this with the two
    /// clocks read together, at least once per loop turn (before feeding that turn's
    /// inputs), so a jump of the wall clock (a laptop suspend, an NTP step) shows in the
    /// next message exactly. Messages already queued keep their stamp, and
    /// retransmissions resend the stored bytes unchanged, as [P] and [A] do (fn
    /// `ResendStreamDataMessageScheduler` sends `streamMessage.Content`).
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.clock = WallClock {
            base: now,
            base_unix_ms: unix_ms,
        };
    }

    /// This channel's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// True if a payload of `len` bytes would be accepted by [`Channel::send`] now.
    pub fn can_send(&self, len: usize) -> bool {
        self.closed.is_none() && self.window_has_room(len)
    }

    fn window_has_room(&self, len: usize) -> bool {
        self.unacked.is_empty()
            || (self.unacked.len() < self.config.max_in_flight_messages
                && self.unacked_bytes + len <= self.config.max_in_flight_bytes)
    }

    /// Queues one stream-data message and returns its sequence number.
    ///
    /// The message is transmitted at once unless the channel is disconnected, and kept
    /// until acknowledged.
    pub fn send(
        &mut self,
        payload_type: PayloadType,
        payload: Bytes,
        now: Instant,
    ) -> Result<i64, SendError> {
        if !self.window_has_room(payload.len()) && self.closed.is_none() {
            return Err(SendError::WindowFull);
        }
        self.send_past_window(payload_type, payload, now)
    }

    /// Like [`Channel::send`], but queued even when the in-flight window is full.
    /// For the last message of a session (the TerminateSession flag): a peer that
    /// stopped acknowledging is the usual reason to end one, and the goodbye must
    /// not wait behind the window it filled. Our window is far below the references'
    /// outgoing buffers ([P] 10 000 messages, evicting the oldest when full, fn
    /// `AddDataToOutgoingMessageBuffer`; [A] 100 000), so one message past it is within
    /// what either side accepts.
    pub fn send_past_window(
        &mut self,
        payload_type: PayloadType,
        payload: Bytes,
        now: Instant,
    ) -> Result<i64, SendError> {
        if self.closed.is_some() {
            return Err(SendError::Closed);
        }
        let seq = self.next_seq;
        let flags = match (self.role, seq) {
            // [A] `datachannel.go` fn `SendStreamDataMessage`: Flags 1 on seq 0.
            (Role::Agent, 0) => header_flags::SYN,
            _ => header_flags::DATA,
        };
        let msg = ClientMessage {
            message_type: self.role.outgoing_type(),
            schema_version: SCHEMA_VERSION,
            created_date: self.clock.unix_ms(now),
            sequence_number: seq,
            flags,
            message_id: new_message_id(),
            payload_type,
            payload,
        };
        let frame = msg.encode()?;
        self.next_seq += 1;
        self.stats.messages_sent += 1;
        self.stats.bytes_sent += msg.payload.len() as u64;
        self.unacked_bytes += msg.payload.len();
        self.unacked.insert(
            seq,
            Outgoing {
                frame,
                payload_len: msg.payload.len(),
                first_sent: None,
                last_sent: None,
                transmissions: 0,
                deadline: None,
                overdue: false,
            },
        );
        if self.connected {
            self.transmit_seq(seq, now);
        }
        Ok(seq)
    }

    fn transmit_seq(&mut self, seq: i64, now: Instant) {
        let base = self.rtt.rto();
        let Some(out) = self.unacked.get_mut(&seq) else {
            return;
        };
        // Each retransmission of the same message doubles its timeout, up to 8 RTO, so
        // a peer that stops acknowledging is not flooded with the whole window every
        // RTO (the references avoid this by resending only the oldest message).
        let rto = base.saturating_mul(1 << out.transmissions.min(MAX_BACKOFF_SHIFT));
        if out.transmissions > 0 {
            self.stats.retransmissions += 1;
        }
        out.transmissions += 1;
        out.overdue = false;
        out.first_sent.get_or_insert(now);
        out.last_sent = Some(now);
        let deadline = now + rto;
        out.deadline = Some(deadline);
        self.transmit.push_back(out.frame.clone());
        self.timers.push(Reverse((deadline, seq)));
        if self.timers.len() > 2 * self.unacked.len() + 64 {
            self.rebuild_timers();
        }
    }

    fn rebuild_timers(&mut self) {
        self.timers = self
            .unacked
            .iter()
            .filter_map(|(&seq, o)| o.deadline.map(|d| Reverse((d, seq))))
            .collect();
    }

    /// The next frame to send on the websocket (one BINARY frame each). Acks go
    /// first: they are small, and a late ack inflates the sender's RTT estimate and
    /// retransmission timeout.
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.acks.pop_front().or_else(|| self.transmit.pop_front())
    }

    /// Frames waiting for [`Channel::poll_transmit`] (acks, data, retransmissions).
    pub fn pending_transmit(&self) -> usize {
        self.acks.len() + self.transmit.len()
    }

    /// The next in-order payload or state change.
    pub fn poll_event(&mut self) -> Option<ChannelEvent> {
        self.events.pop_front()
    }

    /// When [`Channel::handle_timeout`] must next be called, if at all.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if self.closed.is_some() || !self.connected {
            return None;
        }
        while let Some(&Reverse((deadline, seq))) = self.timers.peek() {
            let live = self
                .unacked
                .get(&seq)
                .is_some_and(|o| o.deadline == Some(deadline));
            if live {
                return Some(deadline);
            }
            self.timers.pop();
        }
        None
    }

    /// Runs the retransmission timers that expired at or before `now`, and gives up
    /// once the oldest unacknowledged message has waited longer than
    /// [`ChannelConfig::give_up_after`].
    ///
    /// An expiry resends the message only when it is evidently lost (the rules, with
    /// sources, are in `proto-docs/channel.md` §6):
    ///
    /// 1. **Stall** (no acknowledgement matched for an RTO): only the oldest
    ///    unacknowledged message is resent; every other expiry is deferred by an RTO.
    ///    Both references resend only the front of their outgoing list ([P]
    ///    `streaming.go` / [A] `datachannel.go` fn `ResendStreamDataMessageScheduler`),
    ///    so a peer that stopped acknowledging gets one message per timeout, not the
    ///    whole window.
    /// 2. **Hole** (acks flow and the peer acknowledged a later message): resent, since
    ///    a websocket delivers in order and the peer has passed it.
    /// 3. **Queued** (acks flow, nothing later acknowledged): deferred by an RTO; it is
    ///    on its way behind the messages sent before it (commit 3eb03ce: resending those
    ///    resent the whole window of a bulk upload again and again).
    /// 4. **Recovery**: after a stall resend, the oldest message is resent as soon as it
    ///    is overdue (when the previous oldest is acknowledged), as [P]'s next 100 ms
    ///    tick would, so messages the peer dropped during the stall are recovered one
    ///    per round trip. Recovery ends with an acknowledgement that answers a first
    ///    transmission (see `handle_ack`).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() || !self.connected {
            return;
        }
        while let Some(&Reverse((deadline, seq))) = self.timers.peek() {
            if deadline > now {
                break;
            }
            self.timers.pop();
            let Some(out) = self.unacked.get(&seq) else {
                continue;
            };
            if out.deadline != Some(deadline) {
                continue;
            }
            if let Some(oldest) = self.given_up(now) {
                self.close(CloseReason::ResendTimeout {
                    sequence_number: oldest,
                });
                return;
            }
            match self.on_expiry(seq, now) {
                Expiry::Resend => self.transmit_seq(seq, now),
                Expiry::StallResend => {
                    self.recovering = true;
                    self.transmit_seq(seq, now);
                }
                Expiry::Defer => self.defer(seq, now),
            }
        }
    }

    /// The oldest unacknowledged sequence number, if it has waited at least
    /// [`ChannelConfig::give_up_after`] since its first transmission. Sequence order is
    /// first-transmission order, so no other message can have waited longer.
    fn given_up(&self, now: Instant) -> Option<i64> {
        let limit = self.config.give_up_after?;
        let (&oldest, out) = self.unacked.first_key_value()?;
        let first = out.first_sent?;
        (now.saturating_duration_since(first) >= limit).then_some(oldest)
    }

    /// What an expired timer of `seq` does (rules in [`Channel::handle_timeout`]).
    fn on_expiry(&self, seq: i64, now: Instant) -> Expiry {
        let oldest = self.unacked.first_key_value().map(|(&s, _)| s) == Some(seq);
        let acks_flowing = self
            .last_ack_at
            .is_some_and(|t| now.saturating_duration_since(t) < self.rtt.rto());
        if !acks_flowing {
            return if oldest {
                Expiry::StallResend
            } else {
                Expiry::Defer
            };
        }
        let passed = self.highest_acked.is_some_and(|h| h > seq);
        if passed || (oldest && self.recovering) {
            Expiry::Resend
        } else {
            Expiry::Defer
        }
    }

    /// Re-arms the timer of `seq` one RTO from `now` without resending it.
    fn defer(&mut self, seq: i64, now: Instant) {
        let deadline = now + self.rtt.rto();
        if let Some(out) = self.unacked.get_mut(&seq) {
            out.deadline = Some(deadline);
            out.overdue = true;
        }
        self.timers.push(Reverse((deadline, seq)));
        self.stats.deferred_retransmissions += 1;
        if self.timers.len() > 2 * self.unacked.len() + 64 {
            self.rebuild_timers();
        }
    }

    /// Tells the channel the websocket is gone: nothing is transmitted and no timer
    /// runs until [`Channel::on_reconnect`]. Sequence state and unacknowledged messages
    /// are kept ([P] `streaming.go` fn `Reconnect`).
    pub fn on_disconnect(&mut self) {
        if self.closed.is_some() {
            return;
        }
        self.connected = false;
        self.transmit.clear();
        self.acks.clear();
    }

    /// Tells the channel a new websocket is open (after OpenDataChannel was sent on
    /// it): every unacknowledged message is sent again, in sequence order.
    pub fn on_reconnect(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        self.connected = true;
        self.set_paused(false);
        self.flush_unacked(now);
    }

    fn flush_unacked(&mut self, now: Instant) {
        let seqs: Vec<i64> = self.unacked.keys().copied().collect();
        for seq in seqs {
            self.transmit_seq(seq, now);
        }
    }

    fn set_paused(&mut self, paused: bool) {
        if self.paused == paused {
            return;
        }
        self.paused = paused;
        self.events.push_back(if paused {
            ChannelEvent::Paused
        } else {
            ChannelEvent::Resumed
        });
    }

    fn resume(&mut self) {
        self.set_paused(false);
    }

    /// Whether in-order stream data is accepted. While `false`, new stream data is
    /// dropped unacknowledged so the peer retransmits it later, exactly as the agent
    /// does while its handler is not ready ([A] `datachannel.go` fn
    /// `handleStreamDataMessage`, `ErrHandlerNotReady`): this is receive backpressure.
    pub fn set_receive_ready(&mut self, ready: bool) {
        self.receive_ready = ready;
    }

    /// Processes one frame received on the websocket.
    ///
    /// A malformed frame is dropped and reported; nothing is acknowledged for it, so a
    /// peer that sent a corrupted copy retransmits it.
    pub fn handle_frame(&mut self, frame: Bytes, now: Instant) -> Result<(), FrameError> {
        if self.closed.is_some() {
            return Ok(());
        }
        let msg = match ClientMessage::decode(frame) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                return Err(e.into());
            }
        };
        match &msg.message_type {
            t if *t == self.role.incoming_type() => self.handle_stream_data(msg, now),
            MessageType::Acknowledge => {
                let ack: AcknowledgedSequence = payload::from_json("acknowledge", &msg.payload)?;
                self.handle_ack(ack.sequence_number, now);
                self.resume();
            }
            MessageType::ChannelClosed => {
                // [P] `streaming.go` fn `HandleChannelClosedMessage` ends the session even
                // when the payload does not parse; so do we, and report the error.
                let parsed: Result<ChannelClosed, _> =
                    payload::from_json("channel_closed", &msg.payload);
                self.close(CloseReason::ChannelClosed(
                    parsed.as_ref().cloned().unwrap_or_default(),
                ));
                parsed?;
            }
            MessageType::PausePublication => self.set_paused(true),
            MessageType::StartPublication => self.resume(),
            _ => self.stats.ignored += 1,
        }
        Ok(())
    }

    /// Removes the acknowledged message, samples the RTT, and during a recovery (see
    /// [`Channel::handle_timeout`]) makes an overdue oldest message due at once.
    ///
    /// Recovery ends when the peer evidently receives first transmissions again: an ack
    /// of a message sent only once, or of a retransmitted one sooner than half a
    /// smoothed RTT after its last copy went out, which can only answer an earlier copy
    /// (the retransmission was spurious: the peer was slow, not losing messages; the
    /// heuristic of Allman and Paxson, "On estimating end-to-end network path
    /// properties", 1999).
    fn handle_ack(&mut self, sequence_number: i64, now: Instant) {
        let Some(out) = self.unacked.remove(&sequence_number) else {
            self.stats.unknown_acks += 1;
            return;
        };
        self.stats.acks_received += 1;
        self.unacked_bytes -= out.payload_len;
        self.last_ack_at = Some(now);
        self.highest_acked = Some(
            self.highest_acked
                .map_or(sequence_number, |h| h.max(sequence_number)),
        );
        let since_last = out
            .last_sent
            .map(|sent| now.saturating_duration_since(sent));
        if out.transmissions == 1 {
            // Karn's rule: a sample from a retransmitted message is ambiguous.
            if let Some(rtt) = since_last {
                self.rtt.on_sample(rtt);
            }
            self.recovering = false;
        } else if since_last.is_some_and(|d| d < self.rtt.srtt() / 2) {
            self.recovering = false;
        }
        if self.unacked.is_empty() {
            self.recovering = false;
        }
        if self.recovering
            && let Some((&oldest, front)) = self.unacked.iter_mut().next()
            && front.overdue
        {
            front.deadline = Some(now);
            self.timers.push(Reverse((now, oldest)));
        }
    }

    fn handle_stream_data(&mut self, msg: ClientMessage, now: Instant) {
        let seq = msg.sequence_number;
        if seq < self.expected_seq {
            self.stats.duplicates += 1;
            self.queue_ack(&msg, now);
            return;
        }
        if seq > self.expected_seq {
            if self.reorder.contains_key(&seq) {
                self.stats.duplicates += 1;
                self.queue_ack(&msg, now);
            } else if self.receive_ready && self.reorder.len() < self.config.reorder_capacity {
                self.stats.out_of_order += 1;
                self.queue_ack(&msg, now);
                self.reorder.insert(seq, msg);
            } else {
                self.stats.refused += 1;
            }
            self.resume();
            return;
        }
        if !self.receive_ready {
            self.stats.refused += 1;
            return;
        }
        // The ack goes out before anything the user sends in response ([P] acks
        // handshake messages before handling them).
        self.queue_ack(&msg, now);
        self.deliver(msg);
        while let Some(next) = self.reorder.remove(&self.expected_seq) {
            self.deliver(next);
        }
        self.resume();
    }

    fn deliver(&mut self, msg: ClientMessage) {
        self.expected_seq += 1;
        self.stats.messages_delivered += 1;
        self.stats.bytes_delivered += msg.payload.len() as u64;
        self.events.push_back(ChannelEvent::Data {
            sequence_number: msg.sequence_number,
            payload_type: msg.payload_type,
            payload: msg.payload,
        });
    }

    fn queue_ack(&mut self, msg: &ClientMessage, now: Instant) {
        let content = AcknowledgeContent {
            message_type: msg.message_type.as_str().to_owned(),
            message_id: msg.message_id.hyphenated().to_string(),
            sequence_number: msg.sequence_number,
            is_sequential_message: true,
        };
        let ack = ClientMessage {
            message_type: MessageType::Acknowledge,
            schema_version: SCHEMA_VERSION,
            created_date: self.clock.unix_ms(now),
            sequence_number: 0,
            flags: header_flags::ACK,
            message_id: new_message_id(),
            payload_type: PayloadType::Undefined,
            payload: Bytes::from(payload::to_json(&content)),
        };
        // An ack payload is never empty and its type is short: encoding cannot fail.
        if let Ok(frame) = ack.encode() {
            self.stats.acks_sent += 1;
            if self.connected {
                if self.acks.len() >= MAX_QUEUED_ACKS {
                    // The websocket cannot take our acks as fast as data arrives. Reading
                    // must not wait for writing (the peer may be blocked writing to us),
                    // so the oldest unsent ack goes: its message comes again and is
                    // acked again, the protocol's own recovery.
                    self.acks.pop_front();
                    self.stats.acks_dropped += 1;
                }
                self.acks.push_back(frame);
            }
        }
    }

    fn close(&mut self, reason: CloseReason) {
        if self.closed.is_none() {
            self.closed = Some(reason.clone());
            self.events.push_back(ChannelEvent::Closed(reason));
        }
    }

    /// Why the channel ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.closed.as_ref()
    }

    /// True between `pause_publication` and `start_publication` (or inbound traffic).
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// The sequence number the next sent message will get.
    pub fn next_sequence_number(&self) -> i64 {
        self.next_seq
    }

    /// The sequence number expected next from the peer.
    pub fn expected_sequence_number(&self) -> i64 {
        self.expected_seq
    }

    /// Unacknowledged outgoing messages.
    pub fn in_flight_messages(&self) -> usize {
        self.unacked.len()
    }

    /// Unacknowledged outgoing payload bytes.
    pub fn in_flight_bytes(&self) -> usize {
        self.unacked_bytes
    }

    /// Out-of-order messages waiting for a gap to fill.
    pub fn reorder_buffered(&self) -> usize {
        self.reorder.len()
    }

    /// The RTT estimator.
    pub fn rtt(&self) -> &RttEstimator {
        &self.rtt
    }

    /// Counters.
    pub fn stats(&self) -> &ChannelStats {
        &self.stats
    }
}

/// A random (version 4) MessageId. The message ids only need to be unique, so they come
/// from the thread's fast PRNG (seeded from the OS) rather than one `getrandom` system
/// call per message, which was the busiest system call of a transfer.
fn new_message_id() -> Uuid {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0_MS: u64 = 1_700_000_000_000;

    fn pair() -> (Channel, Channel, Instant) {
        let now = Instant::now();
        (
            Channel::new(Role::Client, ChannelConfig::default(), now, T0_MS),
            Channel::new(Role::Agent, ChannelConfig::default(), now, T0_MS),
            now,
        )
    }

    fn frames(c: &mut Channel) -> Vec<Bytes> {
        std::iter::from_fn(|| c.poll_transmit()).collect()
    }

    fn events(c: &mut Channel) -> Vec<ChannelEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn data(c: &mut Channel) -> Vec<(i64, Bytes)> {
        events(c)
            .into_iter()
            .filter_map(|e| match e {
                ChannelEvent::Data {
                    sequence_number,
                    payload,
                    ..
                } => Some((sequence_number, payload)),
                _ => None,
            })
            .collect()
    }

    fn decode(f: &Bytes) -> ClientMessage {
        ClientMessage::decode(f.clone()).unwrap()
    }

    fn ack_of(f: &Bytes) -> AcknowledgeContent {
        let m = decode(f);
        assert_eq!(m.message_type, MessageType::Acknowledge);
        assert_eq!((m.sequence_number, m.flags), (0, 3));
        assert_eq!(m.payload_type, PayloadType::Undefined);
        payload::from_json("ack", &m.payload).unwrap()
    }

    #[test]
    fn sequence_numbers_and_header_fields() {
        let (mut c, mut a, now) = pair();
        for i in 0..3 {
            let seq = c
                .send(PayloadType::Output, Bytes::from(vec![i; 3]), now)
                .unwrap();
            assert_eq!(seq, i as i64);
        }
        let f = frames(&mut c);
        assert_eq!(f.len(), 3);
        let m = decode(&f[1]);
        assert_eq!(m.message_type, MessageType::InputStreamData);
        assert_eq!((m.sequence_number, m.flags, m.schema_version), (1, 0, 1));
        assert_eq!(m.created_date, T0_MS);

        a.send(
            PayloadType::HandshakeRequest,
            Bytes::from_static(b"{}"),
            now,
        )
        .unwrap();
        a.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        let f = frames(&mut a);
        assert_eq!(decode(&f[0]).flags, 1, "agent seq 0 carries SYN");
        assert_eq!(decode(&f[1]).flags, 0);
        assert_eq!(decode(&f[1]).message_type, MessageType::OutputStreamData);
    }

    #[test]
    fn every_message_is_acked_once_and_delivered_in_order() {
        let (mut c, mut a, now) = pair();
        for p in [b"a", b"b", b"c"] {
            a.send(PayloadType::Output, Bytes::from_static(p), now)
                .unwrap();
        }
        let f = frames(&mut a);
        // Deliver 2, 0, 1: 2 is buffered and acked, then 0 and 1 release it.
        for i in [2, 0, 1] {
            c.handle_frame(f[i].clone(), now).unwrap();
        }
        let acks: Vec<i64> = frames(&mut c)
            .iter()
            .map(|f| ack_of(f).sequence_number)
            .collect();
        assert_eq!(acks, vec![2, 0, 1]);
        let got: Vec<_> = data(&mut c).into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![0, 1, 2]);
        assert_eq!(c.stats().out_of_order, 1);
        assert_eq!(c.expected_sequence_number(), 3);
    }

    #[test]
    fn unsent_acks_are_bounded_and_the_oldest_go_first() {
        let now = Instant::now();
        let mut c = Channel::new(Role::Client, ChannelConfig::default(), now, T0_MS);
        let big = ChannelConfig {
            max_in_flight_messages: 10_000,
            max_in_flight_bytes: 10_000_000,
            ..ChannelConfig::default()
        };
        let mut a = Channel::new(Role::Agent, big, now, T0_MS);
        let n = MAX_QUEUED_ACKS + 100;
        for _ in 0..n {
            a.send(PayloadType::Output, Bytes::from_static(b"x"), now)
                .unwrap();
        }
        // The client's websocket takes nothing while all of them arrive.
        for f in frames(&mut a) {
            c.handle_frame(f, now).unwrap();
        }
        assert_eq!(c.pending_transmit(), MAX_QUEUED_ACKS);
        assert_eq!(c.stats().acks_dropped, 100);
        assert_eq!(data(&mut c).len(), n, "every message is delivered");
        let acks: Vec<i64> = frames(&mut c)
            .iter()
            .map(|f| ack_of(f).sequence_number)
            .collect();
        assert_eq!(acks.first(), Some(&100), "the oldest 100 were dropped");
        assert_eq!(acks.last(), Some(&(n as i64 - 1)));
        // A resent message is acked again.
        a.on_disconnect();
        a.on_reconnect(now);
        let again = frames(&mut a);
        c.handle_frame(again[0].clone(), now).unwrap();
        assert_eq!(ack_of(&frames(&mut c)[0]).sequence_number, 0);
    }

    #[test]
    fn ack_fields_name_the_acked_message() {
        let (mut c, mut a, now) = pair();
        a.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        let f = frames(&mut a).remove(0);
        let id = decode(&f).message_id;
        c.handle_frame(f, now).unwrap();
        let ack = ack_of(&frames(&mut c)[0]);
        assert_eq!(ack.message_type, "output_stream_data");
        assert_eq!(ack.message_id, id.hyphenated().to_string());
        assert!(ack.is_sequential_message);
    }

    #[test]
    fn duplicates_are_acked_again_but_delivered_once() {
        let (mut c, mut a, now) = pair();
        a.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        let f = frames(&mut a).remove(0);
        c.handle_frame(f.clone(), now).unwrap();
        c.handle_frame(f, now).unwrap();
        assert_eq!(frames(&mut c).len(), 2);
        assert_eq!(data(&mut c).len(), 1);
        assert_eq!(c.stats().duplicates, 1);
    }

    #[test]
    fn acks_remove_exactly_one_message_and_sample_rtt() {
        let (mut c, mut a, now) = pair();
        for _ in 0..2 {
            c.send(PayloadType::Output, Bytes::from_static(b"x"), now)
                .unwrap();
        }
        let f = frames(&mut c);
        a.handle_frame(f[1].clone(), now).unwrap();
        let later = now + Duration::from_millis(20);
        for ack in frames(&mut a) {
            c.handle_frame(ack, later).unwrap();
        }
        assert_eq!(c.in_flight_messages(), 1);
        assert_eq!(c.rtt().rto(), Duration::from_millis(170));
    }

    /// Runs every timer due at `now`, as a driver does after each input.
    fn fire(c: &mut Channel, now: Instant) {
        while c.poll_timeout().is_some_and(|t| t <= now) {
            c.handle_timeout(now);
        }
    }

    fn ack_frame(a: &mut Channel, frame: &Bytes, now: Instant) -> Bytes {
        a.handle_frame(frame.clone(), now).unwrap();
        frames(a).remove(0)
    }

    #[test]
    fn in_a_stall_only_the_oldest_is_resent_and_the_next_after_its_ack() {
        let (mut c, mut a, now) = pair();
        c.send(PayloadType::Output, Bytes::from_static(b"a"), now)
            .unwrap();
        let t1 = now + Duration::from_millis(50);
        c.send(PayloadType::Output, Bytes::from_static(b"b"), t1)
            .unwrap();
        let first = frames(&mut c);
        assert_eq!(c.poll_timeout(), Some(now + Duration::from_millis(200)));
        c.handle_timeout(now + Duration::from_millis(199));
        assert!(frames(&mut c).is_empty());
        c.handle_timeout(now + Duration::from_millis(200));
        let re = frames(&mut c);
        assert_eq!(re, vec![first[0].clone()], "same bytes, same seq and id");
        // No ack at all: "b" is not the oldest, so its expiry does not resend it.
        assert_eq!(c.poll_timeout(), Some(t1 + Duration::from_millis(200)));
        c.handle_timeout(t1 + Duration::from_millis(200));
        assert!(frames(&mut c).is_empty());
        assert_eq!(c.stats().deferred_retransmissions, 1);
        // "a" is acknowledged (100 ms after its resend): "b" is now the oldest and
        // overdue, so it is due at once.
        let t = now + Duration::from_millis(300);
        let ack = ack_frame(&mut a, &re[0], t);
        c.handle_frame(ack, t).unwrap();
        assert_eq!(c.poll_timeout(), Some(t));
        c.handle_timeout(t);
        assert_eq!(frames(&mut c), vec![first[1].clone()]);
        assert_eq!(c.stats().retransmissions, 2);
    }

    #[test]
    fn a_stalled_peer_gets_only_the_oldest_message_resent() {
        let (mut c, _, t0) = pair();
        for i in 0..100u8 {
            c.send(PayloadType::Output, Bytes::from(vec![i]), t0)
                .unwrap();
        }
        let first = frames(&mut c);
        assert_eq!(first.len(), 100);
        let end = t0 + Duration::from_secs(10);
        let mut resent_at = Vec::new();
        while let Some(t) = c.poll_timeout().filter(|&t| t <= end) {
            c.handle_timeout(t);
            let out = frames(&mut c);
            assert!(out.len() <= 1, "{} frames at one expiry", out.len());
            for f in out {
                assert_eq!(f, first[0], "only the oldest, byte for byte");
                resent_at.push(t.duration_since(t0).as_millis());
            }
        }
        // Its own backoff (RTO 200 ms, doubling, capped at 8 RTO); the other 99 are
        // deferred, never resent.
        assert_eq!(
            resent_at,
            vec![200, 600, 1400, 3000, 4600, 6200, 7800, 9400]
        );
        assert_eq!(c.stats().retransmissions, 8);
        assert!(c.stats().deferred_retransmissions >= 99);
        assert_eq!(c.in_flight_messages(), 100);
        assert!(c.close_reason().is_none());
    }

    #[test]
    fn a_stall_still_gives_up_with_resend_timeout() {
        let (mut c, _, t0) = pair();
        for i in 0..100u8 {
            c.send(PayloadType::Output, Bytes::from(vec![i]), t0)
                .unwrap();
        }
        let first = frames(&mut c);
        let mut t = t0;
        while c.close_reason().is_none() {
            t = c.poll_timeout().expect("a timer while unacked");
            c.handle_timeout(t);
            for f in frames(&mut c) {
                assert_eq!(f, first[0]);
            }
        }
        assert!(t >= t0 + Duration::from_secs(300));
        assert!(t <= t0 + Duration::from_millis(300_200));
        assert_eq!(
            c.close_reason(),
            Some(&CloseReason::ResendTimeout { sequence_number: 0 })
        );
        assert_eq!(c.poll_timeout(), None);
        c.handle_timeout(t + Duration::from_secs(10));
        assert!(frames(&mut c).is_empty(), "nothing after Closed");
    }

    #[test]
    fn messages_dropped_during_a_stall_are_recovered_one_per_round_trip() {
        let (mut c, mut a, t0) = pair();
        for i in 0..5u8 {
            c.send(PayloadType::Output, Bytes::from(vec![i]), t0)
                .unwrap();
        }
        // The agent's handler is not ready: everything is dropped unacknowledged.
        a.set_receive_ready(false);
        for f in frames(&mut c) {
            a.handle_frame(f, t0).unwrap();
        }
        assert!(frames(&mut a).is_empty());
        a.set_receive_ready(true);
        let rtt = Duration::from_millis(60);
        let mut t = t0 + Duration::from_millis(200);
        let mut resent = Vec::new();
        fire(&mut c, t);
        loop {
            let out = frames(&mut c);
            let [f] = &out[..] else {
                panic!("expected one resend at {t:?}, got {}", out.len());
            };
            resent.push((decode(f).sequence_number, t.duration_since(t0).as_millis()));
            let ack = ack_frame(&mut a, f, t);
            t += rtt;
            c.handle_frame(ack, t).unwrap();
            fire(&mut c, t);
            if c.in_flight_messages() == 0 {
                break;
            }
        }
        assert_eq!(
            resent,
            vec![(0, 200), (1, 260), (2, 320), (3, 380), (4, 440)],
            "one per round trip, oldest first"
        );
        let got: Vec<i64> = data(&mut a).into_iter().map(|(s, _)| s).collect();
        assert_eq!(got, vec![0, 1, 2, 3, 4]);
        assert_eq!(c.stats().retransmissions, 5);
    }

    #[test]
    fn a_slow_peer_ends_the_recovery_after_one_spurious_resend() {
        let (mut c, mut a, t0) = pair();
        for i in 0..10u8 {
            c.send(PayloadType::Output, Bytes::from(vec![i]), t0)
                .unwrap();
        }
        let first = frames(&mut c);
        // The peer is slow, not lossy: it acknowledges the originals after 1.5 s.
        let end = t0 + Duration::from_millis(1500);
        while let Some(t) = c.poll_timeout().filter(|&t| t <= end) {
            c.handle_timeout(t);
        }
        let stall_resends = frames(&mut c);
        assert_eq!(
            stall_resends,
            vec![first[0].clone(); 3],
            "at 200, 600, 1400 ms"
        );
        let mut t = t0 + Duration::from_millis(1500);
        let mut spurious = Vec::new();
        for f in &first {
            let ack = ack_frame(&mut a, f, t);
            c.handle_frame(ack, t).unwrap();
            fire(&mut c, t);
            spurious.extend(frames(&mut c).iter().map(|f| decode(f).sequence_number));
            t += Duration::from_millis(1);
        }
        // Message 1 is resent when 0's ack arrives (0 was resent 100 ms earlier, so
        // that ack may answer the resend); 1's ack arrives 1 ms after its resend, so
        // it answers the original: the recovery ends there.
        assert_eq!(spurious, vec![1]);
        assert_eq!(c.in_flight_messages(), 0);
        assert_eq!(c.stats().retransmissions, 4);
    }

    #[test]
    fn created_date_follows_the_wall_clock_across_a_jump() {
        let (mut c, mut a, t0) = pair();
        c.send(PayloadType::Output, Bytes::from_static(b"before"), t0)
            .unwrap();
        let before = frames(&mut c).remove(0);
        assert_eq!(decode(&before).created_date, T0_MS);
        // A suspend: the monotonic clock advances 1 s, the wall clock 10 minutes.
        let t1 = t0 + Duration::from_secs(1);
        c.set_wall_clock(t1, T0_MS + 600_000);
        c.send(PayloadType::Output, Bytes::from_static(b"after"), t1)
            .unwrap();
        let after = frames(&mut c).remove(0);
        assert_eq!(decode(&after).created_date, T0_MS + 600_000);
        // Later messages and acks advance from the new base.
        let t2 = t1 + Duration::from_millis(250);
        a.send(PayloadType::Output, Bytes::from_static(b"x"), t0)
            .unwrap();
        c.handle_frame(frames(&mut a).remove(0), t2).unwrap();
        let ack = frames(&mut c).remove(0);
        assert_eq!(decode(&ack).created_date, T0_MS + 600_250);
        c.send(PayloadType::Output, Bytes::from_static(b"later"), t2)
            .unwrap();
        assert_eq!(decode(&frames(&mut c)[0]).created_date, T0_MS + 600_250);
        // A retransmission resends the stored bytes: the original CreatedDate.
        c.handle_timeout(t2);
        assert_eq!(frames(&mut c), vec![before]);
    }

    #[test]
    fn queued_messages_are_not_resent_while_acks_flow_but_holes_are() {
        let (mut c, mut a, now) = pair();
        for i in 0..4u8 {
            c.send(PayloadType::Output, Bytes::from(vec![i]), now)
                .unwrap();
        }
        let f = frames(&mut c);
        // The peer works through a queue: message 0 is acknowledged late, just before
        // the RTO; 1..3 are still on their way when their timers expire.
        let t = now + Duration::from_millis(199);
        a.handle_frame(f[0].clone(), t).unwrap();
        for ack in frames(&mut a) {
            c.handle_frame(ack, t).unwrap();
        }
        c.handle_timeout(now + Duration::from_millis(200));
        assert!(frames(&mut c).is_empty(), "queued, not lost: no resend");
        assert_eq!(c.stats().deferred_retransmissions, 3);
        // Message 3 arrives, 1 and 2 do not: a hole, resent when their timers expire
        // again. Message 3 is acknowledged, so nothing else goes out.
        let t3 = now + Duration::from_millis(250);
        a.handle_frame(f[3].clone(), t3).unwrap();
        for ack in frames(&mut a) {
            c.handle_frame(ack, t3).unwrap();
        }
        let next = c.poll_timeout().unwrap();
        c.handle_timeout(next);
        assert_eq!(frames(&mut c), vec![f[1].clone(), f[2].clone()]);
        // With no acknowledgement for an RTO, a message is resent (a stall).
        let (mut c, _, now) = pair();
        c.send(PayloadType::Output, Bytes::from_static(b"z"), now)
            .unwrap();
        let sent = frames(&mut c);
        c.handle_timeout(now + Duration::from_millis(200));
        assert_eq!(frames(&mut c), sent);
        assert_eq!(c.stats().deferred_retransmissions, 0);
    }

    #[test]
    fn window_exerts_backpressure_instead_of_evicting() {
        let now = Instant::now();
        let cfg = ChannelConfig {
            max_in_flight_messages: 2,
            ..ChannelConfig::default()
        };
        let mut c = Channel::new(Role::Client, cfg, now, T0_MS);
        let mut a = Channel::new(Role::Agent, ChannelConfig::default(), now, T0_MS);
        c.send(PayloadType::Output, Bytes::from_static(b"a"), now)
            .unwrap();
        c.send(PayloadType::Output, Bytes::from_static(b"b"), now)
            .unwrap();
        assert!(!c.can_send(1));
        assert_eq!(
            c.send(PayloadType::Output, Bytes::from_static(b"c"), now),
            Err(SendError::WindowFull)
        );
        let f = frames(&mut c);
        a.handle_frame(f[0].clone(), now).unwrap();
        c.handle_frame(frames(&mut a).remove(0), now).unwrap();
        assert!(c.can_send(1));
        assert_eq!(
            c.send(PayloadType::Output, Bytes::from_static(b"c"), now),
            Ok(2)
        );
    }

    #[test]
    fn past_window_send_queues_the_goodbye_when_the_window_is_full() {
        let now = Instant::now();
        let cfg = ChannelConfig {
            max_in_flight_messages: 1,
            ..ChannelConfig::default()
        };
        let mut c = Channel::new(Role::Client, cfg, now, T0_MS);
        let mut a = Channel::new(Role::Agent, ChannelConfig::default(), now, T0_MS);
        c.send(PayloadType::Output, Bytes::from_static(b"a"), now)
            .unwrap();
        assert_eq!(
            c.send(PayloadType::Flag, Bytes::from_static(&[0, 0, 0, 2]), now),
            Err(SendError::WindowFull)
        );
        assert_eq!(
            c.send_past_window(PayloadType::Flag, Bytes::from_static(&[0, 0, 0, 2]), now),
            Ok(1)
        );
        let f = frames(&mut c);
        assert_eq!(f.len(), 2, "both messages go out at once");
        for frame in f {
            a.handle_frame(frame, now).unwrap();
        }
        let got: Vec<_> = std::iter::from_fn(|| a.poll_event()).collect();
        assert!(
            got.iter().any(|e| matches!(e, ChannelEvent::Data { payload_type: PayloadType::Flag, payload, .. } if payload[..] == [0, 0, 0, 2])),
            "the agent side receives the flag: {got:?}"
        );
    }

    #[test]
    fn byte_window_admits_one_large_message_when_empty() {
        let now = Instant::now();
        let cfg = ChannelConfig {
            max_in_flight_bytes: 10,
            ..ChannelConfig::default()
        };
        let mut c = Channel::new(Role::Client, cfg, now, T0_MS);
        c.send(PayloadType::Output, Bytes::from(vec![0; 64]), now)
            .unwrap();
        assert_eq!(
            c.send(PayloadType::Output, Bytes::from_static(b"x"), now),
            Err(SendError::WindowFull)
        );
    }

    #[test]
    fn not_ready_receiver_refuses_without_ack() {
        let (mut c, mut a, now) = pair();
        a.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        let f = frames(&mut a).remove(0);
        c.set_receive_ready(false);
        c.handle_frame(f.clone(), now).unwrap();
        assert!(frames(&mut c).is_empty());
        assert!(data(&mut c).is_empty());
        c.set_receive_ready(true);
        c.handle_frame(f, now).unwrap();
        assert_eq!(frames(&mut c).len(), 1);
        assert_eq!(data(&mut c).len(), 1);
    }

    #[test]
    fn full_reorder_buffer_drops_without_ack() {
        let now = Instant::now();
        let cfg = ChannelConfig {
            reorder_capacity: 1,
            ..ChannelConfig::default()
        };
        let mut c = Channel::new(Role::Client, cfg, now, T0_MS);
        let mut a = Channel::new(Role::Agent, ChannelConfig::default(), now, T0_MS);
        for _ in 0..3 {
            a.send(PayloadType::Output, Bytes::from_static(b"x"), now)
                .unwrap();
        }
        let f = frames(&mut a);
        c.handle_frame(f[1].clone(), now).unwrap();
        c.handle_frame(f[2].clone(), now).unwrap();
        assert_eq!(frames(&mut c).len(), 1);
        assert_eq!(c.stats().refused, 1);
    }

    #[test]
    fn pause_is_reported_but_sending_continues_as_in_the_plugin() {
        let (mut c, mut a, now) = pair();
        let pause = ClientMessage {
            message_type: MessageType::PausePublication,
            schema_version: 1,
            created_date: 1,
            sequence_number: 0,
            flags: 0,
            message_id: Uuid::new_v4(),
            payload_type: PayloadType::Undefined,
            payload: Bytes::from_static(b"{}"),
        };
        c.handle_frame(pause.encode().unwrap(), now).unwrap();
        assert!(c.is_paused());
        c.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        let f = frames(&mut c);
        assert_eq!(f.len(), 1, "[P] keeps sending while paused");
        assert!(c.poll_timeout().is_some(), "retransmission keeps running");
        a.handle_frame(f[0].clone(), now).unwrap();
        assert_eq!(data(&mut a).len(), 1);
        let mut start = pause.clone();
        start.message_type = MessageType::StartPublication;
        c.handle_frame(start.encode().unwrap(), now).unwrap();
        assert!(!c.is_paused());
        assert_eq!(
            events(&mut c),
            vec![ChannelEvent::Paused, ChannelEvent::Resumed]
        );
    }

    #[test]
    fn retransmissions_back_off_per_message() {
        let (mut c, _, now) = pair();
        c.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        frames(&mut c);
        let mut fired = Vec::new();
        for _ in 0..6 {
            let t = c.poll_timeout().unwrap();
            c.handle_timeout(t);
            assert_eq!(frames(&mut c).len(), 1);
            fired.push(t.duration_since(now).as_millis());
        }
        // RTO 200 ms, doubling per retransmission, capped at 8 RTO.
        assert_eq!(fired, vec![200, 600, 1400, 3000, 4600, 6200]);
    }

    #[test]
    fn unparseable_channel_closed_still_ends_the_channel() {
        let (mut c, _, now) = pair();
        let msg = ClientMessage {
            message_type: MessageType::ChannelClosed,
            schema_version: 1,
            created_date: 1,
            sequence_number: 0,
            flags: 3,
            message_id: Uuid::new_v4(),
            payload_type: PayloadType::Undefined,
            payload: Bytes::from_static(b"not json"),
        };
        assert!(matches!(
            c.handle_frame(msg.encode().unwrap(), now),
            Err(FrameError::Payload(_))
        ));
        assert!(matches!(
            c.close_reason(),
            Some(CloseReason::ChannelClosed(_))
        ));
    }

    #[test]
    fn reconnect_resends_every_unacked_message_in_order() {
        let (mut c, _, now) = pair();
        for _ in 0..3 {
            c.send(PayloadType::Output, Bytes::from_static(b"x"), now)
                .unwrap();
        }
        let sent = frames(&mut c);
        c.on_disconnect();
        c.send(PayloadType::Output, Bytes::from_static(b"y"), now)
            .unwrap();
        assert!(frames(&mut c).is_empty());
        assert_eq!(c.poll_timeout(), None);
        c.on_reconnect(now + Duration::from_secs(5));
        let re = frames(&mut c);
        assert_eq!(re.len(), 4);
        assert_eq!(&re[..3], &sent[..]);
        assert_eq!(decode(&re[3]).sequence_number, 3);
    }

    #[test]
    fn channel_closed_is_terminal_and_not_acked() {
        let (mut c, _, now) = pair();
        let cc = ChannelClosed {
            session_id: "s-1".into(),
            output: "bye".into(),
            message_type: "channel_closed".into(),
            ..ChannelClosed::default()
        };
        let msg = ClientMessage {
            message_type: MessageType::ChannelClosed,
            schema_version: 1,
            created_date: 1,
            sequence_number: 0,
            flags: 3,
            message_id: Uuid::new_v4(),
            payload_type: PayloadType::Undefined,
            payload: Bytes::from(payload::to_json(&cc)),
        };
        c.handle_frame(msg.encode().unwrap(), now).unwrap();
        assert!(frames(&mut c).is_empty());
        assert_eq!(
            events(&mut c),
            vec![ChannelEvent::Closed(CloseReason::ChannelClosed(cc.clone()))]
        );
        assert_eq!(
            c.send(PayloadType::Output, Bytes::from_static(b"x"), now),
            Err(SendError::Closed)
        );
        assert_eq!(c.close_reason(), Some(&CloseReason::ChannelClosed(cc)));
    }

    #[test]
    fn gives_up_after_the_configured_time() {
        let (mut c, _, now) = pair();
        c.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        let mut t = now;
        while c.close_reason().is_none() {
            t = c.poll_timeout().expect("a timer while unacked");
            c.handle_timeout(t);
            frames(&mut c);
        }
        assert!(t >= now + Duration::from_secs(300));
        assert!(t <= now + Duration::from_secs(302));
        assert_eq!(
            c.close_reason(),
            Some(&CloseReason::ResendTimeout { sequence_number: 0 })
        );
    }

    #[test]
    fn malformed_frames_are_counted_and_not_acked() {
        let (mut c, mut a, now) = pair();
        a.send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        let mut f = frames(&mut a).remove(0).to_vec();
        *f.last_mut().unwrap() ^= 0xff;
        assert!(matches!(
            c.handle_frame(Bytes::from(f), now),
            Err(FrameError::Decode(DecodeError::DigestMismatch))
        ));
        assert!(frames(&mut c).is_empty());
        assert_eq!(c.stats().malformed, 1);
    }

    #[test]
    fn own_direction_and_unknown_types_are_ignored() {
        let (mut c, _, now) = pair();
        let mut other = Channel::new(Role::Client, ChannelConfig::default(), now, T0_MS);
        other
            .send(PayloadType::Output, Bytes::from_static(b"x"), now)
            .unwrap();
        c.handle_frame(frames(&mut other).remove(0), now).unwrap();
        assert!(frames(&mut c).is_empty());
        assert!(events(&mut c).is_empty());
        assert_eq!(c.stats().ignored, 1);
    }
}
