//! The ClientMessage binary codec: one message per websocket binary frame.
//!
//! Layout (all integers big-endian), from [P] `src/message/clientmessage.go` (consts
//! `ClientMessage_*Offset`) and [P] `src/message/messageparser.go`
//! (fn `SerializeClientMessage`, `DeserializeClientMessage`, `Validate`); the agent's
//! [A] `agent/session/contracts/agentmessage.go` is byte-identical:
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 4 | HeaderLength (116: it does not count the PayloadLength field) |
//! | 4 | 32 | MessageType, ASCII, right-padded with spaces |
//! | 36 | 4 | SchemaVersion (1) |
//! | 40 | 8 | CreatedDate, ms since the Unix epoch |
//! | 48 | 8 | SequenceNumber (i64) |
//! | 56 | 8 | Flags |
//! | 64 | 16 | MessageId, UUID with its two 8-byte halves swapped |
//! | 80 | 32 | PayloadDigest, SHA-256 of the payload |
//! | 112 | 4 | PayloadType |
//! | 116 | 4 | PayloadLength |
//! | 120 | n | Payload |

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use thiserror::Error;
use uuid::Uuid;

use super::kind::{MessageType, PayloadType};

/// Offset of HeaderLength.
pub const HL_OFFSET: usize = 0;
/// Offset of MessageType.
pub const MESSAGE_TYPE_OFFSET: usize = 4;
/// Length of the MessageType field.
pub const MESSAGE_TYPE_LEN: usize = 32;
/// Offset of SchemaVersion.
pub const SCHEMA_VERSION_OFFSET: usize = 36;
/// Offset of CreatedDate.
pub const CREATED_DATE_OFFSET: usize = 40;
/// Offset of SequenceNumber.
pub const SEQUENCE_NUMBER_OFFSET: usize = 48;
/// Offset of Flags.
pub const FLAGS_OFFSET: usize = 56;
/// Offset of MessageId.
pub const MESSAGE_ID_OFFSET: usize = 64;
/// Offset of PayloadDigest.
pub const PAYLOAD_DIGEST_OFFSET: usize = 80;
/// Offset of PayloadType.
pub const PAYLOAD_TYPE_OFFSET: usize = 112;
/// Offset of PayloadLength; also the value both references write into HeaderLength.
pub const PAYLOAD_LENGTH_OFFSET: usize = 116;
/// Offset of the payload in a message written by the references (readers take
/// `HeaderLength + 4`).
pub const PAYLOAD_OFFSET: usize = 120;
/// The HeaderLength value both references write.
pub const HEADER_LENGTH: u32 = PAYLOAD_LENGTH_OFFSET as u32;
/// The SchemaVersion value both references write.
pub const SCHEMA_VERSION: u32 = 1;

/// A decoded (or to-be-encoded) ClientMessage.
///
/// HeaderLength, PayloadDigest and PayloadLength are not stored: the encoder computes
/// them, and the decoder uses them as the references do (see [`ClientMessage::decode`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMessage {
    /// MessageType header field.
    pub message_type: MessageType,
    /// SchemaVersion header field (never checked by either reference).
    pub schema_version: u32,
    /// CreatedDate header field, milliseconds since the Unix epoch. Must not be 0.
    pub created_date: u64,
    /// SequenceNumber header field.
    pub sequence_number: i64,
    /// Flags header field (never read by either reference).
    pub flags: u64,
    /// MessageId header field.
    pub message_id: Uuid,
    /// PayloadType header field.
    pub payload_type: PayloadType,
    /// The payload bytes, as on the wire (encrypted ones when KMS encryption is on).
    pub payload: Bytes,
}

/// Why a frame is not a valid ClientMessage.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The frame cannot hold the header fields up to PayloadType (116 bytes; 120 for
    /// [`ClientMessage::decode_strict`]).
    #[error("frame of {len} bytes is shorter than the ClientMessage header")]
    TooShort {
        /// Frame length.
        len: usize,
    },
    /// HeaderLength is zero ([P] `Validate`: "HeaderLength cannot be zero").
    #[error("HeaderLength is zero")]
    ZeroHeaderLength,
    /// HeaderLength points past the end of the frame (the references would panic
    /// slicing it), or, for [`ClientMessage::decode_strict`] only, is not 116.
    #[error("HeaderLength {header_length} is invalid for a frame of {frame_len} bytes")]
    BadHeaderLength {
        /// The HeaderLength field.
        header_length: u32,
        /// Frame length.
        frame_len: usize,
    },
    /// MessageType is not UTF-8. [P] would keep the bytes and ignore the message as an
    /// unknown type; the outcome is the same (dropped, not acknowledged).
    #[error("MessageType is not valid UTF-8")]
    MessageTypeNotUtf8,
    /// MessageType contains a control character (NUL included) once trimmed. [P]
    /// would keep such a string and ignore the message as an unknown type; refusing it
    /// keeps every decoded MessageType printable and re-encodable unchanged.
    #[error("MessageType contains control characters")]
    MessageTypeControlChars,
    /// MessageType is empty ([P] `Validate`: "MessageType is missing").
    #[error("MessageType is missing")]
    EmptyMessageType,
    /// CreatedDate is zero ([P] `Validate`: "CreatedDate is missing").
    #[error("CreatedDate is missing")]
    ZeroCreatedDate,
    /// PayloadLength disagrees with the bytes after the header (only
    /// [`ClientMessage::decode_strict`]: no reference reader checks it).
    #[error("PayloadLength says {declared} bytes but the frame carries {actual}")]
    PayloadLengthMismatch {
        /// The PayloadLength field.
        declared: u32,
        /// Bytes after the header.
        actual: usize,
    },
    /// SHA-256 of the payload differs from PayloadDigest ([P] `Validate`:
    /// "payload Hash is not valid").
    #[error("payload digest does not match its SHA-256")]
    DigestMismatch,
}

/// How much [`ClientMessage::decode`] checks beyond what a message needs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Checks {
    /// Exactly what [P] or [A] checks before processing a message.
    Reference,
    /// Also that the frame is what both reference writers produce.
    Canonical,
}

/// Why a ClientMessage cannot be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// MessageType does not fit its 32-byte field.
    #[error("MessageType {0:?} is longer than 32 bytes")]
    MessageTypeTooLong(String),
    /// Neither reference can serialize an empty payload, and the agent drops empty data.
    #[error("a ClientMessage payload must not be empty")]
    EmptyPayload,
    /// The payload does not fit the u32 PayloadLength field.
    #[error("payload of {0} bytes does not fit a u32 length")]
    PayloadTooLarge(usize),
}

fn be_u32(frame: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&frame[at..at + 4]);
    u32::from_be_bytes(b)
}

fn be_u64(frame: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&frame[at..at + 8]);
    u64::from_be_bytes(b)
}

/// Writes a UUID the way [P] fn `putUuid` does: bytes 8..16 first, then bytes 0..8.
pub fn uuid_to_wire(id: &Uuid) -> [u8; 16] {
    let b = id.as_bytes();
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&b[8..]);
    out[8..].copy_from_slice(&b[..8]);
    out
}

/// Reads a UUID the way [P] fn `getUuid` does (inverse of [`uuid_to_wire`]).
pub fn uuid_from_wire(wire: &[u8; 16]) -> Uuid {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&wire[8..]);
    b[8..].copy_from_slice(&wire[..8]);
    Uuid::from_bytes(b)
}

/// The MessageType field as [P] / [A] fn `getString` reads it: NUL bytes stripped from
/// both ends (`bytes.Trim(…, "\x00")`), then white space (`strings.TrimSpace`; Go's
/// `unicode.IsSpace` and Rust's `char::is_whitespace` are the same Unicode White_Space
/// set). Go would keep invalid UTF-8 or inner control characters, which can then match
/// no MessageType, and ignore the message; we refuse it (the same outcome).
fn message_type_str(frame: &[u8]) -> Result<&str, DecodeError> {
    let raw = &frame[MESSAGE_TYPE_OFFSET..MESSAGE_TYPE_OFFSET + MESSAGE_TYPE_LEN];
    let start = raw.iter().position(|&b| b != 0).unwrap_or(raw.len());
    let end = raw.iter().rposition(|&b| b != 0).map_or(start, |e| e + 1);
    let s = std::str::from_utf8(&raw[start..end])
        .map_err(|_| DecodeError::MessageTypeNotUtf8)?
        .trim();
    if s.chars().any(char::is_control) {
        return Err(DecodeError::MessageTypeControlChars);
    }
    Ok(s)
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

impl ClientMessage {
    /// Decodes and validates one websocket frame, accepting every frame that [P] or [A]
    /// would process (their readers are [P] `messageparser.go` fn
    /// `DeserializeClientMessage` + `Validate`, [A] `agentmessage.go` fn `Deserialize` +
    /// `Validate`; `proto-docs/wire-format.md` §3.9 has the table):
    ///
    /// 1. the frame holds the fields up to PayloadType (116 bytes: [A] ignores a failed
    ///    PayloadLength read and takes it as 0; [P] needs 120);
    /// 2. the payload is `frame[HeaderLength + 4 ..]`, whatever HeaderLength and
    ///    PayloadLength say (both references slice this way, in Go's wrapping `uint32`
    ///    arithmetic), and must lie inside the frame (where Go would panic);
    /// 3. MessageType: NULs stripped from both ends, then white space (`getString`);
    ///    non-UTF-8 or control characters left inside are refused: Go would keep them,
    ///    match no type and ignore the message;
    /// 4. `start_publication` / `pause_publication` are accepted without further checks
    ///    ([P] `Validate`);
    /// 5. HeaderLength is not 0; 6. MessageType is not empty; 7. CreatedDate is not 0;
    /// 8. if PayloadLength is not 0, the payload matches PayloadDigest ([P]
    ///    `Validate`; [A] checks no digest).
    ///
    /// SchemaVersion, Flags and unknown MessageTypes are never refused (neither
    /// reference checks them). Zero-copy: the payload is a slice of `frame`.
    pub fn decode(frame: Bytes) -> Result<ClientMessage, DecodeError> {
        Self::decode_with(frame, Checks::Reference)
    }

    /// [`ClientMessage::decode`], and also requires what every reference writer (and
    /// ours) produces: at least 120 bytes, HeaderLength 116, PayloadLength equal to the
    /// payload bytes, and a valid PayloadDigest for every non-empty payload. For
    /// checkers (the simulator flags a client frame that fails only these), not for
    /// receiving: the references process such frames.
    pub fn decode_strict(frame: Bytes) -> Result<ClientMessage, DecodeError> {
        Self::decode_with(frame, Checks::Canonical)
    }

    fn decode_with(frame: Bytes, checks: Checks) -> Result<ClientMessage, DecodeError> {
        let len = frame.len();
        let min_len = match checks {
            Checks::Reference => PAYLOAD_LENGTH_OFFSET,
            Checks::Canonical => PAYLOAD_OFFSET,
        };
        if len < min_len {
            return Err(DecodeError::TooShort { len });
        }
        let header_length = be_u32(&frame, HL_OFFSET);
        // Go adds the uint32 HeaderLength and the untyped constant 4 as uint32, so it
        // wraps: HeaderLength 0xFFFF_FFFC puts the payload at 0.
        let payload_start = header_length.wrapping_add(4) as usize;
        if payload_start > len {
            return Err(DecodeError::BadHeaderLength {
                header_length,
                frame_len: len,
            });
        }
        let type_str = message_type_str(&frame)?;
        let message_type = MessageType::parse(type_str);

        let mut wire_id = [0u8; 16];
        wire_id.copy_from_slice(&frame[MESSAGE_ID_OFFSET..MESSAGE_ID_OFFSET + 16]);
        // [A] `Deserialize` ignores a failed PayloadLength read: Go's zero value.
        let declared_len = if len >= PAYLOAD_OFFSET {
            be_u32(&frame, PAYLOAD_LENGTH_OFFSET)
        } else {
            0
        };
        let payload = frame.slice(payload_start..);

        let msg = ClientMessage {
            schema_version: be_u32(&frame, SCHEMA_VERSION_OFFSET),
            created_date: be_u64(&frame, CREATED_DATE_OFFSET),
            sequence_number: be_u64(&frame, SEQUENCE_NUMBER_OFFSET) as i64,
            flags: be_u64(&frame, FLAGS_OFFSET),
            message_id: uuid_from_wire(&wire_id),
            payload_type: PayloadType::from_u32(be_u32(&frame, PAYLOAD_TYPE_OFFSET)),
            message_type,
            payload,
        };
        let digest_ok =
            || sha256(&msg.payload)[..] == frame[PAYLOAD_DIGEST_OFFSET..PAYLOAD_DIGEST_OFFSET + 32];
        if checks == Checks::Canonical {
            if header_length != HEADER_LENGTH {
                return Err(DecodeError::BadHeaderLength {
                    header_length,
                    frame_len: len,
                });
            }
            if declared_len as usize != msg.payload.len() {
                return Err(DecodeError::PayloadLengthMismatch {
                    declared: declared_len,
                    actual: msg.payload.len(),
                });
            }
            if !msg.payload.is_empty() && !digest_ok() {
                return Err(DecodeError::DigestMismatch);
            }
        }
        if msg.message_type.is_publication() {
            return Ok(msg);
        }
        if header_length == 0 {
            return Err(DecodeError::ZeroHeaderLength);
        }
        if type_str.is_empty() {
            return Err(DecodeError::EmptyMessageType);
        }
        if msg.created_date == 0 {
            return Err(DecodeError::ZeroCreatedDate);
        }
        if declared_len != 0 && !digest_ok() {
            return Err(DecodeError::DigestMismatch);
        }
        Ok(msg)
    }

    /// Total encoded size in bytes.
    pub fn encoded_len(&self) -> usize {
        PAYLOAD_OFFSET + self.payload.len()
    }

    /// Encodes the message as [P] fn `SerializeClientMessage` does: HeaderLength 116,
    /// MessageType space-padded, digest and PayloadLength computed from the payload.
    pub fn encode(&self) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf)?;
        Ok(buf.freeze())
    }

    /// Appends the encoding of the message to `buf` (see [`ClientMessage::encode`]).
    pub fn encode_into(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let type_str = self.message_type.as_str();
        if type_str.len() > MESSAGE_TYPE_LEN {
            return Err(EncodeError::MessageTypeTooLong(type_str.to_owned()));
        }
        if self.payload.is_empty() {
            return Err(EncodeError::EmptyPayload);
        }
        let payload_len = u32::try_from(self.payload.len())
            .map_err(|_| EncodeError::PayloadTooLarge(self.payload.len()))?;
        buf.reserve(self.encoded_len());
        buf.put_u32(HEADER_LENGTH);
        buf.put_slice(type_str.as_bytes());
        buf.put_bytes(b' ', MESSAGE_TYPE_LEN - type_str.len());
        buf.put_u32(self.schema_version);
        buf.put_u64(self.created_date);
        buf.put_i64(self.sequence_number);
        buf.put_u64(self.flags);
        buf.put_slice(&uuid_to_wire(&self.message_id));
        buf.put_slice(&sha256(&self.payload));
        buf.put_u32(self.payload_type.as_u32());
        buf.put_u32(payload_len);
        buf.put_slice(&self.payload);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::header_flags;

    fn sample() -> ClientMessage {
        ClientMessage {
            message_type: MessageType::InputStreamData,
            schema_version: 1,
            created_date: 1_503_434_274_948,
            sequence_number: 7,
            flags: header_flags::DATA,
            message_id: Uuid::parse_str("dd01e56b-ff48-483e-a508-b5f073f31b16").unwrap(),
            payload_type: PayloadType::Output,
            payload: Bytes::from_static(b"hello"),
        }
    }

    fn encoded() -> Vec<u8> {
        sample().encode().unwrap().to_vec()
    }

    fn decode(v: Vec<u8>) -> Result<ClientMessage, DecodeError> {
        ClientMessage::decode(Bytes::from(v))
    }

    #[test]
    fn uuid_halves_are_swapped_on_the_wire() {
        let id = Uuid::parse_str("dd01e56b-ff48-483e-a508-b5f073f31b16").unwrap();
        let wire = uuid_to_wire(&id);
        assert_eq!(hex::encode(wire), "a508b5f073f31b16dd01e56bff48483e");
        assert_eq!(uuid_from_wire(&wire), id);
    }

    #[test]
    fn round_trip_and_layout() {
        let bytes = encoded();
        assert_eq!(bytes.len(), 125);
        assert_eq!(&bytes[0..4], &116u32.to_be_bytes());
        assert_eq!(&bytes[4..21], b"input_stream_data");
        assert!(bytes[21..36].iter().all(|&b| b == b' '));
        assert_eq!(decode(bytes).unwrap(), sample());
    }

    fn with_type_field(field: &[u8]) -> Vec<u8> {
        let mut b = encoded();
        b[4..36].fill(0);
        b[4..4 + field.len()].copy_from_slice(field);
        b
    }

    #[test]
    fn short_frames_are_rejected() {
        for n in [0, 1, 115] {
            assert_eq!(
                decode(encoded()[..n].to_vec()),
                Err(DecodeError::TooShort { len: n })
            );
        }
        assert_eq!(
            ClientMessage::decode_strict(Bytes::from(encoded()[..119].to_vec())),
            Err(DecodeError::TooShort { len: 119 })
        );
    }

    #[test]
    fn a_frame_cut_inside_payload_length_decodes_as_the_agent_does() {
        // [A] `Deserialize` ignores the failed PayloadLength read (0) and slices at
        // HeaderLength + 4; [P] rejects the frame. Either reference processing it is
        // enough for us to accept it.
        let mut b = encoded();
        b.truncate(118);
        b[0..4].copy_from_slice(&112u32.to_be_bytes());
        let m = decode(b.clone()).unwrap();
        assert_eq!(&m.payload[..], &b[116..118]);
        assert_eq!(m.sequence_number, 7);
        // HeaderLength 116 would slice past the end: Go panics, we refuse.
        b[0..4].copy_from_slice(&116u32.to_be_bytes());
        assert!(matches!(
            decode(b),
            Err(DecodeError::BadHeaderLength {
                header_length: 116,
                frame_len: 118
            })
        ));
    }

    #[test]
    fn header_length_is_bounds_checked() {
        let mut b = encoded();
        b[0..4].copy_from_slice(&200u32.to_be_bytes());
        assert!(matches!(
            decode(b.clone()),
            Err(DecodeError::BadHeaderLength {
                header_length: 200,
                ..
            })
        ));
        b[0..4].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(decode(b), Err(DecodeError::ZeroHeaderLength));
    }

    #[test]
    fn a_longer_header_moves_the_payload_as_in_the_reference() {
        // [P] slices the payload at HeaderLength + 4 whatever the value.
        let mut b = encoded();
        b[0..4].copy_from_slice(&117u32.to_be_bytes());
        b[116..120].copy_from_slice(&4u32.to_be_bytes());
        let digest = sha256(b"ello");
        b[80..112].copy_from_slice(&digest);
        let m = decode(b.clone()).unwrap();
        assert_eq!(&m.payload[..], b"ello");
        assert!(matches!(
            ClientMessage::decode_strict(Bytes::from(b)),
            Err(DecodeError::BadHeaderLength {
                header_length: 117,
                ..
            })
        ));
    }

    #[test]
    fn a_shorter_header_overlaps_the_payload_as_in_the_reference() {
        // HeaderLength 100: both references take the payload from byte 104, inside the
        // header. PayloadLength (bytes 116..120) is then part of that payload; with it
        // 0, [P] checks no digest and processes the message.
        let mut b = encoded();
        b[0..4].copy_from_slice(&100u32.to_be_bytes());
        b[116..120].fill(0);
        let m = decode(b.clone()).unwrap();
        assert_eq!(&m.payload[..], &b[104..]);
        assert_eq!(m.message_type, MessageType::InputStreamData);
        // With PayloadLength not 0 the digest is checked over that payload.
        b[116..120].copy_from_slice(&5u32.to_be_bytes());
        assert_eq!(decode(b), Err(DecodeError::DigestMismatch));
    }

    #[test]
    fn header_length_wraps_as_go_uint32_arithmetic() {
        // Go: `input[headerLength+4:]` in uint32, so 0xFFFF_FFFD + 4 = 1.
        let mut b = encoded();
        b[0..4].copy_from_slice(&0xFFFF_FFFDu32.to_be_bytes());
        b[116..120].fill(0);
        let m = decode(b.clone()).unwrap();
        assert_eq!(&m.payload[..], &b[1..]);
    }

    #[test]
    fn payload_length_is_not_used_to_slice() {
        // [P] and [A] take the rest of the frame; [P] uses PayloadLength only to decide
        // whether to check the digest, which covers the bytes actually there.
        for declared in [6u32, 4, 1, u32::MAX] {
            let mut b = encoded();
            b[116..120].copy_from_slice(&declared.to_be_bytes());
            let m = decode(b.clone()).unwrap();
            assert_eq!(&m.payload[..], b"hello", "PayloadLength {declared}");
            assert_eq!(
                ClientMessage::decode_strict(Bytes::from(b)),
                Err(DecodeError::PayloadLengthMismatch {
                    declared,
                    actual: 5
                })
            );
        }
    }

    #[test]
    fn the_digest_is_checked_iff_payload_length_is_not_zero() {
        let mut b = encoded();
        *b.last_mut().unwrap() ^= 1;
        assert_eq!(decode(b.clone()), Err(DecodeError::DigestMismatch));
        // [P] `Validate`: `if clientMessage.PayloadLength != 0 { … sha256 … }`.
        b[116..120].fill(0);
        assert_eq!(&decode(b.clone()).unwrap().payload[..], b"helln");
        assert_eq!(
            ClientMessage::decode_strict(Bytes::from(b)),
            Err(DecodeError::PayloadLengthMismatch {
                declared: 0,
                actual: 5
            })
        );
        // An empty payload with PayloadLength not 0 must carry SHA-256("").
        let mut b = encoded();
        b.truncate(120);
        b[80..112].fill(0xaa);
        assert_eq!(decode(b.clone()), Err(DecodeError::DigestMismatch));
        b[80..112].copy_from_slice(&sha256(b""));
        assert!(decode(b).unwrap().payload.is_empty());
    }

    #[test]
    fn type_and_date_are_checked() {
        let mut b = encoded();
        b[4..36].fill(b' ');
        assert_eq!(decode(b), Err(DecodeError::EmptyMessageType));

        let mut b = encoded();
        b[4..36].fill(0);
        assert_eq!(decode(b), Err(DecodeError::EmptyMessageType));

        let mut b = encoded();
        b[4] = 0xff;
        assert_eq!(decode(b), Err(DecodeError::MessageTypeNotUtf8));

        let mut b = encoded();
        b[40..48].fill(0);
        assert_eq!(decode(b), Err(DecodeError::ZeroCreatedDate));
    }

    #[test]
    fn schema_version_and_flags_are_never_checked() {
        for (version, flags) in [(0u32, 0u64), (2, 3), (u32::MAX, u64::MAX)] {
            let mut b = encoded();
            b[36..40].copy_from_slice(&version.to_be_bytes());
            b[56..64].copy_from_slice(&flags.to_be_bytes());
            let m = decode(b).unwrap();
            assert_eq!((m.schema_version, m.flags), (version, flags));
        }
    }

    #[test]
    fn unknown_message_types_decode_verbatim() {
        let m = decode(with_type_field(b"agent_job_reply")).unwrap();
        assert_eq!(m.message_type, MessageType::Other("agent_job_reply".into()));
        let m = decode(with_type_field(b"Acknowledge")).unwrap();
        assert_eq!(m.message_type, MessageType::Other("Acknowledge".into()));
    }

    #[test]
    fn message_type_is_trimmed_as_go_get_string() {
        // NULs stripped from both ends first, then any Unicode white space.
        for field in [
            &b"acknowledge"[..],
            b"\0\0acknowledge\0",
            b" acknowledge \0\0",
            b"\0 \tacknowledge\r\n \0",
            b"\x0b\x0cacknowledge",
            "\u{a0}acknowledge\u{85}\u{3000}".as_bytes(),
        ] {
            assert_eq!(
                decode(with_type_field(field)).unwrap().message_type,
                MessageType::Acknowledge,
                "{field:?}"
            );
        }
    }

    #[test]
    fn control_characters_inside_the_message_type_are_refused() {
        // Go trims these to "\0acknowledge" / "acknowledge\0" / "ack\x01nowledge",
        // which match no type: [P] ignores the message, we refuse it.
        for field in [
            &b" \0acknowledge"[..],
            b"acknowledge\0 ",
            b"ack\x01nowledge",
        ] {
            assert_eq!(
                decode(with_type_field(field)),
                Err(DecodeError::MessageTypeControlChars),
                "{field:?}"
            );
        }
    }

    #[test]
    fn nul_padded_message_type_is_accepted() {
        let mut b = encoded();
        b[21..36].fill(0);
        assert_eq!(
            decode(b).unwrap().message_type,
            MessageType::InputStreamData
        );
    }

    #[test]
    fn publication_messages_skip_validation() {
        let mut m = sample();
        m.message_type = MessageType::PausePublication;
        let mut b = m.encode().unwrap().to_vec();
        b[40..48].fill(0);
        b[80..112].fill(0);
        b[116..120].fill(0);
        assert_eq!(
            decode(b).unwrap().message_type,
            MessageType::PausePublication
        );
    }

    #[test]
    fn empty_payload_decodes_but_never_encodes() {
        let mut b = encoded();
        b.truncate(120);
        b[116..120].fill(0);
        b[80..112].fill(0xaa);
        let m = decode(b.clone()).unwrap();
        assert_eq!(ClientMessage::decode_strict(Bytes::from(b)).unwrap(), m);
        assert!(m.payload.is_empty());
        assert_eq!(m.encode(), Err(EncodeError::EmptyPayload));
    }

    #[test]
    fn long_message_type_is_an_encode_error() {
        let mut m = sample();
        m.message_type = MessageType::Other("x".repeat(33));
        assert!(matches!(
            m.encode(),
            Err(EncodeError::MessageTypeTooLong(_))
        ));
        m.message_type = MessageType::Other("x".repeat(32));
        assert_eq!(decode(m.encode().unwrap().to_vec()).unwrap(), m);
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn message_type() -> impl Strategy<Value = MessageType> {
            prop_oneof![
                Just(MessageType::InputStreamData),
                Just(MessageType::OutputStreamData),
                Just(MessageType::Acknowledge),
                Just(MessageType::ChannelClosed),
                Just(MessageType::StartPublication),
                Just(MessageType::PausePublication),
                Just(MessageType::AgentSessionState),
                "[a-z_]{1,32}".prop_map(|s| MessageType::parse(&s)),
            ]
        }

        prop_compose! {
            fn message()(
                message_type in message_type(),
                schema_version in any::<u32>(),
                created_date in 1..u64::MAX,
                sequence_number in any::<i64>(),
                flags in any::<u64>(),
                id in any::<u128>(),
                payload_type in any::<u32>(),
                payload in prop::collection::vec(any::<u8>(), 1..2048),
            ) -> ClientMessage {
                ClientMessage {
                    message_type,
                    schema_version,
                    created_date,
                    sequence_number,
                    flags,
                    message_id: Uuid::from_u128(id),
                    payload_type: PayloadType::from_u32(payload_type),
                    payload: Bytes::from(payload),
                }
            }
        }

        proptest! {
            #[test]
            fn encode_decode_round_trip(m in message()) {
                let frame = m.encode().unwrap();
                prop_assert_eq!(frame.len(), m.encoded_len());
                prop_assert_eq!(ClientMessage::decode(frame).unwrap(), m);
            }

            #[test]
            fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
                let _ = ClientMessage::decode(Bytes::from(bytes.clone()));
                let _ = ClientMessage::decode_strict(Bytes::from(bytes));
            }

            #[test]
            fn decode_never_panics_on_any_header_length(
                hl in any::<u32>(),
                declared in prop_oneof![Just(0u32), any::<u32>()],
                len in 116usize..300,
                fill in any::<u8>(),
            ) {
                let mut frame = vec![fill; len];
                frame[0..4].copy_from_slice(&hl.to_be_bytes());
                frame[4..21].copy_from_slice(b"input_stream_data");
                frame[21..36].fill(b' ');
                if len >= PAYLOAD_OFFSET {
                    frame[116..120].copy_from_slice(&declared.to_be_bytes());
                }
                let res = ClientMessage::decode(Bytes::from(frame.clone()));
                let start = hl.wrapping_add(4) as usize;
                if start > len {
                    let is_bad_header_length =
                        matches!(res, Err(DecodeError::BadHeaderLength { .. }));
                    prop_assert!(is_bad_header_length);
                } else if let Ok(m) = res {
                    prop_assert_eq!(&m.payload[..], &frame[start..]);
                }
            }

            #[test]
            fn strict_decode_accepts_exactly_our_encodings(m in message()) {
                let frame = m.encode().unwrap();
                prop_assert_eq!(ClientMessage::decode_strict(frame).unwrap(), m);
            }

            #[test]
            fn any_single_bit_flip_in_the_payload_is_caught(m in message(), bit in any::<prop::sample::Index>()) {
                prop_assume!(!m.message_type.is_publication());
                let mut frame = m.encode().unwrap().to_vec();
                let i = PAYLOAD_OFFSET + bit.index(m.payload.len() * 8) / 8;
                frame[i] ^= 1 << (bit.index(8));
                prop_assert_eq!(ClientMessage::decode(Bytes::from(frame)), Err(DecodeError::DigestMismatch));
            }
        }
    }
}
