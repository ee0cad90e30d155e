//! `bastion-sim`: prints exactly one `listening http://127.0.0.1:PORT` line, serves the
//! API and introspection, exits 0 on SIGTERM; refuses a non-loopback address.

// The simulator tests' helpers live with the product's tests (they also serve the
// end-to-end suites there); they use only bastion-proto and this crate.
#[path = "../../../tests/sim_util/mod.rs"]
mod sim_util;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use sim_util::*;

fn bastion_sim() -> Command {
    Command::new(env!("CARGO_BIN_EXE_bastion-sim"))
}

#[tokio::test]
async fn sim_prints_one_line_and_serves() {
    let mut child = bastion_sim()
        .args(["--listen", "127.0.0.1:0", "--agent-version", "3.2.2222.0"])
        .args(["--agent-pacing-ms", "0"])
        .args([
            "--credential",
            &format!("{TEST_ACCESS_KEY_ID}:{TEST_SECRET}"),
        ])
        .env(
            "RUST_LOG",
            "trace,tungstenite=trace,tokio_tungstenite=trace",
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn bastion-sim");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut first = String::new();
        let _ = r.read_line(&mut first);
        let _ = tx.send(first);
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        rest
    });
    let line = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("no listening line within 20 s");
    let url = line
        .strip_suffix('\n')
        .and_then(|l| l.strip_prefix("listening http://"))
        .unwrap_or_else(|| panic!("unexpected line {line:?}"));
    let addr: SocketAddr = url.parse().expect("address");
    assert!(addr.ip().is_loopback());
    assert_ne!(addr.port(), 0);

    let (status, v) = get_json(addr, "/sim/health").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["agent_version"], "3.2.2222.0");
    let (id, token, url) = start_session(addr, json!({"Target": "i-0123456789abcdef0"})).await;
    // Open the data channel with the token (and once with a wrong one), so that the
    // token passes through every layer that might log it.
    let mut c = HandClient::new(open_ws(&url, &token, "c").await);
    let _ = c.recv(Duration::from_secs(10)).await;
    let mut bad = open_ws(&url, &token, "c").await;
    use futures_util::StreamExt as _;
    while let Some(Ok(_)) = bad.next().await {}
    let token2 = resume(addr, &id).await;

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "bastion-sim did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let rest = reader.join().unwrap();
    assert!(rest.is_empty(), "more than one line on stdout: {rest:?}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(stderr.contains(&id), "the session id is logged");
    assert!(
        stderr.contains("OpenDataChannel refused"),
        "the bad token is logged as such"
    );
    assert!(!stderr.contains(&token), "a token leaked into the logs");
    assert!(!stderr.contains(&token2), "a token leaked into the logs");
    drop(c);
    assert!(
        !stderr.contains('\u{1b}'),
        "ANSI escapes in non-terminal logs"
    );
}

#[test]
fn sim_refuses_non_loopback_without_flag() {
    let out = bastion_sim()
        .args(["--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--allow-non-loopback"));
}

#[test]
fn version_flag() {
    let out = bastion_sim().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("bastion-sim {}", env!("CARGO_PKG_VERSION"))
    );
}
