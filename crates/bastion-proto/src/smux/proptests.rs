//! Property tests: frame sequences survive any re-chunking of the byte stream, and a
//! client and a server session joined back to back deliver every stream's bytes
//! exactly and in order whatever the chunking on either side.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use bytes::Bytes;
use proptest::prelude::*;

use super::frame::{Frame, FrameDecoder};
use super::session::{Event, Role, Session, StreamRead};
use super::{Config, StreamId};

fn arb_frame() -> impl Strategy<Value = Frame> {
    let sid = any::<u32>().prop_map(StreamId);
    prop_oneof![
        sid.clone().prop_map(|sid| Frame::Syn { sid }),
        sid.clone().prop_map(|sid| Frame::Fin { sid }),
        sid.clone().prop_map(|sid| Frame::Nop { sid }),
        (sid.clone(), any::<u32>(), any::<u32>()).prop_map(|(sid, consumed, window)| {
            Frame::Upd {
                sid,
                consumed,
                window,
            }
        }),
        (
            sid,
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), 0..64),
                1 => proptest::collection::vec(any::<u8>(), 0..70_000)
                    .prop_map(|mut v| { v.truncate(65535); v }),
            ]
        )
            .prop_map(|(sid, d)| Frame::Psh {
                sid,
                data: Bytes::from(d)
            }),
    ]
}

/// A small deterministic generator for chunk sizes, seeded by proptest.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// 1..=max, biased towards small values half of the time.
    fn size(&mut self, max: usize) -> usize {
        let r = self.next() as usize;
        let cap = if r & 1 == 0 { max.min(16) } else { max };
        1 + (r >> 1) % cap.max(1)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn frames_round_trip_under_any_chunking(
        frames in proptest::collection::vec(arb_frame(), 0..24),
        cuts in proptest::collection::vec(1usize..300, 1..40),
    ) {
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend_from_slice(&f.to_bytes().unwrap());
        }
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = cuts[i % cuts.len()].min(rest.len());
            i += 1;
            d.push(&rest[..n]);
            rest = &rest[n..];
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
        }
        prop_assert_eq!(d.buffered(), 0);
        prop_assert_eq!(got, frames);
    }
}

/// Moves bytes from `from` to `to` in random transmit sizes and random input pieces;
/// the receiver handles its events after every piece.
fn pump(from: &mut Session, to: &mut Session, to_side: &mut Side, rng: &mut Rng) -> bool {
    let mut moved = false;
    while let Some(b) = from.poll_transmit(rng.size(5000)) {
        moved = true;
        let mut rest = &b[..];
        while !rest.is_empty() {
            let n = rng.size(rest.len());
            to.handle_input(&rest[..n]).unwrap();
            rest = &rest[n..];
            to_side.drain(to, rng);
        }
    }
    moved
}

/// One side's view of the streams it has seen.
#[derive(Default)]
struct Side {
    received: BTreeMap<StreamId, Vec<u8>>,
    eof: BTreeSet<StreamId>,
    accepted: Vec<StreamId>,
}

impl Side {
    fn drain(&mut self, s: &mut Session, rng: &mut Rng) {
        while let Some(e) = s.poll_event() {
            match e {
                Event::Accepted(id) => self.accepted.push(id),
                Event::Readable(id) | Event::Finished(id) => loop {
                    match s.read(id, rng.size(40_000)).unwrap() {
                        StreamRead::Data(b) => {
                            assert!(!self.eof.contains(&id), "data after Eof on {id}");
                            self.received.entry(id).or_default().extend_from_slice(&b)
                        }
                        StreamRead::Eof => {
                            self.eof.insert(id);
                            break;
                        }
                        StreamRead::Blocked => break,
                    }
                },
                Event::Closed(r) => panic!("session closed: {r}"),
            }
        }
    }
}

fn payload(len: usize, tag: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31) ^ tag).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// For each stream: the client writes `up` in pieces, the server writes `down`;
    /// half the streams are closed by the client first, half by the server. Every
    /// byte must arrive exactly once, in order, and every FIN must become Eof.
    #[test]
    fn back_to_back_sessions_deliver_every_byte(
        streams in proptest::collection::vec(
            (0usize..100_000, 0usize..100_000, any::<bool>()), 1..6),
        seed in any::<u64>(),
        frame_size in prop_oneof![Just(32768usize), 1usize..2000],
    ) {
        let mut rng = Rng(seed | 1);
        let now = Instant::now();
        let cfg = Config { max_frame_size: frame_size, ..Config::keepalive_disabled() };
        let mut client = Session::new(Role::Client, cfg.clone(), now).unwrap();
        let mut server = Session::new(Role::Server, cfg, now).unwrap();
        let mut cs = Side::default();
        let mut ss = Side::default();

        let ids: Vec<StreamId> = streams.iter().map(|_| client.open_stream().unwrap()).collect();
        let up: Vec<Vec<u8>> = streams.iter().enumerate().map(|(i, s)| payload(s.0, i as u8)).collect();
        let down: Vec<Vec<u8>> =
            streams.iter().enumerate().map(|(i, s)| payload(s.1, 0x80 | i as u8)).collect();
        let mut up_off = vec![0usize; ids.len()];
        let mut down_off = vec![0usize; ids.len()];
        let mut client_closed = BTreeSet::new();
        let mut server_closed = BTreeSet::new();

        for _round in 0..10_000 {
            // Client writes a random piece of some stream.
            let i = rng.next() as usize % ids.len();
            if up_off[i] < up[i].len() {
                let n = rng.size(up[i].len() - up_off[i]);
                client.write(ids[i], &up[i][up_off[i]..up_off[i] + n]).unwrap();
                up_off[i] += n;
            }
            // Server writes on streams it has accepted.
            let j = rng.next() as usize % ids.len();
            if ss.accepted.contains(&ids[j]) && down_off[j] < down[j].len()
                && !server_closed.contains(&ids[j])
            {
                let n = rng.size(down[j].len() - down_off[j]);
                server.write(ids[j], &down[j][down_off[j]..down_off[j] + n]).unwrap();
                down_off[j] += n;
            }
            // Closing rules: no half-close, so a side closes only once it has received
            // all the bytes it expects (the other side's FIN, when it comes first, is
            // its Eof). Its own last writes may still be queued: FIN must follow them.
            for (k, &id) in ids.iter().enumerate() {
                let client_first = streams[k].2;
                let c_has_all = cs.received.get(&id).map_or(0, Vec::len) == down[k].len();
                let s_has_all = ss.received.get(&id).map_or(0, Vec::len) == up[k].len();
                if !client_closed.contains(&id) && c_has_all
                    && (client_first || cs.eof.contains(&id))
                {
                    // Write whatever is left and close at once: FIN queued behind data.
                    client.write(id, &up[k][up_off[k]..]).unwrap();
                    up_off[k] = up[k].len();
                    client.close(id).unwrap();
                    client_closed.insert(id);
                }
                if !server_closed.contains(&id) && s_has_all
                    && ss.accepted.contains(&id)
                    && (!client_first || ss.eof.contains(&id))
                {
                    server.write(id, &down[k][down_off[k]..]).unwrap();
                    down_off[k] = down[k].len();
                    server.close(id).unwrap();
                    server_closed.insert(id);
                }
            }
            let a = pump(&mut client, &mut server, &mut ss, &mut rng);
            ss.drain(&mut server, &mut rng);
            let b = pump(&mut server, &mut client, &mut cs, &mut rng);
            cs.drain(&mut client, &mut rng);

            if !a && !b && client_closed.len() == ids.len() && server_closed.len() == ids.len() {
                break;
            }
        }

        prop_assert_eq!(&ss.accepted, &ids);
        for (k, id) in ids.iter().enumerate() {
            prop_assert_eq!(ss.received.get(id).map_or(&[][..], Vec::as_slice), &up[k][..]);
            prop_assert_eq!(cs.received.get(id).map_or(&[][..], Vec::as_slice), &down[k][..]);
            if streams[k].2 {
                prop_assert!(ss.eof.contains(id), "server saw no Eof on {}", id);
            } else {
                prop_assert!(cs.eof.contains(id), "client saw no Eof on {}", id);
            }
        }
        prop_assert_eq!(client.num_streams(), 0);
        prop_assert_eq!(server.num_streams(), 0);
        prop_assert_eq!(client.buffered_total(), 0);
        prop_assert_eq!(server.buffered_total(), 0);
        prop_assert!(!client.is_closed() && !server.is_closed());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes (often starting like real frames) never panic a server session;
    /// it either accepts them or closes with a protocol error, and its counters stay
    /// consistent.
    #[test]
    fn arbitrary_input_never_panics(
        prefix in proptest::collection::vec(arb_frame(), 0..6),
        garbage in proptest::collection::vec(any::<u8>(), 0..200),
        seed in any::<u64>(),
    ) {
        let mut wire = Vec::new();
        for f in &prefix {
            wire.extend_from_slice(&f.to_bytes().unwrap());
        }
        wire.extend_from_slice(&garbage);
        let mut rng = Rng(seed | 1);
        let mut s = Session::new(Role::Server, Config::default(), Instant::now()).unwrap();
        let mut rest = &wire[..];
        while !rest.is_empty() {
            let n = rng.size(rest.len());
            if s.handle_input(&rest[..n]).is_err() {
                prop_assert!(s.is_closed());
                break;
            }
            rest = &rest[n..];
        }
        while let Some(e) = s.poll_event() {
            if let Some(id) = e.stream_id() {
                while let Ok(StreamRead::Data(_)) = s.read(id, usize::MAX) {}
            }
        }
        prop_assert_eq!(s.buffered_total(), 0);
    }
}
