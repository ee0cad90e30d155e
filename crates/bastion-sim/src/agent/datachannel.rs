//! The agent's reliability layer, written from [A] `agent/session/datachannel/datachannel.go`
//! (not from the client's `proto::channel`, so that a bug there cannot be mirrored here).
//!
//! This module holds the state and the send side: sequence numbers, the outgoing buffer
//! and its resend scheduler, the RTT/RTO estimator, acknowledgements, and the incoming
//! reorder buffer. The receive-side control flow (`handleStreamDataMessage`) lives in
//! `core.rs`, because it calls into the handshake and the plugin.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::time::Instant;
use uuid::Uuid;

use crate::report::SessionReport;
use bastion_proto::kind::{MessageType, PayloadType, header_flags};
use bastion_proto::message::ClientMessage;
use bastion_proto::payload::{AcknowledgeContent, to_json};

/// [A] `agent/session/config/config.go` const `OutgoingMessageBufferCapacity`.
pub(super) const OUTGOING_CAPACITY: usize = 100_000;
/// [A] `config.go` const `IncomingMessageBufferCapacity`.
pub(super) const INCOMING_CAPACITY: usize = 100_000;
/// [A] `config.go` const `ResendSleepInterval`.
pub(super) const RESEND_INTERVAL: Duration = Duration::from_millis(100);
/// [A] `config.go` const `StreamDataPayloadSize`: the port and shell pumps read at most this.
pub(super) const STREAM_DATA_PAYLOAD_SIZE: usize = 1024;
/// [A] `config.go` const `DefaultTransmissionTimeout`.
const DEFAULT_TRANSMISSION_TIMEOUT: Duration = Duration::from_millis(200);
/// [A] `config.go` const `DefaultRoundTripTime`.
const DEFAULT_ROUND_TRIP_TIME: Duration = Duration::from_millis(100);
/// [A] `config.go` const `ClockGranularity`.
const CLOCK_GRANULARITY: Duration = Duration::from_millis(10);
/// [A] `config.go` const `MaxTransmissionTimeout`.
const MAX_TRANSMISSION_TIMEOUT: Duration = Duration::from_secs(1);
/// [A] `config.go` const `RTTConstant`.
const RTT_CONSTANT: f64 = 1.0 / 8.0;
/// [A] `config.go` const `RTTVConstant`.
const RTTV_CONSTANT: f64 = 1.0 / 4.0;
/// How many sent MessageIds we remember to check the MessageId of acks (not an agent
/// rule: the agent never checks it; this bounds our memory on long sessions).
const SENT_ID_MEMORY: usize = 1 << 20;

/// Milliseconds since the Unix epoch, as [A] fn `SendStreamDataMessage` stamps
/// CreatedDate (`time.Now().UnixNano() / 1000000`). Never 0.
pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1)
}

/// One unacknowledged message ([A] `StreamingMessage`).
#[derive(Debug)]
pub(super) struct Outgoing {
    pub seq: i64,
    pub content: Bytes,
    pub last_sent: Instant,
}

/// What the agent's input handler answered for one message ([A] fn
/// `processStreamDataMessage` and the plugins' `InputStreamMessageHandler`).
#[derive(Debug)]
pub(super) enum HandlerResult {
    /// Processed: ack it, advance the expected sequence number.
    Ok,
    /// `mgsContracts.ErrHandlerNotReady`: no ack, no increment; the client retransmits.
    NotReady,
    /// Any other handler error: logged, no ack, no increment ([A] fn
    /// `handleStreamDataMessage` returns the error before `SendAcknowledgeMessage`).
    Failed(String),
    /// The handler would block (e.g. the basic port plugin redials inside the handler):
    /// the agent's websocket reader stops until it can finish; the message is processed
    /// again from scratch once the plugin is ready.
    Stall,
}

/// The sequence and buffer state of one data channel ([A] `DataChannel`).
pub(super) struct DataChannel {
    report: Arc<SessionReport>,
    /// Frames to hand to the service, in order.
    pub out: Vec<Bytes>,
    /// [A] `StreamDataSequenceNumber`: the next outgoing sequence number.
    pub next_seq: i64,
    /// [A] `OutgoingMessageBuffer`, oldest first.
    pub outgoing: VecDeque<Outgoing>,
    /// MessageIds of the messages sent, for `sent_ids_base..next_seq`.
    sent_ids: VecDeque<Uuid>,
    sent_ids_base: i64,
    /// [A] `ExpectedSequenceNumber`.
    pub expected_seq: i64,
    /// [A] `IncomingMessageBuffer`.
    pub incoming: HashMap<i64, ClientMessage>,
    /// [A] `RoundTripTime`, float64 nanoseconds as in Go.
    srtt_ns: f64,
    /// [A] `RoundTripTimeVariation`, float64 nanoseconds.
    rttvar_ns: f64,
    /// [A] `RetransmissionTimeout`.
    pub rto: Duration,
    /// [A] `Pause`.
    pub paused: bool,
    /// Acknowledgements held back by the ack-delay knob, with the time each is due, in
    /// the order they were made (due times never decrease).
    delayed_acks: VecDeque<(Instant, Bytes)>,
}

impl DataChannel {
    /// [A] fn `Initialize`: sequence numbers from 0, RTT 100 ms, RTTVAR 0, RTO 200 ms.
    pub fn new(report: Arc<SessionReport>) -> DataChannel {
        DataChannel {
            report,
            out: Vec::new(),
            next_seq: 0,
            outgoing: VecDeque::new(),
            sent_ids: VecDeque::new(),
            sent_ids_base: 0,
            expected_seq: 0,
            incoming: HashMap::new(),
            srtt_ns: DEFAULT_ROUND_TRIP_TIME.as_nanos() as f64,
            rttvar_ns: 0.0,
            rto: DEFAULT_TRANSMISSION_TIMEOUT,
            paused: false,
            delayed_acks: VecDeque::new(),
        }
    }

    /// [A] fn `SendStreamDataMessage`:
    /// * an empty payload is ignored ("Ignoring empty stream data payload");
    /// * Flags 1 on sequence number 0, else 0;
    /// * while paused the message is not sent, but it is still buffered and numbered;
    /// * it is buffered with `LastSentTime = now` unless the buffer holds
    ///   `OutgoingMessageBufferCapacity` messages ([A] fn `AddDataToOutgoingMessageBuffer`
    ///   returns silently: such a message can never be retransmitted);
    /// * the sequence number always advances.
    pub fn send_stream_data(&mut self, payload_type: PayloadType, payload: Bytes, now: Instant) {
        if payload.is_empty() {
            tracing::debug!(?payload_type, "agent: ignoring empty stream data payload");
            return;
        }
        let seq = self.next_seq;
        let message_id = Uuid::new_v4();
        let msg = ClientMessage {
            message_type: MessageType::OutputStreamData,
            schema_version: 1,
            created_date: unix_ms(),
            sequence_number: seq,
            flags: if seq == 0 {
                header_flags::SYN
            } else {
                header_flags::DATA
            },
            message_id,
            payload_type,
            payload,
        };
        let n = msg.payload.len() as u64;
        let Ok(content) = msg.encode() else {
            return; // unreachable: the payload is not empty and the type fits
        };
        if !self.paused {
            self.out.push(content.clone());
        }
        self.report.count(|c| {
            c.data_messages_to_client += 1;
            c.data_bytes_to_client += n;
        });
        if self.outgoing.len() < OUTGOING_CAPACITY {
            self.outgoing.push_back(Outgoing {
                seq,
                content,
                last_sent: now,
            });
        }
        self.sent_ids.push_back(message_id);
        if self.sent_ids.len() > SENT_ID_MEMORY {
            self.sent_ids.pop_front();
            self.sent_ids_base += 1;
        }
        self.next_seq += 1;
    }

    /// The MessageId we sent with sequence number `seq`, if still remembered.
    pub fn sent_id(&self, seq: i64) -> Option<Uuid> {
        let i = usize::try_from(seq.checked_sub(self.sent_ids_base)?).ok()?;
        self.sent_ids.get(i).copied()
    }

    /// [A] fn `SendAcknowledgeMessage` → `sendAgentMessage`: MessageType `acknowledge`,
    /// SchemaVersion 1, SequenceNumber 0, Flags 3, PayloadType unset (0), payload
    /// `AcknowledgeContent` of the acknowledged message with `IsSequentialMessage: true`.
    /// Acks are sent even while paused (`sendAgentMessage` does not look at `Pause`).
    ///
    /// The agent writes an ack straight to its websocket, on the reader goroutine,
    /// before it reads the next message; not through the plugin pumps, so the pumps'
    /// 1 ms pacing never applies to acks. With `delay` (the ack-delay knob, an agent
    /// emulator that acks late) the ack is held until `now + delay` instead, while
    /// everything else goes on at once. Acks keep their order: one made after a longer
    /// delay was set waits for the ones before it.
    pub fn send_ack(&mut self, acked: &ClientMessage, now: Instant, delay: Duration) {
        let content = AcknowledgeContent {
            message_type: acked.message_type.as_str().to_owned(),
            message_id: acked.message_id.to_string(),
            sequence_number: acked.sequence_number,
            is_sequential_message: true,
        };
        let msg = ClientMessage {
            message_type: MessageType::Acknowledge,
            schema_version: 1,
            created_date: unix_ms(),
            sequence_number: 0,
            flags: header_flags::ACK,
            message_id: Uuid::new_v4(),
            payload_type: PayloadType::Undefined,
            payload: Bytes::from(to_json(&content)),
        };
        let Ok(b) = msg.encode() else {
            return;
        };
        if delay.is_zero() && self.delayed_acks.is_empty() {
            self.out.push(b);
            self.report.count(|c| c.acks_to_client += 1);
            return;
        }
        let due = self
            .delayed_acks
            .back()
            .map_or(now + delay, |(last, _)| (*last).max(now + delay));
        self.delayed_acks.push_back((due, b));
    }

    /// Sends the delayed acks due at `now`.
    pub fn release_acks(&mut self, now: Instant) {
        while let Some((due, _)) = self.delayed_acks.front()
            && *due <= now
        {
            if let Some((_, b)) = self.delayed_acks.pop_front() {
                self.out.push(b);
                self.report.count(|c| c.acks_to_client += 1);
            }
        }
    }

    /// When the next delayed ack is due.
    pub fn next_ack_due(&self) -> Option<Instant> {
        self.delayed_acks.front().map(|(due, _)| *due)
    }

    /// True while delayed acks wait.
    pub fn acks_delayed(&self) -> bool {
        !self.delayed_acks.is_empty()
    }

    /// [A] fn `ProcessAcknowledgedMessage`: a linear scan for the acknowledged sequence
    /// number; if found, update the RTO from that message's `LastSentTime` and remove
    /// it. Nothing else is checked, and an unknown number is a no-op. Returns whether a
    /// message was removed.
    pub fn process_ack(&mut self, seq: i64, now: Instant) -> bool {
        let Some(pos) = self.outgoing.iter().position(|m| m.seq == seq) else {
            return false;
        };
        let sample = now.saturating_duration_since(self.outgoing[pos].last_sent);
        self.update_rto(sample);
        self.outgoing.remove(pos);
        true
    }

    /// [A] fn `calculateRetransmissionTimeout` (float64 nanoseconds, the old RTT in the
    /// variation term, `time.Duration(float)` truncation, capped at 1 s).
    fn update_rto(&mut self, sample: Duration) {
        let r = sample.as_nanos() as f64;
        self.rttvar_ns =
            (1.0 - RTTV_CONSTANT) * self.rttvar_ns + RTTV_CONSTANT * (self.srtt_ns - r).abs();
        self.srtt_ns = (1.0 - RTT_CONSTANT) * self.srtt_ns + RTT_CONSTANT * r;
        let rto_ns = self.srtt_ns + (CLOCK_GRANULARITY.as_nanos() as f64).max(4.0 * self.rttvar_ns);
        let rto = Duration::from_nanos(rto_ns as u64);
        self.rto = rto.min(MAX_TRANSMISSION_TIMEOUT);
    }

    /// One tick of [A] fn `ResendStreamDataMessageScheduler`: idle while paused; else look
    /// only at the oldest buffered message and resend its stored bytes unchanged if
    /// `time.Since(LastSentTime) > RetransmissionTimeout`, writing the new `LastSentTime`
    /// back. There is no give-up.
    pub fn resend_tick(&mut self, now: Instant) {
        if self.paused {
            return;
        }
        let rto = self.rto;
        let Some(front) = self.outgoing.front_mut() else {
            return;
        };
        if now.saturating_duration_since(front.last_sent) > rto {
            tracing::trace!(seq = front.seq, "agent: resend stream data message");
            self.out.push(front.content.clone());
            front.last_sent = now;
            self.report.count(|c| c.retransmissions += 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dc() -> DataChannel {
        DataChannel::new(Arc::new(SessionReport::default()))
    }

    #[test]
    fn rto_follows_the_agent_formula() {
        let mut d = dc();
        assert_eq!(d.rto, Duration::from_millis(200));
        // R = 100 ms: RTTVAR = 0, SRTT = 100 ms, RTO = 100 + max(10, 0) = 110 ms.
        d.update_rto(Duration::from_millis(100));
        assert_eq!(d.rto, Duration::from_millis(110));
        // R = 20 ms: RTTVAR = 0.25*80 = 20 ms, SRTT = 87.5+2.5 = 90 ms, RTO = 90+80 = 170.
        d.update_rto(Duration::from_millis(20));
        assert_eq!(d.rto, Duration::from_millis(170));
        for _ in 0..10 {
            d.update_rto(Duration::from_secs(5));
        }
        assert_eq!(d.rto, Duration::from_secs(1));
    }

    #[test]
    fn seq_zero_has_flags_one_and_empty_payloads_are_ignored() {
        let mut d = dc();
        let now = Instant::now();
        d.send_stream_data(PayloadType::Output, Bytes::new(), now);
        assert!(d.out.is_empty());
        d.send_stream_data(PayloadType::Output, Bytes::from_static(b"a"), now);
        d.send_stream_data(PayloadType::Output, Bytes::from_static(b"b"), now);
        let m0 = ClientMessage::decode(d.out[0].clone()).unwrap();
        let m1 = ClientMessage::decode(d.out[1].clone()).unwrap();
        assert_eq!((m0.sequence_number, m0.flags), (0, 1));
        assert_eq!((m1.sequence_number, m1.flags), (1, 0));
        assert_eq!(m0.message_type, MessageType::OutputStreamData);
        assert_eq!(d.sent_id(1), Some(m1.message_id));
        assert_eq!(d.sent_id(2), None);
    }

    #[test]
    fn paused_messages_are_numbered_and_buffered_but_not_sent() {
        let mut d = dc();
        d.paused = true;
        d.send_stream_data(
            PayloadType::Output,
            Bytes::from_static(b"a"),
            Instant::now(),
        );
        assert!(d.out.is_empty());
        assert_eq!(d.outgoing.len(), 1);
        assert_eq!(d.next_seq, 1);
    }

    #[test]
    fn full_outgoing_buffer_sends_without_buffering() {
        let mut d = dc();
        let now = Instant::now();
        for i in 0..OUTGOING_CAPACITY as i64 {
            d.outgoing.push_back(Outgoing {
                seq: -1 - i,
                content: Bytes::new(),
                last_sent: now,
            });
        }
        d.send_stream_data(PayloadType::Output, Bytes::from_static(b"x"), now);
        assert_eq!(d.out.len(), 1);
        assert_eq!(d.outgoing.len(), OUTGOING_CAPACITY);
        assert_eq!(d.next_seq, 1);
    }

    #[test]
    fn delayed_acks_wait_their_delay_and_keep_their_order() {
        let mut d = dc();
        let t0 = Instant::now();
        let m = |seq| ClientMessage {
            message_type: MessageType::InputStreamData,
            schema_version: 1,
            created_date: 1,
            sequence_number: seq,
            flags: 0,
            message_id: Uuid::new_v4(),
            payload_type: PayloadType::Output,
            payload: Bytes::from_static(b"x"),
        };
        let ms = Duration::from_millis;
        d.send_ack(&m(0), t0, ms(10));
        // The delay shrinks: the next ack still waits for the one before it.
        d.send_ack(&m(1), t0 + ms(1), ms(2));
        d.send_ack(&m(2), t0 + ms(20), Duration::ZERO);
        assert!(d.out.is_empty());
        assert_eq!(d.next_ack_due(), Some(t0 + ms(10)));
        d.release_acks(t0 + ms(9));
        assert!(d.out.is_empty());
        d.release_acks(t0 + ms(10));
        assert_eq!(d.out.len(), 2);
        assert_eq!(d.next_ack_due(), Some(t0 + ms(20)));
        d.release_acks(t0 + ms(20));
        let seqs: Vec<i64> = d
            .out
            .drain(..)
            .map(|b| {
                let a: AcknowledgeContent = bastion_proto::payload::from_json(
                    "ack",
                    &ClientMessage::decode(b).unwrap().payload,
                )
                .unwrap();
                a.sequence_number
            })
            .collect();
        assert_eq!(seqs, vec![0, 1, 2]);
        assert!(!d.acks_delayed());
        // Nothing held: an ack without delay goes out at once.
        d.send_ack(&m(3), t0 + ms(30), Duration::ZERO);
        assert_eq!(d.out.len(), 1);
    }

    #[test]
    fn ack_removes_only_the_matching_sequence_number() {
        let mut d = dc();
        let now = Instant::now();
        for b in [b"a", b"b", b"c"] {
            d.send_stream_data(PayloadType::Output, Bytes::from_static(b), now);
        }
        assert!(d.process_ack(1, now + Duration::from_millis(50)));
        assert!(!d.process_ack(1, now));
        assert!(!d.process_ack(7, now));
        let left: Vec<i64> = d.outgoing.iter().map(|m| m.seq).collect();
        assert_eq!(left, vec![0, 2]);
        // RTT sample 50 ms: RTTVAR = 12.5 ms, SRTT = 93.75 ms, RTO = 93.75 + 50 = 143.75.
        assert_eq!(d.rto, Duration::from_micros(143_750));
    }
}
