//! `bastionctl session-manager-plugin ...`: the plugin's argv contract against the
//! in-process simulator, over real sockets, with the real binary.

mod sim_util;

use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bastionctl");

fn plugin_command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env("AWS_ACCESS_KEY_ID", "AKIDTEST")
        .env("AWS_SECRET_ACCESS_KEY", "dummy-secret")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_SESSION_TOKEN")
        .env_remove("AWS_ENDPOINT_URL")
        .env_remove("AWS_ENDPOINT_URL_SSM")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

#[tokio::test]
async fn version_and_bare_invocation() {
    let out = plugin_command()
        .args(["session-manager-plugin", "--version"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let v = String::from_utf8(out.stdout).unwrap();
    let v = v.trim();
    // The AWS CLI's check: ^\d+(\.\d+){0,3}$ and newer than 1.2.497.0.
    let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts.len(), 4, "{v}");
    assert!(parts > vec![1, 2, 497, 0], "{v}");

    let out = plugin_command()
        .arg("session-manager-plugin")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed successfully"),
        "{:?}",
        out
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn port_forwarding_through_the_plugin_contract() {
    let sim = sim_util::start_default().await;
    let addr = sim.local_addr();
    let echo = sim_util::echo_server().await;
    let request = json!({
        "Target": "i-0123456789abcdef0",
        "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
        "Parameters": {
            "host": ["127.0.0.1"],
            "portNumber": [echo.to_string()],
            "localPortNumber": ["0"],
        },
    });
    let r = sim_util::ssm(addr, "StartSession", request.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let response = String::from_utf8(r.body.clone()).unwrap();
    let session_id = r.json()["SessionId"].as_str().unwrap().to_owned();

    let mut child = plugin_command()
        .args([
            "session-manager-plugin",
            &response,
            "us-east-1",
            "StartSession",
            "",
            &request.to_string(),
            &sim.endpoint_url(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let seen = Arc::new(Mutex::new(String::new()));
    let port: u16 = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            seen.lock().unwrap().push_str(&line);
            seen.lock().unwrap().push('\n');
            if let Some(rest) = line.strip_prefix("Port ") {
                let (n, tail) = rest.split_once(' ').unwrap();
                assert_eq!(tail, format!("opened for sessionId {session_id}."));
                return n.parse().unwrap();
            }
        }
        panic!("plugin stdout ended: {}", seen.lock().unwrap());
    })
    .await
    .expect("no 'Port N opened' line within 30 s");
    assert!(
        seen.lock()
            .unwrap()
            .contains(&format!("Starting session with SessionId: {session_id}")),
        "{}",
        seen.lock().unwrap()
    );
    let drain = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = seen.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };

    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut data = vec![0u8; 1 << 20];
            fastrand::fill(&mut data);
            let want = Sha256::digest(&data);
            let conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (mut r, mut w) = conn.into_split();
            // No half-close before the echo is back: over smux a FIN ends the stream
            // both ways (as with the reference plugin), so read exactly what was sent.
            let writer = tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w
            });
            let mut got = vec![0u8; 1 << 20];
            r.read_exact(&mut got).await.unwrap();
            drop(writer.await.unwrap());
            assert_eq!(Sha256::digest(&got), want);
        }));
    }
    tokio::time::timeout(Duration::from_secs(120), async {
        for t in tasks {
            if let Err(e) = t.await {
                panic!("{e:?}; session {:?}", sim.session(&session_id));
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("echo through the plugin did not finish within 120 s"));

    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("plugin did not exit after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    let out = seen.lock().unwrap().clone();
    assert!(
        out.contains(&format!("Connection accepted for session [{session_id}]")),
        "{out}"
    );
    assert!(out.contains("Waiting for connections..."), "{out}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sim.session(&session_id).expect("session").status;
        if status == "Terminated" {
            break;
        }
        assert!(Instant::now() < deadline, "session status {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    sim_util::assert_no_violations(addr).await;
}

#[tokio::test]
async fn env_indirection_and_non_port_document() {
    let sim = sim_util::start_default().await;
    let addr = sim.local_addr();
    let request = json!({ "Target": "i-0123456789abcdef0" });
    let r = sim_util::ssm(addr, "StartSession", request.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let session_id = r.json()["SessionId"].as_str().unwrap().to_owned();
    let out = plugin_command()
        .env(
            "AWS_SSM_START_SESSION_RESPONSE",
            String::from_utf8(r.body.clone()).unwrap(),
        )
        .args([
            "session-manager-plugin",
            "AWS_SSM_START_SESSION_RESPONSE",
            "us-east-1",
            "StartSession",
            "",
            &request.to_string(),
            &sim.endpoint_url(),
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains(&format!("Starting session with SessionId: {session_id}")),
        "{stdout}"
    );
    assert!(
        stderr.contains("not a port-forwarding document"),
        "{stderr}"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.session(&session_id).expect("session").status != "Terminated" {
        assert!(Instant::now() < deadline, "session not terminated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs the drop-in at `BASTION_LOG=level` through a session start, a websocket cut and
/// resume (ResumeSession through the endpoint argument), an echo and SIGTERM, with the
/// simulator behind a relay that records every token it issues; no such token may
/// appear in the plugin's stdout or stderr.
async fn plugin_logs_no_token_at(level: &str) {
    let sim = sim_util::start_default().await;
    let snoop = sim_util::TokenSnoop::start(sim.local_addr()).await;
    sim.update_faults(|f| {
        f.cut_after_bytes = Some(64 * 1024);
        f.max_cuts = Some(1);
    })
    .unwrap();
    let echo = sim_util::echo_server().await;
    let request = json!({
        "Target": "i-0123456789abcdef0",
        "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
        "Parameters": {
            "host": ["127.0.0.1"],
            "portNumber": [echo.to_string()],
            "localPortNumber": ["0"],
        },
    });
    let r = sim_util::ssm(snoop.addr, "StartSession", request.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let session_id = r.json()["SessionId"].as_str().unwrap().to_owned();
    let mut child = plugin_command()
        .env("BASTION_LOG", level)
        .env(
            "AWS_SSM_START_SESSION_RESPONSE",
            String::from_utf8(r.body.clone()).unwrap(),
        )
        .args([
            "session-manager-plugin",
            "AWS_SSM_START_SESSION_RESPONSE",
            "us-east-1",
            "StartSession",
            "",
            &request.to_string(),
            &snoop.endpoint_url(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr at once: at trace level it is large.
    let mut err_pipe = child.stderr.take().unwrap();
    let stderr = tokio::spawn(async move {
        let mut buf = Vec::new();
        let _ = err_pipe.read_to_end(&mut buf).await;
        String::from_utf8_lossy(&buf).into_owned()
    });
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stdout = String::new();
    let port: u16 = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            stdout.push_str(&line);
            stdout.push('\n');
            if let Some(rest) = line.strip_prefix("Port ") {
                return rest.split_once(' ').unwrap().0.parse().unwrap();
            }
        }
        panic!("plugin stdout ended: {stdout}");
    })
    .await
    .expect("no 'Port N opened' line within 30 s");

    // 256 KiB each way: past the cut, so the plugin resumes mid-transfer.
    let mut data = vec![0u8; 256 * 1024];
    fastrand::fill(&mut data);
    let conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = conn.into_split();
    let want = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w
    });
    let mut got = vec![0u8; 256 * 1024];
    tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut got))
        .await
        .expect("echo within 60 s")
        .unwrap();
    drop(writer.await.unwrap());
    assert_eq!(Sha256::digest(&got), want);
    let counters = sim.session(&session_id).unwrap().counters;
    assert!(counters.connections >= 2, "no resume: {counters:?}");

    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("plugin did not exit after SIGTERM")
        .unwrap();
    assert_eq!(status.code(), Some(0), "{status:?}");
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(Duration::from_secs(5), lines.next_line()).await
    {
        stdout.push_str(&line);
        stdout.push('\n');
    }
    let stderr = tokio::time::timeout(Duration::from_secs(10), stderr)
        .await
        .expect("stderr closes")
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sim.session(&session_id).expect("session").status != "Terminated" {
        assert!(Instant::now() < deadline, "session not terminated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());

    let tokens = snoop.tokens();
    assert!(
        tokens.len() >= 2,
        "the relay saw the StartSession and ResumeSession tokens: {}",
        tokens.len()
    );
    assert!(
        stdout.contains(&format!("Exiting session with sessionId: {session_id}.")),
        "{stdout}"
    );
    let level_word = level.split(',').next().unwrap().to_uppercase();
    assert!(
        stderr.contains(&level_word),
        "no {level_word} line: the log was not captured at {level}"
    );
    sim_util::assert_no_token_in(&tokens, "plugin's stdout", &stdout);
    sim_util::assert_no_token_in(&tokens, "plugin's stderr", &stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_logs_no_token_at_info_level() {
    plugin_logs_no_token_at("info").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_logs_no_token_at_debug_level() {
    plugin_logs_no_token_at("debug").await;
}

/// Plain `BASTION_LOG=trace`: tungstenite logs every frame (the OpenDataChannel one has
/// the token) and aws_smithy_runtime the ResumeSession body; `bastion::logging` caps both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_logs_no_token_at_trace_level() {
    plugin_logs_no_token_at("trace").await;
}
