//! The smux frame: an 8-byte header and, for PSH and UPD, a body.
//!
//! Layout ([P] `vendor/src/github.com/xtaci/smux/frame.go` consts `sizeOf*`,
//! `headerSize`, type `rawHeader`; `session.go` fn `sendLoop` writes it):
//!
//! | offset | size | field |
//! |---:|---:|---|
//! | 0 | 1 | version, 1 |
//! | 1 | 1 | cmd: SYN 0, FIN 1, PSH 2, NOP 3, UPD 4 |
//! | 2 | 2 | length, **little-endian** u16 |
//! | 4 | 4 | stream id, **little-endian** u32 |
//! | 8 | n | body |
//!
//! How long the body is depends on the command, because that is how the reference
//! receiver reads it (`session.go` fn `recvLoop`):
//!
//! * PSH: `length` bytes;
//! * UPD: exactly 8 bytes (`szCmdUPD`), whatever `length` says;
//! * SYN, FIN, NOP: no body, whatever `length` says (any bytes a peer put there are read
//!   as the next header, exactly as the reference does).
//!
//! The reference sender always writes `length` = body length (`sendLoop`), so for frames
//! it produces the two readings agree.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use thiserror::Error;

use super::StreamId;

/// The protocol version this module speaks (`mux.go` fn `DefaultConfig`: `Version: 1`).
pub const VERSION: u8 = 1;
/// Size of the frame header (`frame.go` const `headerSize`).
pub const HEADER_SIZE: usize = 8;
/// Size of a UPD body: consumed u32 LE, then window u32 LE (`frame.go` const `szCmdUPD`).
pub const UPD_SIZE: usize = 8;
/// The largest PSH body the u16 length field can describe (`mux.go` fn `VerifyConfig`:
/// "max frame size must not be larger than 65535").
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

/// A frame command (`frame.go` consts `cmdSYN` … `cmdUPD`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cmd {
    /// 0: open a stream (no body).
    Syn,
    /// 1: close a stream, "a.k.a EOF mark" (no body).
    Fin,
    /// 2: stream data.
    Psh,
    /// 3: keepalive, no operation (no body, stream id 0).
    Nop,
    /// 4: window update, sent only by protocol version 2 (8-byte body).
    Upd,
}

impl Cmd {
    /// The wire value.
    pub fn as_u8(self) -> u8 {
        match self {
            Cmd::Syn => 0,
            Cmd::Fin => 1,
            Cmd::Psh => 2,
            Cmd::Nop => 3,
            Cmd::Upd => 4,
        }
    }

    /// Parses a wire value; `None` for values the reference's `recvLoop` rejects.
    pub fn from_u8(v: u8) -> Option<Cmd> {
        match v {
            0 => Some(Cmd::Syn),
            1 => Some(Cmd::Fin),
            2 => Some(Cmd::Psh),
            3 => Some(Cmd::Nop),
            4 => Some(Cmd::Upd),
            _ => None,
        }
    }
}

/// One decoded (or to-be-encoded) smux frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// SYN: the sender opened stream `sid`.
    Syn {
        /// Stream id.
        sid: StreamId,
    },
    /// FIN: the sender closed stream `sid`.
    Fin {
        /// Stream id.
        sid: StreamId,
    },
    /// PSH: data for stream `sid` (at most [`MAX_PAYLOAD`] bytes).
    Psh {
        /// Stream id.
        sid: StreamId,
        /// The body.
        data: Bytes,
    },
    /// NOP: keepalive. The reference sends stream id 0 and ignores the id on receipt.
    Nop {
        /// Stream id (0 from the reference).
        sid: StreamId,
    },
    /// UPD: protocol-2 window update. A version-1 session ignores it.
    Upd {
        /// Stream id.
        sid: StreamId,
        /// Bytes the peer has consumed on this stream.
        consumed: u32,
        /// The peer's window.
        window: u32,
    },
}

/// Why the byte stream is not valid smux v1. Either error ends the session
/// (`session.go` fn `recvLoop` → `notifyProtoError(ErrInvalidProtocol)`).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The version byte is not 1 (`recvLoop`: `hdr.Version() != byte(s.config.Version)`,
    /// checked before the command).
    #[error("smux header at stream offset {offset} has version {found}, expected {VERSION}")]
    BadVersion {
        /// The version byte.
        found: u8,
        /// Offset of the header in the session's input byte stream.
        offset: u64,
    },
    /// The command byte is not 0..=4 (`recvLoop`, `default:` arm).
    #[error("smux header at stream offset {offset} has unknown command {cmd}")]
    UnknownCmd {
        /// The command byte.
        cmd: u8,
        /// Offset of the header in the session's input byte stream.
        offset: u64,
    },
}

/// Why a frame cannot be encoded.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum EncodeError {
    /// A PSH body does not fit the u16 length field.
    #[error("PSH body of {0} bytes exceeds the 65535-byte smux frame limit")]
    PayloadTooLarge(usize),
}

/// Appends an 8-byte header (`session.go` fn `sendLoop`: ver, cmd, LE u16 length, LE u32
/// sid).
pub(crate) fn put_header(buf: &mut BytesMut, cmd: Cmd, length: u16, sid: StreamId) {
    buf.put_u8(VERSION);
    buf.put_u8(cmd.as_u8());
    buf.put_u16_le(length);
    buf.put_u32_le(sid.0);
}

impl Frame {
    /// The frame's command.
    pub fn cmd(&self) -> Cmd {
        match self {
            Frame::Syn { .. } => Cmd::Syn,
            Frame::Fin { .. } => Cmd::Fin,
            Frame::Psh { .. } => Cmd::Psh,
            Frame::Nop { .. } => Cmd::Nop,
            Frame::Upd { .. } => Cmd::Upd,
        }
    }

    /// The frame's stream id.
    pub fn sid(&self) -> StreamId {
        match self {
            Frame::Syn { sid }
            | Frame::Fin { sid }
            | Frame::Psh { sid, .. }
            | Frame::Nop { sid }
            | Frame::Upd { sid, .. } => *sid,
        }
    }

    /// Encoded size: header plus body.
    pub fn encoded_len(&self) -> usize {
        HEADER_SIZE
            + match self {
                Frame::Psh { data, .. } => data.len(),
                Frame::Upd { .. } => UPD_SIZE,
                _ => 0,
            }
    }

    /// Appends the encoding to `buf`, as `session.go` fn `sendLoop` does: the length
    /// field is the body length (0 for SYN/FIN/NOP, 8 for UPD).
    pub fn encode_into(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        buf.reserve(self.encoded_len());
        match self {
            Frame::Psh { sid, data } => {
                let len = u16::try_from(data.len())
                    .map_err(|_| EncodeError::PayloadTooLarge(data.len()))?;
                put_header(buf, Cmd::Psh, len, *sid);
                buf.put_slice(data);
            }
            Frame::Upd {
                sid,
                consumed,
                window,
            } => {
                // UPD_SIZE is 8: the cast cannot truncate.
                put_header(buf, Cmd::Upd, UPD_SIZE as u16, *sid);
                buf.put_u32_le(*consumed);
                buf.put_u32_le(*window);
            }
            Frame::Syn { sid } | Frame::Fin { sid } | Frame::Nop { sid } => {
                put_header(buf, self.cmd(), 0, *sid);
            }
        }
        Ok(())
    }

    /// Encodes the frame into a new buffer (see [`Frame::encode_into`]).
    pub fn to_bytes(&self) -> Result<Bytes, EncodeError> {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf)?;
        Ok(buf.freeze())
    }
}

/// Incremental frame decoder: push bytes in pieces of any size, pull whole frames.
///
/// Mirrors the reference receiver (`session.go` fn `recvLoop`, which reads the header
/// with `io.ReadFull` and then the body): the header is validated as soon as its 8
/// bytes are present, even if the body has not arrived yet. Once it has returned an
/// error the decoder is poisoned and returns that error forever: the stream cannot be
/// resynchronised, and the reference stops reading too.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: BytesMut,
    /// Offset in the input stream of `buf[0]`.
    offset: u64,
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder at the start of a byte stream.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Appends input bytes.
    pub fn push(&mut self, data: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(data);
        }
    }

    /// Bytes pushed but not yet returned as part of a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// True when a complete header is buffered (its frame may still lack body bytes).
    /// The reference sets its keepalive `dataReady` flag at exactly this point.
    pub fn has_header(&self) -> bool {
        self.buf.len() >= HEADER_SIZE
    }

    /// Total bytes consumed as whole frames so far.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Returns the next whole frame, `Ok(None)` if more bytes are needed, or the
    /// protocol error that ends the session.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let Some(&hdr) = self.buf.first_chunk::<HEADER_SIZE>() else {
            return Ok(None);
        };
        let version = hdr[0];
        let raw_cmd = hdr[1];
        let length = usize::from(u16::from_le_bytes([hdr[2], hdr[3]]));
        let sid = StreamId(u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]));
        if version != VERSION {
            return Err(self.fail(FrameError::BadVersion {
                found: version,
                offset: self.offset,
            }));
        }
        let Some(cmd) = Cmd::from_u8(raw_cmd) else {
            return Err(self.fail(FrameError::UnknownCmd {
                cmd: raw_cmd,
                offset: self.offset,
            }));
        };
        let body_len = match cmd {
            Cmd::Psh => length,
            Cmd::Upd => UPD_SIZE,
            Cmd::Syn | Cmd::Fin | Cmd::Nop => 0,
        };
        let total = HEADER_SIZE + body_len;
        if self.buf.len() < total {
            return Ok(None);
        }
        let mut raw = self.buf.split_to(total);
        self.offset += total as u64;
        raw.advance(HEADER_SIZE);
        let frame = match cmd {
            Cmd::Syn => Frame::Syn { sid },
            Cmd::Fin => Frame::Fin { sid },
            Cmd::Nop => Frame::Nop { sid },
            Cmd::Psh => Frame::Psh {
                sid,
                data: raw.freeze(),
            },
            Cmd::Upd => Frame::Upd {
                sid,
                consumed: raw.get_u32_le(),
                window: raw.get_u32_le(),
            },
        };
        Ok(Some(frame))
    }

    fn fail(&mut self, e: FrameError) -> FrameError {
        self.failed = Some(e.clone());
        self.buf.clear();
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `smux_v1_frames` vectors of `tests/golden/ssm-golden-vectors.json`.
    fn golden() -> serde_json::Value {
        let text = include_str!("../../tests/golden/ssm-golden-vectors.json");
        let all: serde_json::Value = serde_json::from_str(text).unwrap();
        all["smux_v1_frames"].clone()
    }

    fn golden_hex(key: &str) -> Vec<u8> {
        hex::decode(golden()[key].as_str().unwrap()).unwrap()
    }

    fn decode_all(bytes: &[u8]) -> Vec<Frame> {
        let mut d = FrameDecoder::new();
        d.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = d.next_frame().unwrap() {
            out.push(f);
        }
        assert_eq!(d.buffered(), 0);
        out
    }

    #[test]
    fn golden_vectors_encode_and_decode_byte_exact() {
        let cases = [
            ("syn_sid3", Frame::Syn { sid: StreamId(3) }),
            ("fin_sid3", Frame::Fin { sid: StreamId(3) }),
            (
                "psh_sid3_hello",
                Frame::Psh {
                    sid: StreamId(3),
                    data: Bytes::from_static(b"hello"),
                },
            ),
            ("nop", Frame::Nop { sid: StreamId(0) }),
        ];
        for (key, frame) in cases {
            let wire = golden_hex(key);
            assert_eq!(frame.to_bytes().unwrap().to_vec(), wire, "encode {key}");
            assert_eq!(frame.encoded_len(), wire.len(), "len {key}");
            assert_eq!(decode_all(&wire), vec![frame], "decode {key}");
        }
    }

    #[test]
    fn header_fields_are_little_endian() {
        let f = Frame::Psh {
            sid: StreamId(0x0403_0201),
            data: Bytes::from(vec![7u8; 0x0102]),
        };
        let b = f.to_bytes().unwrap();
        assert_eq!(&b[..8], &[1, 2, 0x02, 0x01, 0x01, 0x02, 0x03, 0x04]);
        assert_eq!(decode_all(&b), vec![f]);
    }

    #[test]
    fn upd_round_trips_with_an_eight_byte_body() {
        let f = Frame::Upd {
            sid: StreamId(5),
            consumed: 0x1122_3344,
            window: 65536,
        };
        let b = f.to_bytes().unwrap();
        assert_eq!(hex::encode(&b), "01040800050000004433221100000100");
        assert_eq!(decode_all(&b), vec![f]);
    }

    #[test]
    fn upd_body_is_eight_bytes_whatever_the_length_field_says() {
        // recvLoop reads szCmdUPD bytes and never looks at hdr.Length() for UPD.
        let mut b = Frame::Upd {
            sid: StreamId(5),
            consumed: 1,
            window: 2,
        }
        .to_bytes()
        .unwrap()
        .to_vec();
        b[2] = 0;
        b.extend_from_slice(&golden_hex("nop"));
        assert_eq!(decode_all(&b).len(), 2);
    }

    #[test]
    fn length_of_syn_fin_nop_is_not_a_body() {
        // recvLoop reads no body for SYN/FIN/NOP: whatever follows is the next header.
        let mut b = golden_hex("syn_sid3");
        b[2] = 8;
        b.extend_from_slice(&golden_hex("fin_sid3"));
        assert_eq!(
            decode_all(&b),
            vec![
                Frame::Syn { sid: StreamId(3) },
                Frame::Fin { sid: StreamId(3) }
            ]
        );
    }

    #[test]
    fn zero_length_psh_decodes_to_an_empty_body() {
        let b = hex::decode("0102000003000000").unwrap();
        assert_eq!(
            decode_all(&b),
            vec![Frame::Psh {
                sid: StreamId(3),
                data: Bytes::new()
            }]
        );
    }

    #[test]
    fn bad_version_is_reported_before_the_command_and_poisons() {
        let mut d = FrameDecoder::new();
        d.push(&golden_hex("syn_sid3"));
        d.push(&[2, 9, 0, 0, 3, 0, 0, 0]);
        assert_eq!(d.next_frame(), Ok(Some(Frame::Syn { sid: StreamId(3) })));
        let e = FrameError::BadVersion {
            found: 2,
            offset: 8,
        };
        assert_eq!(d.next_frame(), Err(e.clone()));
        d.push(&golden_hex("nop"));
        assert_eq!(d.next_frame(), Err(e));
    }

    #[test]
    fn unknown_command_is_an_error() {
        for cmd in [5u8, 6, 0x80, 0xff] {
            let mut d = FrameDecoder::new();
            d.push(&[1, cmd, 0, 0, 0, 0, 0, 0]);
            assert_eq!(
                d.next_frame(),
                Err(FrameError::UnknownCmd { cmd, offset: 0 })
            );
        }
    }

    #[test]
    fn header_is_checked_before_the_body_arrives() {
        let mut d = FrameDecoder::new();
        d.push(&[0, 2, 0xff, 0xff, 3, 0, 0]);
        assert_eq!(d.next_frame(), Ok(None));
        d.push(&[0]);
        assert!(matches!(
            d.next_frame(),
            Err(FrameError::BadVersion { found: 0, .. })
        ));
    }

    #[test]
    fn frames_split_at_every_byte_decode() {
        let mut wire = Vec::new();
        for key in ["syn_sid3", "psh_sid3_hello", "nop", "fin_sid3"] {
            wire.extend_from_slice(&golden_hex(key));
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        for b in &wire {
            d.push(std::slice::from_ref(b));
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, decode_all(&wire));
        assert_eq!(got.len(), 4);
        assert_eq!(d.offset(), wire.len() as u64);
    }

    #[test]
    fn oversized_psh_is_an_encode_error() {
        let f = Frame::Psh {
            sid: StreamId(3),
            data: Bytes::from(vec![0u8; MAX_PAYLOAD + 1]),
        };
        assert_eq!(
            f.to_bytes(),
            Err(EncodeError::PayloadTooLarge(MAX_PAYLOAD + 1))
        );
        let f = Frame::Psh {
            sid: StreamId(3),
            data: Bytes::from(vec![0u8; MAX_PAYLOAD]),
        };
        assert_eq!(decode_all(&f.to_bytes().unwrap()), vec![f]);
    }

    #[test]
    fn cmd_values() {
        for v in 0..=255u8 {
            match Cmd::from_u8(v) {
                Some(c) => assert_eq!(c.as_u8(), v),
                None => assert!(v > 4),
            }
        }
    }
}
