//! The tunnel against a direct loopback connection, side by side in one run.
//!
//! A real `bastiond run` (the release binary under `cargo bench`) forwards to local
//! servers through the simulator, with the agent's 1 ms pacing on and again with it off
//! (to see the client alone); the same servers are also reached directly. Printed as one
//! table with ratios to direct:
//!
//! * upload and download throughput of one connection (MB/s);
//! * request/response latency: sequential 64-byte round trips, p50 / p99 / max;
//! * new-connection latency on a warm session (connect → first byte back), p50 / p99;
//! * the daemon's CPU seconds per GiB moved (utime + stime from `/proc`) and its RSS.
//!
//! `cargo bench --bench tunnel` runs it in full (`BENCH_MIB`, default 64, sets the
//! transfer size; the agent's pacing caps a paced download at about 1 MB/s, so the paced
//! transfers use `BENCH_MIB / 8`). Under `cargo test` it runs a small smoke pass that
//! checks every transfer's SHA-256, so the harness itself stays tested.

#[path = "../tests/e2e_util/mod.rs"]
mod e2e_util;

use std::time::{Duration, Instant};

use bastion::sim::{SimConfig, SimHandle, Simulator};
use e2e_util::{DaemonProcess, free_port};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sizes of one run.
struct Plan {
    mib: usize,
    paced_mib: usize,
    round_trips: usize,
    connects: usize,
}

/// One measured path: a name and the local port that reaches the servers.
struct Path {
    name: &'static str,
    sink: u16,
    source: u16,
    echo: u16,
}

#[derive(Default)]
struct Row {
    up_mbps: f64,
    down_mbps: f64,
    rtt: [Duration; 3],
    connect: [Duration; 2],
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// Reads an 8-byte length, then that many bytes; answers their SHA-256.
async fn sink_server() -> u16 {
    serve(|mut c| async move {
        let Ok(len) = c.read_u64().await else { return };
        let mut h = Sha256::new();
        let mut left = len as usize;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let n = match c.read(&mut buf[..left.min(256 * 1024)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            h.update(&buf[..n]);
            left -= n;
        }
        let _ = c.write_all(&h.finalize()).await;
    })
    .await
}

/// Reads an 8-byte length, then sends that many bytes of `pattern`.
async fn source_server() -> u16 {
    serve(|mut c| async move {
        let Ok(len) = c.read_u64().await else { return };
        let data = pattern(len as usize);
        let _ = c.write_all(&data).await;
    })
    .await
}

/// Echoes everything.
async fn echo_server() -> u16 {
    serve(|c| async move {
        let (mut r, mut w) = c.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

async fn serve<F, Fut>(handler: F) -> u16
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let _ = c.set_nodelay(true);
            tokio::spawn(handler(c));
        }
    });
    port
}

async fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = c.set_nodelay(true);
    c
}

async fn upload(port: u16, data: &[u8]) -> f64 {
    let want = Sha256::digest(data);
    let started = Instant::now();
    let mut c = connect(port).await;
    c.write_u64(data.len() as u64).await.expect("write");
    c.write_all(data).await.expect("write");
    let mut got = [0u8; 32];
    c.read_exact(&mut got).await.expect("digest");
    assert_eq!(&got[..], &want[..], "upload SHA-256");
    data.len() as f64 / started.elapsed().as_secs_f64() / 1e6
}

async fn download(port: u16, len: usize) -> f64 {
    let want = Sha256::digest(pattern(len));
    let started = Instant::now();
    let mut c = connect(port).await;
    c.write_u64(len as u64).await.expect("write");
    let mut got = Vec::with_capacity(len);
    c.read_to_end(&mut got).await.expect("read");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(Sha256::digest(&got), want, "download SHA-256");
    len as f64 / secs / 1e6
}

fn percentiles(mut v: Vec<Duration>) -> [Duration; 3] {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize];
    [at(0.5), at(0.99), v[v.len() - 1]]
}

async fn round_trips(port: u16, n: usize) -> [Duration; 3] {
    let mut c = connect(port).await;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&msg).await.expect("write");
        c.read_exact(&mut back).await.expect("read");
        times.push(t.elapsed());
    }
    percentiles(times)
}

async fn connects(port: u16, n: usize) -> [Duration; 2] {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut c = connect(port).await;
        c.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.expect("read");
        times.push(t.elapsed());
    }
    let p = percentiles(times);
    [p[0], p[1]]
}

async fn measure(path: &Path, plan: &Plan, mib: usize) -> Row {
    let data = pattern(mib << 20);
    // Warm: the daemon's first connection starts the session.
    let _ = round_trips(path.echo, 10).await;
    Row {
        up_mbps: upload(path.sink, &data).await,
        down_mbps: download(path.source, mib << 20).await,
        rtt: round_trips(path.echo, plan.round_trips).await,
        connect: connects(path.echo, plan.connects).await,
    }
}

/// (utime + stime in seconds, RSS in KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // After the command name: state is field 3, utime 14, stime 15 (1-based, man proc).
    let ticks = |i: usize| fields.get(i - 3).and_then(|v| v.parse::<f64>().ok());
    let hz = 100.0; // USER_HZ on Linux
    let cpu = (ticks(14).unwrap_or(0.0) + ticks(15).unwrap_or(0.0)) / hz;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    (cpu, rss)
}

fn profile(name: &str, remote: u16, local: u16) -> String {
    format!(
        "[profiles.{name}]\ntarget = \"i-0123456789abcdef0\"\nremote_host = \"127.0.0.1\"\n\
         remote_port = {remote}\nlocal_port = {local}\nbind = [\"127.0.0.1\"]\nautostart = true\n\
         max_sessions = 1\n"
    )
}

/// A daemon with one profile per server, against `sim`.
async fn tunnel(sim: &SimHandle, name: &'static str, servers: [u16; 3]) -> (DaemonProcess, Path) {
    let locals = [free_port(), free_port(), free_port()];
    let config: String = ["sink", "source", "echo"]
        .iter()
        .zip(servers.iter().zip(&locals))
        .map(|(p, (r, l))| profile(p, *r, *l))
        .collect();
    let d = DaemonProcess::start_with_env(&config, &sim.endpoint_url(), &[("RUST_LOG", "warn")]);
    for l in locals {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", l)).is_err() {
            assert!(Instant::now() < deadline, "no listener");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let path = Path {
        name,
        sink: locals[0],
        source: locals[1],
        echo: locals[2],
    };
    (d, path)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mib = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64usize);
    let plan = if full {
        Plan {
            mib,
            paced_mib: (mib / 8).max(1),
            round_trips: 10_000,
            connects: 200,
        }
    } else {
        Plan {
            mib: 1,
            paced_mib: 1,
            round_trips: 50,
            connects: 5,
        }
    };
    let servers = [
        sink_server().await,
        source_server().await,
        echo_server().await,
    ];
    let direct = Path {
        name: "direct loopback",
        sink: servers[0],
        source: servers[1],
        echo: servers[2],
    };
    let base = measure(&direct, &plan, plan.mib).await;
    let mut rows = vec![(direct.name, plan.mib, base, None)];
    for (name, pacing, size) in [
        ("tunnel, agent pacing off", Duration::ZERO, plan.mib),
        (
            "tunnel, agent pacing 1 ms",
            Duration::from_millis(1),
            plan.paced_mib,
        ),
    ] {
        let sim = Simulator::bind(SimConfig {
            agent_pacing: pacing,
            ..SimConfig::default()
        })
        .await
        .expect("sim")
        .spawn();
        let (d, path) = tunnel(&sim, name, servers).await;
        let (cpu0, _) = usage(d.child.id());
        let row = measure(&path, &plan, size).await;
        let (cpu1, rss) = usage(d.child.id());
        // Bytes through the daemon: upload + download, plus the small traffic.
        let gib = (2 * (size << 20)) as f64 / (1u64 << 30) as f64;
        rows.push((path.name, size, row, Some(((cpu1 - cpu0) / gib, rss))));
        assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    }
    println!(
        "| path | MiB | up MB/s | down MB/s | RTT p50 ms | p99 | max | connect p50 ms | p99 | daemon CPU s/GiB | daemon RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, size, r, daemon) in &rows {
        println!(
            "| {name} | {size} | {:.1} ({:.2}x) | {:.1} ({:.2}x) | {} | {} | {} | {} | {} | {} | {} |",
            r.up_mbps,
            r.up_mbps / rows[0].2.up_mbps,
            r.down_mbps,
            r.down_mbps / rows[0].2.down_mbps,
            ms(r.rtt[0]),
            ms(r.rtt[1]),
            ms(r.rtt[2]),
            ms(r.connect[0]),
            ms(r.connect[1]),
            daemon.map_or("-".into(), |(c, _)| format!("{c:.2}")),
            daemon.map_or("-".into(), |(_, rss)| format!("{:.1}", rss as f64 / 1024.0)),
        );
    }
}
