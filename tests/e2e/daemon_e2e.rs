//! The whole product over real sockets: a real PostgreSQL server, the simulator standing
//! in for AWS (reached through `AWS_ENDPOINT_URL_SSM`), the real `bastiond run` process
//! and real clients (psql, tokio-postgres, bastionctl).

use crate::e2e_util;
use crate::sim_util;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bastion_sim::{SimConfig, SimHandle, Simulator};
use e2e_util::{DaemonProcess, PgServer, assert_no_violations, free_port, profile, wait_listening};
use sha2::{Digest, Sha256};
use sim_util::TokenSnoop;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn sim(config: SimConfig) -> SimHandle {
    Simulator::bind(e2e_util::with_daemon_credential(config))
        .await
        .expect("sim bind")
        .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_and_a_rust_client_get_rows_through_the_tunnel() {
    let pg = PgServer::start();
    let sim = sim(SimConfig::default()).await;
    let local = free_port();
    let d = DaemonProcess::start(&profile("pg", pg.port, local), &sim.endpoint_url());
    wait_listening(local, &d);

    let out = tokio::task::spawn_blocking(move || PgServer::psql(local, "select 40 + 2"))
        .await
        .unwrap();
    assert_eq!(out, "42");

    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={local} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .expect("tokio-postgres connects through the tunnel");
    tokio::spawn(conn);
    let rows = client
        .query("select g, md5(g::text) from generate_series(1, 500) g", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 500);
    let last: String = rows[499].get(1);
    assert_eq!(last, md5_hex(b"500"));

    let (code, out, _) = d.ctl(&["--json", "status", "pg"]);
    assert_eq!(code, 0);
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(status["state"], "ready");
    assert_eq!(status["mode"], "mux");
    assert!(status["bytes_down"].as_u64().unwrap() > 10_000, "{status}");
    assert_no_violations(&sim);
}

/// MD5 computed independently of PostgreSQL, with coreutils' md5sum.
fn md5_hex(data: &[u8]) -> String {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    let hex = String::from_utf8_lossy(&out.stdout);
    hex.split_whitespace().next().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_psql_connections_on_one_profile() {
    let pg = PgServer::start();
    let sim = sim(SimConfig::default()).await;
    let local = free_port();
    let d = DaemonProcess::start(&profile("pg", pg.port, local), &sim.endpoint_url());
    wait_listening(local, &d);
    let handles: Vec<_> = (0..50)
        .map(|i| {
            std::thread::spawn(move || {
                PgServer::psql(
                    local,
                    &format!("select {i} + sum(g) from generate_series(1, 1000) g"),
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), (500_500 + i).to_string());
    }
    let sessions = sim.sessions();
    assert!(
        (1..=4).contains(&sessions.len()),
        "striped over at most max_sessions (4) sessions: {}",
        sessions.len()
    );
    let streams: u64 = sessions.iter().map(|s| s.counters.streams_opened).sum();
    assert!(streams >= 50, "{streams}");
    assert_no_violations(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_of_64_mib_in_and_out_keeps_every_byte() {
    let pg = PgServer::start();
    // Agent pacing off: this measures correctness of bulk transfer, not the agent's cap.
    let sim = sim(SimConfig {
        agent_pacing: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    let local = free_port();
    let d = DaemonProcess::start(&profile("pg", pg.port, local), &sim.endpoint_url());
    wait_listening(local, &d);

    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={local} user=postgres dbname=postgres"),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    client
        .batch_execute("create table blob (line text)")
        .await
        .unwrap();

    // 64 MiB of pseudo-random hex lines.
    let mut data = Vec::with_capacity(64 << 20);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while data.len() < 64 << 20 {
        for _ in 0..31 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(format!("{x:016x}").as_bytes());
        }
        data.push(b'\n');
    }
    let sent = Sha256::digest(&data);

    let sink = client.copy_in("copy blob from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    use futures_util::SinkExt;
    for chunk in data.chunks(256 * 1024) {
        sink.send(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    let rows = sink.finish().await.unwrap();
    assert_eq!(rows as usize, data.iter().filter(|&&b| b == b'\n').count());

    use futures_util::StreamExt;
    let stream = client.copy_out("copy blob to stdout").await.unwrap();
    futures_util::pin_mut!(stream);
    let mut back = Sha256::new();
    let mut n = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        n += chunk.len();
        back.update(&chunk);
    }
    assert_eq!(n, data.len());
    assert_eq!(back.finalize(), sent, "COPY out differs from COPY in");
    assert_no_violations(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_profiles_at_once_and_basic_mode() {
    let pg = PgServer::start();
    // An old agent (basic mode: one connection per session at a time).
    let basic_sim = sim(SimConfig {
        agent_version: "3.0.196.0".into(),
        ..SimConfig::default()
    })
    .await;
    let ports = [free_port(), free_port(), free_port()];
    // Agents before 3.1.1188.0 cannot forward to a remote host: use the instance's own
    // port (the simulated instance is this machine).
    let config = format!(
        "{}{}{}",
        profile("a", pg.port, ports[0]),
        profile("b", pg.port, ports[1]),
        profile("c", pg.port, ports[2])
    )
    .replace("remote_host = \"127.0.0.1\"\n", "");
    let d = DaemonProcess::start(&config, &basic_sim.endpoint_url());
    for p in ports {
        wait_listening(p, &d);
    }
    let handles: Vec<_> = ports
        .iter()
        .map(|&p| std::thread::spawn(move || PgServer::psql(p, &format!("select {p}"))))
        .collect();
    for (h, p) in handles.into_iter().zip(ports) {
        assert_eq!(h.join().unwrap(), p.to_string());
    }
    // Sequential connections on one basic-mode profile reuse its session.
    for i in 0..3 {
        assert_eq!(
            PgServer::psql(ports[0], &format!("select {i}")),
            i.to_string()
        );
    }
    let (code, out, _) = d.ctl(&["--json", "list"]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    let modes: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["mode"].clone())
        .collect();
    assert!(modes.iter().all(|m| m == "basic"), "{list}");
    assert_no_violations(&basic_sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_remote_port_closes_the_client_and_the_daemon_stays_up() {
    let sim = sim(SimConfig::default()).await;
    let local = free_port();
    let dead = free_port(); // nothing listens there
    let d = DaemonProcess::start(&profile("dead", dead, local), &sim.endpoint_url());
    wait_listening(local, &d);
    let started = Instant::now();
    assert_closed_without_data(local, b"hello", "the client connection is closed promptly").await;
    assert!(started.elapsed() < Duration::from_secs(10));
    // The reason reaches bastionctl.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, out, _) = d.ctl(&["--json", "status", "dead"]);
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        if s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("could not connect"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no error shown: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the daemon still serves.
    let (code, _, _) = d.ctl(&["list"]);
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_not_connected_and_unknown_profile_reach_the_user() {
    let sim = sim(SimConfig {
        targets: bastion_sim::TargetPolicy::Only(vec!["i-0aaaaaaaaaaaaaaaa".into()]),
        ..SimConfig::default()
    })
    .await;
    let local = free_port();
    let d = DaemonProcess::start(
        &profile("pg", 5432, local).replace("autostart = true\n", ""),
        &sim.endpoint_url(),
    );
    let (code, _, err) = d.ctl(&["open", "pg", "--warm"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not connected to Session Manager"), "{err}");
    let (code, _, err) = d.ctl(&["open", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("no profile named \"nope\""), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_terminates_sessions_and_exits_zero_and_no_token_is_logged() {
    let pg = PgServer::start();
    let sim = sim(SimConfig::default()).await;
    let local = free_port();
    let mut d = DaemonProcess::start(&profile("pg", pg.port, local), &sim.endpoint_url());
    wait_listening(local, &d);
    assert_eq!(PgServer::psql(local, "select 1"), "1");
    let status = d.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        d.log_text()
    );
    assert!(!sim.sessions().is_empty());
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.sessions().iter().any(|s| s.status != "Terminated") {
        assert!(
            Instant::now() < deadline,
            "sessions not terminated: {:?}",
            sim.sessions()
                .iter()
                .map(|s| s.status.clone())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = d.log_text();
    assert!(
        log.contains("session started"),
        "the log was captured at debug level"
    );
    assert!(!log.contains("TokenValue"), "a token reached the log");
    assert!(
        !log.contains("MessageSchemaVersion"),
        "the OpenDataChannel message reached the log"
    );
}

#[test]
fn check_config_reports_file_line_and_column() {
    let dir = std::env::temp_dir().join(format!("bastion-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(
        &file,
        "[profiles.a]\ntarget = \"i-0123456789abcdef0\"\nremote_port = 99999\nlocal_port = 1\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bastiond"))
        .arg("--check-config")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml:3:15: remote_port must be between 1 and 65535"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_port_already_taken_is_a_clear_error() {
    let sim = sim(SimConfig::default()).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let d = DaemonProcess::start(
        &profile("pg", 5432, port).replace("autostart = true\n", ""),
        &sim.endpoint_url(),
    );
    let (code, _, err) = d.ctl(&["open", "pg"]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    let (code, _, _) = d.ctl(&["status"]);
    assert_eq!(code, 0, "the daemon keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_too_old_for_remote_host_is_refused_with_the_reason() {
    // 3.1.1187.0 predates remote-host support: it would forward to the instance itself.
    let sim = sim(SimConfig {
        agent_version: "3.1.1187.0".into(),
        ..SimConfig::default()
    })
    .await;
    let local = free_port();
    let d = DaemonProcess::start(&profile("old", 5432, local), &sim.endpoint_url());
    wait_listening(local, &d);
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("the client connection is closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "EOF, not data");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, out, _) = d.ctl(&["--json", "status", "old"]);
        let s: serde_json::Value = serde_json::from_str(&out).unwrap();
        let err = s["last_error"].as_str().unwrap_or_default();
        if err.contains("3.1.1187.0") && err.contains("too old") {
            break;
        }
        assert!(Instant::now() < deadline, "status: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, _, err) = d.ctl(&["open", "old", "--warm"]);
    assert_eq!(code, 1);
    assert!(err.contains("too old"), "{err}");
    // The refused sessions were terminated, not left open.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.sessions().iter().any(|s| s.status != "Terminated") {
        assert!(Instant::now() < deadline, "{:?}", sim.sessions());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A server that answers a one-line request with `reply` while its client has already
/// shut down its sending side, as `printf 'GET\n' | nc host port` expects.
async fn reply_server(reply: Vec<u8>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let reply = reply.clone();
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while c.read(&mut b).await.unwrap_or(0) == 1 {
                    line.push(b[0]);
                    if b[0] == b'\n' {
                        break;
                    }
                }
                // Think a little, as a query would, then stream the answer.
                tokio::time::sleep(Duration::from_millis(300)).await;
                for chunk in reply.chunks(64 * 1024) {
                    if c.write_all(chunk).await.is_err() {
                        return;
                    }
                }
                // Close once the client's EOF arrives.
                let mut rest = Vec::new();
                let _ = c.read_to_end(&mut rest).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_half_closes_still_gets_the_whole_reply() {
    let reply: Vec<u8> = (0..4 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = Sha256::digest(&reply);
    let server = reply_server(reply).await;
    let sim = sim(SimConfig::default()).await;
    let local = free_port();
    let d = DaemonProcess::start(&profile("hc", server, local), &sim.endpoint_url());
    wait_listening(local, &d);
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    conn.write_all(b"GET everything\n").await.unwrap();
    conn.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), conn.read_to_end(&mut got))
        .await
        .expect("the connection ends after the reply")
        .unwrap();
    assert_eq!(got.len(), 4 * 1024 * 1024, "{}", d.log_text());
    assert_eq!(Sha256::digest(&got), want);
    assert_no_violations(&sim);
}

/// Runs the daemon at `rust_log` through a session start, a websocket cut and resume (a
/// second token), more traffic and SIGTERM, with the simulator behind a relay that
/// records every token it issues; no such token may appear in anything the daemon wrote.
async fn no_token_is_logged_at(rust_log: &str) {
    let pg = PgServer::start();
    let sim = sim(SimConfig::default()).await;
    let snoop = TokenSnoop::start(sim.local_addr()).await;
    // Cut the first websocket once some traffic went through it: the daemon resumes.
    sim.update_faults(|f| {
        f.cut_after_bytes = Some(64 * 1024);
        f.max_cuts = Some(1);
    })
    .unwrap();
    let local = free_port();
    let mut d = DaemonProcess::start_with_env(
        &profile("pg", pg.port, local),
        &snoop.endpoint_url(),
        &[("RUST_LOG", rust_log)],
    );
    wait_listening(local, &d);
    assert_eq!(PgServer::psql(local, "select 1"), "1");
    // Enough rows to pass the cut; each query still completes, over the resumed channel.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut round = 0;
    loop {
        round += 1;
        let out = PgServer::psql(
            local,
            &format!("select {round} + count(*) from generate_series(1, 20000) g, md5(g::text) m"),
        );
        assert_eq!(out, (20_000 + round).to_string());
        let (_, out, _) = d.ctl(&["--json", "status", "pg"]);
        let status: serde_json::Value = serde_json::from_str(&out).unwrap();
        if status["resumes"].as_u64().unwrap_or(0) >= 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no resume after {round} rounds: {status}"
        );
    }
    let data = PgServer::psql(
        local,
        "select string_agg(md5(g::text), '' order by g) from generate_series(1, 2000) g",
    );
    assert_eq!(data.len(), 64_000);

    let status = d.terminate();
    assert!(status.success(), "exit status {status:?}");
    let sessions = sim.sessions();
    assert!(!sessions.is_empty());
    for s in &sessions {
        e2e_util::wait_terminated(&sim, &s.session_id).await;
    }
    let session_id = sessions[0].session_id.clone();
    assert_no_violations(&sim);

    let tokens = snoop.tokens();
    assert!(
        tokens.len() >= 2,
        "the relay saw the StartSession and ResumeSession tokens: {}",
        tokens.len()
    );
    let log = d.log_text();
    assert!(
        log.contains(" TRACE "),
        "the log was captured at trace level"
    );
    assert!(log.contains(&session_id), "the log names the session");
    assert!(log.contains("data channel resumed"), "the resume is logged");
    sim_util::assert_no_token_in(&tokens, "daemon's log (stderr)", &log);
    sim_util::assert_no_token_in(&tokens, "daemon's stdout", &d.stdout_text());
    assert!(!log.contains("TokenValue"), "a token field reached the log");
    assert!(
        !log.contains("MessageSchemaVersion"),
        "the OpenDataChannel message reached the log"
    );
}

/// Plain `RUST_LOG=trace`, the most the daemon logs. At TRACE, aws_smithy_runtime logs
/// the StartSession / ResumeSession response bodies and outputs (with TokenValue) and
/// tungstenite every frame; `bastion::logging` caps both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_token_is_logged_at_trace_level_through_start_resume_and_shutdown() {
    no_token_is_logged_at("trace").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_sso_profile_without_a_login_says_to_run_aws_sso_login() {
    let sim = sim(SimConfig::default()).await;
    let home = std::env::temp_dir().join(format!(
        "bastion-sso-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(home.join(".aws")).unwrap();
    let aws_config = home.join(".aws/config");
    std::fs::write(
        &aws_config,
        "[profile team-dev]\nsso_session = team\nsso_account_id = 123456789012\n\
         sso_role_name = Developer\nregion = us-east-1\n\n[sso-session team]\n\
         sso_start_url = https://example.awsapps.com/start\nsso_region = us-east-1\n",
    )
    .unwrap();
    let local = free_port();
    let d = DaemonProcess::start_with_env(
        &format!(
            "{}aws_profile = \"team-dev\"\n",
            profile("sso", 5432, local).replace("autostart = true\n", "")
        ),
        &sim.endpoint_url(),
        &[
            ("HOME", home.to_str().unwrap()),
            ("AWS_CONFIG_FILE", aws_config.to_str().unwrap()),
            (
                "AWS_SHARED_CREDENTIALS_FILE",
                "/nonexistent/bastion-test/credentials",
            ),
            ("AWS_ACCESS_KEY_ID", ""),
            ("AWS_SECRET_ACCESS_KEY", ""),
        ],
    );
    let started = Instant::now();
    let (code, _, err) = d.ctl(&["open", "sso", "--warm"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("aws sso login --profile team-dev"),
        "the user is told what to run: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(15), "no hang");
    assert!(sim.sessions().is_empty(), "no session without credentials");
    let _ = std::fs::remove_dir_all(&home);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_denied_and_a_handshake_timeout_reach_bastionctl() {
    let sim = sim(SimConfig {
        faults: bastion_sim::Faults {
            fail_start_session: Some("AccessDeniedException".into()),
            ..bastion_sim::Faults::default()
        },
        ..SimConfig::default()
    })
    .await;
    let local = free_port();
    let d = DaemonProcess::start(
        &format!(
            "{}connect_timeout = \"2s\"\n",
            profile("pg", 5432, local).replace("autostart = true\n", "")
        ),
        &sim.endpoint_url(),
    );
    let (code, _, err) = d.ctl(&["open", "pg", "--warm"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.to_lowercase().contains("access denied"), "{err}");
    // Now StartSession works but the agent never completes the handshake in time.
    sim.update_faults(|f| {
        f.fail_start_session = None;
        f.handshake_delay_ms = Some(10_000);
    })
    .unwrap();
    let started = Instant::now();
    let (code, _, err) = d.ctl(&["open", "pg", "--warm"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("handshake did not complete within 2s"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    // The half-open session was terminated, and the daemon still serves.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sim.sessions().iter().any(|s| s.status != "Terminated") {
        assert!(Instant::now() < deadline, "{:?}", sim.sessions());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(d.ctl(&["list"]).0, 0);
}

/// Connects to `port`, sends `data`, and checks that the connection is closed within
/// 10 s with nothing read back (EOF or reset, not data).
async fn assert_closed_without_data(port: u16, data: &[u8], what: &str) {
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let _ = conn.write_all(data).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect(what)
        .unwrap_or(0);
    assert_eq!(n, 0, "{what}: EOF, not data");
}

/// Checks one echo of `data` through `conn`.
async fn echo_once(conn: &mut tokio::net::TcpStream, data: &[u8]) {
    conn.write_all(data).await.unwrap();
    let mut back = vec![0u8; data.len()];
    tokio::time::timeout(Duration::from_secs(20), conn.read_exact(&mut back))
        .await
        .expect("echo within 20 s")
        .unwrap();
    assert_eq!(back, data);
}

/// `max_connections`: the connection past the limit is closed at once with the reason
/// in `status`, and the permit of a connection that ends is free again (held by the
/// connection's task, released however it ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn max_connections_refuses_the_next_and_frees_a_slot_when_one_ends() {
    let sim = sim(SimConfig::default()).await;
    let echo = sim_util::echo_server().await;
    let local = free_port();
    let d = DaemonProcess::start(
        &format!("{}max_connections = 2\n", profile("cap", echo, local)),
        &sim.endpoint_url(),
    );
    wait_listening(local, &d);
    let mut a = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    echo_once(&mut a, b"a").await;
    let mut b = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    echo_once(&mut b, b"b").await;

    assert_closed_without_data(local, b"c", "the third connection is closed at once").await;
    let (_, out, _) = d.ctl(&["--json", "status", "cap"]);
    assert!(out.contains("max_connections (2) reached"), "{out}");
    assert!(out.contains("\"connections\":2"), "{out}");

    drop(a);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, out, _) = d.ctl(&["--json", "status", "cap"]);
        if out.contains("\"connections\":1") {
            break;
        }
        assert!(Instant::now() < deadline, "the slot was never freed: {out}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut e = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    echo_once(&mut e, b"again").await;
    echo_once(&mut b, b"still").await;
    assert_no_violations(&sim);
}

/// SIGTERM stops accepting at once but lets an open connection finish (within
/// `--grace-secs`); the daemon exits as soon as it has, without waiting out the grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_open_connections_finish_then_exits_without_waiting_out_the_grace() {
    let sim = sim(SimConfig::default()).await;
    let echo = sim_util::echo_server().await;
    let local = free_port();
    let d = DaemonProcess::start(&profile("grace", echo, local), &sim.endpoint_url());
    wait_listening(local, &d);
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    echo_once(&mut conn, b"before").await;
    let pid = rustix::process::Pid::from_raw(d.child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    // Stopped accepting: a new connection is refused (the listener is gone).
    let deadline = Instant::now() + Duration::from_secs(5);
    while tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "still accepting after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The open connection still works.
    echo_once(&mut conn, b"after SIGTERM").await;
    let mut d = d;
    let closed_at = Instant::now();
    drop(conn);
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    let took = closed_at.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "exited {took:?} after its last connection closed: it waited for the 10 s grace"
    );
    assert_no_violations(&sim);
}
