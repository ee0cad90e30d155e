//! Two channel state machines joined by a simulated lossy link (simulated time): every
//! payload is delivered exactly once, in order, whatever the link drops, duplicates,
//! reorders and delays.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use bastion_proto::channel::{Channel, ChannelConfig, ChannelEvent, Role};
use bastion_proto::kind::PayloadType;
use bytes::Bytes;
use proptest::prelude::*;

#[derive(Clone, Debug)]
struct Link {
    drop_pct: u8,
    dup_pct: u8,
    max_delay_ms: u64,
}

/// A deterministic xorshift so each proptest case replays exactly.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pct(&mut self, p: u8) -> bool {
        self.next() % 100 < u64::from(p)
    }
}

struct End {
    chan: Channel,
    to_send: VecDeque<Bytes>,
    received: Vec<Bytes>,
}

fn run(
    seed: u64,
    link: Link,
    a_msgs: Vec<Vec<u8>>,
    b_msgs: Vec<Vec<u8>>,
    window: usize,
) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let cfg = ChannelConfig {
        max_in_flight_messages: window,
        give_up_after: None,
        ..ChannelConfig::default()
    };
    let mut ends = [
        End {
            chan: Channel::new(Role::Client, cfg.clone(), t0, 1),
            to_send: a_msgs.iter().cloned().map(Bytes::from).collect(),
            received: Vec::new(),
        },
        End {
            chan: Channel::new(Role::Agent, cfg, t0, 1),
            to_send: b_msgs.iter().cloned().map(Bytes::from).collect(),
            received: Vec::new(),
        },
    ];
    let mut rng = Rng(seed | 1);
    // (arrival, tie-breaker, destination, frame)
    let mut wire: BinaryHeap<Reverse<(Instant, u64, usize, Bytes)>> = BinaryHeap::new();
    let mut now = t0;
    let mut tie = 0u64;
    let deadline = t0 + Duration::from_secs(3600);

    loop {
        for (i, end) in ends.iter_mut().enumerate() {
            while let Some(p) = end.to_send.front() {
                if !end.chan.can_send(p.len()) {
                    break;
                }
                let p = end.to_send.pop_front().unwrap_or_default();
                end.chan.send(PayloadType::Output, p, now).unwrap();
            }
            while let Some(frame) = end.chan.poll_transmit() {
                let copies = if rng.pct(link.drop_pct) {
                    0
                } else if rng.pct(link.dup_pct) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let delay = Duration::from_millis(rng.next() % (link.max_delay_ms + 1));
                    tie += 1;
                    wire.push(Reverse((now + delay, tie, 1 - i, frame.clone())));
                }
            }
            while let Some(ev) = end.chan.poll_event() {
                match ev {
                    ChannelEvent::Data { payload, .. } => end.received.push(payload),
                    other => prop_assert!(false, "unexpected event {other:?}"),
                }
            }
        }
        let done = ends[0].received.len() == b_msgs.len()
            && ends[1].received.len() == a_msgs.len()
            && ends
                .iter()
                .all(|e| e.to_send.is_empty() && e.chan.in_flight_messages() == 0);
        if done {
            break;
        }
        let next_wire = wire.peek().map(|Reverse((t, ..))| *t);
        let next_timer = ends.iter_mut().filter_map(|e| e.chan.poll_timeout()).min();
        let next = match (next_wire, next_timer) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => {
                prop_assert!(false, "stalled with nothing in flight");
                unreachable!()
            }
        };
        prop_assert!(
            next < deadline,
            "did not converge within an hour of simulated time"
        );
        now = now.max(next);
        while let Some(Reverse((t, ..))) = wire.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, _, dest, frame))) = wire.pop() else {
                break;
            };
            ends[dest].chan.handle_frame(frame, now).unwrap();
        }
        for end in ends.iter_mut() {
            end.chan.handle_timeout(now);
        }
    }
    let got_b: Vec<Vec<u8>> = ends[1].received.iter().map(|b| b.to_vec()).collect();
    let got_a: Vec<Vec<u8>> = ends[0].received.iter().map(|b| b.to_vec()).collect();
    prop_assert_eq!(got_b, a_msgs);
    prop_assert_eq!(got_a, b_msgs);
    Ok(())
}

fn payloads() -> impl Strategy<Value = Vec<Vec<u8>>> {
    prop::collection::vec(prop::collection::vec(any::<u8>(), 1..64), 0..60)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    #[test]
    fn exactly_once_in_order_over_a_lossy_link(
        seed in any::<u64>(),
        drop_pct in 0u8..35,
        dup_pct in 0u8..35,
        max_delay_ms in 0u64..300,
        window in 1usize..64,
        a in payloads(),
        b in payloads(),
    ) {
        run(seed, Link { drop_pct, dup_pct, max_delay_ms }, a, b, window)?;
    }
}

#[test]
fn heavy_loss_still_converges() {
    let msgs: Vec<Vec<u8>> = (0..500u32).map(|i| i.to_be_bytes().to_vec()).collect();
    run(
        42,
        Link {
            drop_pct: 50,
            dup_pct: 20,
            max_delay_ms: 500,
        },
        msgs.clone(),
        msgs,
        256,
    )
    .unwrap();
}
