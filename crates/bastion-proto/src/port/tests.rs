//! `PortSession` in simulated time against an agent made of the channel and smux
//! (server role) driven by hand.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Value, json};

use super::*;
use crate::channel::{Channel, ChannelConfig, ChannelEvent, Role};
use crate::kind::PayloadType;
use crate::session::ClientConfig;

const MUX_AGENT: &str = "3.3.987.0";
const BASIC_AGENT: &str = "3.0.196.0";

/// The agent: its channel, and in mux mode its smux server.
struct Agent {
    chan: Channel,
    smux: Option<smux::Session>,
    /// Basic mode: the stream bytes received.
    received: Vec<u8>,
    flags: Vec<Flag>,
}

impl Agent {
    fn send_json(&mut self, pt: PayloadType, v: &Value, now: Instant) {
        self.chan
            .send(pt, Bytes::from(serde_json::to_vec(v).unwrap()), now)
            .unwrap();
    }

    /// Takes what the channel delivered: smux input, basic bytes, flags.
    fn absorb(&mut self) {
        while let Some(ev) = self.chan.poll_event() {
            if let ChannelEvent::Data {
                payload_type,
                payload,
                ..
            } = ev
            {
                match payload_type {
                    PayloadType::Output => match &mut self.smux {
                        Some(s) => s.handle_input(&payload).unwrap(),
                        None => self.received.extend_from_slice(&payload),
                    },
                    PayloadType::Flag => {
                        let v = u32::from_be_bytes(payload[..4].try_into().unwrap());
                        self.flags.push(Flag::from_u32(v).unwrap());
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends bytes to the client: in mux mode on smux stream `id`.
    fn send(&mut self, id: Option<u32>, data: &[u8], now: Instant) {
        match (&mut self.smux, id) {
            (Some(s), Some(id)) => {
                s.write(StreamId(id), data).unwrap();
                while let Some(chunk) = s.poll_transmit(1024) {
                    self.chan.send(PayloadType::Output, chunk, now).unwrap();
                }
            }
            _ => {
                for c in data.chunks(1024) {
                    self.chan
                        .send(PayloadType::Output, Bytes::copy_from_slice(c), now)
                        .unwrap();
                }
            }
        }
    }

    /// What smux stream `id` received so far.
    fn read_stream(&mut self, id: u32) -> (Vec<u8>, bool) {
        let s = self.smux.as_mut().unwrap();
        let mut out = Vec::new();
        loop {
            match s.read(StreamId(id), usize::MAX) {
                Ok(StreamRead::Data(b)) => out.extend_from_slice(&b),
                Ok(StreamRead::Blocked) => return (out, false),
                Ok(StreamRead::Eof) | Err(_) => return (out, true),
            }
        }
    }
}

fn port_request(agent_version: &str, session_type: &str) -> Value {
    json!({"AgentVersion": agent_version, "RequestedClientActions": [
        {"ActionType": "SessionType", "ActionParameters": {"SessionType": session_type,
         "Properties": {"portNumber": "5432", "type": "LocalPortForwarding",
                        "host": "db.example", "localPortNumber": "0"}}}]})
}

/// A session through its handshake with an agent of `agent_version`.
fn ready_session(agent_version: &str, session_type: &str) -> (ClientSession, Agent, Instant) {
    let now = Instant::now();
    let mut c = ClientSession::new(ClientConfig::new("s-1", "i-1"), now, 1);
    let mut a = Agent {
        chan: Channel::new(Role::Agent, ChannelConfig::default(), now, 1),
        smux: None,
        received: Vec::new(),
        flags: Vec::new(),
    };
    a.send_json(
        PayloadType::HandshakeRequest,
        &port_request(agent_version, session_type),
        now,
    );
    for _ in 0..3 {
        while let Some(f) = a.chan.poll_transmit() {
            c.handle_frame(f, now).unwrap();
        }
        while let Some(f) = c.poll_transmit() {
            a.chan.handle_frame(f, now).unwrap();
        }
    }
    while a.chan.poll_event().is_some() {}
    a.send_json(
        PayloadType::HandshakeComplete,
        &json!({"HandshakeTimeToComplete": 1_000_000, "CustomerMessage": ""}),
        now,
    );
    while let Some(f) = a.chan.poll_transmit() {
        c.handle_frame(f, now).unwrap();
    }
    assert!(c.is_ready() || session_type != "Port");
    (c, a, now)
}

fn port(agent_version: &str) -> (PortSession, Agent, Instant) {
    let (c, mut a, now) = ready_session(agent_version, "Port");
    let p = PortSession::new(c, PortConfig::default(), now).unwrap();
    if p.is_mux() {
        a.smux = Some(
            smux::Session::new(
                smux::Role::Server,
                smux::Config::for_ssm(p.info().agent_disables_smux_keepalive),
                now,
            )
            .unwrap(),
        );
    }
    (p, a, now)
}

/// Moves frames both ways until nothing moves.
fn shuttle(p: &mut PortSession, a: &mut Agent, now: Instant) {
    for _ in 0..100 {
        let mut moved = false;
        while let Some(f) = p.poll_transmit(now) {
            a.chan.handle_frame(f, now).unwrap();
            moved = true;
        }
        a.absorb();
        while let Some(f) = a.chan.poll_transmit() {
            p.handle_frame(now, f).unwrap();
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

fn events(p: &mut PortSession) -> Vec<PortEvent> {
    std::iter::from_fn(|| p.poll_event()).collect()
}

/// Reads a connection until it blocks or ends: (bytes, ended).
fn read_all(p: &mut PortSession, key: StreamKey, now: Instant) -> (Vec<u8>, bool) {
    let mut out = Vec::new();
    loop {
        match p.read(key, 16 * 1024, now) {
            StreamRead::Data(b) => out.extend_from_slice(&b),
            StreamRead::Blocked => return (out, false),
            StreamRead::Eof => return (out, true),
        }
    }
}

#[test]
fn the_agent_version_selects_mux_or_basic_and_shells_are_refused() {
    assert!(port(MUX_AGENT).0.is_mux());
    assert!(!port(BASIC_AGENT).0.is_mux());
    let (c, _, now) = ready_session(MUX_AGENT, "Standard_Stream");
    assert!(matches!(
        PortSession::new(c, PortConfig::default(), now),
        Err(PortError::NotPortForwarding(t)) if t == "Standard_Stream"
    ));
    let now = Instant::now();
    let fresh = ClientSession::new(ClientConfig::new("s", "t"), now, 1);
    assert_eq!(
        PortSession::new(fresh, PortConfig::default(), now).err(),
        Some(PortError::NotReady)
    );
}

#[test]
fn mux_connections_carry_bytes_both_ways_on_their_own_streams() {
    let (mut p, mut a, now) = port(MUX_AGENT);
    let one = p.open_stream(now).unwrap();
    let two = p.open_stream(now).unwrap();
    assert_ne!(one, two);
    p.write(one, Bytes::from_static(b"SELECT 1")).unwrap();
    p.write(two, Bytes::from(vec![7u8; 5000])).unwrap();
    shuttle(&mut p, &mut a, now);
    assert_eq!(a.read_stream(one).0, b"SELECT 1");
    assert_eq!(a.read_stream(two).0, vec![7u8; 5000]);

    a.send(Some(two), b"row", now);
    shuttle(&mut p, &mut a, now);
    assert_eq!(events(&mut p), vec![PortEvent::Readable(two)]);
    assert_eq!(read_all(&mut p, two, now), (b"row".to_vec(), false));
    assert_eq!(read_all(&mut p, one, now), (Vec::new(), false));
    let s = p.stats();
    assert_eq!((s.open_streams, s.total_streams), (2, 2));
    assert_eq!(s.bytes_up, 5008);
}

#[test]
fn a_remote_fin_ends_the_connection_after_its_data() {
    let (mut p, mut a, now) = port(MUX_AGENT);
    let id = p.open_stream(now).unwrap();
    p.write(id, Bytes::from_static(b"q")).unwrap();
    shuttle(&mut p, &mut a, now);
    a.send(Some(id), b"last words", now);
    a.smux.as_mut().unwrap().close(StreamId(id)).unwrap();
    while let Some(chunk) = a.smux.as_mut().unwrap().poll_transmit(1024) {
        a.chan.send(PayloadType::Output, chunk, now).unwrap();
    }
    shuttle(&mut p, &mut a, now);
    assert!(events(&mut p).contains(&PortEvent::Readable(id)));
    assert_eq!(read_all(&mut p, id, now), (b"last words".to_vec(), true));
    assert_eq!(p.stats().open_streams, 0);
    assert_eq!(p.read(id, 10, now), StreamRead::Eof, "forgotten");
}

#[test]
fn a_half_closed_connection_keeps_receiving_until_the_remote_is_quiet_for_the_linger() {
    let (mut p, mut a, t0) = port(MUX_AGENT);
    let linger = PortConfig::default().half_close_linger;
    let id = p.open_stream(t0).unwrap();
    p.write(id, Bytes::from_static(b"COPY ... FROM STDIN"))
        .unwrap();
    p.finish(id, t0);
    shuttle(&mut p, &mut a, t0);
    // No FIN yet: the agent would close its TCP connection and lose the reply.
    assert_eq!(a.read_stream(id), (b"COPY ... FROM STDIN".to_vec(), false));

    // The reply arrives 2 s later: the linger counts from it.
    let t1 = t0 + Duration::from_secs(2);
    a.send(Some(id), b"COPY 3", t1);
    shuttle(&mut p, &mut a, t1);
    assert_eq!(read_all(&mut p, id, t1), (b"COPY 3".to_vec(), false));
    assert_eq!(
        p.poll_timeout().map(|t| t.min(t1 + linger)),
        Some(t1 + linger)
    );
    p.handle_timeout(t1 + linger - Duration::from_millis(1));
    assert!(!events(&mut p).contains(&PortEvent::Closed(id)));

    p.handle_timeout(t1 + linger);
    assert!(events(&mut p).contains(&PortEvent::Closed(id)));
    shuttle(&mut p, &mut a, t1 + linger);
    assert!(a.read_stream(id).1, "the FIN reached the agent");
    assert_eq!(p.stats().open_streams, 0);
}

#[test]
fn a_connection_nobody_reads_closes_at_once() {
    let (mut p, mut a, now) = port(MUX_AGENT);
    let id = p.open_stream(now).unwrap();
    p.write(id, Bytes::from_static(b"x")).unwrap();
    p.close(id, now);
    shuttle(&mut p, &mut a, now);
    assert_eq!(a.read_stream(id), (b"x".to_vec(), true));
    assert!(matches!(p.write(id, Bytes::from_static(b"y")), Err(UnknownStream(k)) if k == id));
}

/// A mux session with `config`, and its agent.
fn port_with(config: PortConfig) -> (PortSession, Agent, Instant) {
    let (c, mut a, now) = ready_session(MUX_AGENT, "Port");
    let p = PortSession::new(c, config, now).unwrap();
    a.smux =
        Some(smux::Session::new(smux::Role::Server, smux::Config::for_ssm(true), now).unwrap());
    (p, a, now)
}

#[test]
fn uploads_stop_at_the_pending_limit() {
    let (mut p, _a, now) = port_with(PortConfig {
        max_pending_upload: 8 * 1024,
        ..PortConfig::default()
    });
    let id = p.open_stream(now).unwrap();
    // Nothing is acknowledged and the channel window takes 4 MiB: fill it; then the
    // bytes wait in smux until upload_room turns false.
    let mut written = 0;
    while p.upload_room() {
        p.write(id, Bytes::from(vec![1u8; 64 * 1024])).unwrap();
        written += 64 * 1024;
        while p.poll_transmit(now).is_some() {}
        assert!(written < 16 << 20, "upload_room never turned false");
    }
    assert!(p.pending_upload() >= 8 * 1024);
    assert!(written >= 4 << 20, "the window took its 4 MiB first");
}

#[test]
fn downloads_stop_at_the_receive_buffer_until_read() {
    let (mut p, mut a, now) = port_with(PortConfig {
        smux_receive_buffer: 64 * 1024,
        ..PortConfig::default()
    });
    let id = p.open_stream(now).unwrap();
    p.write(id, Bytes::from_static(b"go")).unwrap();
    shuttle(&mut p, &mut a, now);
    assert!(p.wants_input());
    // 100 KiB for a connection that reads nothing exceed the 64 KiB buffer.
    a.send(Some(id), &vec![2u8; 100 * 1024], now);
    shuttle(&mut p, &mut a, now);
    assert!(!p.wants_input(), "the receive buffer is full");
    let (got, _) = read_all(&mut p, id, now);
    assert_eq!(got, vec![2u8; 100 * 1024]);
    assert!(p.wants_input(), "reading made room");
}

#[test]
fn basic_mode_carries_one_connection_at_a_time_and_disconnects_after_its_data() {
    let (mut p, mut a, now) = port(BASIC_AGENT);
    let first = p.open_stream(now).unwrap();
    assert_eq!(p.open_stream(now), Err(OpenError::BasicBusy));
    assert!(!p.can_open());
    p.write(first, Bytes::from(vec![3u8; 3000])).unwrap();
    p.finish(first, now);
    shuttle(&mut p, &mut a, now);
    assert_eq!(a.received, vec![3u8; 3000]);
    assert_eq!(
        a.flags,
        vec![Flag::DisconnectToPort],
        "after the data, once"
    );
    assert!(p.can_open());

    let second = p.open_stream(now).unwrap();
    assert_ne!(first, second);
    a.send(None, b"hello", now);
    shuttle(&mut p, &mut a, now);
    assert_eq!(events(&mut p), vec![PortEvent::Readable(second)]);
    assert_eq!(read_all(&mut p, second, now), (b"hello".to_vec(), false));
}

#[test]
fn basic_mode_refuses_output_while_no_connection_is_open() {
    let (mut p, mut a, now) = port(BASIC_AGENT);
    // The agent sends before any local connection: not acknowledged, not delivered
    // ([P] drops it until a client connects; the agent resends).
    a.send(None, b"early", now);
    shuttle(&mut p, &mut a, now);
    assert_eq!(a.chan.in_flight_messages(), 1, "unacknowledged");
    let id = p.open_stream(now).unwrap();
    // The agent's resend timer brings it now.
    let later = now + Duration::from_secs(1);
    a.chan.handle_timeout(later);
    shuttle(&mut p, &mut a, later);
    assert_eq!(read_all(&mut p, id, later), (b"early".to_vec(), false));
    assert_eq!(a.chan.in_flight_messages(), 0);
}

#[test]
fn a_new_connection_on_a_quiet_websocket_probes_it_and_silence_is_death() {
    let (mut p, mut a, t0) = port(MUX_AGENT);
    shuttle(&mut p, &mut a, t0);
    let _ = events(&mut p);
    let t1 = t0 + Duration::from_secs(6);
    let _id = p.open_stream(t1).unwrap();
    assert_eq!(events(&mut p), vec![PortEvent::Ping(PingKind::Probe)]);
    let due = t1 + Duration::from_secs(5);
    p.handle_timeout(due);
    assert!(
        events(&mut p).contains(&PortEvent::WebsocketDead(DeadReason::ProbeUnanswered)),
        "no frame answered the probe"
    );
}

#[test]
fn an_answered_probe_and_a_blocked_writer_are_not_death() {
    let (mut p, mut a, t0) = port(MUX_AGENT);
    shuttle(&mut p, &mut a, t0);
    let t1 = t0 + Duration::from_secs(6);
    p.open_stream(t1).unwrap();
    p.on_traffic(t1 + Duration::from_millis(20)); // the pong
    p.handle_timeout(t1 + Duration::from_secs(5));
    assert!(
        !events(&mut p)
            .iter()
            .any(|e| matches!(e, PortEvent::WebsocketDead(_)))
    );

    // Our writer is stuck behind a full socket for a minute: keepalives only.
    let mut t = t1;
    for _ in 0..60 {
        t += Duration::from_secs(1);
        p.set_writer_blocked(t, true);
        p.handle_timeout(t);
    }
    assert!(
        !events(&mut p)
            .iter()
            .any(|e| matches!(e, PortEvent::WebsocketDead(_)))
    );
}

#[test]
fn the_end_is_reported_and_no_connection_opens_after_it() {
    let (mut p, mut a, now) = port(MUX_AGENT);
    let cc = crate::payload::ChannelClosed {
        session_id: "s-1".into(),
        output: "Session terminated".into(),
        message_type: "channel_closed".into(),
        ..crate::payload::ChannelClosed::default()
    };
    let msg = crate::message::ClientMessage {
        message_type: crate::kind::MessageType::ChannelClosed,
        schema_version: 1,
        created_date: 1,
        sequence_number: 0,
        flags: 3,
        message_id: uuid::Uuid::new_v4(),
        payload_type: PayloadType::Undefined,
        payload: Bytes::from(crate::payload::to_json(&cc)),
    };
    p.handle_frame(now, msg.encode().unwrap()).unwrap();
    shuttle(&mut p, &mut a, now);
    let end = p.end();
    assert_eq!(
        end,
        Some(PortEnd::ChannelClosed {
            output: "Session terminated".into()
        })
    );
    assert!(matches!(p.open_stream(now), Err(OpenError::Ended(_))));
}
