//! `ClientMessage::decode` on arbitrary bytes must never panic, and every message it
//! accepts must survive `encode` → `decode` unchanged (when it is encodable at all:
//! non-empty payload, MessageType of at most 32 bytes).
//!
//! A random frame almost never carries the SHA-256 of its payload, so the fuzzer could
//! not get past the digest check on its own. Each input is therefore decoded twice:
//! as is, and with PayloadLength and PayloadDigest patched to match the payload found
//! at `HeaderLength + 4` (when HeaderLength is in range). The second pass explores
//! everything after the digest check.
#![no_main]

use bastion::proto::message::{
    ClientMessage, MESSAGE_TYPE_LEN, PAYLOAD_DIGEST_OFFSET, PAYLOAD_LENGTH_OFFSET, PAYLOAD_OFFSET,
    sha256,
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn check(frame: &[u8]) {
    let Ok(msg) = ClientMessage::decode(Bytes::copy_from_slice(frame)) else {
        return;
    };
    if msg.payload.is_empty() || msg.message_type.as_str().len() > MESSAGE_TYPE_LEN {
        return;
    }
    let encoded = msg
        .encode()
        .unwrap_or_else(|e| panic!("decoded message does not encode: {e}: {msg:?}"));
    assert_eq!(encoded.len(), msg.encoded_len());
    let again = ClientMessage::decode(encoded.clone())
        .unwrap_or_else(|e| panic!("re-encoded message does not decode: {e}: {msg:?}"));
    assert_eq!(again, msg, "decode(encode(m)) != m");
    // Our own encoding is canonical: a second round trip is byte-identical.
    assert_eq!(again.encode().expect("encodes"), encoded);
}

/// Makes PayloadLength and PayloadDigest agree with the payload, if HeaderLength lets
/// the payload start after the fixed header fields.
fn fix_up(frame: &mut [u8]) -> bool {
    if frame.len() < PAYLOAD_OFFSET {
        return false;
    }
    let hl = u32::from_be_bytes(frame[0..4].try_into().unwrap()) as usize;
    let start = hl.saturating_add(4);
    if hl < PAYLOAD_LENGTH_OFFSET || start > frame.len() {
        return false;
    }
    let n = (frame.len() - start) as u32;
    frame[PAYLOAD_LENGTH_OFFSET..PAYLOAD_LENGTH_OFFSET + 4].copy_from_slice(&n.to_be_bytes());
    let digest = sha256(&frame[start..]);
    frame[PAYLOAD_DIGEST_OFFSET..PAYLOAD_DIGEST_OFFSET + 32].copy_from_slice(&digest);
    true
}

fuzz_target!(|data: &[u8]| {
    check(data);
    let mut fixed = data.to_vec();
    if fix_up(&mut fixed) {
        check(&fixed);
    }
});
