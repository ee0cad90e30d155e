//! The simulator's data plane: upgrade admission (SigV4, cell-numbers, presigned
//! StreamUrls, ClientVersion floor) tested with a raw tungstenite client,
//! OpenDataChannel and tokens, the agent's first frame, channel_closed, websocket
//! recycle and cuts, idle timeout, and full port sessions driven by a hand-built client
//! (ClientMessage + payload types + proto::smux).

use crate::sim_util;

use std::time::Duration;

use bastion::proto::kind::{MessageType, PayloadType};
use bastion::proto::message::ClientMessage;
use bastion::proto::payload::{HandshakeRequest, from_json};
use bastion_sim::{
    AuthKind, DirectionFaults, Faults, RefusalKind, SimConfig, ViolationKind, sigv4,
};
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use sim_util::*;
use tokio_tungstenite::tungstenite::Message;

const CLIENT_ID: &str = "0c2b3d4e-5f60-4718-8a9b-0c1d2e3f4a5b";

/// Reads until a close frame or the end of the connection; returns the close code.
async fn close_code(ws: &mut Ws) -> Option<u16> {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("no close within 10 s")
        {
            Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
            Some(Ok(_)) => continue,
            Some(Err(_)) | None => return None,
        }
    }
}

#[tokio::test]
async fn bad_token_is_refused_with_1008() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let (id, _token, url) = start_port_session(addr, 9).await;
    let mut ws = open_ws(&url, "not-the-token", CLIENT_ID).await;
    assert_eq!(close_code(&mut ws).await, Some(1008));
    let s = sim.session(&id).unwrap();
    assert_eq!(s.violations.len(), 1, "{:?}", s.violations);
    assert_eq!(s.violations[0].kind, ViolationKind::BadToken);
    assert!(!s.violations[0].detail.contains("not-the-token"));
    assert_eq!(s.counters.connections, 0);
    let v = session_json(addr, &id).await;
    assert_eq!(v["violations"][0]["kind"], "bad_token");

    // A binary first message is not an OpenDataChannel.
    let (id, _token, url) = start_port_session(addr, 9).await;
    let mut ws = connect_signed(&url, &Signer::test()).await.unwrap();
    ws.send(Message::Binary(bytes::Bytes::from_static(b"hello")))
        .await
        .unwrap();
    assert_eq!(close_code(&mut ws).await, Some(1008));
    let s = sim.session(&id).unwrap();
    assert_eq!(s.violations[0].kind, ViolationKind::BadOpenDataChannel);

    // Unknown session: no upgrade.
    let url = format!("ws://{addr}/v1/data-channel/nobody-0123?role=publish_subscribe");
    assert!(tokio_tungstenite::connect_async(&url).await.is_err());
    sim.shutdown().await;
}

#[tokio::test]
async fn token_is_single_use_and_expires() {
    let sim = start(SimConfig {
        token_ttl: Duration::from_millis(300),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let (id, token, url) = start_port_session(addr, 9).await;
    let mut first = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    // The agent speaks first: the connection was accepted.
    let m = first.recv_data(Duration::from_secs(5)).await;
    assert_eq!(m.payload_type, PayloadType::HandshakeRequest);
    assert_eq!(sim.session(&id).unwrap().counters.connections, 1);

    let mut again = open_ws(&url, &token, CLIENT_ID).await;
    assert_eq!(close_code(&mut again).await, Some(1008));
    let s = sim.session(&id).unwrap();
    assert_eq!(s.violations.len(), 1);
    assert_eq!(s.violations[0].kind, ViolationKind::BadToken);
    assert!(s.violations[0].detail.contains("already used"));

    // A resume token that is not used in time expires.
    let (token2, url2) = resume_session(addr, &id).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut late = open_ws(&url2, &token2, CLIENT_ID).await;
    assert_eq!(close_code(&mut late).await, Some(1008));
    let s = sim.session(&id).unwrap();
    assert!(s.violations[1].detail.contains("expired"));
    drop(first);
    sim.shutdown().await;
}

#[tokio::test]
async fn handshake_request_is_the_first_frame() {
    let sim = start(SimConfig {
        agent_version: "3.2.2222.0".into(),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let (id, token, url) = start_session(
        addr,
        json!({
            "Target": "i-0123456789abcdef0",
            "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
            "Parameters": {"host": ["db.example"], "portNumber": ["5432"], "localPortNumber": ["0"]},
        }),
    )
    .await;
    let mut ws = open_ws(&url, &token, CLIENT_ID).await;
    let frame = loop {
        match ws.next().await.unwrap().unwrap() {
            Message::Binary(b) => break b,
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    let m = ClientMessage::decode(frame).unwrap();
    assert_eq!(m.message_type, MessageType::OutputStreamData);
    assert_eq!(m.sequence_number, 0);
    assert_eq!(m.flags, 1);
    assert_eq!(m.payload_type, PayloadType::HandshakeRequest);
    let req: HandshakeRequest = from_json("HandshakeRequest", &m.payload).unwrap();
    assert_eq!(req.agent_version, "3.2.2222.0");
    assert_eq!(req.requested_client_actions[0].action_type, "SessionType");
    let params = &req.requested_client_actions[0].action_parameters;
    assert_eq!(params["SessionType"], "Port");
    assert_eq!(
        params["Properties"],
        json!({"host": "db.example", "portNumber": "5432", "type": "LocalPortForwarding", "localPortNumber": "0"})
    );
    let s = session_json(addr, &id).await;
    assert_eq!(s["status"], "Connected");
    assert_eq!(s["client_version"], CLIENT_VERSION);
    assert_eq!(s["client_id"], CLIENT_ID);
    assert_eq!(s["attached"], true);
    sim.shutdown().await;
}

#[tokio::test]
async fn terminate_session_sends_channel_closed() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let (id, token, url) = start_port_session(addr, 9).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    let m = c.recv_data(Duration::from_secs(5)).await;
    assert_eq!(m.payload_type, PayloadType::HandshakeRequest);
    let r = ssm(addr, "TerminateSession", json!({"SessionId": id})).await;
    assert_eq!(r.status, 200);
    let closed = loop {
        match c.recv(Duration::from_secs(10)).await {
            Inbound::ChannelClosed(cc) => break cc,
            Inbound::Data(_) | Inbound::Control(_) => continue,
            other => panic!("expected channel_closed, got {other:?}"),
        }
    };
    assert_eq!(closed.session_id, id);
    assert_eq!(closed.destination_id, "i-0123456789abcdef0");
    assert_eq!(closed.message_type, "channel_closed");
    assert_eq!(closed.schema_version, 1);
    assert!(
        closed.created_date.ends_with('Z'),
        "{}",
        closed.created_date
    );
    match c.recv(Duration::from_secs(5)).await {
        Inbound::Closed(Some((code, _))) => assert_eq!(code, 1000),
        other => panic!("expected close 1000, got {other:?}"),
    }
    let s = sim.session(&id).unwrap();
    assert_eq!(s.status, "Terminated");
    assert!(s.end_unix_ms.is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn websocket_recycle_closes_with_1000_and_resume_works() {
    let sim = start(SimConfig {
        ws_recycle: Some(Duration::from_millis(1500)),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = start_port_session(addr, echo).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    c.handshake().await;
    let mut mux = MuxClient::new();
    let data = pattern(4096, 3);
    assert_eq!(mux.echo(&mut c, &data).await, data);
    loop {
        match c.recv(Duration::from_secs(5)).await {
            Inbound::Closed(Some((code, _))) => {
                assert_eq!(code, 1000);
                break;
            }
            Inbound::Data(_) | Inbound::Control(_) => continue,
            other => panic!("expected close 1000, got {other:?}"),
        }
    }
    // Detached: the session is still alive and resumable.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(sim.session(&id).unwrap().status, "Disconnected");
    let (token2, url2) = resume_session(addr, &id).await;
    c.reconnect(open_ws(&url2, &token2, CLIENT_ID).await).await;
    let data = pattern(4096, 4);
    assert_eq!(mux.echo(&mut c, &data).await, data);
    let s = sim.session(&id).unwrap();
    assert_eq!(s.counters.connections, 2);
    assert_eq!(s.status, "Connected");
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    sim.shutdown().await;
}

#[tokio::test]
async fn max_session_duration_terminates_with_output() {
    let sim = start(SimConfig {
        max_session_duration: Some(Duration::from_millis(700)),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = start_port_session(addr, echo).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    c.handshake().await;
    let cc = loop {
        match c.recv(Duration::from_secs(10)).await {
            Inbound::ChannelClosed(cc) => break cc,
            Inbound::Data(_) | Inbound::Control(_) => continue,
            other => panic!("expected channel_closed, got {other:?}"),
        }
    };
    assert_eq!(cc.output, bastion_sim::dataplane::MAX_DURATION_OUTPUT);
    assert!(sim.wait_terminated(&id, Duration::from_secs(5)).await);
    let r = ssm(addr, "DescribeSessions", json!({"State": "History"})).await;
    assert_eq!(r.json()["Sessions"][0]["MaxSessionDuration"], "1");
    assert_no_violations(addr).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn shell_session_runs_sh() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let (id, token, url) = start_session(addr, json!({"Target": "i-0123456789abcdef0"})).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    // Standard_Stream without KMS: no handshake; the client speaks first.
    c.send_stream(PayloadType::Size, br#"{"cols":80,"rows":24}"#)
        .await;
    c.send_stream(PayloadType::Output, b"printf 'sim-%s\\n' ok; exit\n")
        .await;
    let mut out = Vec::new();
    let closed = loop {
        match c.recv(Duration::from_secs(10)).await {
            Inbound::Data(m) if m.payload_type == PayloadType::Output => {
                out.extend_from_slice(&m.payload)
            }
            Inbound::ChannelClosed(cc) => break cc,
            Inbound::Data(_) | Inbound::Control(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("sim-ok"), "{text:?}");
    assert_eq!(closed.session_id, id);
    assert!(sim.wait_terminated(&id, Duration::from_secs(5)).await);
    assert_no_violations(addr).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn cut_fault_drops_the_connection_without_close_frame() {
    let sim = start(SimConfig {
        faults: Faults {
            cut_after_ms: Some(200),
            max_cuts: Some(1),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let (id, token, url) = start_port_session(addr, 9).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    let _ = c.recv_data(Duration::from_secs(5)).await;
    match c.recv(Duration::from_secs(5)).await {
        Inbound::Closed(None) => {}
        other => panic!("expected an abrupt end, got {other:?}"),
    }
    let (token2, url2) = resume_session(addr, &id).await;
    c.reconnect(open_ws(&url2, &token2, CLIENT_ID).await).await;
    // max_cuts = 1: the second websocket survives.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let s = sim.session(&id).unwrap();
    assert_eq!(s.counters.faults_injected, 1);
    assert_eq!(s.counters.connections, 2);
    assert!(s.attached);
    sim.shutdown().await;
}

#[tokio::test]
async fn idle_timeout_terminates_with_output() {
    let sim = start(SimConfig {
        idle_timeout: Some(Duration::from_millis(500)),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    // Never connected: terminated without a channel_closed.
    let (never, _, _) = start_port_session(addr, 9).await;
    let (id, token, url) = start_port_session(addr, 9).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    let cc = loop {
        match c.recv(Duration::from_secs(10)).await {
            Inbound::ChannelClosed(cc) => break cc,
            Inbound::Data(_) | Inbound::Control(_) => continue,
            other => panic!("expected channel_closed, got {other:?}"),
        }
    };
    assert_eq!(cc.output, bastion_sim::dataplane::IDLE_TIMEOUT_OUTPUT);
    assert!(sim.wait_terminated(&never, Duration::from_secs(5)).await);
    assert!(sim.wait_terminated(&id, Duration::from_secs(5)).await);
    sim.shutdown().await;
}

/// A full port session: handshake, mux, bytes through a real TCP echo server,
/// TerminateSession, channel_closed, zero violations.
async fn port_round_trip(remote_host: bool) {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = if remote_host {
        start_session(
            addr,
            json!({
                "Target": "i-0123456789abcdef0",
                "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
                "Parameters": {"host": ["127.0.0.1"], "portNumber": [echo.to_string()]},
            }),
        )
        .await
    } else {
        start_port_session(addr, echo).await
    };
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    let req = c.handshake().await;
    assert_eq!(req.agent_version, "3.3.987.0");
    let mut mux = MuxClient::new();
    for (i, len) in [5usize, 1000, 64 * 1024].into_iter().enumerate() {
        let data = pattern(len, i as u64);
        let got = mux.echo(&mut c, &data).await;
        assert_eq!(got, data, "stream {i}");
    }
    c.wait_all_acked(Duration::from_secs(10)).await;

    let r = ssm(addr, "TerminateSession", json!({"SessionId": id})).await;
    assert_eq!(r.status, 200);
    let cc = loop {
        match c.recv(Duration::from_secs(10)).await {
            Inbound::ChannelClosed(cc) => break cc,
            Inbound::Data(_) | Inbound::Control(_) => continue,
            other => panic!("expected channel_closed, got {other:?}"),
        }
    };
    assert_eq!(cc.session_id, id);
    assert!(sim.wait_terminated(&id, Duration::from_secs(5)).await);
    let s = sim.session(&id).unwrap();
    assert_eq!(s.counters.connections, 1);
    assert_eq!(s.counters.streams_opened, 3);
    assert!(s.counters.frames_from_client > 0);
    assert!(s.counters.frames_to_client > 0);
    assert_no_violations(addr).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn port_session_round_trip_mux() {
    port_round_trip(false).await;
}

#[tokio::test]
async fn port_session_to_remote_host_round_trip() {
    port_round_trip(true).await;
}

/// Drops, duplicates, reorders and delays in both directions, and a websocket recycle
/// in the middle: every byte still arrives once and in order, and the client commits no
/// violation.
#[tokio::test]
async fn port_session_survives_message_faults_and_resume() {
    let lossy = DirectionFaults {
        drop_pct: 5.0,
        duplicate_pct: 5.0,
        reorder_pct: 5.0,
        delay_ms: Some((0, 3)),
    };
    let sim = start(SimConfig {
        faults: Faults {
            seed: Some(7),
            to_agent: lossy.clone(),
            to_client: lossy,
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = start_port_session(addr, echo).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    c.handshake().await;
    let mut mux = MuxClient::new();
    let data = pattern(128 * 1024, 1);
    assert_eq!(mux.echo(&mut c, &data).await, data);

    // Resume on a new websocket, keep going.
    let (token2, url2) = resume_session(addr, &id).await;
    drop(std::mem::replace(
        &mut c.ws,
        open_ws(&url2, &token2, CLIENT_ID).await,
    ));
    let pending: Vec<_> = c.unacked.values().cloned().collect();
    for m in pending {
        c.send_raw(&m).await;
    }
    let data = pattern(64 * 1024, 2);
    assert_eq!(mux.echo(&mut c, &data).await, data);
    let s = sim.session(&id).unwrap();
    assert!(s.counters.faults_injected > 0);
    assert_eq!(s.counters.connections, 2);
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    sim.shutdown().await;
}

/// Cut after N bytes (twice), then a clean websocket: the client resumes each time and
/// every byte arrives.
#[tokio::test]
async fn cut_after_bytes_is_survived_by_resume() {
    let sim = start(SimConfig {
        faults: Faults {
            cut_after_bytes: Some(24 * 1024),
            max_cuts: Some(2),
            ..Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = start_port_session(addr, echo).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    c.handshake().await;
    let resumer = Resumer {
        addr,
        session_id: id.clone(),
        client_id: CLIENT_ID.into(),
        resumes: Default::default(),
    };
    let mut mux = MuxClient::new();
    let data = pattern(96 * 1024, 9);
    assert_eq!(mux.echo_resuming(&mut c, &data, Some(&resumer)).await, data);
    assert_eq!(resumer.resumes.load(std::sync::atomic::Ordering::SeqCst), 2);
    let s = sim.session(&id).unwrap();
    assert_eq!(s.counters.connections, 3);
    assert_eq!(s.counters.faults_injected, 2);
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    sim.shutdown().await;
}

// ---------------------------------------------------------------------------------------
// Upgrade admission: signatures, cell-numbers, ClientVersion (sim::admission)

/// Attaches with `ws` (already upgraded), sends OpenDataChannel and completes the
/// handshake: the session works.
async fn works(ws: Ws, token: &str) -> HandClient {
    let mut ws = ws;
    ws.send(Message::text(open_data_channel_text(token, CLIENT_ID)))
        .await
        .unwrap();
    let mut c = HandClient::new(ws);
    c.handshake().await;
    c
}

#[tokio::test]
async fn unsigned_upgrade_is_refused_with_403_and_a_signed_one_works() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = start_port_session(addr, echo).await;

    let (status, body) = refused(connect_with(&url, &[]).await);
    assert_eq!(status, 403);
    assert!(body.contains("not signed"), "{body}");
    let s = sim.session(&id).unwrap();
    assert_eq!(s.counters.upgrades_refused, 1);
    assert_eq!(s.counters.unsigned_upgrades, 1);
    assert_eq!(s.counters.connections, 0);
    assert_eq!(s.violations.len(), 1);
    assert_eq!(s.violations[0].kind, ViolationKind::UpgradeRefused);
    let u = &s.upgrades[0];
    assert!(!u.accepted && !u.verified);
    assert_eq!(u.refusal, Some(RefusalKind::Unsigned));
    assert_eq!(u.auth, AuthKind::None);

    let ws = connect_signed(&url, &Signer::test())
        .await
        .expect("signed upgrade");
    let mut c = works(ws, &token).await;
    let data = pattern(8192, 5);
    assert_eq!(MuxClient::new().echo(&mut c, &data).await, data);
    let s = sim.session(&id).unwrap();
    assert_eq!(s.upgrades.len(), 2);
    let u = &s.upgrades[1];
    assert!(u.accepted && u.verified);
    assert_eq!(u.auth, AuthKind::Header);
    assert_eq!(u.access_key_id.as_deref(), Some(TEST_ACCESS_KEY_ID));
    assert_eq!(u.cell_number, s.cell_number);
    assert_eq!(s.counters.upgrades_refused, 1);
    // Over HTTP too.
    let v = session_json(addr, &id).await;
    assert_eq!(v["upgrades"][0]["refusal"], "unsigned");
    assert_eq!(v["upgrades"][1]["auth"], "header");
    assert_eq!(v["counters"]["unsigned_upgrades"], 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn wrong_secret_region_or_token_is_refused() {
    let sim =
        start(SimConfig::default().with_credential("AKIDTEMP", "temp-secret", Some("tok-1"))).await;
    let addr = sim.local_addr();
    let (id, token, url) = start_port_session(addr, 9).await;
    let wrong_secret = Signer {
        secret: "not-the-secret".into(),
        ..Signer::test()
    };
    let wrong_region = Signer {
        region: "eu-west-1".into(),
        ..Signer::test()
    };
    let unknown = Signer {
        access_key_id: "AKIDNOBODY".into(),
        ..Signer::test()
    };
    let temp = Signer {
        access_key_id: "AKIDTEMP".into(),
        secret: "temp-secret".into(),
        session_token: Some("tok-1".into()),
        region: REGION.into(),
    };
    let no_token = Signer {
        session_token: None,
        ..temp.clone()
    };
    for (signer, want) in [
        (&wrong_secret, "signature mismatch"),
        (&wrong_region, "region"),
        (&unknown, "unknown access key id AKIDNOBODY"),
        (&no_token, "X-Amz-Security-Token is missing"),
    ] {
        let (status, body) = refused(connect_signed(&url, signer).await);
        assert_eq!(status, 403);
        assert!(body.contains(want), "{want}: {body}");
    }
    // A header changed after signing.
    let mut headers = Signer::test().headers(&url, unix_now());
    headers[0].1 = sigv4::format_amz_date(unix_now() + 1);
    let (status, body) = refused(connect_with(&url, &headers).await);
    assert_eq!(
        (status, body.contains("signature mismatch")),
        (403, true),
        "{body}"
    );
    // An old signature.
    let headers = Signer::test().headers(&url, unix_now() - 3600);
    let (status, body) = refused(connect_with(&url, &headers).await);
    assert_eq!(
        (status, body.contains("away from the simulator's clock")),
        (403, true),
        "{body}"
    );

    let s = sim.session(&id).unwrap();
    assert_eq!(s.counters.upgrades_refused, 6);
    assert_eq!(s.counters.unsigned_upgrades, 0);
    assert!(
        s.upgrades
            .iter()
            .all(|u| u.refusal == Some(RefusalKind::BadSignature))
    );
    assert_eq!(s.upgrades[2].access_key_id.as_deref(), Some("AKIDNOBODY"));

    // Temporary credentials with their token.
    let ws = connect_signed(&url, &temp)
        .await
        .expect("temporary credentials");
    let _c = works(ws, &token).await;
    let s = sim.session(&id).unwrap();
    assert_eq!(
        s.upgrades.last().unwrap().access_key_id.as_deref(),
        Some("AKIDTEMP")
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn superseded_cell_number_is_refused_after_resume() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = start_port_session(addr, echo).await;
    let mut c = HandClient::new(open_ws(&url, &token, CLIENT_ID).await);
    c.handshake().await;
    let (token2, url2) = resume_session(addr, &id).await;
    let old_cell = url.split_once("cell-number=").unwrap().1;
    let new_cell = url2.split_once("cell-number=").unwrap().1;
    assert_ne!(old_cell, new_cell);

    let (status, body) = refused(connect_signed(&url, &Signer::test()).await);
    assert_eq!(status, 403);
    assert!(body.contains("superseded"), "{body}");
    // A cell never issued.
    let forged = format!(
        "{}cell-number=+/AAAAAAAAAAAAAAAAAAAAAAAAAA=",
        url.split_once("cell-number=").unwrap().0
    );
    let (status, body) = refused(connect_signed(&forged, &Signer::test()).await);
    assert_eq!(status, 403);
    assert!(body.contains("never issued"), "{body}");

    c.reconnect(open_ws(&url2, &token2, CLIENT_ID).await).await;
    let data = pattern(4096, 8);
    assert_eq!(MuxClient::new().echo(&mut c, &data).await, data);
    let s = sim.session(&id).unwrap();
    let kinds: Vec<_> = s.upgrades.iter().map(|u| (u.accepted, u.refusal)).collect();
    assert_eq!(
        kinds,
        [
            (true, None),
            (false, Some(RefusalKind::SupersededCellNumber)),
            (false, Some(RefusalKind::UnknownCellNumber)),
            (true, None)
        ]
    );
    assert_eq!(s.upgrades[1].cell_number.as_deref(), Some(old_cell));
    assert_eq!(s.upgrades[3].cell_number.as_deref(), Some(new_cell));
    assert_eq!(s.counters.upgrades_refused, 2);
    assert_eq!(s.counters.connections, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn knobs_off_accept_unsigned_upgrades_and_superseded_cells() {
    let sim = start(SimConfig {
        require_signed_upgrades: false,
        expire_superseded_cells: false,
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let echo = echo_server().await;
    let (id, token, url) = start_port_session(addr, echo).await;
    let mut c = works(connect_with(&url, &[]).await.expect("unsigned"), &token).await;
    // What plugins 1.2.764.0-1.2.814.0 do: resume, re-dial the original StreamUrl.
    let (token2, _url2) = resume_session(addr, &id).await;
    let mut ws = connect_with(&url, &[]).await.expect("superseded cell");
    ws.send(Message::text(open_data_channel_text(&token2, CLIENT_ID)))
        .await
        .unwrap();
    c.reconnect(ws).await;
    let data = pattern(4096, 6);
    assert_eq!(MuxClient::new().echo(&mut c, &data).await, data);
    let s = sim.session(&id).unwrap();
    assert_eq!(s.counters.unsigned_upgrades, 2);
    assert_eq!(s.counters.upgrades_refused, 0);
    assert!(s.upgrades.iter().all(|u| u.accepted && !u.verified));
    assert!(s.violations.is_empty(), "{:?}", s.violations);
    sim.shutdown().await;
}

#[tokio::test]
async fn presigned_stream_url_verifies_and_refuses_an_extra_authorization() {
    let sim = start(SimConfig {
        presigned_stream_urls: true,
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let (id, token, url) = start_port_session(addr, 9).await;
    // What the plugin does with a presigned URL: dial it as is.
    let (status, body) = refused(connect_signed(&url, &Signer::test()).await);
    assert_eq!(status, 403);
    assert!(
        body.contains("both a presigned URL and an Authorization header"),
        "{body}"
    );
    let tampered = url.replace("role=publish_subscribe", "role=subscribe");
    let (status, body) = refused(connect_with(&tampered, &[]).await);
    assert_eq!(
        (status, body.contains("signature mismatch")),
        (403, true),
        "{body}"
    );
    let _c = works(connect_with(&url, &[]).await.expect("presigned"), &token).await;
    let s = sim.session(&id).unwrap();
    let u = s.upgrades.last().unwrap();
    assert!(u.accepted && u.verified);
    assert_eq!(u.auth, AuthKind::Query);
    assert_eq!(
        u.access_key_id.as_deref(),
        Some(bastion_sim::admission::PRESIGNER_ACCESS_KEY_ID)
    );
    assert_eq!(s.counters.upgrades_refused, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn low_client_version_is_a_violation_unless_the_floor_is_off() {
    for floor in [Some("1.2.764.0"), None] {
        let sim = start(SimConfig {
            min_client_version: floor.map(str::to_owned),
            ..SimConfig::default()
        })
        .await;
        let addr = sim.local_addr();
        let (id, token, url) = start_port_session(addr, 9).await;
        let mut ws = connect_signed(&url, &Signer::test()).await.unwrap();
        ws.send(Message::text(open_data_channel_text_as(
            &token,
            CLIENT_ID,
            "1.2.677.0",
        )))
        .await
        .unwrap();
        let mut c = HandClient::new(ws);
        c.handshake_as("1.2.700.0").await;
        let s = sim.session(&id).unwrap();
        let details: Vec<&str> = s
            .violations
            .iter()
            .filter(|v| v.kind == ViolationKind::ClientVersionUnsupported)
            .map(|v| v.detail.as_str())
            .collect();
        if floor.is_some() {
            assert_eq!(details.len(), 2, "{:?}", s.violations);
            assert!(
                details[0].contains("OpenDataChannel ClientVersion 1.2.677.0"),
                "{}",
                details[0]
            );
            assert!(
                details[1].contains("HandshakeResponse ClientVersion 1.2.700.0"),
                "{}",
                details[1]
            );
            // The session still runs.
            assert_eq!(s.status, "Connected");
        } else {
            assert!(s.violations.is_empty(), "{:?}", s.violations);
        }
        sim.shutdown().await;
    }
}
