//! The control API over a real Unix socket: routes, errors, malformed requests, socket
//! permissions, the peer check, and the `bastionctl` binary. No AWS call is made: the
//! profiles are only opened (listeners), never connected to.

use std::io::{Read as _, Write as _};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use bastion::api::{ErrorCode, OpenEvent, ProfileState, ProfileStatus};
use bastion::config::Config;
use bastion::ctl::{Client, CtlError};
use bastion::daemon::Daemon;
use bastion::daemon::control::{ControlError, PeerPolicy, SocketAccess, bind, serve_listener};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir (short enough for a socket path).
fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bctl-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn profile(name: &str, port: u16) -> String {
    format!(
        "[profiles.{name}]\ntarget = \"i-0123456789abcdef0\"\nlocal_port = {port}\nremote_port = 1\nbind = [\"127.0.0.1\"]\n\n"
    )
}

/// A profile whose session start fails before any AWS call: the EC2 lookup of its
/// `target_tags` refuses the malformed region.
fn tagged_profile(name: &str, port: u16) -> String {
    format!(
        "[profiles.{name}]\ntarget_tags = {{ Name = \"db\" }}\nregion = \"not a region\"\nlocal_port = {port}\nremote_port = 1\nbind = [\"127.0.0.1\"]\n\n"
    )
}

struct Server {
    dir: PathBuf,
    socket: PathBuf,
    config_path: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ControlError>>>,
}

impl Server {
    async fn start(config: &str) -> Server {
        Self::start_with(config, SocketAccess::default(), None).await
    }

    async fn start_with(config: &str, access: SocketAccess, socket: Option<PathBuf>) -> Server {
        let dir = temp_dir();
        let config_path = dir.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let parsed =
            Config::parse(config, Path::new("t.toml"), &|_| None).expect("test config parses");
        let daemon: Arc<Daemon> = Daemon::new(&config_path, parsed, None);
        let socket = socket.unwrap_or_else(|| dir.join("run").join("control.sock"));
        let listener = bind(&socket, access)
            .await
            .expect("bind the control socket");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_listener(daemon, listener, async move {
            let _ = stopped.await;
        }));
        Server {
            dir,
            socket,
            config_path,
            stop: Some(stop),
            task: Some(task),
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.socket).with_timeout(Duration::from_secs(10))
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let r = tokio::time::timeout(Duration::from_secs(10), self.task.take().unwrap())
            .await
            .expect("server stops");
        r.unwrap().unwrap();
        assert!(
            !self.socket.exists(),
            "the socket file is removed on shutdown"
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn api_code(e: &CtlError) -> (u16, &str, &str) {
    match e {
        CtlError::Api { status, error } => (*status, error.code.as_str(), error.message.as_str()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_private_and_health_answers() {
    let server = Server::start(&profile("alpha", free_port())).await;
    let mode = std::fs::metadata(&server.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    let dir_mode = std::fs::metadata(server.socket.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "socket directory mode {dir_mode:o}");
    let health = server.client().health().await.unwrap();
    assert_eq!(health.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(health.pid, std::process::id());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_status_open_close() {
    let (pa, pb) = (free_port(), free_port());
    let server = Server::start(&(profile("alpha", pa) + &profile("beta", pb))).await;
    let client = server.client();

    let list = client.list().await.unwrap();
    let names: Vec<_> = list.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["alpha", "beta"]);
    assert!(list.iter().all(|p| p.state == ProfileState::Closed));
    assert_eq!(list[0].target, "i-0123456789abcdef0");

    let opened = client.open("alpha").await.unwrap();
    assert_eq!(opened.state, ProfileState::Listening);
    assert_eq!(opened.listen, [format!("127.0.0.1:{pa}")]);
    assert!(
        std::net::TcpListener::bind(("127.0.0.1", pa)).is_err(),
        "alpha listens"
    );
    // Opening again is idempotent.
    assert_eq!(
        client.open("alpha").await.unwrap().state,
        ProfileState::Listening
    );

    let status = client.status("alpha").await.unwrap();
    assert_eq!(status.state, ProfileState::Listening);
    assert_eq!(status.session_id, None);
    assert_eq!(
        client.status("beta").await.unwrap().state,
        ProfileState::Closed
    );

    let closed = client.close("alpha").await.unwrap();
    assert_eq!(closed.state, ProfileState::Closed);
    assert!(closed.listen.is_empty());
    // The listener task is aborted asynchronously: poll until the port is free.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(("127.0.0.1", pa)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "alpha's port is never freed"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_profile_is_404() {
    let server = Server::start(&profile("alpha", free_port())).await;
    let client = server.client();
    for e in [
        client.status("nosuch").await.unwrap_err(),
        client.open("nosuch").await.unwrap_err(),
        client.close("nosuch").await.unwrap_err(),
        client.open_warm("nosuch").await.unwrap_err(),
    ] {
        let (status, code, message) = api_code(&e);
        assert_eq!((status, code), (404, "unknown_profile"), "{message}");
        assert!(message.contains("nosuch"), "{message}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_in_use_is_409() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let server = Server::start(&profile("alpha", port)).await;
    let e = server.client().open("alpha").await.unwrap_err();
    let (status, code, message) = api_code(&e);
    assert_eq!((status, code), (409, "port_in_use"), "{message}");
    assert!(
        message.contains(&port.to_string()),
        "message names the port: {message}"
    );
    // The warm path reports it the same way, before any streaming.
    let e = server.client().open_warm("alpha").await.unwrap_err();
    assert_eq!(api_code(&e).1, "port_in_use");
    assert_eq!(
        server.client().status("alpha").await.unwrap().state,
        ProfileState::Closed
    );
    drop(taken);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_open_streams_ndjson_progress() {
    // A session start that fails before any AWS call exercises the whole stream.
    let port = free_port();
    let server = Server::start(&tagged_profile("tagged", port)).await;
    let mut stream = server.client().open_warm("tagged").await.unwrap();
    let mut phases = Vec::new();
    let mut last = None;
    while let Some(line) = stream.next_line().await.unwrap() {
        serde_json::from_str::<serde_json::Value>(&line.raw).expect("each line is JSON");
        match line.event {
            OpenEvent::Progress(p) => phases.push(p.phase),
            other => last = Some(other),
        }
    }
    assert_eq!(phases, ["listening", "starting_session", "failed"]);
    match last {
        Some(OpenEvent::Error { error }) => assert_eq!(error.code, ErrorCode::Ec2LookupFailed),
        other => panic!("expected a final error line, got {other:?}"),
    }
    // The raw wire format: content type and one JSON object per line.
    let body = br#"{"warm":true}"#;
    let req = format!(
        "POST /v1/profiles/tagged/open HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let raw = raw_exchange(&server.socket, &[req.as_bytes(), body].concat(), false).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/x-ndjson"),
        "{text}"
    );
    assert!(text.contains(r#""phase":"starting_session""#), "{text}");
    assert!(
        text.contains(r#"{"error":{"code":"ec2_lookup_failed""#),
        "{text}"
    );
    // The listener stays open after a failed warm open; the next connection retries.
    let status = server.client().status("tagged").await.unwrap();
    assert_eq!(status.state, ProfileState::Error);
    assert!(status.last_error.is_some());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_unchanged_profiles() {
    let (pa, pb, pc) = (free_port(), free_port(), free_port());
    let server = Server::start(&(profile("alpha", pa) + &profile("beta", pb))).await;
    let client = server.client();
    client.open("alpha").await.unwrap();
    std::fs::write(
        &server.config_path,
        profile("alpha", pa) + &profile("gamma", pc),
    )
    .unwrap();
    let r = client.reload().await.unwrap();
    assert_eq!(r.added, ["gamma"]);
    assert_eq!(r.removed, ["beta"]);
    assert_eq!(r.unchanged, ["alpha"]);
    assert!(r.changed.is_empty());
    assert_eq!(
        client.status("alpha").await.unwrap().state,
        ProfileState::Listening
    );
    // A broken configuration is refused with a clear error, and nothing changes.
    std::fs::write(&server.config_path, "[profiles.x]\nlocal_port = \"no\"\n").unwrap();
    let e = client.reload().await.unwrap_err();
    let (status, code, _) = api_code(&e);
    assert_eq!((status, code), (422, "bad_config"));
    let names: Vec<_> = client
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert_eq!(names, ["alpha", "gamma"]);
    client.close("alpha").await.unwrap();
    server.stop().await;
}

/// Writes `request` on a fresh connection (closing the write half when asked) and
/// returns everything the server sent before closing the connection (5 s at most).
async fn raw_exchange(socket: &Path, request: &[u8], half_close: bool) -> Vec<u8> {
    raw_exchange_closed(socket, request, half_close).await.0
}

/// [`raw_exchange`], and whether the server closed the connection within the 5 s.
async fn raw_exchange_closed(socket: &Path, request: &[u8], half_close: bool) -> (Vec<u8>, bool) {
    let mut conn = UnixStream::connect(socket).await.unwrap();
    // The server may answer (and close) before reading everything: ignore write errors.
    let _ = conn.write_all(request).await;
    if half_close {
        let _ = conn.shutdown().await;
    }
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 8192];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (out, closed)
}

/// The HTTP status of a raw answer, if it is one.
fn status_of(raw: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(raw.get(..12)?).ok()?;
    text.strip_prefix("HTTP/1.1 ")?.trim().parse().ok()
}

/// The API error code in a raw answer's JSON body.
fn error_code_of(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let body = text.split_once("\r\n\r\n")?.1;
    let v: serde_json::Value = serde_json::from_str(body.trim()).ok()?;
    Some(v["code"].as_str()?.to_owned())
}

fn http(method: &str, path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    [req.as_bytes(), body].concat()
}

fn json_post(path: &str, body: &[u8]) -> Vec<u8> {
    http("POST", path, &["Content-Type: application/json"], body)
}

enum Expect {
    /// This status with this API error code.
    Api(u16, &'static str),
    /// Any 4xx/5xx answer, or the connection closed without one.
    ErrorOrClosed,
    /// The server closes the connection (whatever it sent before).
    Closed,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_errors_and_the_server_keeps_serving() {
    let server =
        Server::start(&(profile("alpha", free_port()) + &profile("beta", free_port()))).await;
    let client = server.client();
    let open = "/v1/profiles/alpha/open";
    let too_big = vec![b' '; bastion::api::MAX_REQUEST_BYTES + 1];
    let nested = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
    let mut chunked = b"POST /v1/profiles/alpha/open HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..40 {
        chunked.extend_from_slice(format!("{:x}\r\n", 4096).as_bytes());
        chunked.extend_from_slice(&[b' '; 4096]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let long_header = format!("X-Long: {}", "a".repeat(1024 * 1024));

    let cases: Vec<(&str, Vec<u8>, bool, Expect)> = vec![
        ("truncated JSON", json_post(open, br#"{"warm":"#), false, Expect::Api(400, "bad_request")),
        ("wrong JSON type", json_post(open, br#"{"warm":"yes"}"#), false, Expect::Api(400, "bad_request")),
        ("JSON array body", json_post(open, b"[]"), false, Expect::Api(400, "bad_request")),
        ("JSON string body", json_post(open, b"\"warm\""), false, Expect::Api(400, "bad_request")),
        ("deeply nested JSON", json_post(open, nested.as_bytes()), false, Expect::Api(400, "bad_request")),
        ("invalid UTF-8 in JSON", json_post(open, b"{\"warm\": \"\xff\xfe\"}"), false, Expect::Api(400, "bad_request")),
        ("trailing garbage after JSON", json_post(open, br#"{"warm":false} xyz"#), false, Expect::Api(400, "bad_request")),
        ("body over the size cap", json_post(open, &too_big), false, Expect::Api(413, "payload_too_large")),
        ("chunked body over the size cap", chunked, false, Expect::Api(413, "payload_too_large")),
        ("wrong content type", http("POST", open, &["Content-Type: text/plain"], br#"{"warm":false}"#), false, Expect::Api(415, "unsupported_media_type")),
        ("form-encoded body", http("POST", open, &["Content-Type: application/x-www-form-urlencoded"], b"warm=true"), false, Expect::Api(415, "unsupported_media_type")),
        ("wrong method on a collection", http("DELETE", "/v1/profiles", &[], b""), false, Expect::Api(405, "method_not_allowed")),
        ("GET on an action", http("GET", open, &[], b""), false, Expect::Api(405, "method_not_allowed")),
        ("PUT on reload", http("PUT", "/v1/reload", &[], b""), false, Expect::Api(405, "method_not_allowed")),
        ("unknown API version", http("GET", "/v2/profiles", &[], b""), false, Expect::Api(404, "not_found")),
        ("unknown route", http("GET", "/v1/nope", &[], b""), false, Expect::Api(404, "not_found")),
        ("root path", http("GET", "/", &[], b""), false, Expect::Api(404, "not_found")),
        ("unknown profile", http("GET", "/v1/profiles/nosuch", &[], b""), false, Expect::Api(404, "unknown_profile")),
        ("non-UTF-8 profile name", http("GET", "/v1/profiles/%FF%FE", &[], b""), false, Expect::Api(400, "bad_request")),
        ("binary garbage", b"\x00\x01\x02\x03\xff\xfe\xfd\r\n\r\n".to_vec(), false, Expect::ErrorOrClosed),
        ("text that is not HTTP", b"hello there\r\n\r\n".to_vec(), false, Expect::ErrorOrClosed),
        ("truncated request head", b"GET /v1/health HTTP/1.1\r\nHost: x\r\n".to_vec(), true, Expect::ErrorOrClosed),
        ("truncated body", b"POST /v1/profiles/alpha/open HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"warm\":".to_vec(), true, Expect::ErrorOrClosed),
        ("invalid Content-Length", b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(), false, Expect::ErrorOrClosed),
        ("unknown transfer coding", b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nxxxx".to_vec(), false, Expect::ErrorOrClosed),
        ("bad chunk size", b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n".to_vec(), false, Expect::ErrorOrClosed),
        ("oversized header", http("GET", "/v1/health", &[&long_header], b""), false, Expect::ErrorOrClosed),
        ("HTTP/2 preface then garbage frames", [&b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..], &[0xff; 64]].concat(), false, Expect::Closed),
        ("unknown HTTP version", b"GET /v1/health HTTP/9.9\r\nHost: x\r\n\r\n".to_vec(), false, Expect::ErrorOrClosed),
        ("control characters in the path", b"GET /v1/prof\x01iles HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(), false, Expect::ErrorOrClosed),
        ("empty connection", Vec::new(), true, Expect::ErrorOrClosed),
    ];
    assert!(cases.len() >= 20);
    for (what, request, half_close, expect) in cases {
        let (raw, closed) = raw_exchange_closed(&server.socket, &request, half_close).await;
        let status = status_of(&raw);
        match expect {
            Expect::Api(want, code) => {
                assert_eq!(
                    status,
                    Some(want),
                    "{what}: {}",
                    String::from_utf8_lossy(&raw)
                );
                assert_eq!(
                    error_code_of(&raw).as_deref(),
                    Some(code),
                    "{what}: {}",
                    String::from_utf8_lossy(&raw)
                );
            }
            Expect::ErrorOrClosed => match status {
                None => assert!(
                    raw.is_empty() && closed,
                    "{what}: neither an HTTP answer nor a clean close: {raw:?}"
                ),
                Some(s) => assert!(s >= 400, "{what}: answered {s}"),
            },
            Expect::Closed => assert!(closed, "{what}: the connection stayed open"),
        }
        // The server still serves a valid request after each.
        let health = client
            .health()
            .await
            .unwrap_or_else(|e| panic!("after {what}: {e}"));
        assert_eq!(health.pid, std::process::id());
        assert_eq!(
            client.status("beta").await.unwrap().state,
            ProfileState::Closed
        );
    }
    // Nothing the malformed requests sent opened a profile.
    assert_eq!(
        client.status("alpha").await.unwrap().state,
        ProfileState::Closed
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_client_does_not_block_others() {
    let server = Server::start(&profile("alpha", free_port())).await;
    let mut stalled = Vec::new();
    for _ in 0..5 {
        let mut c = UnixStream::connect(&server.socket).await.unwrap();
        c.write_all(b"POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{")
            .await
            .unwrap();
        stalled.push(c);
    }
    let mut idle = UnixStream::connect(&server.socket).await.unwrap();
    idle.write_all(b"GET /v1/hea").await.unwrap();
    for _ in 0..3 {
        assert_eq!(server.client().list().await.unwrap().len(), 1);
    }
    drop(stalled);
    drop(idle);
    server.stop().await;
}

#[test]
fn peer_policy() {
    let own = PeerPolicy {
        uid: 1000,
        gid: None,
    };
    assert!(own.allows(1000, 1000, &[]));
    assert!(own.allows(0, 0, &[]), "root may connect");
    assert!(!own.allows(1001, 1000, &[1000]), "another user is refused");
    assert!(!own.allows(65534, 65534, &[]));
    let group = PeerPolicy {
        uid: 1000,
        gid: Some(50),
    };
    assert!(group.allows(1001, 50, &[]), "primary group member");
    assert!(
        group.allows(1001, 100, &[7, 50]),
        "supplementary group member"
    );
    assert!(!group.allows(1001, 100, &[7]));
}

/// End to end: a connection from another uid is closed unanswered, and the server keeps
/// serving its own user. Needs root (to take another uid on one thread).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_users_connections_are_closed() {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: needs root to connect as another uid");
        return;
    }
    let dir = temp_dir();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = dir.join("control.sock");
    // World-connectable socket, so that only the peer check stands in the way.
    let access = SocketAccess {
        mode: 0o666,
        gid: None,
    };
    let server =
        Server::start_with(&profile("alpha", free_port()), access, Some(socket.clone())).await;
    let path = socket.clone();
    let answer = std::thread::spawn(move || {
        rustix::thread::set_thread_res_uid(
            rustix::process::Uid::from_raw(65534),
            rustix::process::Uid::from_raw(65534),
            rustix::process::Uid::from_raw(0),
        )
        .unwrap();
        let mut c =
            std::os::unix::net::UnixStream::connect(&path).expect("the socket is connectable");
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = c.write_all(b"GET /v1/profiles HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut out = Vec::new();
        // Closed with our request unread: EOF or a reset, never a timeout.
        let closed = match c.read_to_end(&mut out) {
            Ok(_) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        (closed, out)
    })
    .join()
    .unwrap();
    assert!(answer.0, "closed rather than left hanging");
    assert!(
        answer.1.is_empty(),
        "no answer to another uid: {:?}",
        String::from_utf8_lossy(&answer.1)
    );
    assert_eq!(server.client().list().await.unwrap().len(), 1);
    server.stop().await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = temp_dir();
    let socket = dir.join("control.sock");
    // A socket file nobody accepts on (a daemon that died).
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let server = Server::start_with(
        &profile("alpha", free_port()),
        SocketAccess::default(),
        Some(socket.clone()),
    )
    .await;
    server
        .client()
        .health()
        .await
        .expect("serves on the replaced socket");
    // A second daemon on the same socket is refused, and names the first one.
    match bind(&socket, SocketAccess::default()).await {
        Err(ControlError::AlreadyRunning { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
        other => panic!("expected AlreadyRunning, got {other:?}"),
    }
    server
        .client()
        .health()
        .await
        .expect("the first daemon still serves");
    server.stop().await;
    // Something that is not a socket is never deleted.
    std::fs::write(&socket, "keep me").unwrap();
    match bind(&socket, SocketAccess::default()).await {
        Err(e @ ControlError::NotASocket { .. }) => assert!(e.to_string().contains("not a socket")),
        other => panic!("expected NotASocket, got {other:?}"),
    }
    assert_eq!(std::fs::read_to_string(&socket).unwrap(), "keep me");
    let _ = std::fs::remove_dir_all(dir);
}

async fn bastionctl(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_bastionctl"))
        .args(args)
        .env_remove("BASTION_SOCKET")
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bastionctl_without_daemon_says_how_to_start_it() {
    let dir = temp_dir();
    let socket = dir.join("missing.sock");
    let s = socket.to_str().unwrap();
    for args in [
        vec!["--socket", s, "list"],
        vec!["--socket", s, "--json", "status"],
        vec!["open", "x", "--socket", s],
    ] {
        let out = bastionctl(&args).await;
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            stderr,
            format!(
                "bastiond is not running (no control socket at {s}); start it with: systemctl --user start bastiond (or run: bastiond run)\n"
            )
        );
        assert!(out.stdout.is_empty());
    }
    // Also through BASTION_SOCKET.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_bastionctl"))
        .arg("list")
        .env("BASTION_SOCKET", &socket)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bastionctl_commands() {
    let (pa, pb) = (free_port(), free_port());
    let server = Server::start(&(profile("alpha", pa) + &profile("beta", pb))).await;
    let s = server.socket.to_str().unwrap().to_owned();
    let run = |args: Vec<&'static str>| {
        let s = s.clone();
        async move {
            let mut full = vec!["--socket", s.as_str()];
            full.extend(args);
            bastionctl(&full).await
        }
    };

    let out = run(vec!["--json", "list"]).await;
    assert_eq!(out.status.code(), Some(0));
    let list: Vec<ProfileStatus> =
        serde_json::from_slice(&out.stdout).expect("--json list is the API JSON");
    assert_eq!(list.len(), 2);

    let out = run(vec!["list"]).await;
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{text}");
    assert!(
        lines[1].starts_with("alpha") && lines[2].starts_with("beta"),
        "{text}"
    );
    // Aligned: the STATE column starts at the same offset on every line.
    let col = lines[0].find("STATE").unwrap();
    assert!(
        lines[1..].iter().all(|l| &l[col..col + 6] == "closed"),
        "{text}"
    );

    let out = run(vec!["open", "alpha"]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(&format!("127.0.0.1:{pa}")), "{text}");

    let out = run(vec!["status", "alpha", "--json"]).await;
    let status: ProfileStatus = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status.state, ProfileState::Listening);

    let out = run(vec!["status"]).await;
    let text = String::from_utf8(out.stdout).unwrap();
    for header in [
        "LISTEN",
        "SESSION",
        "AGENT",
        "MODE",
        "CONNS",
        "UP",
        "DOWN",
        "UPTIME",
        "LAST ERROR",
    ] {
        assert!(text.lines().next().unwrap().contains(header), "{text}");
    }
    assert!(text.contains("listening"), "{text}");

    let out = run(vec!["status", "nosuch"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: no profile named \"nosuch\""),
        "{stderr}"
    );

    let out = run(vec!["--json", "close", "nosuch"]).await;
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "unknown_profile");

    let out = run(vec!["close", "alpha"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout).unwrap().contains("closed"));

    let out = run(vec!["reload", "--json"]).await;
    assert_eq!(out.status.code(), Some(0));
    let r: bastion::api::ReloadResult = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r.unchanged, ["alpha", "beta"]);

    let out = run(vec!["frobnicate"]).await;
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    let out = bastionctl(&["--version"]).await;
    assert_eq!(out.status.code(), Some(0));
    assert!(
        String::from_utf8(out.stdout)
            .unwrap()
            .contains(env!("CARGO_PKG_VERSION"))
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bastionctl_warm_json_streams_events() {
    let server = Server::start(&tagged_profile("tagged", free_port())).await;
    let out = bastionctl(&[
        "--socket",
        server.socket.to_str().unwrap(),
        "--json",
        "open",
        "tagged",
        "--warm",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "the session cannot start");
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<OpenEvent> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        matches!(&events[0], OpenEvent::Progress(p) if p.phase == "listening"),
        "{text}"
    );
    assert!(
        matches!(events.last(), Some(OpenEvent::Error { error }) if error.code == ErrorCode::Ec2LookupFailed),
        "{text}"
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.starts_with("error: cannot resolve target_tags"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1);
    // Human mode off a terminal: one line per phase on stderr.
    let out = bastionctl(&[
        "--socket",
        server.socket.to_str().unwrap(),
        "open",
        "tagged",
        "--warm",
    ])
    .await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("starting_session "), "{stderr}");
    server.stop().await;
}
