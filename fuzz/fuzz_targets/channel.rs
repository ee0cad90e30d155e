//! A client `Channel` driven by a sequence of operations derived from the input:
//! frames (raw garbage, valid ClientMessages of any type built from fuzzed fields and
//! encoded with our encoder, optionally with one byte corrupted, acknowledgements of
//! what we sent), sends, timeouts at increasing simulated times with wall-clock jumps
//! (`set_wall_clock`), disconnect/reconnect and receive backpressure. After every step `poll_transmit` and `poll_event` are
//! drained and the invariants checked:
//!
//! * delivered sequence numbers are strictly consecutive from 0 (so each is delivered
//!   exactly once), and each delivered payload is one the peer sent with that number;
//! * nothing is delivered or reported after `Closed`;
//! * every transmitted frame decodes; acks only name output_stream_data sequence
//!   numbers the peer actually sent; data frames carry what we sent under their number;
//! * the in-flight window and reorder buffer stay within their limits.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bastion_proto::channel::{Channel, ChannelConfig, ChannelEvent, Role, SendError};
use bastion_proto::kind::{MessageType, PayloadType};
use bastion_proto::message::ClientMessage;
use bastion_proto::payload::{AcknowledgeContent, ChannelClosed, from_json, to_json};
use bytes::Bytes;
use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use uuid::Uuid;

const T0_MS: u64 = 1_700_000_000_000;

struct Harness {
    ch: Channel,
    config: ChannelConfig,
    now: Instant,
    /// Stream data the peer sent (validly encoded), by sequence number.
    peer_sent: HashMap<i64, Vec<(PayloadType, Bytes)>>,
    /// What we sent, by sequence number.
    we_sent: HashMap<i64, (PayloadType, Bytes)>,
    next_delivered: i64,
    closed: bool,
}

fn payload(u: &mut Unstructured<'_>, max: usize) -> Result<Bytes> {
    let n = u.int_in_range(0..=max)?;
    Ok(Bytes::copy_from_slice(u.bytes(n.min(u.len()))?))
}

fn payload_type(u: &mut Unstructured<'_>) -> Result<PayloadType> {
    Ok(PayloadType::from_u32(if u.ratio(7, 8)? {
        u.int_in_range(0..=13)?
    } else {
        u.arbitrary()?
    }))
}

impl Harness {
    fn seq(&self, u: &mut Unstructured<'_>) -> Result<i64> {
        Ok(match u.int_in_range(0..=7)? {
            0 => u.arbitrary()?,
            1 => self.next_delivered + i64::from(u.int_in_range(-8i8..=-1)?),
            _ => self.next_delivered + i64::from(u.int_in_range(0u8..=12)?),
        })
    }

    fn message(&self, u: &mut Unstructured<'_>) -> Result<ClientMessage> {
        let message_type = match u.int_in_range(0..=9)? {
            0..=3 => MessageType::OutputStreamData,
            4 => MessageType::Acknowledge,
            5 => MessageType::InputStreamData,
            6 => MessageType::PausePublication,
            7 => MessageType::StartPublication,
            8 => MessageType::ChannelClosed,
            _ => {
                let n = u.int_in_range(0..=32)?;
                let s: String = String::from_utf8_lossy(u.bytes(n.min(u.len()))?).into();
                MessageType::Other(s)
            }
        };
        let mut payload_bytes = payload(u, 48)?;
        match message_type {
            MessageType::Acknowledge if u.ratio(7, 8)? => {
                let seq = if u.ratio(3, 4)? && self.ch.next_sequence_number() > 0 {
                    u.int_in_range(0..=self.ch.next_sequence_number() - 1)?
                } else {
                    u.arbitrary()?
                };
                payload_bytes = Bytes::from(to_json(&AcknowledgeContent {
                    message_type: "input_stream_data".into(),
                    message_id: Uuid::nil().hyphenated().to_string(),
                    sequence_number: seq,
                    is_sequential_message: u.arbitrary()?,
                }));
            }
            MessageType::ChannelClosed if u.ratio(3, 4)? => {
                payload_bytes = Bytes::from(to_json(&ChannelClosed {
                    output: String::from_utf8_lossy(&payload_bytes).into(),
                    message_type: "channel_closed".into(),
                    ..ChannelClosed::default()
                }));
            }
            _ => {}
        }
        Ok(ClientMessage {
            message_type,
            schema_version: 1,
            created_date: u.int_in_range(1..=u64::MAX)?,
            sequence_number: self.seq(u)?,
            flags: u.int_in_range(0..=3)?,
            message_id: Uuid::from_bytes(u.arbitrary()?),
            payload_type: payload_type(u)?,
            payload: payload_bytes,
        })
    }

    fn frame(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let frame = match u.int_in_range(0..=9)? {
            // Raw garbage.
            0 => payload(u, 200)?,
            _ => {
                let Ok(enc) = self.message(u)?.encode() else {
                    return Ok(());
                };
                if u.ratio(1, 8)? {
                    // One corrupted byte.
                    let mut v = enc.to_vec();
                    let i = u.choose_index(v.len())?;
                    v[i] ^= u.int_in_range(1..=255)?;
                    Bytes::from(v)
                } else {
                    enc
                }
            }
        };
        // What the channel will see (an `Other` type may decode as a known one, or
        // not at all, since decoding trims it).
        let msg = ClientMessage::decode(frame.clone()).ok();
        if let Some(m) = &msg
            && m.message_type == MessageType::OutputStreamData
        {
            let e = self.peer_sent.entry(m.sequence_number).or_default();
            if !e.contains(&(m.payload_type, m.payload.clone())) {
                e.push((m.payload_type, m.payload.clone()));
            }
        }
        let res = self.ch.handle_frame(frame.clone(), self.now);
        if res.is_err() {
            // Only a frame that does not decode, or an ack/channel_closed with a bad
            // payload, is refused.
            if let Some(m) = &msg {
                assert!(
                    matches!(
                        m.message_type,
                        MessageType::Acknowledge | MessageType::ChannelClosed
                    ),
                    "valid {:?} refused: {res:?}",
                    m.message_type
                );
            }
        }
        Ok(())
    }

    fn send(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let pt = payload_type(u)?;
        let data = payload(u, 64)?;
        let expected = self.ch.next_sequence_number();
        let could = self.ch.can_send(data.len());
        match self.ch.send(pt, data.clone(), self.now) {
            Ok(seq) => {
                assert!(could && !self.closed);
                assert_eq!(seq, expected);
                assert!(!data.is_empty());
                self.we_sent.insert(seq, (pt, data));
            }
            Err(SendError::Closed) => assert!(self.closed),
            Err(SendError::WindowFull) => assert!(!could && !self.closed),
            Err(SendError::Encode(_)) => assert!(data.is_empty()),
        }
        assert_eq!(
            self.ch.next_sequence_number(),
            expected + i64::from(self.we_sent.contains_key(&expected))
        );
        Ok(())
    }

    fn advance(&mut self, u: &mut Unstructured<'_>) -> Result<()> {
        let d = match u.int_in_range(0..=3)? {
            0 => Duration::from_millis(u.int_in_range(0..=50)?),
            1 => Duration::from_millis(u.int_in_range(0..=2_000)?),
            2 => Duration::from_secs(u.int_in_range(0..=400)?),
            _ => match self.ch.poll_timeout() {
                Some(t) => t.saturating_duration_since(self.now),
                None => Duration::ZERO,
            },
        };
        self.now += d;
        if u.ratio(1, 4)? {
            // Any wall clock (a suspend, an NTP step, even 0): frames still decode.
            self.ch.set_wall_clock(self.now, u.arbitrary()?);
        }
        if let Some(t) = self.ch.poll_timeout() {
            assert!(!self.closed);
            let _ = t;
        }
        self.ch.handle_timeout(self.now);
        Ok(())
    }

    fn drain(&mut self) {
        if self.closed {
            // Closed in an earlier step: nothing more goes out.
            assert!(self.ch.poll_transmit().is_none(), "transmit after Closed");
        }
        while let Some(frame) = self.ch.poll_transmit() {
            let m = ClientMessage::decode(frame).expect("channel transmitted a bad frame");
            match m.message_type {
                MessageType::Acknowledge => {
                    let ack: AcknowledgeContent =
                        from_json("acknowledge", &m.payload).expect("our ack parses");
                    assert_eq!(ack.message_type, "output_stream_data");
                    assert!(ack.is_sequential_message);
                    assert!(
                        self.peer_sent.contains_key(&ack.sequence_number),
                        "ack for seq {} the peer never sent",
                        ack.sequence_number
                    );
                }
                MessageType::InputStreamData => {
                    let (pt, data) = self
                        .we_sent
                        .get(&m.sequence_number)
                        .expect("transmitted a seq we never sent");
                    assert_eq!((m.payload_type, &m.payload), (*pt, data));
                }
                other => panic!("client transmitted {other:?}"),
            }
        }
        while let Some(ev) = self.ch.poll_event() {
            assert!(!self.closed, "event {ev:?} after Closed");
            match ev {
                ChannelEvent::Data {
                    sequence_number,
                    payload_type,
                    payload,
                } => {
                    assert_eq!(
                        sequence_number, self.next_delivered,
                        "delivery out of sequence"
                    );
                    self.next_delivered += 1;
                    let sent = self
                        .peer_sent
                        .get(&sequence_number)
                        .expect("delivered a seq the peer never sent");
                    assert!(
                        sent.iter()
                            .any(|(t, p)| *t == payload_type && *p == payload),
                        "delivered payload differs from every copy sent"
                    );
                }
                ChannelEvent::Closed(_) => {
                    assert!(self.ch.close_reason().is_some());
                    self.closed = true;
                }
                ChannelEvent::Paused | ChannelEvent::Resumed => {}
            }
        }
        assert_eq!(self.ch.expected_sequence_number(), self.next_delivered);
        assert_eq!(
            self.ch.stats().messages_delivered,
            self.next_delivered as u64
        );
        assert!(self.ch.in_flight_messages() <= self.config.max_in_flight_messages.max(1));
        assert!(self.ch.reorder_buffered() <= self.config.reorder_capacity);
        assert_eq!(self.closed, self.ch.close_reason().is_some());
    }
}

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    let config = ChannelConfig {
        max_in_flight_messages: u.int_in_range(1..=16)?,
        max_in_flight_bytes: u.int_in_range(1..=1024)?,
        reorder_capacity: u.int_in_range(0..=16)?,
        give_up_after: if u.arbitrary()? {
            Some(Duration::from_secs(u.int_in_range(1..=600)?))
        } else {
            None
        },
    };
    let now = Instant::now();
    let mut h = Harness {
        ch: Channel::new(Role::Client, config.clone(), now, T0_MS),
        config,
        now,
        peer_sent: HashMap::new(),
        we_sent: HashMap::new(),
        next_delivered: 0,
        closed: false,
    };
    let mut connected = true;
    while !u.is_empty() {
        match u.int_in_range(0..=15)? {
            0..=7 => h.frame(u)?,
            8..=10 => h.send(u)?,
            11 | 12 => h.advance(u)?,
            13 => {
                if connected {
                    h.ch.on_disconnect();
                } else {
                    h.ch.on_reconnect(h.now);
                }
                connected = !connected;
            }
            14 => h.ch.set_receive_ready(u.arbitrary()?),
            _ => {
                // Nothing comes out while disconnected.
                if !connected {
                    assert!(h.ch.poll_transmit().is_none());
                    assert!(h.ch.poll_timeout().is_none());
                }
            }
        }
        h.drain();
    }
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let _ = run(&mut u);
});
