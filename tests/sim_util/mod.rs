//! Helpers for the simulator tests: a tiny HTTP/1.1 client, and a hand-built data-channel
//! client that speaks the protocol with the project's codec types only (no
//! `proto::channel` / `proto::session`), so a client-side bug cannot hide a simulator one.
#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bastion_proto::kind::{MessageType, PayloadType};
use bastion_proto::message::ClientMessage;
use bastion_proto::payload::{
    AcknowledgeContent, ActionStatus, ChannelClosed, HandshakeComplete, HandshakeRequest,
    HandshakeResponse, OpenDataChannelInput, ProcessedClientAction, from_json, to_json,
};
use bastion_proto::smux::{Config as SmuxConfig, Event, Role, Session as Smux, StreamRead};
use bastion_sim::sigv4;
use bastion_sim::{SimConfig, SimHandle, Simulator};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use uuid::Uuid;

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A fake SigV4 header: the simulator only takes the access key id from it.
pub const AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/us-east-1/ssm/aws4_request, SignedHeaders=content-type;host;x-amz-date;x-amz-target, Signature=0000";

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}

/// The hand client's credential, also the one the drop-in tests give the plugin
/// (tests/plugin_dropin.rs, tests/awscli_dropin.rs).
pub const TEST_ACCESS_KEY_ID: &str = "AKIDTEST";
pub const TEST_SECRET: &str = "dummy-secret";
/// The credential tests/e2e_util's `DaemonProcess` gives the daemon (kept in step with
/// it: tests include either helper module or both).
pub const DAEMON_ACCESS_KEY_ID: &str = "AKIDDAEMON";
pub const DAEMON_SECRET: &str = "secret-test-key";
/// The simulator's default region, the one every harness signs for.
pub const REGION: &str = "us-east-1";
/// The ClientVersion the hand client reports (explicit: not the product's constant,
/// which the simulator's version floor must not silently follow).
pub const CLIENT_VERSION: &str = "1.2.896.0";

/// `config` with the credentials the harnesses hand out registered.
pub fn with_test_credentials(config: SimConfig) -> SimConfig {
    config
        .with_credential(TEST_ACCESS_KEY_ID, TEST_SECRET, None)
        .with_credential(DAEMON_ACCESS_KEY_ID, DAEMON_SECRET, None)
}

/// Starts a simulator with the harnesses' credentials registered.
pub async fn start(config: SimConfig) -> SimHandle {
    init_tracing();
    Simulator::bind(with_test_credentials(config))
        .await
        .expect("bind")
        .spawn()
}

pub async fn start_default() -> SimHandle {
    start(SimConfig::default()).await
}

// ---------------------------------------------------------------------------------------
// HTTP

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts the AWS JSON 1.1 error shape and returns the error code.
    pub fn error_code(&self) -> String {
        assert!(self.status >= 400, "expected an error, got {self:?}");
        let v = self.json();
        let code = v["__type"].as_str().expect("__type").to_owned();
        assert!(v["message"].is_string(), "message missing: {v}");
        assert_eq!(self.header("x-amzn-ErrorType"), Some(code.as_str()));
        assert_eq!(
            self.header("content-type"),
            Some("application/x-amz-json-1.1")
        );
        code
    }
}

fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = body.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_str = std::str::from_utf8(&body[..eol]).unwrap_or("0");
        let size = usize::from_str_radix(size_str.split(';').next().unwrap_or("0").trim(), 16)
            .unwrap_or(0);
        body = &body[eol + 2..];
        if size == 0 || body.len() < size {
            return out;
        }
        out.extend_from_slice(&body[..size]);
        body = &body[(size + 2).min(body.len())..];
    }
}

pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("http response timeout")
        .expect("read");
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let raw = &buf[split + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked { dechunk(raw) } else { raw.to_vec() };
    HttpResponse {
        status,
        headers,
        body,
    }
}

/// Calls an SSM API operation.
pub async fn ssm(addr: SocketAddr, op: &str, body: Value) -> HttpResponse {
    let target = format!("AmazonSSM.{op}");
    http(
        addr,
        "POST",
        "/",
        &[
            ("X-Amz-Target", &target),
            ("Content-Type", "application/x-amz-json-1.1"),
            ("X-Amz-Date", "20260101T000000Z"),
            ("Authorization", AUTH),
        ],
        body.to_string().as_bytes(),
    )
    .await
}

pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = http(addr, "GET", path, &[], b"").await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

pub async fn post_json(addr: SocketAddr, path: &str, body: Value) -> (u16, Value) {
    let r = http(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        body.to_string().as_bytes(),
    )
    .await;
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// StartSession that must succeed: (SessionId, TokenValue, StreamUrl).
pub async fn start_session(addr: SocketAddr, body: Value) -> (String, String, String) {
    let r = ssm(addr, "StartSession", body).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    (
        v["SessionId"].as_str().unwrap().to_owned(),
        v["TokenValue"].as_str().unwrap().to_owned(),
        v["StreamUrl"].as_str().unwrap().to_owned(),
    )
}

pub async fn start_port_session(addr: SocketAddr, port: u16) -> (String, String, String) {
    start_session(
        addr,
        json!({
            "Target": "i-0123456789abcdef0",
            "DocumentName": "AWS-StartPortForwardingSession",
            "Parameters": {"portNumber": [port.to_string()], "localPortNumber": ["0"]},
        }),
    )
    .await
}

/// ResumeSession that must succeed: (TokenValue, StreamUrl).
pub async fn resume_session(addr: SocketAddr, session_id: &str) -> (String, String) {
    let r = ssm(addr, "ResumeSession", json!({ "SessionId": session_id })).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    (
        v["TokenValue"].as_str().unwrap().to_owned(),
        v["StreamUrl"].as_str().unwrap().to_owned(),
    )
}

/// ResumeSession that must succeed: the TokenValue (its new StreamUrl is dropped).
pub async fn resume(addr: SocketAddr, session_id: &str) -> String {
    resume_session(addr, session_id).await.0
}

/// Asserts that the simulator saw no protocol violation in any session (through the
/// HTTP introspection endpoint).
pub async fn assert_no_violations(addr: SocketAddr) {
    let (status, v) = get_json(addr, "/sim/sessions").await;
    assert_eq!(status, 200);
    for s in v.as_array().expect("array") {
        assert_eq!(
            s["violations"].as_array().map(Vec::len),
            Some(0),
            "violations in {}: {}",
            s["session_id"],
            s["violations"]
        );
    }
}

pub async fn session_json(addr: SocketAddr, id: &str) -> Value {
    let (status, v) = get_json(addr, &format!("/sim/sessions/{id}")).await;
    assert_eq!(status, 200);
    v
}

// ---------------------------------------------------------------------------------------
// TCP echo destination

/// A TCP echo server on 127.0.0.1; returns its port.
pub async fn echo_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

// ---------------------------------------------------------------------------------------
// Token-recording relay

/// A TCP relay in front of the simulator that records every `TokenValue` the simulator
/// hands out (StartSession and ResumeSession answers pass through it; so does the data
/// channel, whose StreamUrl names the relay because it follows the request's Host).
pub struct TokenSnoop {
    pub addr: std::net::SocketAddr,
    tokens: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>,
}

impl TokenSnoop {
    pub async fn start(upstream: std::net::SocketAddr) -> TokenSnoop {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tokens = std::sync::Arc::new(std::sync::Mutex::new(
            std::collections::BTreeSet::<String>::new(),
        ));
        let found = tokens.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(up) = tokio::net::TcpStream::connect(upstream).await else {
                    continue;
                };
                let found = found.clone();
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = up.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut cr, &mut uw).await;
                    let _ = uw.shutdown().await;
                });
                tokio::spawn(async move {
                    const KEY: &[u8] = b"\"TokenValue\":\"";
                    let mut window: Vec<u8> = Vec::new();
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match ur.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        window.extend_from_slice(&buf[..n]);
                        let mut i = 0;
                        while let Some(p) = window[i..].windows(KEY.len()).position(|w| w == KEY) {
                            let start = i + p + KEY.len();
                            match window[start..].iter().position(|&b| b == b'"') {
                                Some(len) => {
                                    found.lock().unwrap().insert(
                                        String::from_utf8_lossy(&window[start..start + len])
                                            .into_owned(),
                                    );
                                    i = start + len;
                                }
                                None => break,
                            }
                        }
                        // Keep enough of the tail for a match split across reads.
                        let keep = window.len().min(512);
                        window.drain(..window.len() - keep);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        TokenSnoop { addr, tokens }
    }

    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every token seen so far, sorted.
    pub fn tokens(&self) -> Vec<String> {
        self.tokens.lock().unwrap().iter().cloned().collect()
    }
}

/// Panics when `text` (what a process wrote to `what`) holds one of `tokens`, or the
/// second half of one (a token split across lines or escaped). The message shows the
/// offending line with the token masked.
pub fn assert_no_token_in(tokens: &[String], what: &str, text: &str) {
    for (i, token) in tokens.iter().enumerate() {
        assert!(token.len() >= 20, "odd token {i}: {} chars", token.len());
        let half = &token[token.len() / 2..];
        if let Some(at) = text.find(half) {
            let line_start = text[..at].rfind('\n').map_or(0, |p| p + 1);
            let line_end = text[at..].find('\n').map_or(text.len(), |p| at + p);
            let line = text[line_start..line_end]
                .replace(token.as_str(), "<TOKEN>")
                .replace(half, "<HALF-TOKEN>");
            panic!(
                "token {i} of {} appears in the {what} ({} bytes) at {at}: {}",
                tokens.len(),
                text.len(),
                &line[..line.len().min(1500)]
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Hand-built data-channel client

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

pub fn open_data_channel_text(token: &str, client_id: &str) -> String {
    open_data_channel_text_as(token, client_id, CLIENT_VERSION)
}

pub fn open_data_channel_text_as(token: &str, client_id: &str, client_version: &str) -> String {
    serde_json::to_string(&OpenDataChannelInput {
        message_schema_version: "1.0".into(),
        request_id: Uuid::new_v4().to_string(),
        token_value: token.into(),
        client_id: client_id.into(),
        client_version: client_version.into(),
    })
    .unwrap()
}

/// Who signs an upgrade, and for which region.
#[derive(Clone, Debug)]
pub struct Signer {
    pub access_key_id: String,
    pub secret: String,
    pub session_token: Option<String>,
    pub region: String,
}

impl Signer {
    /// The hand client's credential ([`TEST_ACCESS_KEY_ID`]).
    pub fn test() -> Signer {
        Signer {
            access_key_id: TEST_ACCESS_KEY_ID.into(),
            secret: TEST_SECRET.into(),
            session_token: None,
            region: REGION.into(),
        }
    }

    /// The headers a current plugin adds to the upgrade GET of `url` at `now_unix`
    /// (`X-Amz-Date`, `X-Amz-Security-Token`, `Authorization`), built from the
    /// specification's steps with the verifier's canonical-form functions.
    pub fn headers(&self, url: &str, now_unix: i64) -> Vec<(String, String)> {
        let rest = url.split_once("://").expect("scheme").1;
        let (authority, path_query) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
        let amz_date = sigv4::format_amz_date(now_unix);
        let mut added = vec![("x-amz-date".to_owned(), amz_date.clone())];
        if let Some(t) = &self.session_token {
            added.push(("x-amz-security-token".to_owned(), t.clone()));
        }
        let mut headers = axum::http::HeaderMap::new();
        headers.insert("host", authority.parse().unwrap());
        for (k, v) in &added {
            headers.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        let mut signed: Vec<&str> = vec!["host"];
        signed.extend(added.iter().map(|(k, _)| k.as_str()));
        signed.sort();
        let req = sigv4::Request {
            method: "GET",
            path,
            query,
            headers: &headers,
        };
        let creq = sigv4::canonical_request(&req, &signed, None).unwrap();
        let date = &amz_date[..8];
        let scope = format!("{date}/{}/ssmmessages/aws4_request", self.region);
        let key = sigv4::signing_key(&self.secret, date, &self.region, "ssmmessages");
        let signature = sigv4::sign(&key, &sigv4::string_to_sign(&amz_date, &scope, &creq));
        added.push((
            "authorization".to_owned(),
            format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={}, Signature={signature}",
                self.access_key_id,
                signed.join(";")
            ),
        ));
        added
    }
}

pub fn unix_now() -> i64 {
    (now_ms() / 1000) as i64
}

/// Upgrades to `url` with these extra headers; the error (e.g. an HTTP 403) if refused.
pub async fn connect_with(
    url: &str,
    headers: &[(String, String)],
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    let mut req = url.into_client_request()?;
    for (k, v) in headers {
        req.headers_mut().insert(
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    tokio_tungstenite::connect_async(req)
        .await
        .map(|(ws, _)| ws)
}

/// Upgrades to `url` signed as `signer` would sign it now.
pub async fn connect_signed(
    url: &str,
    signer: &Signer,
) -> Result<Ws, tokio_tungstenite::tungstenite::Error> {
    connect_with(url, &signer.headers(url, unix_now())).await
}

/// Status and body of a refused upgrade (panics if it was accepted).
pub fn refused(r: Result<Ws, tokio_tungstenite::tungstenite::Error>) -> (u16, String) {
    match r {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => (
            resp.status().as_u16(),
            String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).into_owned(),
        ),
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok(_) => panic!("the upgrade was accepted"),
    }
}

/// Connects the websocket (signed with the test credential) and sends OpenDataChannel.
pub async fn open_ws(url: &str, token: &str, client_id: &str) -> Ws {
    let mut ws = connect_signed(url, &Signer::test())
        .await
        .expect("websocket connect");
    ws.send(Message::text(open_data_channel_text(token, client_id)))
        .await
        .unwrap();
    ws
}

pub fn message(
    message_type: MessageType,
    seq: i64,
    flags: u64,
    payload_type: PayloadType,
    payload: Vec<u8>,
) -> ClientMessage {
    ClientMessage {
        message_type,
        schema_version: 1,
        created_date: now_ms(),
        sequence_number: seq,
        flags,
        message_id: Uuid::new_v4(),
        payload_type,
        payload: Bytes::from(payload),
    }
}

pub fn ack_for(m: &ClientMessage) -> ClientMessage {
    let content = AcknowledgeContent {
        message_type: m.message_type.as_str().to_owned(),
        message_id: m.message_id.to_string(),
        sequence_number: m.sequence_number,
        is_sequential_message: true,
    };
    message(
        MessageType::Acknowledge,
        0,
        3,
        PayloadType::Undefined,
        to_json(&content),
    )
}

#[derive(Debug)]
pub enum Inbound {
    /// `output_stream_data` accepted in order (already acked).
    Data(ClientMessage),
    ChannelClosed(ChannelClosed),
    /// Any other message type.
    Control(ClientMessage),
    /// A close frame (code, reason), or `None` when the connection ended without one.
    Closed(Option<(u16, String)>),
}

/// The client half of the data channel, built from the codec types: per-message acks,
/// in-order delivery (duplicates re-acked, early messages acked and buffered), resend of
/// unacked messages every 200 ms.
pub struct HandClient {
    pub ws: Ws,
    pub next_seq: i64,
    pub expected: i64,
    pub unacked: BTreeMap<i64, ClientMessage>,
    pub reorder: BTreeMap<i64, ClientMessage>,
    pub ready: VecDeque<ClientMessage>,
    pub acks_received: Vec<i64>,
    pub resends: u64,
}

impl HandClient {
    pub fn new(ws: Ws) -> HandClient {
        HandClient {
            ws,
            next_seq: 0,
            expected: 0,
            unacked: BTreeMap::new(),
            reorder: BTreeMap::new(),
            ready: VecDeque::new(),
            acks_received: Vec::new(),
            resends: 0,
        }
    }

    /// Replaces the websocket (after a resume); keeps all sequence state and resends
    /// everything unacked.
    pub async fn reconnect(&mut self, ws: Ws) {
        self.ws = ws;
        let pending: Vec<ClientMessage> = self.unacked.values().cloned().collect();
        for m in pending {
            self.send_raw(&m).await;
        }
    }

    pub async fn send_raw(&mut self, m: &ClientMessage) {
        let _ = self.ws.send(Message::Binary(m.encode().unwrap())).await;
    }

    pub async fn send_stream(&mut self, payload_type: PayloadType, payload: &[u8]) {
        let m = message(
            MessageType::InputStreamData,
            self.next_seq,
            0,
            payload_type,
            payload.to_vec(),
        );
        self.next_seq += 1;
        self.unacked.insert(m.sequence_number, m.clone());
        self.send_raw(&m).await;
    }

    async fn resend(&mut self) {
        let pending: Vec<ClientMessage> = self.unacked.values().take(8).cloned().collect();
        for m in pending {
            self.resends += 1;
            self.send_raw(&m).await;
        }
    }

    /// Next event; panics after `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> Inbound {
        if let Some(m) = self.ready.pop_front() {
            return Inbound::Data(m);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.tick().await;
        loop {
            let msg = tokio::select! {
                m = self.ws.next() => m,
                _ = tick.tick() => {
                    self.resend().await;
                    continue;
                }
                _ = tokio::time::sleep_until(deadline) => panic!("no message within {timeout:?}"),
            };
            let frame = match msg {
                Some(Ok(Message::Binary(b))) => b,
                Some(Ok(Message::Text(t))) => Bytes::from(t),
                Some(Ok(Message::Close(f))) => {
                    return Inbound::Closed(f.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return Inbound::Closed(None),
            };
            let m = ClientMessage::decode(frame).expect("agent frame must decode");
            match m.message_type {
                MessageType::Acknowledge => {
                    let a: AcknowledgeContent = from_json("ack", &m.payload).unwrap();
                    self.unacked.remove(&a.sequence_number);
                    self.acks_received.push(a.sequence_number);
                }
                MessageType::OutputStreamData => {
                    let ack = ack_for(&m);
                    self.send_raw(&ack).await;
                    if m.sequence_number == self.expected {
                        self.expected += 1;
                        while let Some(next) = self.reorder.remove(&self.expected) {
                            self.expected += 1;
                            self.ready.push_back(next);
                        }
                        return Inbound::Data(m);
                    } else if m.sequence_number > self.expected {
                        self.reorder.entry(m.sequence_number).or_insert(m);
                    }
                }
                MessageType::ChannelClosed => {
                    return Inbound::ChannelClosed(
                        from_json("channel_closed", &m.payload).unwrap(),
                    );
                }
                _ => return Inbound::Control(m),
            }
        }
    }

    /// Next in-order stream message (skips control messages).
    pub async fn recv_data(&mut self, timeout: Duration) -> ClientMessage {
        loop {
            match self.recv(timeout).await {
                Inbound::Data(m) => return m,
                Inbound::Control(_) => continue,
                other => panic!("expected stream data, got {other:?}"),
            }
        }
    }

    /// Waits for the HandshakeRequest, answers it, waits for HandshakeComplete.
    pub async fn handshake(&mut self) -> HandshakeRequest {
        self.handshake_as(CLIENT_VERSION).await
    }

    /// [`HandClient::handshake`] reporting `client_version` in the HandshakeResponse.
    pub async fn handshake_as(&mut self, client_version: &str) -> HandshakeRequest {
        let m = self.recv_data(Duration::from_secs(10)).await;
        assert_eq!(m.payload_type, PayloadType::HandshakeRequest);
        assert_eq!(m.sequence_number, 0);
        assert_eq!(m.flags, 1);
        let req: HandshakeRequest = from_json("HandshakeRequest", &m.payload).unwrap();
        let resp = HandshakeResponse {
            client_version: client_version.into(),
            processed_client_actions: req
                .requested_client_actions
                .iter()
                .map(|a| ProcessedClientAction {
                    action_type: a.action_type.clone(),
                    action_status: ActionStatus::Success,
                    action_result: Value::Null,
                    error: String::new(),
                })
                .collect(),
            errors: None,
        };
        self.send_stream(PayloadType::HandshakeResponse, &to_json(&resp))
            .await;
        let m = self.recv_data(Duration::from_secs(10)).await;
        assert_eq!(m.payload_type, PayloadType::HandshakeComplete);
        let _: HandshakeComplete = from_json("HandshakeComplete", &m.payload).unwrap();
        req
    }

    /// Waits until every message we sent was acked.
    pub async fn wait_all_acked(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.unacked.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            assert!(!left.is_zero(), "unacked: {:?}", self.unacked.keys());
            let _ = tokio::time::timeout(left.min(Duration::from_millis(300)), async {
                let ev = self.recv(Duration::from_secs(3600)).await;
                if let Inbound::Data(_) | Inbound::Control(_) = ev {
                } else {
                    panic!("unexpected {ev:?}");
                }
            })
            .await;
        }
    }
}

/// What a client needs to resume a session (each resume dials the new StreamUrl).
pub struct Resumer {
    pub addr: SocketAddr,
    pub session_id: String,
    pub client_id: String,
    pub resumes: std::sync::atomic::AtomicU64,
}

/// A smux client stream over the hand client: writes `data`, reads back `data.len()`
/// bytes (against an echo destination).
pub struct MuxClient {
    pub smux: Smux,
}

impl Default for MuxClient {
    fn default() -> Self {
        Self::new()
    }
}

impl MuxClient {
    pub fn new() -> MuxClient {
        MuxClient {
            smux: Smux::new(
                Role::Client,
                SmuxConfig::keepalive_disabled(),
                std::time::Instant::now(),
            )
            .unwrap(),
        }
    }

    pub async fn echo(&mut self, client: &mut HandClient, data: &[u8]) -> Vec<u8> {
        self.echo_resuming(client, data, None).await
    }

    /// Like [`MuxClient::echo`]; when `resume` is given, a websocket that closes or
    /// drops is resumed (ResumeSession + reconnect) as a client must.
    pub async fn echo_resuming(
        &mut self,
        client: &mut HandClient,
        data: &[u8],
        resume_with: Option<&Resumer>,
    ) -> Vec<u8> {
        let sid = self.smux.open_stream().unwrap();
        self.smux.write(sid, data).unwrap();
        let mut got = Vec::new();
        loop {
            while let Some(chunk) = self.smux.poll_transmit(1024) {
                client.send_stream(PayloadType::Output, &chunk).await;
            }
            if got.len() >= data.len() {
                break;
            }
            match client.recv(Duration::from_secs(20)).await {
                Inbound::Data(m) if m.payload_type == PayloadType::Output => {
                    self.smux.handle_input(&m.payload).expect("smux input");
                }
                Inbound::Data(_) | Inbound::Control(_) => {}
                Inbound::Closed(how) if resume_with.is_some() => {
                    let r = resume_with.unwrap();
                    r.resumes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!(?how, "test client: resuming");
                    let (token, url) = resume_session(r.addr, &r.session_id).await;
                    client
                        .reconnect(open_ws(&url, &token, &r.client_id).await)
                        .await;
                }
                other => panic!("unexpected {other:?} after {} bytes", got.len()),
            }
            while let Some(ev) = self.smux.poll_event() {
                if let Event::Readable(id) = ev {
                    assert_eq!(id, sid);
                    while let Ok(StreamRead::Data(b)) = self.smux.read(id, 1 << 20) {
                        got.extend_from_slice(&b);
                    }
                }
            }
        }
        self.smux.close(sid).unwrap();
        while let Some(chunk) = self.smux.poll_transmit(1024) {
            client.send_stream(PayloadType::Output, &chunk).await;
        }
        got
    }
}

pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..len).map(|_| rng.u8(..)).collect()
}
