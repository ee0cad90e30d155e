//! smux on arbitrary bytes, cut into arbitrary pieces.
//!
//! Input layout: byte 0 = options, byte 1 = number N of chunk sizes (mod 16), then N
//! chunk-size bytes, then the smux byte stream. The stream is fed, cut into pieces of
//! the given sizes (cycled; a 0 feeds an empty slice), to:
//!
//! * a `Session` of each role, after each piece draining events (reading every
//!   readable stream, echoing data, closing finished streams), advancing a simulated
//!   clock through `handle_timeout`, and draining `poll_transmit` with varying limits;
//!   everything the session transmits must itself be valid smux;
//! * a `FrameDecoder` fed the same pieces, which must produce exactly the frames (and
//!   error) of a decoder fed the whole stream at once, and whose frames re-encode to
//!   the input bytes (except the length field of bodiless frames, which the receiver
//!   ignores as the reference does).
#![no_main]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bastion_proto::smux::{
    Cmd, Config, Event, Frame, FrameDecoder, FrameError, HEADER_SIZE, Role, Session, SessionError,
    StreamId, StreamRead,
};
use libfuzzer_sys::fuzz_target;

struct Input<'a> {
    opts: u8,
    sizes: &'a [u8],
    stream: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Input<'a>> {
        let (&opts, rest) = data.split_first()?;
        let (&n, rest) = rest.split_first()?;
        let n = usize::from(n & 15).min(rest.len());
        let (sizes, stream) = rest.split_at(n);
        Some(Input {
            opts,
            sizes,
            stream,
        })
    }

    /// The pieces: `sizes` cycled; a zero size yields an empty piece. Without sizes
    /// (or with all zero) the stream is one piece.
    fn chunks(&self) -> Vec<&'a [u8]> {
        let mut out = Vec::new();
        if self.sizes.iter().all(|&s| s == 0) {
            out.push(self.stream);
            return out;
        }
        let mut rest = self.stream;
        let mut i = 0;
        while !rest.is_empty() {
            let n = usize::from(self.sizes[i % self.sizes.len()]).min(rest.len());
            let (a, b) = rest.split_at(n);
            out.push(a);
            rest = b;
            i += 1;
        }
        out
    }
}

fn config(opts: u8) -> Config {
    let mut c = match opts & 3 {
        0 => Config::default(),
        1 => Config::keepalive_disabled(),
        2 => Config::for_ssm(false),
        _ => Config::for_ssm(true),
    };
    if opts & 4 != 0 {
        // Small limits: writes split into many frames, the receive budget fills.
        c.max_frame_size = 7;
        c.max_receive_buffer = 64;
    }
    c
}

/// Decodes the whole stream at once: the frames and the final error, if any.
fn decode_whole(stream: &[u8]) -> (Vec<Frame>, Option<FrameError>) {
    let mut d = FrameDecoder::new();
    d.push(stream);
    let mut frames = Vec::new();
    loop {
        match d.next_frame() {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => return (frames, None),
            Err(e) => {
                // Poisoned: the same error forever, nothing buffered.
                assert_eq!(d.next_frame(), Err(e.clone()));
                d.push(b"\x01\x03\0\0\0\0\0\0");
                assert_eq!(d.next_frame(), Err(e.clone()));
                return (frames, Some(e));
            }
        }
    }
}

fn check_decoder(input: &Input<'_>) {
    let (whole, whole_err) = decode_whole(input.stream);

    let mut d = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut err = None;
    'feed: for chunk in input.chunks() {
        d.push(chunk);
        loop {
            match d.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    err = Some(e);
                    break 'feed;
                }
            }
        }
    }
    assert_eq!(frames, whole, "chunking changed the decoded frames");
    assert_eq!(err, whole_err, "chunking changed the decode error");

    // Re-encoding the frames gives back the consumed input.
    let mut at = 0usize;
    for f in &frames {
        let enc = f.to_bytes().expect("a decoded frame encodes");
        assert_eq!(enc.len(), f.encoded_len());
        let raw = &input.stream[at..at + enc.len()];
        if f.cmd() == Cmd::Psh || f.cmd() == Cmd::Upd && raw[2..4] == [8, 0] {
            assert_eq!(&enc[..], raw, "frame {f:?} does not re-encode to its input");
        } else {
            assert_eq!(enc[..2], raw[..2]);
            assert_eq!(enc[4..], raw[4..]);
        }
        at += enc.len();
    }
    if err.is_none() {
        assert_eq!(d.offset(), at as u64);
        assert_eq!(d.buffered(), input.stream.len() - at);
        assert_eq!(d.has_header(), d.buffered() >= HEADER_SIZE);
    }
}

/// The peer's view of what a session transmits: must always be valid smux.
struct Wire {
    decoder: FrameDecoder,
}

impl Wire {
    fn take(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
        while let Some(f) = self
            .decoder
            .next_frame()
            .unwrap_or_else(|e| panic!("session transmitted invalid smux: {e}"))
        {
            if let Frame::Psh { data, .. } = &f {
                assert!(!data.is_empty(), "session sent an empty PSH");
            }
            assert!(!matches!(f, Frame::Upd { .. }), "v1 session sent UPD");
        }
    }
}

fn check_session(role: Role, input: &Input<'_>) {
    let t0 = Instant::now();
    let cfg = config(input.opts);
    let mut s = Session::new(role, cfg.clone(), t0).expect("valid config");
    let mut wire = Wire {
        decoder: FrameDecoder::new(),
    };
    let mut open: BTreeSet<StreamId> = BTreeSet::new();
    let mut closed_seen = false;
    let mut now = t0;

    if input.opts & 8 != 0 {
        let id = s.open_stream().expect("open");
        assert!(open.insert(id));
        assert_eq!(id.get() % 2, u32::from(role == Role::Client));
        s.write(id, b"hello smux").expect("write");
    }

    for (i, chunk) in input.chunks().into_iter().enumerate() {
        let before = s.is_closed();
        match s.handle_input(chunk) {
            Ok(()) => assert!(!before),
            Err(SessionError::Closed(_)) => assert!(before),
            Err(SessionError::Protocol(_)) => {
                assert!(!before);
                assert!(s.is_closed());
            }
        }

        // Drain events.
        let max_read = 1 + usize::from(input.opts >> 4) * 3;
        while let Some(ev) = s.poll_event() {
            assert!(!closed_seen, "event {ev:?} after Closed");
            match ev {
                Event::Accepted(id) => {
                    assert!(open.insert(id), "accepted {id} twice");
                    if !s.is_closed() {
                        s.write(id, &[id.get() as u8; 9])
                            .expect("write to accepted");
                    }
                }
                Event::Readable(id) => {
                    assert!(open.contains(&id));
                    loop {
                        match s.read(id, max_read) {
                            Ok(StreamRead::Data(b)) => {
                                assert!(!b.is_empty() && b.len() <= max_read);
                                if !s.is_closed() {
                                    s.write_bytes(id, b).expect("echo");
                                }
                            }
                            Ok(StreamRead::Blocked) | Ok(StreamRead::Eof) => break,
                            Err(_) => {
                                assert!(s.is_closed());
                                break;
                            }
                        }
                    }
                    assert_eq!(s.buffered(id), 0);
                }
                Event::Finished(id) => {
                    assert!(open.contains(&id));
                    assert!(s.is_finished(id));
                    if input.opts & 16 != 0 && !s.is_closed() {
                        s.close(id).expect("close finished stream");
                        open.remove(&id);
                        assert!(!s.contains(id));
                    }
                }
                Event::Closed(_) => {
                    assert!(s.is_closed());
                    closed_seen = true;
                }
            }
        }
        assert_eq!(s.num_streams(), open.len());
        let total: usize = open.iter().map(|&id| s.buffered(id)).sum();
        assert_eq!(total, s.buffered_total());
        assert_eq!(
            s.wants_input(),
            !s.is_closed() && total < cfg.max_receive_buffer
        );

        // Time passes: 0..=15 s per piece, from the piece itself.
        let step = chunk.first().map_or(3, |b| b & 15);
        now += Duration::from_secs(u64::from(step));
        if let Some(t) = s.poll_timeout() {
            assert!(!s.is_closed());
            let _ = t;
        }
        s.handle_timeout(now);

        // Transmit with a varying limit.
        let limit = [1usize, 3, 8, 100, usize::MAX][i % 5];
        while let Some(b) = s.poll_transmit(limit) {
            assert!(!b.is_empty() && b.len() <= limit);
            wire.take(&b);
        }
        if s.is_closed() {
            assert!(s.poll_transmit(usize::MAX).is_none());
        } else {
            assert_eq!(s.pending_transmit(), 0);
        }
    }
    // Drain any event left by the last timeout.
    while let Some(ev) = s.poll_event() {
        assert!(!closed_seen, "event {ev:?} after Closed");
        if matches!(ev, Event::Closed(_)) {
            closed_seen = true;
        }
    }
    assert_eq!(closed_seen, s.is_closed());
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    check_decoder(&input);
    check_session(Role::Client, &input);
    check_session(Role::Server, &input);
});
