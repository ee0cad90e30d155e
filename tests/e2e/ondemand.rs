//! On-demand bastions end to end: a real `bastiond run` launches an EC2 instance (or a
//! Fargate task) in moto_server (EC2, ECS, STS, DynamoDB through the standard
//! `AWS_ENDPOINT_URL_<SERVICE>` settings), the simulator answers Session Manager and
//! reports the instance Online only after a boot delay, and a real PostgreSQL (or an echo
//! server) sits behind the tunnel.

use crate::e2e_util;
use crate::sim_util;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use bastion::aws::ec2::Instance;
use bastion_sim::{Ec2Targets, SimConfig, SimHandle};
use e2e_util::moto::Moto;
use e2e_util::{DaemonProcess, PgServer, free_port};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// moto, and the simulator asking the same moto whether instances run.
struct World {
    moto: Moto,
    sim: SimHandle,
}

async fn world(boot_delay: Duration) -> World {
    let moto = Moto::start().await;
    let sim = sim_util::start(SimConfig {
        ec2: Some(Ec2Targets {
            endpoint: moto.url(),
            boot_delay,
        }),
        ..SimConfig::default()
    })
    .await;
    World { moto, sim }
}

fn state_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "bastion-state-{tag}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("state dir");
    dir
}

/// `bastiond run` with every AWS control-plane service at `aws` (moto, or a proxy in
/// front of it) and Session Manager at the simulator.
fn daemon(w: &World, config: &str, state: &Path, aws: &str) -> DaemonProcess {
    DaemonProcess::start_with_env(
        config,
        &w.sim.endpoint_url(),
        &[
            ("AWS_ENDPOINT_URL_EC2", aws),
            ("AWS_ENDPOINT_URL_ECS", aws),
            ("AWS_ENDPOINT_URL_STS", aws),
            ("AWS_ENDPOINT_URL_DYNAMODB", aws),
            ("BASTION_STATE_DIR", state.to_str().expect("utf-8 path")),
        ],
    )
}

fn ec2_profile(name: &str, remote_port: u16, local_port: u16, bastion: &str) -> String {
    format!(
        "[profiles.{name}]\nremote_host = \"127.0.0.1\"\nremote_port = {remote_port}\n\
         local_port = {local_port}\nbind = [\"127.0.0.1\"]\n\
         [profiles.{name}.bastion]\nprovider = \"ec2\"\ninstance_type = \"t3.micro\"\n\
         user_data = \"db-tunnel\"\n{bastion}\n"
    )
}

/// Live (not terminated) instances of `profile` in moto.
async fn live_instances(moto: &Moto, profile: &str) -> Vec<Instance> {
    moto.ec2()
        .instances_with_tags(
            &BTreeMap::from([("bastion:profile".to_owned(), profile.to_owned())]),
            &["pending", "running", "stopping", "stopped"],
        )
        .await
        .expect("DescribeInstances")
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn registry(state: &Path) -> Value {
    std::fs::read_to_string(state.join("registry.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// The phases of an NDJSON progress stream, in order.
fn phases(ndjson: &str) -> Vec<(String, Value)> {
    ndjson
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let phase = v["phase"].as_str()?.to_owned();
            Some((phase, v))
        })
        .collect()
}

fn position(list: &[(String, Value)], phase: &str) -> usize {
    list.iter()
        .position(|(p, _)| p == phase)
        .unwrap_or_else(|| panic!("no {phase} event in {list:?}"))
}

fn status(d: &DaemonProcess, name: &str) -> Value {
    let (code, out, err) = d.ctl(&["--json", "status", name]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).expect("status JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cold_path_launches_waits_for_online_and_postgres_answers() {
    // (Online at least 3 s after the launch, given moto's whole-second launchTime: two
    // polls, 2 s apart, see it booting.)
    let boot = Duration::from_secs(4);
    let w = world(boot).await;
    let pg = PgServer::start();
    let (warm_port, held_port) = (free_port(), free_port());
    let config = ec2_profile("pg", pg.port, warm_port, "idle_timeout = \"1h\"")
        + &ec2_profile("pg-held", pg.port, held_port, "idle_timeout = \"1h\"");
    let state = state_dir("cold");
    let d = daemon(&w, &config, &state, &w.moto.url());

    // `open --warm` reports the boot as it happens.
    let started = Instant::now();
    let (code, out, err) = d.ctl(&["--json", "open", "pg", "--warm"]);
    assert_eq!(code, 0, "{err}; log:\n{}", d.log_text());
    assert!(
        started.elapsed() >= boot - Duration::from_secs(1),
        "ready before the boot delay passed"
    );
    let events = phases(&out);
    let launching = position(&events, "launching");
    let launched = position(&events, "launched");
    let waiting = position(&events, "waiting_online");
    let ready = events
        .iter()
        .rposition(|(p, _)| p == "ready")
        .expect("ready");
    assert!(
        launching < launched && launched < waiting && waiting < ready,
        "{events:?}"
    );
    let instance = events[launched].1["resource"]
        .as_str()
        .expect("instance id")
        .to_owned();
    assert!(instance.starts_with("i-"), "{instance}");
    let waits: Vec<f64> = events
        .iter()
        .filter(|(p, _)| p == "waiting_online")
        .map(|(_, v)| v["elapsed_secs"].as_f64().unwrap_or(-1.0))
        .collect();
    assert!(
        waits.len() >= 2 && waits.windows(2).all(|w| w[0] <= w[1]),
        "{waits:?}"
    );
    assert!(
        events[waiting].1["resource"] == instance.as_str(),
        "progress names the instance: {events:?}"
    );

    // Rows come back from PostgreSQL through the launched bastion.
    let rows = PgServer::psql(warm_port, "SELECT 6 * 7 AS answer, current_database()");
    assert!(rows.contains("42"), "{rows}");

    // moto holds exactly one instance, tagged, with self-termination in its user data.
    let live = live_instances(&w.moto, "pg").await;
    assert_eq!(live.len(), 1, "{live:?}");
    let tags = &live[0].tags;
    assert_eq!(live[0].id, instance);
    // The owner is the caller as STS GetCallerIdentity names it (moto: user/moto).
    let owner = tags["bastion:owner"].clone();
    assert!(
        owner.starts_with("arn:aws:") && owner.ends_with(":user/moto"),
        "{owner}"
    );
    assert_eq!(tags["bastion:key"], format!("pg@{owner}"));
    assert!(tags["bastion:registry"].starts_with("file:"), "{tags:?}");
    assert_eq!(tags["Name"], "bastion-pg");
    let behaviour = w
        .moto
        .ec2()
        .call(
            "DescribeInstanceAttribute",
            &[
                ("InstanceId".to_owned(), instance.clone()),
                (
                    "Attribute".to_owned(),
                    "instanceInitiatedShutdownBehavior".to_owned(),
                ),
            ],
        )
        .await
        .expect("DescribeInstanceAttribute");
    assert_eq!(
        behaviour
            .find("instanceInitiatedShutdownBehavior")
            .and_then(|e| e.child_text("value")),
        Some("terminate")
    );

    // The registry recorded it ready; status shows it.
    let reg = registry(&state);
    let record = &reg["records"][format!("pg@{owner}")];
    assert_eq!(record["phase"], "ready", "{reg}");
    assert_eq!(record["resource"], instance.as_str());
    let s = status(&d, "pg");
    assert_eq!(s["bastion"]["phase"], "ready", "{s}");
    assert_eq!(s["target"], format!("ec2 on demand → {instance}"), "{s}");
    let (code, text, _) = d.ctl(&["status", "pg"]);
    assert_eq!(code, 0);
    assert!(
        text.contains("ec2 on demand, registry local") && text.contains(&instance),
        "{text}"
    );

    // A client connecting to a profile whose bastion does not exist yet is held until
    // the bastion is online, then served.
    let (code, _, err) = d.ctl(&["open", "pg-held"]);
    assert_eq!(code, 0, "{err}");
    let held = Instant::now();
    let rows = tokio::task::spawn_blocking(move || PgServer::psql(held_port, "SELECT 'held' AS x"))
        .await
        .expect("psql task");
    assert!(rows.contains("held"), "{rows}");
    // (moto's launchTime has one-second resolution: the boot delay counts from the
    // whole second.)
    assert!(
        held.elapsed() >= boot - Duration::from_secs(1),
        "the held client was served before the instance booted"
    );
    assert_eq!(live_instances(&w.moto, "pg-held").await.len(), 1);
    assert_eq!(
        live_instances(&w.moto, "pg").await.len(),
        1,
        "reused, not relaunched"
    );

    e2e_util::assert_no_violations(&w.sim);
    let log = d.log_text();
    assert!(!log.contains("secret-test-key"), "a secret reached the log");
}

async fn create_registry_table(moto: &Moto, table: &str) {
    aws_sdk_dynamodb::Client::new(&moto.sdk_config())
        .create_table()
        .table_name(table)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .expect("attribute"),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .expect("key"),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("CreateTable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_daemons_sharing_a_dynamodb_registry_launch_one_bastion() {
    let w = world(Duration::from_secs(2)).await;
    create_registry_table(&w.moto, "bastion-registry").await;
    let echo = sim_util::echo_server().await;
    let extra = "shared = true\nregistry = \"dynamodb:bastion-registry\"\nidle_timeout = \"1h\"";
    let (pa, pb) = (free_port(), free_port());
    let (sa, sb) = (state_dir("team-a"), state_dir("team-b"));
    let a = daemon(
        &w,
        &ec2_profile("team", echo, pa, extra),
        &sa,
        &w.moto.url(),
    );
    let b = daemon(
        &w,
        &ec2_profile("team", echo, pb, extra),
        &sb,
        &w.moto.url(),
    );

    let (ra, rb) = std::thread::scope(|s| {
        let ta = s.spawn(|| a.ctl(&["--json", "open", "team", "--warm"]));
        let tb = s.spawn(|| b.ctl(&["--json", "open", "team", "--warm"]));
        (ta.join().expect("a"), tb.join().expect("b"))
    });
    assert_eq!(ra.0, 0, "{}; log:\n{}", ra.2, a.log_text());
    assert_eq!(rb.0, 0, "{}; log:\n{}", rb.2, b.log_text());
    let live = live_instances(&w.moto, "team").await;
    assert_eq!(live.len(), 1, "two daemons launched {live:?}");
    let launches = [&ra.1, &rb.1]
        .iter()
        .filter(|out| phases(out).iter().any(|(p, _)| p == "launching"))
        .count();
    assert_eq!(
        launches, 1,
        "exactly one daemon launches:\n{}\n---\n{}",
        ra.1, rb.1
    );
    assert_eq!(
        live[0].tags["bastion:registry"],
        "dynamodb:bastion-registry"
    );
    assert_eq!(live[0].tags["bastion:key"], "team");

    e2e_util::echo_roundtrip(pa, 256 * 1024).await;
    e2e_util::echo_roundtrip(pb, 256 * 1024).await;
    let (sa_, sb_) = (status(&a, "team"), status(&b, "team"));
    assert_eq!(sa_["bastion"]["resource"], live[0].id.as_str(), "{sa_}");
    assert_eq!(sb_["bastion"]["resource"], live[0].id.as_str(), "{sb_}");
    e2e_util::assert_no_violations(&w.sim);
}

/// Follows `bastionctl --json events NAME` in a thread; the lines arrive on the channel.
fn follow_events(
    d: &DaemonProcess,
    name: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<Value>) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bastionctl"))
        .arg("--socket")
        .arg(&d.socket)
        .args(["--json", "events", name])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("bastionctl events");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    (child, rx)
}

fn next_phase(
    rx: &std::sync::mpsc::Receiver<Value>,
    wanted: &[&str],
    timeout: Duration,
) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        if let Ok(v) = rx.recv_timeout(Duration::from_millis(200)) {
            let p = v["phase"].as_str().unwrap_or_default().to_owned();
            let done = wanted.contains(&p.as_str());
            seen.push(p);
            if done {
                return seen;
            }
        }
    }
    panic!("none of {wanted:?} within {timeout:?}; saw {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_reaping_and_max_lifetime_terminate_the_instance() {
    let w = world(Duration::from_secs(1)).await;
    let echo = sim_util::echo_server().await;
    let (idle_port, old_port) = (free_port(), free_port());
    let config = ec2_profile("idle", echo, idle_port, "idle_timeout = \"3s\"")
        + &ec2_profile(
            "old",
            echo,
            old_port,
            "idle_timeout = \"1h\"\nmax_lifetime = \"15s\"\nlifetime_warning = \"8s\"",
        );
    let state = state_dir("reap");
    let d = daemon(&w, &config, &state, &w.moto.url());

    // Idle: used once, then no connection and no Active session for 3 s → terminated.
    let (idle_events, idle_rx) = follow_events(&d, "idle");
    let (code, _, err) = d.ctl(&["open", "idle", "--warm"]);
    assert_eq!(code, 0, "{err}; log:\n{}", d.log_text());
    let instance = live_instances(&w.moto, "idle").await[0].id.clone();
    e2e_util::echo_roundtrip(idle_port, 64 * 1024).await;
    let seen = next_phase(&idle_rx, &["terminated"], Duration::from_secs(40));
    let idle_at = seen.iter().position(|p| p == "idle").expect("idle event");
    let term_at = seen
        .iter()
        .position(|p| p == "terminating")
        .expect("terminating event");
    assert!(idle_at < term_at, "{seen:?}");
    wait_for(
        "the idle instance to terminate",
        Duration::from_secs(10),
        || async { live_instances(&w.moto, "idle").await.is_empty() },
    )
    .await;
    assert_eq!(status(&d, "idle")["bastion"]["phase"], "none");
    let state = w
        .moto
        .ec2()
        .describe_instances(&[bastion::aws::ec2::Filter::new(
            "instance-id",
            [instance.as_str()],
        )])
        .await
        .expect("DescribeInstances");
    assert!(
        state
            .iter()
            .any(|i| i.id == instance && i.state == "terminated"),
        "the launched instance {instance} is not the one terminated: {state:?}"
    );
    assert!(
        d.log_text()
            .contains("idle for 3s (no connection, no Active session)"),
        "{}",
        d.log_text()
    );

    // Max lifetime: a connection stays open; a warning comes first, then the instance
    // is terminated anyway and the connection is closed.
    let (old_events, old_rx) = follow_events(&d, "old");
    let (code, _, err) = d.ctl(&["open", "old", "--warm"]);
    assert_eq!(code, 0, "{err}; log:\n{}", d.log_text());
    let mut conn = TcpStream::connect(("127.0.0.1", old_port))
        .await
        .expect("connect");
    conn.write_all(b"ping").await.expect("write");
    let mut four = [0u8; 4];
    conn.read_exact(&mut four).await.expect("echo");
    let seen = next_phase(&old_rx, &["terminated"], Duration::from_secs(40));
    let warn_at = seen
        .iter()
        .position(|p| p == "lifetime_warning")
        .unwrap_or_else(|| panic!("no warning before termination: {seen:?}"));
    let term_at = seen
        .iter()
        .position(|p| p == "terminating")
        .expect("terminating");
    assert!(warn_at < term_at, "{seen:?}");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the connection outlived the bastion");
    wait_for(
        "the old instance to terminate",
        Duration::from_secs(10),
        || async { live_instances(&w.moto, "old").await.is_empty() },
    )
    .await;
    let log = d.log_text();
    assert!(log.contains("reaches its max lifetime (15s)"), "{log}");
    assert!(log.contains("max lifetime (15s) reached"), "{log}");
    for mut c in [idle_events, old_events] {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// A TCP forwarder that holds every chunk from the client for `delay` before passing it
/// on: a slow network in front of moto, which widens the launching and terminating
/// phases enough to kill the daemon inside them.
async fn slow_proxy(upstream: SocketAddr, delay: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        tokio::time::sleep(delay).await;
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                };
                let down = async {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                    let _ = cw.shutdown().await;
                };
                tokio::join!(up, down);
            });
        }
    });
    port
}

fn phase_of(state: &Path) -> Option<String> {
    registry(state)["records"]
        .as_object()
        .and_then(|m| m.values().next())
        .and_then(|r| r["phase"].as_str())
        .map(str::to_owned)
}

/// Every live instance of `profile` is owned by a registry record (same launch id).
async fn assert_owned(moto: &Moto, state: &Path, profile: &str, context: &str) {
    let reg = registry(state);
    let owned: Vec<String> = reg["records"]
        .as_object()
        .map(|m| {
            m.values()
                .filter_map(|r| r["launch_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    for i in live_instances(moto, profile).await {
        assert!(
            owned.contains(&i.tags["bastion:launch-id"]),
            "{context}: instance {} ({}) runs without a registry record; registry: {reg}",
            i.id,
            i.state
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_in_every_phase_leaves_nothing_unowned_and_keeps_used_bastions() {
    let w = world(Duration::from_secs(1)).await;
    let echo = sim_util::echo_server().await;
    let proxy = slow_proxy(w.moto.addr(), Duration::from_millis(300)).await;
    let aws = format!("http://127.0.0.1:{proxy}");
    let phases = [
        "launching",
        "waiting_online",
        "ready",
        "idle",
        "terminating",
    ];
    let mut report = Vec::new();
    for run in 0..20 {
        w.moto.reset().await;
        let target_phase = phases[run % phases.len()];
        let local = free_port();
        let config = ec2_profile("chaos", echo, local, "idle_timeout = \"2s\"");
        let state = state_dir(&format!("chaos{run}"));
        let mut d = daemon(&w, &config, &state, &aws);
        // Drive the lifecycle: open (launch + boot), one connection, then idle and reap.
        let socket = d.socket.clone();
        let opener = std::thread::spawn(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_bastionctl"))
                .arg("--socket")
                .arg(socket)
                .args(["open", "chaos", "--warm"])
                .output()
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut used = false;
        let mut colleague = None;
        loop {
            assert!(
                Instant::now() < deadline,
                "run {run}: never reached {target_phase}; log:\n{}",
                d.log_text()
            );
            let phase = phase_of(&state);
            if phase.as_deref() == Some("ready") && !used && target_phase != "ready" {
                used = true;
                e2e_util::echo_roundtrip(local, 16 * 1024).await;
            }
            if phase.as_deref() == Some(target_phase) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // In some runs a colleague's session uses the instance when the daemon dies.
        let instance = registry(&state)["records"]
            .as_object()
            .and_then(|m| m.values().next())
            .and_then(|r| r["resource"].as_str())
            .map(str::to_owned);
        if run % 4 == 2
            && let Some(i) = &instance
            && matches!(target_phase, "ready" | "idle")
        {
            let (id, _, _) = sim_util::start_session(
                w.sim.local_addr(),
                serde_json::json!({"Target": i, "DocumentName": "AWS-StartPortForwardingSession",
                    "Parameters": {"portNumber": [echo.to_string()]}}),
            )
            .await;
            colleague = Some((i.clone(), id));
        }
        tokio::time::sleep(Duration::from_millis((run as u64 * 37) % 150)).await;
        let killed_in = phase_of(&state).unwrap_or_else(|| "none".into());
        d.child.kill().expect("kill -9");
        let _ = d.child.wait();
        let _ = opener.join();
        assert_owned(
            &w.moto,
            &state,
            "chaos",
            &format!("run {run} right after kill -9 in {killed_in}"),
        )
        .await;

        // Restart on the same state directory: reconciliation, then the lifecycle goes on.
        let d2 = daemon(&w, &config, &state, &aws);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_owned(
            &w.moto,
            &state,
            "chaos",
            &format!("run {run} after restart (killed in {killed_in})"),
        )
        .await;
        if let Some((i, session)) = &colleague {
            // Idle here for longer than idle_timeout, but a session uses it: it stays.
            tokio::time::sleep(Duration::from_secs(4)).await;
            let alive = live_instances(&w.moto, "chaos")
                .await
                .iter()
                .any(|x| &x.id == i && x.state == "running");
            assert!(
                alive,
                "run {run}: the instance a live session uses was terminated; log:\n{}",
                d2.log_text()
            );
            sim_util::ssm(
                w.sim.local_addr(),
                "TerminateSession",
                serde_json::json!({"SessionId": session}),
            )
            .await;
        }
        // Nothing uses it: it is reaped (idle 2 s) and the registry empties.
        let deadline = Instant::now() + Duration::from_secs(40);
        while !(live_instances(&w.moto, "chaos").await.is_empty()
            && registry(&state)["records"]
                .as_object()
                .is_none_or(|m| m.is_empty()))
        {
            assert!(
                Instant::now() < deadline,
                "run {run} (killed in {killed_in}): not reaped after restart; registry {}; sessions {:?}; log:\n{}",
                registry(&state),
                w.sim
                    .sessions()
                    .iter()
                    .map(|s| (s.session_id.clone(), s.status.clone()))
                    .collect::<Vec<_>>(),
                d2.log_text()
                    .lines()
                    .filter(|l| !l.contains(" DEBUG "))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        report.push(format!(
            "run {run}: killed in {killed_in}{}",
            if colleague.is_some() {
                " (session in use)"
            } else {
                ""
            }
        ));
        drop(d2);
        let _ = std::fs::remove_dir_all(&state);
    }
    eprintln!("{}", report.join("\n"));
    for p in phases {
        assert!(
            report
                .iter()
                .filter(|r| r.contains(&format!("killed in {p}")))
                .count()
                >= 2,
            "phase {p} was hit fewer than twice: {report:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fargate_task_is_run_targeted_and_stopped_against_moto_ecs() {
    let w = world(Duration::ZERO).await;
    w.moto.set_ecs_manual_transitions().await;
    w.moto
        .ecs_cluster_and_task_definition("bastions", "bastion")
        .await;
    let (subnet, group) = w.moto.default_network().await;
    let ecs = aws_sdk_ecs::Client::new(&w.moto.sdk_config());
    let echo = sim_util::echo_server().await;
    let local = free_port();
    let config = format!(
        "[profiles.fg]\nremote_host = \"127.0.0.1\"\nremote_port = {echo}\nlocal_port = {local}\n\
         bind = [\"127.0.0.1\"]\n[profiles.fg.bastion]\nprovider = \"fargate\"\n\
         cluster = \"bastions\"\ntask_definition = \"bastion\"\nsubnets = [\"{subnet}\"]\n\
         security_groups = [\"{group}\"]\nidle_timeout = \"2s\"\n"
    );
    let state = state_dir("fargate");
    let d = daemon(&w, &config, &state, &w.moto.url());
    let (events, rx) = follow_events(&d, "fg");
    let (code, out, err) = d.ctl(&["--json", "open", "fg", "--warm"]);
    assert_eq!(code, 0, "{err}; log:\n{}", d.log_text());
    let launched = phases(&out);
    let task_arn = launched[position(&launched, "launched")].1["resource"]
        .as_str()
        .expect("task ARN")
        .to_owned();
    assert!(task_arn.contains(":task/bastions/"), "{task_arn}");
    let task_id = task_arn.rsplit('/').next().unwrap_or_default().to_owned();

    // The session targets the task's container: ecs:<cluster>_<task-id>_<runtime-id>.
    e2e_util::echo_roundtrip(local, 128 * 1024).await;
    let s = status(&d, "fg");
    let target = s["bastion"]["target"].as_str().expect("target").to_owned();
    assert!(
        target.starts_with(&format!("ecs:bastions_{task_id}_")),
        "{s}"
    );
    assert!(
        target.len() > format!("ecs:bastions_{task_id}_").len(),
        "{target}"
    );
    let sessions = w.sim.sessions();
    assert!(
        sessions.iter().any(|x| x.target == target),
        "sim saw {:?}",
        sessions.iter().map(|x| &x.target).collect::<Vec<_>>()
    );

    // Idle for 2 s: the task is stopped.
    let seen = next_phase(&rx, &["terminated"], Duration::from_secs(40));
    assert!(seen.iter().any(|p| p == "terminating"), "{seen:?}");
    let described = ecs
        .describe_tasks()
        .cluster("bastions")
        .tasks(&task_arn)
        .send()
        .await
        .expect("DescribeTasks");
    let task = &described.tasks()[0];
    assert_eq!(task.desired_status(), Some("STOPPED"), "{task:?}");
    assert!(status(&d, "fg")["bastion"]["phase"] == "none");
    let mut events = events;
    let _ = events.kill();
    let _ = events.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn launch_failures_and_a_bastion_that_never_comes_online_are_named() {
    // The simulator never reports the instance Online (an hour's boot delay), as for a
    // subnet without a route to the Session Manager endpoints.
    let w = world(Duration::from_secs(3600)).await;
    let echo = sim_util::echo_server().await;
    let (lost_port, bad_port) = (free_port(), free_port());
    let config = ec2_profile("lost", echo, lost_port, "ready_timeout = \"3s\"")
        + &ec2_profile("badnet", echo, bad_port, "subnet = \"subnet-00000000\"");
    let state = state_dir("errors");
    let d = daemon(&w, &config, &state, &w.moto.url());

    let started = Instant::now();
    let (code, _, err) = d.ctl(&["open", "lost", "--warm"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("did not come online with Session Manager within 3 s")
            && err.contains("VPC endpoints")
            && err.contains("AmazonSSMManagedInstanceCore"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let s = status(&d, "lost");
    assert_eq!(s["bastion"]["phase"], "waiting_online", "{s}");

    let (code, _, err) = d.ctl(&["open", "badnet", "--warm"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot launch a bastion") && err.contains("subnet-00000000"),
        "{err}"
    );
    assert!(live_instances(&w.moto, "badnet").await.is_empty());
    let reg = registry(&state);
    assert!(
        reg["records"]
            .as_object()
            .is_some_and(|m| m.keys().all(|k| !k.starts_with("badnet"))),
        "a failed launch left a record: {reg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_colleague_using_a_shared_bastion_keeps_it_alive() {
    let w = world(Duration::from_secs(1)).await;
    create_registry_table(&w.moto, "bastion-registry").await;
    let echo = sim_util::echo_server().await;
    let extra = "shared = true\nregistry = \"dynamodb:bastion-registry\"\nidle_timeout = \"4s\"";
    let (pa, pb) = (free_port(), free_port());
    let (sa, sb) = (state_dir("keep-a"), state_dir("keep-b"));
    let a = daemon(
        &w,
        &ec2_profile("team", echo, pa, extra),
        &sa,
        &w.moto.url(),
    );
    let b = daemon(
        &w,
        &ec2_profile("team", echo, pb, extra),
        &sb,
        &w.moto.url(),
    );
    let (code, _, err) = a.ctl(&["open", "team", "--warm"]);
    assert_eq!(code, 0, "{err}");
    e2e_util::echo_roundtrip(pa, 4096).await;
    let instance = live_instances(&w.moto, "team").await[0].id.clone();

    // A is idle from now on; B keeps a connection busy for three idle timeouts.
    let (code, _, err) = b.ctl(&["open", "team", "--warm"]);
    assert_eq!(code, 0, "{err}");
    let mut conn = TcpStream::connect(("127.0.0.1", pb))
        .await
        .expect("connect");
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        conn.write_all(b"ping").await.expect("write");
        let mut four = [0u8; 4];
        conn.read_exact(&mut four).await.expect("echo");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let alive = live_instances(&w.moto, "team").await;
    assert!(
        alive.iter().any(|i| i.id == instance),
        "reaped while a colleague used it; A's log:\n{}",
        a.log_text()
    );
    drop(conn);
    wait_for(
        "the shared bastion to be reaped once unused",
        Duration::from_secs(40),
        || async { live_instances(&w.moto, "team").await.is_empty() },
    )
    .await;
}
