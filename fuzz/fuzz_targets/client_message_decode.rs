//! `ClientMessage::decode` on arbitrary bytes must never panic, and every message it
//! accepts must survive `encode` → `decode` unchanged (when it is encodable at all:
//! non-empty payload, MessageType of at most 32 bytes).
//!
//! `decode_strict` must never panic either, and accept only what `decode` accepts, with
//! the same result.
//!
//! A random frame almost never carries the SHA-256 of its payload, so the fuzzer could
//! not get past the digest check on its own. Each input is therefore decoded twice:
//! as is, and with PayloadLength and PayloadDigest patched to match the payload found
//! at `HeaderLength + 4` (in Go's wrapping u32 arithmetic, when in range; HeaderLength
//! below 116 included, which then patches bytes of the payload itself). The second pass
//! explores everything after the digest check; a third pass with PayloadLength 0 (no
//! digest check, as in [P] `Validate`) reaches it for any HeaderLength.
#![no_main]

use bastion_proto::message::{
    ClientMessage, MESSAGE_TYPE_LEN, PAYLOAD_DIGEST_OFFSET, PAYLOAD_LENGTH_OFFSET, PAYLOAD_OFFSET,
    sha256,
};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn check(frame: &[u8]) {
    let lenient = ClientMessage::decode(Bytes::copy_from_slice(frame));
    if let Ok(strict) = ClientMessage::decode_strict(Bytes::copy_from_slice(frame)) {
        assert_eq!(
            lenient.as_ref(),
            Ok(&strict),
            "strict accepts what decode refuses"
        );
    }
    let Ok(msg) = lenient else {
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
    let hl = u32::from_be_bytes(frame[0..4].try_into().unwrap());
    let start = hl.wrapping_add(4) as usize;
    if start > frame.len() {
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
    // PayloadLength 0: no digest check at all ([P] `Validate`), whatever HeaderLength.
    if data.len() >= PAYLOAD_OFFSET {
        let mut zero = data.to_vec();
        zero[PAYLOAD_LENGTH_OFFSET..PAYLOAD_OFFSET].fill(0);
        check(&zero);
    }
});
