//! Agent rules checked one by one with hand-built client frames (no `proto::channel` or
//! `proto::session`, so that each test states the agent rule it checks).

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use uuid::Uuid;

use super::{AgentConfig, AgentExit, ExitReason, SessionKind, run_agent};
use crate::report::{SessionReport, ViolationKind};
use bastion_proto::kind::{Flag, MessageType, PayloadType};
use bastion_proto::message::{ClientMessage, PAYLOAD_DIGEST_OFFSET};
use bastion_proto::payload::{
    AcknowledgeContent, ActionStatus, HandshakeComplete, HandshakeRequest, HandshakeResponse,
    ProcessedClientAction, from_json, to_json,
};
use bastion_proto::smux::{Frame, FrameDecoder, StreamId};

const WAIT: Duration = Duration::from_secs(20);
const NEW_CLIENT: &str = "1.2.650.0";

fn port_cfg(props: Value) -> AgentConfig {
    AgentConfig {
        kind: SessionKind::Port { properties: props },
        ..AgentConfig::default()
    }
}

fn local_props(port: u16) -> Value {
    json!({"portNumber": port.to_string(), "type": "LocalPortForwarding", "localPortNumber": "0"})
}

fn msg(
    message_type: MessageType,
    seq: i64,
    flags: u64,
    pt: PayloadType,
    payload: &[u8],
) -> ClientMessage {
    ClientMessage {
        message_type,
        schema_version: 1,
        created_date: 1_700_000_000_000,
        sequence_number: seq,
        flags,
        message_id: Uuid::new_v4(),
        payload_type: pt,
        payload: Bytes::copy_from_slice(payload),
    }
}

fn input(seq: i64, pt: PayloadType, payload: &[u8]) -> ClientMessage {
    msg(MessageType::InputStreamData, seq, 0, pt, payload)
}

/// The acknowledge the plugin sends for `m` ([P] `SerializeClientMessageWithAcknowledgeContent`).
fn ack_for(m: &ClientMessage) -> ClientMessage {
    let c = AcknowledgeContent {
        message_type: m.message_type.as_str().to_owned(),
        message_id: m.message_id.to_string(),
        sequence_number: m.sequence_number,
        is_sequential_message: true,
    };
    msg(
        MessageType::Acknowledge,
        0,
        3,
        PayloadType::Undefined,
        &to_json(&c),
    )
}

fn response(version: &str, status: ActionStatus, error: &str) -> Vec<u8> {
    to_json(&HandshakeResponse {
        client_version: version.to_owned(),
        processed_client_actions: vec![ProcessedClientAction {
            action_type: "SessionType".into(),
            action_status: status,
            action_result: Value::Null,
            error: error.into(),
        }],
        errors: None,
    })
}

fn smux(cmd: u8, sid: u32, data: &[u8]) -> Vec<u8> {
    let mut v = vec![1, cmd];
    v.extend_from_slice(&(data.len() as u16).to_le_bytes());
    v.extend_from_slice(&sid.to_le_bytes());
    v.extend_from_slice(data);
    v
}
const SYN: u8 = 0;
const FIN: u8 = 1;
const PSH: u8 = 2;

/// A hand-driven client: sends frames, collects the agent's acks and stream data (new
/// sequence numbers only, in arrival order), and acks stream data when `auto_ack`.
struct Client {
    to_agent: Option<mpsc::Sender<Bytes>>,
    from_agent: mpsc::Receiver<Bytes>,
    report: Arc<SessionReport>,
    agent: Option<JoinHandle<AgentExit>>,
    next_seq: i64,
    seen: HashSet<i64>,
    stream: VecDeque<ClientMessage>,
    acks: VecDeque<AcknowledgeContent>,
    auto_ack: bool,
    resends: Vec<(i64, Instant)>,
    smux_in: FrameDecoder,
}

impl Client {
    fn start(cfg: AgentConfig) -> Client {
        let (to_agent, from_client) = mpsc::channel(8);
        let (to_client, from_agent) = mpsc::channel(4096);
        let report = Arc::new(SessionReport::default());
        let agent = tokio::spawn(run_agent(
            cfg,
            "sess-1".into(),
            report.clone(),
            from_client,
            to_client,
        ));
        Client {
            to_agent: Some(to_agent),
            from_agent,
            report,
            agent: Some(agent),
            next_seq: 0,
            seen: HashSet::new(),
            stream: VecDeque::new(),
            acks: VecDeque::new(),
            auto_ack: true,
            resends: Vec::new(),
            smux_in: FrameDecoder::new(),
        }
    }

    async fn send_frame(&mut self, b: Bytes) {
        let tx = self.to_agent.as_ref().expect("input open");
        tokio::time::timeout(WAIT, tx.send(b))
            .await
            .expect("agent takes input")
            .expect("agent alive");
    }

    async fn send(&mut self, m: &ClientMessage) {
        self.send_frame(m.encode().unwrap()).await;
    }

    /// Sends the next input_stream_data; returns it.
    async fn data(&mut self, pt: PayloadType, payload: &[u8]) -> ClientMessage {
        let m = input(self.next_seq, pt, payload);
        self.next_seq += 1;
        self.send(&m).await;
        m
    }

    async fn flag(&mut self, f: Flag) -> ClientMessage {
        self.data(PayloadType::Flag, &f.to_payload()).await
    }

    /// Receives and files one frame; false on timeout or end of the agent.
    async fn pump(&mut self, wait: Duration) -> bool {
        let Ok(Some(frame)) = tokio::time::timeout(wait, self.from_agent.recv()).await else {
            return false;
        };
        let m = ClientMessage::decode(frame).expect("agent frames decode");
        match m.message_type {
            MessageType::Acknowledge => {
                assert_eq!(
                    (m.flags, m.sequence_number, m.payload_type.as_u32()),
                    (3, 0, 0)
                );
                self.acks.push_back(from_json("ack", &m.payload).unwrap());
            }
            MessageType::OutputStreamData => {
                let expected_flags = if m.sequence_number == 0 { 1 } else { 0 };
                assert_eq!(
                    m.flags, expected_flags,
                    "Flags of seq {}",
                    m.sequence_number
                );
                if self.auto_ack {
                    self.send(&ack_for(&m)).await;
                }
                if self.seen.insert(m.sequence_number) {
                    self.stream.push_back(m);
                } else {
                    self.resends.push((m.sequence_number, Instant::now()));
                }
            }
            other => panic!("agent sent {other}"),
        }
        true
    }

    async fn next_stream(&mut self) -> ClientMessage {
        loop {
            if let Some(m) = self.stream.pop_front() {
                return m;
            }
            assert!(self.pump(WAIT).await, "no stream data from the agent");
        }
    }

    async fn next_ack(&mut self) -> AcknowledgeContent {
        loop {
            if let Some(a) = self.acks.pop_front() {
                return a;
            }
            assert!(self.pump(WAIT).await, "no ack from the agent");
        }
    }

    async fn expect_ack(&mut self, m: &ClientMessage) {
        let a = self.next_ack().await;
        assert_eq!(a.sequence_number, m.sequence_number);
        assert_eq!(a.message_id, m.message_id.to_string());
        assert_eq!(a.message_type, "input_stream_data");
        assert!(a.is_sequential_message);
    }

    /// Sends `m` and retransmits it every 200 ms until it is acked, as the plugin does
    /// while the agent's handler is not ready.
    async fn send_until_acked(&mut self, m: &ClientMessage) {
        for _ in 0..100 {
            self.send(m).await;
            let until = Instant::now() + Duration::from_millis(200);
            while Instant::now() < until {
                if let Some(i) = self
                    .acks
                    .iter()
                    .position(|a| a.sequence_number == m.sequence_number)
                {
                    self.acks.remove(i);
                    return;
                }
                let left = until.saturating_duration_since(Instant::now());
                if !self.pump(left).await {
                    break;
                }
            }
        }
        panic!("seq {} never acked", m.sequence_number);
    }

    /// No ack within `wait` (stream data is filed meanwhile).
    async fn expect_no_ack(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while self.acks.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || !self.pump(left).await {
                break;
            }
        }
        assert!(self.acks.is_empty(), "unexpected ack {:?}", self.acks);
    }

    async fn handshake(&mut self, client_version: &str) -> HandshakeRequest {
        let req = self.next_stream().await;
        assert_eq!(req.payload_type, PayloadType::HandshakeRequest);
        assert_eq!((req.sequence_number, req.flags), (0, 1));
        let parsed: HandshakeRequest = from_json("req", &req.payload).unwrap();
        let r = self
            .data(
                PayloadType::HandshakeResponse,
                &response(client_version, ActionStatus::Success, ""),
            )
            .await;
        self.expect_ack(&r).await;
        let done = self.next_stream().await;
        assert_eq!(done.payload_type, PayloadType::HandshakeComplete);
        assert_eq!(done.sequence_number, 1);
        let c: HandshakeComplete = from_json("complete", &done.payload).unwrap();
        assert_eq!(c.customer_message, "");
        assert!(c.handshake_time_to_complete_ns >= 0);
        parsed
    }

    /// The next smux frame the agent sends (from Output stream data, in order).
    async fn smux_frame(&mut self) -> Frame {
        loop {
            if let Some(f) = self.smux_in.next_frame().unwrap() {
                return f;
            }
            let m = self.next_stream().await;
            assert_eq!(m.payload_type, PayloadType::Output, "{m:?}");
            assert!(m.payload.len() <= 1024);
            self.smux_in.push(&m.payload);
        }
    }

    /// Waits for the agent to end, acking meanwhile.
    async fn exit(&mut self) -> AgentExit {
        let mut agent = self.agent.take().expect("agent running");
        loop {
            tokio::select! {
                r = &mut agent => return r.expect("agent task"),
                got = self.pump(WAIT) => if !got {
                    return tokio::time::timeout(WAIT, agent).await.expect("agent ends").unwrap();
                },
            }
        }
    }

    fn violations(&self, kind: ViolationKind) -> usize {
        self.report
            .violations()
            .iter()
            .filter(|v| v.kind == kind)
            .count()
    }

    fn assert_no_violations(&self) {
        let v = self.report.violations();
        assert!(v.is_empty(), "violations: {v:#?}");
    }
}

/// A TCP echo server; returns its port.
async fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    port
}

async fn refused_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

// ------------------------------------------------------------------------ handshake

#[tokio::test]
async fn handshake_request_matches_the_golden_payload() {
    // golden `agent_handshake_request`: the agent's exact bytes (sorted property keys).
    let golden = r#"{"AgentVersion":"3.3.987.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"host":"mydb.cluster-abc.eu-west-1.rds.amazonaws.com","localPortNumber":"0","portNumber":"5432","type":"LocalPortForwarding"}}}]}"#;
    let mut c = Client::start(port_cfg(
        json!({"type":"LocalPortForwarding","portNumber":"5432",
        "localPortNumber":"0","host":"mydb.cluster-abc.eu-west-1.rds.amazonaws.com"}),
    ));
    let req = c.next_stream().await;
    assert_eq!(req.payload_type, PayloadType::HandshakeRequest);
    assert_eq!(std::str::from_utf8(&req.payload).unwrap(), golden);
    assert_eq!(req.schema_version, 1);
}

#[tokio::test]
async fn data_before_handshake_complete_is_acked_discarded_and_flagged() {
    let port = echo_server().await;
    let mut c = Client::start(port_cfg(local_props(port)));
    let _req = c.next_stream().await;
    // A smux SYN sent too early: acked, then thrown away.
    let early = c.data(PayloadType::Output, &smux(SYN, 3, b"")).await;
    c.expect_ack(&early).await;
    assert_eq!(c.violations(ViolationKind::DataBeforeHandshakeComplete), 1);
    let r = c
        .data(
            PayloadType::HandshakeResponse,
            &response(NEW_CLIENT, ActionStatus::Success, ""),
        )
        .await;
    c.expect_ack(&r).await;
    assert_eq!(
        c.next_stream().await.payload_type,
        PayloadType::HandshakeComplete
    );
    // The SYN was lost: stream 3 is unknown, so PSH for it is dropped and nothing echoes.
    c.data(PayloadType::Output, &smux(PSH, 3, b"lost")).await;
    c.next_ack().await;
    while c.pump(Duration::from_millis(300)).await {}
    assert!(c.stream.is_empty(), "{:?}", c.stream);
    assert_eq!(c.report.counters().streams_opened, 0);
}

#[tokio::test(start_paused = true)]
async fn handshake_times_out_after_15_s() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.auto_ack = false;
    let t0 = Instant::now();
    let _req = c.next_stream().await;
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::HandshakeTimeout);
    assert_eq!(
        exit.output,
        "Encountered error while initiating handshake. Handshake timed out. Please ensure that \
         you have the latest version of the session manager plugin."
    );
    // 15 s, then up to 2 s for the unacked HandshakeRequest.
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(15) && took <= Duration::from_secs(18),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn handshake_delay_knob_delays_the_request() {
    let mut cfg = port_cfg(local_props(1));
    cfg.handshake_delay = Duration::from_secs(3);
    let t0 = Instant::now();
    let mut c = Client::start(cfg);
    let _req = c.next_stream().await;
    assert!(t0.elapsed() >= Duration::from_secs(3));
}

#[tokio::test]
async fn failed_session_type_action_fails_the_session_with_the_agent_text() {
    let mut c = Client::start(port_cfg(local_props(1)));
    let _req = c.next_stream().await;
    let r = c
        .data(
            PayloadType::HandshakeResponse,
            &response(NEW_CLIENT, ActionStatus::Failed, "Unknown session type"),
        )
        .await;
    c.expect_ack(&r).await; // the agent's handler returns nil: the response is acked
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::HandshakeFailed);
    assert_eq!(
        exit.output,
        "Encountered error while initiating handshake. SessionType failed on client with \
         status 2 error: Unknown session type"
    );
    assert_eq!(c.violations(ViolationKind::BadHandshakeResponse), 1);
}

#[tokio::test]
async fn malformed_handshake_response_is_not_acked() {
    let mut c = Client::start(port_cfg(local_props(1)));
    let _req = c.next_stream().await;
    c.data(PayloadType::HandshakeResponse, b"{not json").await;
    c.expect_no_ack(Duration::from_millis(300)).await;
    assert_eq!(c.violations(ViolationKind::BadHandshakeResponse), 1);
}

// --------------------------------------------------------------- reliability layer

#[tokio::test]
async fn acks_every_message_and_reacks_duplicates() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    let nop = smux(3, 0, b"");
    let a = c.data(PayloadType::Output, &nop).await;
    c.expect_ack(&a).await;
    let b = c.data(PayloadType::Output, &nop).await;
    c.expect_ack(&b).await;
    // A retransmission of an already processed message: "Resending acknowledge".
    c.send(&a).await;
    c.expect_ack(&a).await;
    let k = c.report.counters();
    assert_eq!(k.duplicates_from_client, 1);
    assert_eq!(k.data_messages_from_client, 4); // response + 2 + duplicate
    assert_eq!(k.acks_to_client, 4);
    c.assert_no_violations();
}

/// The ack-delay knob: every ack (re-acks too) leaves no earlier than the delay after
/// its message arrived, in order, while the message itself is processed at once (the
/// HandshakeComplete that answers a HandshakeResponse is not held); a change of the knob
/// applies to the next message. Simulated time: the agent's timers are exact.
#[tokio::test(start_paused = true)]
async fn ack_delay_knob_delays_every_ack_but_nothing_else() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let delay_ms = Arc::new(AtomicU64::new(50));
    let knob = delay_ms.clone();
    let mut cfg = port_cfg(local_props(1));
    cfg.ack_delay =
        super::AckDelay::live(move || Duration::from_millis(knob.load(Ordering::SeqCst)));
    let delay = Duration::from_millis(50);
    let mut c = Client::start(cfg);
    let _req = c.next_stream().await;
    let t0 = Instant::now();
    let r = c
        .data(
            PayloadType::HandshakeResponse,
            &response(NEW_CLIENT, ActionStatus::Success, ""),
        )
        .await;
    // Processed at once: HandshakeComplete comes before the ack of the response.
    let done = c.next_stream().await;
    assert_eq!(done.payload_type, PayloadType::HandshakeComplete);
    assert!(
        c.acks.is_empty(),
        "ack before HandshakeComplete: {:?}",
        c.acks
    );
    assert!(t0.elapsed() < delay, "{:?}", t0.elapsed());
    c.expect_ack(&r).await;
    assert!(t0.elapsed() >= delay, "ack after {:?}", t0.elapsed());

    // Three messages 10 ms apart: each ack no earlier than 50 ms after its message.
    let nop = smux(3, 0, b"");
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push((c.data(PayloadType::Output, &nop).await, Instant::now()));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for (m, at) in &sent {
        c.expect_ack(m).await;
        assert!(
            at.elapsed() >= delay,
            "seq {} acked after {:?}",
            m.sequence_number,
            at.elapsed()
        );
    }
    // A duplicate's re-ack is delayed as well.
    let at = Instant::now();
    c.send(&sent[0].0).await;
    c.expect_ack(&sent[0].0).await;
    assert!(at.elapsed() >= delay, "re-ack after {:?}", at.elapsed());

    // Knob back to 0: the next ack is immediate.
    delay_ms.store(0, Ordering::SeqCst);
    let at = Instant::now();
    let m = c.data(PayloadType::Output, &nop).await;
    c.expect_ack(&m).await;
    assert!(at.elapsed() < delay, "ack after {:?}", at.elapsed());
    assert_eq!(c.report.counters().acks_to_client, 6);
    c.assert_no_violations();
}

#[tokio::test]
async fn out_of_order_messages_are_acked_buffered_and_processed_in_order() {
    let port = refused_port().await;
    let mut c = Client::start(port_cfg(local_props(port)));
    c.handshake(NEW_CLIENT).await;
    // An smux SYN for stream 3 cut in two; the second half arrives first.
    let syn = smux(SYN, 3, b"");
    let first = input(1, PayloadType::Output, &syn[..5]);
    let second = input(2, PayloadType::Output, &syn[5..]);
    c.next_seq = 3;
    c.send(&second).await;
    c.expect_ack(&second).await; // acked at once although not processed
    c.send(&first).await;
    c.expect_ack(&first).await;
    // Reassembled in order: the SYN opens the stream, the dial is refused.
    let flag = c.next_stream().await;
    assert_eq!(flag.payload_type, PayloadType::Flag);
    assert_eq!(c.report.counters().out_of_order_from_client, 1);
    assert_eq!(c.report.counters().streams_opened, 1);
    c.assert_no_violations();
}

#[tokio::test(start_paused = true)]
async fn resends_only_the_oldest_unacked_message_after_the_rto() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.auto_ack = false;
    let t0 = Instant::now();
    let req = c.next_stream().await;
    // The HandshakeRequest is not acked: resent on the first 100 ms tick where
    // now - lastSent > 200 ms (t = 300 ms), then once per RTO (t = 600 ms, …).
    while c.resends.len() < 2 {
        assert!(c.pump(WAIT).await);
    }
    let at: Vec<Duration> = c.resends.iter().map(|(_, t)| *t - t0).collect();
    assert_eq!(c.resends[0].0, 0);
    assert!(
        at[0] >= Duration::from_millis(300) && at[0] < Duration::from_millis(310),
        "{at:?}"
    );
    assert!(
        at[1] >= Duration::from_millis(600) && at[1] < Duration::from_millis(610),
        "{at:?}"
    );
    // HandshakeComplete (seq 1) joins the buffer; only seq 0 is resent while unacked.
    let r = c
        .data(
            PayloadType::HandshakeResponse,
            &response(NEW_CLIENT, ActionStatus::Success, ""),
        )
        .await;
    c.expect_ack(&r).await;
    let done = c.next_stream().await;
    assert_eq!(done.sequence_number, 1);
    c.resends.clear();
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        c.pump(Duration::from_millis(50)).await;
    }
    assert!(
        !c.resends.is_empty() && c.resends.iter().all(|(s, _)| *s == 0),
        "{:?}",
        c.resends
    );
    // Ack seq 0: now seq 1 is the oldest, and it is the one resent.
    c.send(&ack_for(&req)).await;
    c.resends.clear();
    while c.resends.is_empty() {
        assert!(c.pump(WAIT).await);
    }
    assert_eq!(c.resends[0].0, 1);
    assert!(c.report.counters().retransmissions >= 3);
    c.assert_no_violations();
}

#[tokio::test(start_paused = true)]
async fn pause_publication_stops_resends_until_start_publication() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.auto_ack = false;
    let _req = c.next_stream().await;
    let pause = msg(
        MessageType::PausePublication,
        0,
        3,
        PayloadType::Undefined,
        b"{}",
    );
    c.send(&pause).await;
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        c.pump(Duration::from_millis(100)).await;
    }
    assert!(c.resends.is_empty(), "resent while paused: {:?}", c.resends);
    let start = msg(
        MessageType::StartPublication,
        0,
        3,
        PayloadType::Undefined,
        b"{}",
    );
    c.send(&start).await;
    while c.resends.is_empty() {
        assert!(c.pump(WAIT).await);
    }
}

#[tokio::test]
async fn ack_checks_flag_unknown_and_mismatched_acks() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.auto_ack = false;
    let req = c.next_stream().await;
    // Seq 5 was never sent.
    let mut unknown = req.clone();
    unknown.sequence_number = 5;
    c.send(&ack_for(&unknown)).await;
    // Right seq, wrong MessageId: flagged, but the agent matches by seq only.
    let mut wrong = req.clone();
    wrong.message_id = Uuid::new_v4();
    c.send(&ack_for(&wrong)).await;
    c.data(
        PayloadType::HandshakeResponse,
        &response(NEW_CLIENT, ActionStatus::Success, ""),
    )
    .await;
    c.next_ack().await;
    assert_eq!(c.violations(ViolationKind::AckForUnknownMessage), 1);
    assert_eq!(c.violations(ViolationKind::AckMismatch), 1);
    assert_eq!(c.report.counters().acks_from_client, 2);
}

#[tokio::test]
async fn malformed_frames_and_bad_digests_are_flagged() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    c.send_frame(Bytes::from_static(b"not a client message"))
        .await;
    // A frame whose digest is wrong: the agent does not check it, so it is processed.
    let m = c.data(PayloadType::Output, &smux(3, 0, b"")).await; // sent correctly...
    c.expect_ack(&m).await;
    let m2 = input(c.next_seq, PayloadType::Output, &smux(3, 0, b""));
    c.next_seq += 1;
    let mut raw = m2.encode().unwrap().to_vec();
    raw[PAYLOAD_DIGEST_OFFSET] ^= 0xff;
    c.send_frame(Bytes::from(raw)).await;
    c.expect_ack(&m2).await;
    // Header values the plugin never sends.
    let mut odd = input(c.next_seq, PayloadType::Output, &smux(3, 0, b""));
    c.next_seq += 1;
    odd.flags = 1;
    odd.schema_version = 2;
    c.send(&odd).await;
    c.expect_ack(&odd).await;
    assert_eq!(c.violations(ViolationKind::MalformedFrame), 1);
    assert_eq!(c.violations(ViolationKind::BadDigest), 1);
    assert_eq!(c.violations(ViolationKind::UnexpectedHeader), 2);
}

#[tokio::test]
async fn a_gap_never_filled_is_reported_when_the_session_ends() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    let skipped = input(5, PayloadType::Output, &smux(3, 0, b""));
    c.send(&skipped).await;
    c.expect_ack(&skipped).await;
    c.to_agent = None; // TerminateSession API: the input closes
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::InputClosed);
    assert_eq!(exit.output, "");
    assert_eq!(c.violations(ViolationKind::SequenceGap), 1);
}

#[tokio::test]
async fn channel_closed_ends_the_session() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    let closed = msg(
        MessageType::ChannelClosed,
        0,
        3,
        PayloadType::Undefined,
        b"{}",
    );
    c.send(&closed).await;
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::InputClosed);
    c.assert_no_violations();
}

// ---------------------------------------------------------------------- version gates

/// Whether the agent dials the destination right after the handshake (basic) or only
/// per smux stream (mux).
async fn dials_at_start(client_version: &str) -> bool {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut c = Client::start(port_cfg(local_props(l.local_addr().unwrap().port())));
    c.handshake(client_version).await;
    tokio::time::timeout(Duration::from_millis(500), l.accept())
        .await
        .is_ok()
}

#[tokio::test]
async fn client_1_1_69_gets_basic_and_1_1_70_gets_mux() {
    assert!(dials_at_start("1.1.69").await);
    assert!(!dials_at_start("1.1.70").await);
    assert!(!dials_at_start(NEW_CLIENT).await);
    assert!(dials_at_start("").await); // no version: basic
}

#[tokio::test]
async fn old_agent_versions_get_basic() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = port_cfg(local_props(l.local_addr().unwrap().port()));
    cfg.agent_version = "3.0.196.0".into();
    let mut c = Client::start(cfg);
    let req = c.handshake(NEW_CLIENT).await;
    assert_eq!(req.agent_version, "3.0.196.0");
    assert!(tokio::time::timeout(WAIT, l.accept()).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn client_1_2_331_0_gets_smux_keepalive() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake("1.2.331.0").await;
    let t0 = Instant::now();
    // The agent's smux sends a NOP every 10 s…
    let f = c.smux_frame().await;
    assert_eq!(f, Frame::Nop { sid: StreamId(0) });
    assert!(t0.elapsed() >= Duration::from_secs(10));
    // …and closes the session after 30 s without a frame from us.
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::PluginFailed);
    assert!(exit.output.contains("keepalive"), "{}", exit.output);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(30) && took <= Duration::from_secs(31),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn client_1_2_650_0_gets_mux_without_keepalive() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    // 95 s of silence: no NOP, no keepalive timeout.
    assert!(!c.pump(Duration::from_secs(95)).await);
    assert!(c.agent.as_ref().is_some_and(|a| !a.is_finished()));
    c.assert_no_violations();
}

// -------------------------------------------------------------------------------- mux

#[tokio::test]
async fn mux_stream_round_trips_through_the_destination() {
    let port = echo_server().await;
    let mut c = Client::start(port_cfg(local_props(port)));
    c.handshake(NEW_CLIENT).await;
    let mut up = smux(SYN, 3, b"");
    up.extend(smux(PSH, 3, b"hello"));
    c.data(PayloadType::Output, &up).await;
    let mut got = Vec::new();
    while got.len() < 5 {
        match c.smux_frame().await {
            Frame::Psh { sid, data } => {
                assert_eq!(sid, StreamId(3));
                got.extend_from_slice(&data);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, b"hello");
    // Our FIN is answered with a FIN.
    c.data(PayloadType::Output, &smux(FIN, 3, b"")).await;
    assert_eq!(c.smux_frame().await, Frame::Fin { sid: StreamId(3) });
    let k = c.report.counters();
    assert_eq!(k.streams_opened, 1);
    assert_eq!(k.data_bytes_from_client, up.len() as u64 + 8);
    c.assert_no_violations();
}

#[tokio::test]
async fn mux_refused_dial_sends_connect_to_port_error_then_fin() {
    let port = refused_port().await;
    let mut c = Client::start(port_cfg(local_props(port)));
    c.handshake(NEW_CLIENT).await;
    c.data(PayloadType::Output, &smux(SYN, 3, b"")).await;
    let flag = c.next_stream().await;
    assert_eq!(flag.payload_type, PayloadType::Flag);
    assert_eq!(&flag.payload[..], &[0, 0, 0, 3]);
    assert_eq!(c.smux_frame().await, Frame::Fin { sid: StreamId(3) });
    assert_eq!(c.report.counters().dials_failed, 1);
    // The session stays up: another stream to the same refused port fails the same way.
    c.data(PayloadType::Output, &smux(SYN, 5, b"")).await;
    assert_eq!(c.next_stream().await.payload_type, PayloadType::Flag);
    c.assert_no_violations();
}

#[tokio::test]
async fn mux_ignores_disconnect_to_port_but_flags_it() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    let f = c.flag(Flag::DisconnectToPort).await;
    c.expect_ack(&f).await;
    assert_eq!(c.violations(ViolationKind::Other), 1);
}

#[tokio::test]
async fn smux_protocol_error_fails_the_session() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    let bad = c.data(PayloadType::Output, &[2, 0, 0, 0, 3, 0, 0, 0]).await;
    c.expect_ack(&bad).await;
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::PluginFailed);
    assert_eq!(c.violations(ViolationKind::SmuxProtocol), 1);
}

#[tokio::test]
async fn terminate_session_flag_ends_the_session() {
    let mut c = Client::start(port_cfg(local_props(1)));
    c.handshake(NEW_CLIENT).await;
    let f = c.flag(Flag::TerminateSession).await;
    c.expect_ack(&f).await;
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::TerminateFlag);
    assert_eq!(exit.output, "");
    c.assert_no_violations();
}

/// Remote → client chunking: every Output message carries ≤ 1024 bytes; with pacing
/// each message costs at least the pacing interval.
async fn download(pacing: Duration, basic: bool, total: usize) -> (usize, Duration) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(&vec![7u8; total]).await.unwrap();
        let mut sink = [0u8; 64];
        let _ = s.read(&mut sink).await;
    });
    let mut cfg = port_cfg(local_props(port));
    cfg.pacing = pacing;
    let mut c = Client::start(cfg);
    c.handshake(if basic { "1.1.69" } else { NEW_CLIENT }).await;
    let t0 = Instant::now();
    let mut got = 0;
    let mut messages = 0;
    if basic {
        while got < total {
            let m = c.next_stream().await;
            assert_eq!(m.payload_type, PayloadType::Output);
            assert!(m.payload.len() <= 1024);
            got += m.payload.len();
            messages += 1;
        }
    } else {
        c.data(PayloadType::Output, &smux(SYN, 3, b"")).await;
        while got < total {
            if let Frame::Psh { data, .. } = c.smux_frame().await {
                got += data.len();
            }
            messages = c.seen.len() - 2;
        }
    }
    assert_eq!(got, total);
    c.assert_no_violations();
    (messages, t0.elapsed())
}

#[tokio::test]
async fn pacing_is_one_send_per_interval_and_messages_are_at_most_1024_bytes() {
    let total = 40 * 1024;
    let (n, slow) = download(Duration::from_millis(5), true, total).await;
    assert!(n >= 40, "{n} messages");
    assert!(
        slow >= Duration::from_millis(5 * (n as u64 - 1)),
        "{slow:?} for {n}"
    );
    let (n0, fast) = download(Duration::ZERO, true, total).await;
    assert!(n0 >= 40);
    assert!(fast < slow, "{fast:?} vs {slow:?}");
    // Mux: the smux byte stream (headers included) is cut into ≤ 1024-byte messages.
    let (nm, slow_mux) = download(Duration::from_millis(5), false, total).await;
    assert!(nm > 40, "{nm}");
    assert!(slow_mux >= Duration::from_millis(5 * 40));
}

// ------------------------------------------------------------------------------ basic

#[tokio::test]
async fn basic_round_trip_disconnect_to_port_and_lazy_redial() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let mut c = Client::start(port_cfg(local_props(port)));
    c.handshake("1.1.69").await;
    // Dialed at session start.
    let (mut s1, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap()
        .unwrap();
    // Our accept can complete before the agent has seen its dial complete: until then
    // the agent answers not-ready (no ack) and we retransmit.
    let m = input(c.next_seq, PayloadType::Output, b"ping");
    c.next_seq += 1;
    c.send_until_acked(&m).await;
    let mut buf = [0u8; 4];
    s1.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    s1.write_all(b"pong").await.unwrap();
    let back = c.next_stream().await;
    assert_eq!(
        (back.payload_type, &back.payload[..]),
        (PayloadType::Output, &b"pong"[..])
    );
    // DisconnectToPort closes the agent's connection…
    let f = c.flag(Flag::DisconnectToPort).await;
    c.expect_ack(&f).await;
    assert_eq!(s1.read(&mut buf).await.unwrap(), 0);
    // …and the next data dials again; it is acked once written.
    let again = c.data(PayloadType::Output, b"again").await;
    let (mut s2, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap()
        .unwrap();
    c.expect_ack(&again).await;
    let mut buf5 = [0u8; 5];
    s2.read_exact(&mut buf5).await.unwrap();
    assert_eq!(&buf5, b"again");
    // The destination closing: nobody is told; the next data redials.
    drop(s2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let third = c.data(PayloadType::Output, b"third").await;
    let (mut s3, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap()
        .unwrap();
    c.expect_ack(&third).await;
    s3.read_exact(&mut buf5).await.unwrap();
    assert_eq!(&buf5, b"third");
    assert_eq!(c.report.counters().streams_opened, 3);
    c.assert_no_violations();
}

#[tokio::test]
async fn basic_initial_dial_failure_fails_the_session() {
    let port = refused_port().await;
    let mut c = Client::start(port_cfg(local_props(port)));
    c.handshake("1.1.69").await;
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::PluginFailed);
    assert!(
        exit.output
            .starts_with("Unable to connect to specified port: "),
        "{}",
        exit.output
    );
}

#[tokio::test]
async fn basic_early_input_is_retransmitted_until_the_plugin_is_ready() {
    // With a host, the agent first resolves it, then dials; until then the port plugin
    // answers ErrHandlerNotReady (no ack: see `port::tests` for the rule itself) and the
    // client must retransmit, as the plugin does after its RTO.
    let port = echo_server().await;
    let mut c = Client::start(port_cfg(json!({"portNumber": port.to_string(),
        "type": "LocalPortForwarding", "host": "localhost"})));
    let _req = c.next_stream().await;
    let r = c
        .data(
            PayloadType::HandshakeResponse,
            &response("1.1.69", ActionStatus::Success, ""),
        )
        .await;
    // Sent right behind the response, before HandshakeComplete is even read.
    let early = c.data(PayloadType::Output, b"x").await;
    let mut acked = false;
    for _ in 0..50 {
        while let Some(a) = c.acks.pop_front() {
            acked |= a.sequence_number == early.sequence_number;
        }
        if acked {
            break;
        }
        c.pump(Duration::from_millis(100)).await;
        if !c
            .acks
            .iter()
            .any(|a| a.sequence_number == early.sequence_number)
        {
            c.send(&early).await;
        }
    }
    assert!(acked);
    let back = loop {
        let m = c.next_stream().await;
        if m.payload_type == PayloadType::Output {
            break m;
        }
    };
    assert_eq!(&back.payload[..], b"x");
    let _ = r;
    c.assert_no_violations();
}

#[tokio::test]
async fn forbidden_remote_address_fails_the_session() {
    let mut c = Client::start(port_cfg(
        json!({"portNumber":"80","type":"LocalPortForwarding",
        "host":"169.254.169.254"}),
    ));
    c.handshake(NEW_CLIENT).await;
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::PluginFailed);
    assert_eq!(
        exit.output,
        "Forwarding to IP address 169.254.169.254 is forbidden."
    );
}

// --------------------------------------------------------------------- backpressure

#[tokio::test]
async fn mux_stops_reading_input_when_smux_holds_4_mib_unread() {
    // A destination that accepts but does not read, with a tiny receive buffer.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = sock.local_addr().unwrap().port();
    let l = sock.listen(8).unwrap();
    let mut c = Client::start(port_cfg(local_props(port)));
    c.handshake(NEW_CLIENT).await;
    c.data(PayloadType::Output, &smux(SYN, 3, b"")).await;
    let (mut dest, _): (TcpStream, _) = tokio::time::timeout(WAIT, l.accept())
        .await
        .unwrap()
        .unwrap();
    let chunk = smux(PSH, 3, &vec![1u8; 32 * 1024]);
    let mut sent = 0usize;
    let tx = c.to_agent.clone().unwrap();
    // Keep sending until the agent stops taking input (its reader is blocked).
    loop {
        let m = input(c.next_seq, PayloadType::Output, &chunk);
        match tokio::time::timeout(Duration::from_secs(2), tx.send(m.encode().unwrap())).await {
            Ok(r) => {
                r.unwrap();
                c.next_seq += 1;
                sent += 32 * 1024;
                while c.pump(Duration::ZERO).await {}
            }
            Err(_) => break,
        }
        assert!(sent < 64 << 20, "the agent never stopped reading");
    }
    assert!(sent >= 4 << 20, "stopped after only {sent} bytes");
    let acked_before = c.report.counters().acks_to_client;
    // Read the destination: the agent resumes and acks everything.
    let total = sent;
    let reader = tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        let mut n = 0;
        while n < total {
            n += dest.read(&mut buf).await.unwrap();
        }
        n
    });
    let last = c.next_seq - 1;
    let mut done = false;
    while !done {
        assert!(c.pump(WAIT).await);
        done = c.acks.iter().any(|a| a.sequence_number == last);
        c.acks.clear();
    }
    assert!(c.report.counters().acks_to_client > acked_before);
    assert_eq!(reader.await.unwrap(), total);
    c.assert_no_violations();
}

// ------------------------------------------------------------------------------ shell

#[tokio::test]
async fn shell_runs_commands_in_a_pty_and_ends_when_the_shell_exits() {
    let mut c = Client::start(AgentConfig::default());
    // No handshake for Standard_Stream without KMS: input is accepted at once.
    let size = c
        .data(PayloadType::Size, br#"{"cols":100,"rows":30}"#)
        .await;
    c.expect_ack(&size).await;
    let cmd = c
        .data(PayloadType::Output, b"stty size; echo sim-$((6*7))\r")
        .await;
    c.expect_ack(&cmd).await;
    let mut out = Vec::new();
    let t0 = Instant::now();
    while !String::from_utf8_lossy(&out).contains("sim-42") {
        let m = c.next_stream().await;
        assert_eq!(m.payload_type, PayloadType::Output);
        assert!(m.payload.len() <= 1024);
        out.extend_from_slice(&m.payload);
    }
    // The agent's write pump starts reading after 1 s.
    assert!(t0.elapsed() >= Duration::from_millis(900));
    let text = String::from_utf8_lossy(&out).to_string();
    assert!(text.contains("30 100"), "{text}");
    c.data(PayloadType::Output, b"exit\r").await;
    let exit = c.exit().await;
    assert_eq!(exit.reason, ExitReason::TerminateFlag);
    assert_eq!(exit.output, "");
    c.assert_no_violations();
}
