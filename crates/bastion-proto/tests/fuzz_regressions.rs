//! Reproductions of findings of the cargo-fuzz targets in `fuzz/` (see
//! `fuzz/seed-corpus.sh` and the targets' docs for how to run them).
//!
//! Each test reproduces a finding, fixed since, so that it cannot come back.

use std::time::Instant;

use bastion_proto::channel::{Channel, ChannelConfig, ChannelEvent, Role};
use bastion_proto::kind::{MessageType, PayloadType, header_flags};
use bastion_proto::message::{
    ClientMessage, DecodeError, MESSAGE_TYPE_LEN, MESSAGE_TYPE_OFFSET, SCHEMA_VERSION,
};
use bastion_proto::payload::{ChannelClosed, to_json};
use bytes::Bytes;
use uuid::Uuid;

const T0_MS: u64 = 1_700_000_000_000;

fn message(message_type: MessageType, seq: i64, payload: &[u8]) -> ClientMessage {
    ClientMessage {
        message_type,
        schema_version: SCHEMA_VERSION,
        created_date: T0_MS,
        sequence_number: seq,
        flags: header_flags::DATA,
        message_id: Uuid::from_u128(0xdd01e56b_ff48_483e_a508_b5f073f31b16),
        payload_type: PayloadType::Output,
        payload: Bytes::copy_from_slice(payload),
    }
}

/// A frame whose 32-byte MessageType field is `field` (NUL padded).
fn frame_with_type_field(field: &[u8]) -> Bytes {
    let mut frame = message(MessageType::InputStreamData, 0, b"x")
        .encode()
        .unwrap()
        .to_vec();
    let t = &mut frame[MESSAGE_TYPE_OFFSET..MESSAGE_TYPE_OFFSET + MESSAGE_TYPE_LEN];
    t.fill(0);
    t[..field.len()].copy_from_slice(field);
    Bytes::from(frame)
}

/// Every frame that decodes must come back unchanged from `decode(encode(m))`.
fn assert_round_trips_or_is_refused(frame: Bytes) {
    match ClientMessage::decode(frame) {
        Err(e) => assert_eq!(e, DecodeError::MessageTypeControlChars),
        Ok(m) => {
            let again = ClientMessage::decode(m.encode().expect("encodes")).expect("re-decodes");
            assert_eq!(again, m, "decode(encode(m)) != m");
        }
    }
}

/// Finding (target `client_message_decode`): decode strips NULs from both ends of the
/// MessageType field and *then* trims whitespace (as [P] `getString` does), so a field
/// " \0acknowledge" decoded as `Other("\0acknowledge")`, which re-encoded and decoded
/// as `acknowledge`. Fixed: a MessageType with control characters left after trimming
/// is refused (`DecodeError::MessageTypeControlChars`).
#[test]
fn message_type_with_leading_nul_is_refused() {
    let frame = frame_with_type_field(b" \0acknowledge");
    assert_eq!(
        ClientMessage::decode(frame.clone()),
        Err(DecodeError::MessageTypeControlChars)
    );
    assert_round_trips_or_is_refused(frame);
}

/// The input libFuzzer minimized for the finding above (PayloadDigest valid).
#[test]
fn message_type_with_leading_nul_fuzzer_input() {
    let frame = hex::decode(
        "000000742020202000006368616e6e656c5f636c6f736564000100007365640001000000a508b5f0\
         73f31b16dd01e5eaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaea\
         5bc03dffdb1230000074eaea3000eaeaeaeaeaeaeaeaeaeaeaeaeaeaeaeaea5bc03dffdb12300000\
         74",
    )
    .unwrap();
    // The fuzz target patched PayloadLength and PayloadDigest to match the payload
    // before decoding; do the same.
    let mut frame = frame;
    let n = (frame.len() - 120) as u32;
    frame[116..120].copy_from_slice(&n.to_be_bytes());
    let digest = bastion_proto::message::sha256(&frame[120..]);
    frame[80..112].copy_from_slice(&digest);
    assert_round_trips_or_is_refused(Bytes::from(frame));
}

/// Finding (target `channel`): `Channel::on_reconnect` does not check whether the
/// channel has closed. After `Closed` it still reports `Resumed` (when it had been
/// paused) and queues every unacknowledged message for retransmission
/// (src/proto/channel.rs, `on_reconnect` → `set_paused(false)`, `flush_unacked`),
/// against the `ChannelEvent::Closed` contract "no further events follow".
#[test]
fn reconnect_after_close_emits_nothing() {
    let now = Instant::now();
    let mut c = Channel::new(Role::Client, ChannelConfig::default(), now, T0_MS);
    c.send(PayloadType::Output, Bytes::from_static(b"unacked"), now)
        .unwrap();
    let pause = message(MessageType::PausePublication, 0, b"{}");
    c.handle_frame(pause.encode().unwrap(), now).unwrap();
    let closed = ClientMessage {
        payload: Bytes::from(to_json(&ChannelClosed::default())),
        ..message(MessageType::ChannelClosed, 0, b"")
    };
    c.handle_frame(closed.encode().unwrap(), now).unwrap();
    while c.poll_transmit().is_some() {}
    let events: Vec<_> = std::iter::from_fn(|| c.poll_event()).collect();
    assert!(
        matches!(events.last(), Some(ChannelEvent::Closed(_))),
        "{events:?}"
    );

    c.on_disconnect();
    c.on_reconnect(now);
    assert_eq!(c.poll_event(), None, "event after Closed");
    assert_eq!(c.poll_transmit(), None, "transmit after Closed");
}
