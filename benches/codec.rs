//! ClientMessage codec and data-channel receive path, 1 KiB payloads.
//!
//! * `encode`: `ClientMessage::encode` of an `input_stream_data` / PayloadType Output
//!   message (header, SHA-256 digest, copy).
//! * `decode_verify`: `ClientMessage::decode` of an `output_stream_data` frame,
//!   including the SHA-256 digest check.
//! * `ack_path`: `Channel::handle_frame` (Role::Client) of the next in-sequence
//!   `output_stream_data` frame: decode + verify, ack built (JSON, UUID, encode +
//!   digest) and queued, payload delivered; `poll_transmit` / `poll_event` drained.
//!   The frames are encoded outside the timed section.
//!
//! Each benchmark runs twice, once per throughput unit: group `codec_msgs`
//! (`Throughput::Elements(1)`: messages per second) and group `codec_bytes`
//! (`Throughput::Bytes(1024)`: payload bytes per second).
//!
//! Run: `cargo bench --bench codec`.

use std::cell::Cell;
use std::hint::black_box;
use std::time::{Duration, Instant};

use bastion::proto::channel::{Channel, ChannelConfig, ChannelEvent, Role};
use bastion::proto::kind::{MessageType, PayloadType, header_flags};
use bastion::proto::message::ClientMessage;
use bytes::Bytes;
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use uuid::Uuid;

const PAYLOAD_LEN: usize = 1024;
const T0_MS: u64 = 1_700_000_000_000;

fn message(message_type: MessageType, seq: i64) -> ClientMessage {
    ClientMessage {
        message_type,
        schema_version: 1,
        created_date: T0_MS,
        sequence_number: seq,
        flags: header_flags::DATA,
        message_id: Uuid::from_u128(0xdd01e56b_ff48_483e_a508_b5f073f31b16 + seq as u128),
        payload_type: PayloadType::Output,
        payload: Bytes::from((0..PAYLOAD_LEN).map(|i| i as u8).collect::<Vec<u8>>()),
    }
}

fn bench_group(c: &mut Criterion, name: &str, throughput: Throughput) {
    let mut g = c.benchmark_group(name);
    g.throughput(throughput);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));

    let input = message(MessageType::InputStreamData, 7);
    g.bench_function("encode", |b| b.iter(|| black_box(&input).encode().unwrap()));

    let frame = message(MessageType::OutputStreamData, 7).encode().unwrap();
    g.bench_function("decode_verify", |b| {
        b.iter(|| ClientMessage::decode(black_box(frame.clone())).unwrap())
    });

    g.bench_function("ack_path", |b| {
        let now = Instant::now();
        let mut ch = Channel::new(Role::Client, ChannelConfig::default(), now, T0_MS);
        let next = Cell::new(0i64);
        let template = message(MessageType::OutputStreamData, 0);
        b.iter_batched(
            || {
                let seq = next.get();
                next.set(seq + 1);
                ClientMessage {
                    sequence_number: seq,
                    ..template.clone()
                }
                .encode()
                .unwrap()
            },
            |frame| {
                ch.handle_frame(frame, now).unwrap();
                let ack = ch.poll_transmit().expect("an ack");
                let ev = ch.poll_event().expect("a delivery");
                debug_assert!(matches!(ev, ChannelEvent::Data { .. }));
                debug_assert!(ch.poll_transmit().is_none() && ch.poll_event().is_none());
                (ack, ev)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    bench_group(c, "codec_msgs", Throughput::Elements(1));
    bench_group(c, "codec_bytes", Throughput::Bytes(PAYLOAD_LEN as u64));
}

criterion_group!(benches, codec);
criterion_main!(benches);
