//! MariaDB through the whole product: a throwaway MariaDB server, the simulator standing
//! in for AWS (reached through `AWS_ENDPOINT_URL_SSM`), the real `bastiond run` process,
//! and the real `mariadb` command-line client. The last test runs a PostgreSQL and a
//! MariaDB profile side by side in one daemon.

use crate::e2e_util;

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Duration;

use bastion_sim::{SimConfig, SimHandle, Simulator};
use e2e_util::{
    DaemonProcess, MariaDbServer, PgServer, assert_no_violations, free_port, profile,
    wait_listening, wait_terminated,
};
use sha2::{Digest, Sha256};

async fn sim(config: SimConfig) -> SimHandle {
    Simulator::bind(e2e_util::with_daemon_credential(config))
        .await
        .expect("sim bind")
        .spawn()
}

fn status_json(d: &DaemonProcess, name: &str) -> serde_json::Value {
    let (code, out, err) = d.ctl(&["--json", "status", name]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// MD5 computed independently of the database servers, with coreutils' md5sum.
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

/// These tests count sessions: one per profile (striping is tested in resilience.rs).
fn one_session(profile: String) -> String {
    profile + "max_sessions = 1\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mariadb_cli_creates_inserts_and_selects_through_the_tunnel() {
    let maria = MariaDbServer::start();
    let sim = sim(SimConfig::default()).await;
    let local = free_port();
    let d = DaemonProcess::start(
        &one_session(profile("maria", maria.port, local)),
        &sim.endpoint_url(),
    );
    wait_listening(local, &d);

    let out = tokio::task::spawn_blocking(move || {
        MariaDbServer::query(
            local,
            "create database shop character set utf8mb4; \
             create table shop.items (id int primary key, name varchar(40) not null, \
               price decimal(10,2), note text); \
             insert into shop.items values \
               (1, 'café ☕', 10.50, 'first'), (2, 'tab\\there', 0.01, null), \
               (3, 'zed', 99999999.99, repeat('x', 3000)); \
             update shop.items set price = price * 2 where id = 1; \
             delete from shop.items where id = 3; \
             insert into shop.items (id, name) values (4, 'four'); \
             select id, name, price, coalesce(note, 'NULL!'), length(name), char_length(name) \
               from shop.items order by id",
        )
    })
    .await
    .unwrap();
    // --batch escapes a tab in a value as \t.
    assert_eq!(
        out,
        "1\tcafé ☕\t21.00\tfirst\t9\t6\n\
         2\ttab\\there\t0.01\tNULL!\t8\t8\n\
         4\tfour\tNULL\tNULL!\t4\t4"
    );

    // The rows are in the real server (asked directly, not through the tunnel).
    assert_eq!(
        MariaDbServer::query(
            maria.port,
            "select count(*), sum(price), group_concat(id order by id) from shop.items"
        ),
        "3\t21.01\t1,2,4"
    );

    // A server error comes back through the tunnel as an error, and the session lives on.
    let out = MariaDbServer::client(local)
        .args(["-e", "select * from shop.nope"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ERROR 1146"), "{err}");
    assert_eq!(
        MariaDbServer::query(local, "select name from shop.items where id = 4"),
        "four"
    );

    let status = status_json(&d, "maria");
    assert_eq!(status["state"], "ready", "{status}");
    assert_eq!(status["mode"], "mux", "{status}");
    assert!(status["bytes_up"].as_u64().unwrap() > 1000, "{status}");
    assert!(status["bytes_down"].as_u64().unwrap() > 1000, "{status}");
    let sessions = sim.sessions();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    let props = sessions[0].properties.clone().unwrap();
    assert_eq!(props["portNumber"], maria.port.to_string(), "{props}");
    assert_eq!(props["host"], "127.0.0.1", "{props}");
    // Three clients went through the tunnel: each is one smux stream.
    assert_eq!(sessions[0].counters.streams_opened, 3, "{sessions:?}");
    assert_no_violations(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_mariadb_clients_on_one_profile() {
    const CLIENTS: usize = 20;
    let maria = MariaDbServer::start();
    let sim = sim(SimConfig::default()).await;
    let local = free_port();
    let d = DaemonProcess::start(
        &one_session(profile("maria", maria.port, local)),
        &sim.endpoint_url(),
    );
    wait_listening(local, &d);
    MariaDbServer::query(
        local,
        "create database load_test; \
         create table load_test.hits (client int not null, n int not null, primary key (client, n))",
    );

    // Every client holds its connection for a while (sleep), so all of them are open
    // at the same time; each writes 50 rows and reads back a value only it can expect.
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                barrier.wait();
                MariaDbServer::query(
                    local,
                    &format!(
                        "use load_test; do sleep(1); \
                         insert into hits select {i}, seq from seq_1_to_50; \
                         select {i} * 1000000 + sum(n) from hits where client = {i}"
                    ),
                )
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), (i * 1_000_000 + 1275).to_string());
    }

    // Asked directly: all rows arrived, and the server saw the connections overlap.
    assert_eq!(
        MariaDbServer::query(
            maria.port,
            "select count(*), count(distinct client), sum(n) from load_test.hits"
        ),
        format!("{}\t{CLIENTS}\t{}", CLIENTS * 50, CLIENTS * 1275)
    );
    let max_used: usize = MariaDbServer::query(
        maria.port,
        "select variable_value from information_schema.global_status \
         where variable_name = 'MAX_USED_CONNECTIONS'",
    )
    .parse()
    .unwrap();
    assert!(
        max_used >= CLIENTS,
        "only {max_used} connections were open at once"
    );

    let sessions = sim.sessions();
    assert_eq!(sessions.len(), 1, "all connections share one session");
    assert!(
        sessions[0].counters.streams_opened > CLIENTS as u64,
        "{:?}",
        sessions[0].counters
    );
    assert_no_violations(&sim);
}

/// `lines` lines of 64 pseudo-random hex digits each, newline-terminated.
fn hex_lines(lines: usize) -> Vec<u8> {
    let mut data = Vec::with_capacity(lines * 65);
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for _ in 0..lines {
        for _ in 0..4 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(format!("{x:016x}").as_bytes());
        }
        data.push(b'\n');
    }
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn load_data_and_select_of_8_mib_keep_every_byte() {
    let maria = MariaDbServer::start();
    // Agent pacing off: this checks the bytes of a bulk transfer, not the agent's cap.
    let sim = sim(SimConfig {
        agent_pacing: Duration::ZERO,
        ..SimConfig::default()
    })
    .await;
    let local = free_port();
    let d = DaemonProcess::start(
        &one_session(profile("maria", maria.port, local)),
        &sim.endpoint_url(),
    );
    wait_listening(local, &d);

    let lines = (8 << 20) / 65 + 1;
    let data = hex_lines(lines);
    assert!(data.len() >= 8 << 20);
    let sent = hex::encode(Sha256::digest(&data));
    let file = std::env::temp_dir().join(format!(
        "bastion-mariadb-load-{}-{local}.txt",
        std::process::id()
    ));
    std::fs::write(&file, &data).unwrap();

    // Up: LOAD DATA LOCAL INFILE streams the file from the client through the tunnel;
    // the server hashes what it stored.
    let out = tokio::task::spawn_blocking({
        let file = file.clone();
        move || {
            let out = MariaDbServer::client(local)
                .arg("--local-infile=1")
                .args([
                    "-e",
                    &format!(
                        "create database bulk; \
                         create table bulk.blob (id int auto_increment primary key, \
                           line char(64) not null); \
                         load data local infile '{}' into table bulk.blob (line); \
                         set session group_concat_max_len = 1073741824; \
                         select count(*), sum(length(line)), \
                           sha2(concat(group_concat(line order by id separator '\\n'), '\\n'), 256) \
                           from bulk.blob",
                        file.display()
                    ),
                ])
                .stdin(Stdio::null())
                .output()
                .expect("run mariadb");
            assert!(
                out.status.success(),
                "LOAD DATA failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        }
    })
    .await
    .unwrap();
    let _ = std::fs::remove_file(&file);
    assert_eq!(
        out.trim_end(),
        format!("{lines}\t{}\t{sent}", lines * 64),
        "what the server stored differs from what was sent"
    );

    // Down: SELECT every line back through the tunnel; hash the client's output here.
    let back = tokio::task::spawn_blocking(move || {
        let out = MariaDbServer::client(local)
            .args(["--raw", "-e", "select line from bulk.blob order by id"])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb");
        assert!(
            out.status.success(),
            "SELECT failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    })
    .await
    .unwrap();
    assert_eq!(back.len(), data.len());
    assert_eq!(
        hex::encode(Sha256::digest(&back)),
        sent,
        "SELECT output differs from what was loaded"
    );

    let status = status_json(&d, "maria");
    assert!(
        status["bytes_up"].as_u64().unwrap() >= data.len() as u64,
        "{status}"
    );
    assert!(
        status["bytes_down"].as_u64().unwrap() >= data.len() as u64,
        "{status}"
    );
    assert_no_violations(&sim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_and_mariadb_profiles_open_at_once_in_one_daemon() {
    let pg = PgServer::start();
    let maria = MariaDbServer::start();
    let sim = sim(SimConfig::default()).await;
    let (pg_local, maria_local) = (free_port(), free_port());
    let config = format!(
        "{}{}",
        one_session(profile("pg", pg.port, pg_local)),
        one_session(profile("maria", maria.port, maria_local))
    );
    let d = DaemonProcess::start(&config, &sim.endpoint_url());
    wait_listening(pg_local, &d);
    wait_listening(maria_local, &d);

    // The same digest computed by both servers, each through its own tunnel, at the same
    // time, and here independently.
    let expected = md5_hex(
        (1..=10_000)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",")
            .as_bytes(),
    );
    let mut handles = Vec::new();
    for i in 0..5 {
        handles.push(std::thread::spawn(move || {
            (
                "pg",
                PgServer::psql(
                    pg_local,
                    &format!(
                        "select {i}, md5(string_agg(g::text, ',' order by g)) \
                         from generate_series(1, 10000) g"
                    ),
                ),
            )
        }));
        handles.push(std::thread::spawn(move || {
            (
                "maria",
                MariaDbServer::query(
                    maria_local,
                    &format!(
                        "set session group_concat_max_len = 1000000; \
                         select {i}, md5(group_concat(seq order by seq separator ',')) \
                         from mysql.seq_1_to_10000"
                    ),
                ),
            )
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for h in handles {
        let (which, out) = h.join().unwrap();
        let (i, md5) = out
            .split_once(['|', '\t'])
            .unwrap_or_else(|| panic!("{which}: {out}"));
        assert_eq!(md5, expected, "{which} digest {out}");
        assert!(seen.insert((which, i.to_owned())), "{which} {i} twice");
    }
    assert_eq!(seen.len(), 10);

    // Two profiles, two sessions, each to its own server.
    let (code, out, _) = d.ctl(&["--json", "list"]);
    assert_eq!(code, 0);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    for p in list.as_array().unwrap() {
        assert_eq!(p["state"], "ready", "{list}");
    }
    let sessions = sim.sessions();
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let mut ports: Vec<String> = sessions
        .iter()
        .map(|s| {
            s.properties.as_ref().unwrap()["portNumber"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    ports.sort();
    let mut want = vec![pg.port.to_string(), maria.port.to_string()];
    want.sort();
    assert_eq!(ports, want);

    // Closing one profile ends its session only; the other keeps serving.
    let maria_session = status_json(&d, "maria")["session_id"]
        .as_str()
        .expect("session id")
        .to_owned();
    let (code, _, err) = d.ctl(&["close", "maria"]);
    assert_eq!(code, 0, "{err}");
    wait_terminated(&sim, &maria_session).await;
    assert!(std::net::TcpStream::connect(("127.0.0.1", maria_local)).is_err());
    assert_eq!(PgServer::psql(pg_local, "select 6 * 7"), "42");
    let pg_session = sessions
        .iter()
        .find(|s| s.session_id != maria_session)
        .unwrap();
    assert_ne!(
        sim.session(&pg_session.session_id).unwrap().status,
        "Terminated"
    );
    assert_no_violations(&sim);
}
