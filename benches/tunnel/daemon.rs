//! `bastiond` processes against the simulator: the measured tunnels, the cold paths and
//! the idle-connection footprint.

use std::time::{Duration, Instant};

use bastion_sim::SimHandle;

use super::e2e_util::{DaemonProcess, free_port};
use super::probes::connect;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One profile of the daemon's configuration.
/// `max_sessions: None` leaves the default (4).
pub fn profile(
    name: &str,
    remote: u16,
    local: u16,
    max_sessions: Option<usize>,
    autostart: bool,
) -> String {
    let stripes = max_sessions.map_or(String::new(), |m| format!("max_sessions = {m}\n"));
    format!(
        "[profiles.{name}]\ntarget = \"i-0123456789abcdef0\"\nremote_host = \"127.0.0.1\"\n\
         remote_port = {remote}\nlocal_port = {local}\nbind = [\"127.0.0.1\"]\n\
         autostart = {autostart}\n{stripes}"
    )
}

/// `n` distinct free ports (all bound at once, then released; `free_port` one at a
/// time can hand out the same port twice).
pub fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("addr").port())
        .collect()
}

/// A daemon at `RUST_LOG=warn` against `sim`.
pub fn start(config: &str, sim: &SimHandle) -> DaemonProcess {
    DaemonProcess::start_with_env(config, &sim.endpoint_url(), &[("RUST_LOG", "warn")])
}

/// Waits until the daemon reports a listener on `port` (no TCP probe: a connection
/// would start a session).
pub async fn wait_listening(port: u16, d: &DaemonProcess) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.listening_on(port) {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// CPU seconds (utime + stime, all threads), RSS and peak RSS (KiB) of a process, from
/// `/proc` (what getrusage reports for it).
pub struct Usage {
    pub cpu: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// The anonymous (private, not file-backed) part of the RSS.
    pub anon_kib: u64,
}

pub fn usage(pid: u32) -> Usage {
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
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Usage {
        cpu,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        anon_kib: kib("RssAnon:"),
    }
}

/// Local ports of a measured tunnel's profiles.
pub struct Tunnel {
    pub daemon: DaemonProcess,
    pub sink: u16,
    pub source: u16,
    pub echo: u16,
    /// The source, with `max_sessions` 1, 4 and 8.
    pub striped: [(usize, u16); 3],
    /// The PostgreSQL server (default `max_sessions`, 4), if any.
    pub pg: Option<u16>,
    /// The echo server, listening with no session yet (for `bastionctl open --warm`).
    /// It listens from the start: a port left unbound until the measurement could be
    /// handed to another daemon of the run by its free-port pick (`open` then fails).
    pub cold: u16,
}

/// `max_sessions` of the striping profiles.
pub const STRIPES: [usize; 3] = [1, 4, 8];

impl Tunnel {
    /// A daemon with one profile per server (one session each, except the striping
    /// and PostgreSQL profiles) against `sim`, listening.
    pub async fn start(
        sim: &SimHandle,
        servers: super::servers::Servers,
        pg: Option<u16>,
    ) -> Tunnel {
        let ports = free_ports(8);
        let (sink, source, echo, cold) = (ports[0], ports[1], ports[2], ports[3]);
        let striped = [
            (STRIPES[0], ports[4]),
            (STRIPES[1], ports[5]),
            (STRIPES[2], ports[6]),
        ];
        let pg_local = pg.map(|_| ports[7]);
        let mut config = profile("sink", servers.sink, sink, Some(1), true)
            + &profile("source", servers.source, source, Some(1), true)
            + &profile("echo", servers.echo, echo, Some(1), true)
            + &profile("cold", servers.echo, cold, Some(1), true);
        for (m, local) in striped {
            config += &profile(&format!("source{m}"), servers.source, local, Some(m), true);
        }
        if let (Some(remote), Some(local)) = (pg, pg_local) {
            config += &profile("pg", remote, local, None, true);
        }
        let daemon = start(&config, sim);
        for p in [sink, source, echo, cold]
            .into_iter()
            .chain(striped.map(|s| s.1))
            .chain(pg_local)
        {
            wait_listening(p, &daemon).await;
        }
        Tunnel {
            daemon,
            sink,
            source,
            echo,
            striped,
            pg: pg_local,
            cold,
        }
    }

    /// `bastionctl open NAME --warm` for each of `names` the daemon has: their first
    /// session is up.
    pub fn warm(&self, names: &[&str]) {
        for name in names {
            if *name == "pg" && self.pg.is_none() {
                continue;
            }
            let (code, _, err) = self.daemon.ctl(&["open", name, "--warm"]);
            assert_eq!(code, 0, "bastionctl open {name} --warm: {err}");
        }
    }

    /// `bastionctl open cold --warm`, then a new connection's first byte back; the
    /// session is closed again afterwards.
    pub async fn open_warm_to_first_byte(&self) -> Duration {
        let ctl = env!("CARGO_BIN_EXE_bastionctl");
        let socket = self.daemon.socket.clone();
        let t = Instant::now();
        let out = tokio::process::Command::new(ctl)
            .arg("--socket")
            .arg(&socket)
            .args(["open", "cold", "--warm"])
            .output()
            .await
            .expect("run bastionctl");
        assert!(
            out.status.success(),
            "bastionctl open cold --warm failed ({}):\n{}{}\ndaemon log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.daemon.log_text()
        );
        let mut c = connect(self.cold).await;
        c.write_all(b"x").await.expect("write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.expect("read");
        let took = t.elapsed();
        drop(c);
        // Closed (the session ends) and listening again at once, with no session.
        let (code, _, err) = self.daemon.ctl(&["close", "cold"]);
        assert_eq!(code, 0, "bastionctl close: {err}");
        let (code, _, err) = self.daemon.ctl(&["open", "cold"]);
        assert_eq!(code, 0, "bastionctl open: {err}");
        took
    }
}

/// `bastiond run` spawned → first byte back through its (autostart) profile.
pub async fn start_to_first_byte(sim: &SimHandle, echo: u16) -> Duration {
    let local = free_port();
    let config = profile("echo", echo, local, Some(1), true);
    let endpoint = sim.endpoint_url();
    let t = Instant::now();
    // The spawn helper waits for the control socket with a coarse poll: let it run
    // beside our own 1 ms polling of the listener.
    let spawn = tokio::task::spawn_blocking(move || {
        DaemonProcess::start_with_env(&config, &endpoint, &[("RUST_LOG", "warn")])
    });
    let took = loop {
        if let Ok(mut c) = tokio::net::TcpStream::connect(("127.0.0.1", local)).await {
            let _ = c.set_nodelay(true);
            c.write_all(b"x").await.expect("write");
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.expect("read");
            break t.elapsed();
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "bastiond never listened"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    drop(spawn.await.expect("spawn bastiond"));
    took
}

/// Idle-connection footprint.
pub struct Idle {
    /// Daemon RSS and its anonymous part (KiB) listening on every profile, before any
    /// connection.
    pub base: (u64, u64),
    /// Daemon RSS and its anonymous part (KiB) with every connection open and idle.
    pub loaded: (u64, u64),
    pub conns: usize,
    pub sessions: usize,
}

/// `profiles` profiles (default `max_sessions`) to the echo server, `per_profile` idle
/// connections on each (each has carried one byte both ways), then the daemon's RSS.
pub async fn idle_connections(
    sim: &SimHandle,
    echo: u16,
    profiles: usize,
    per_profile: usize,
) -> Idle {
    let locals = free_ports(profiles);
    let config: String = locals
        .iter()
        .enumerate()
        .map(|(i, l)| profile(&format!("idle{i}"), echo, *l, None, true))
        .collect();
    let sessions_before = sim.sessions().len();
    let d = start(&config, sim);
    for l in &locals {
        wait_listening(*l, &d).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let u = usage(d.child.id());
    let base = (u.rss_kib, u.anon_kib);
    let mut tasks = Vec::new();
    for l in &locals {
        for _ in 0..per_profile {
            let l = *l;
            tasks.push(tokio::spawn(async move {
                let mut c = connect(l).await;
                c.write_all(b"x").await.expect("write");
                let mut b = [0u8; 1];
                c.read_exact(&mut b).await.expect("read");
                c
            }));
        }
    }
    let mut conns = Vec::with_capacity(tasks.len());
    for t in tasks {
        conns.push(t.await.expect("idle connection"));
    }
    // Let allocator and buffers settle, and check that every connection still works.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let u = usage(d.child.id());
    let loaded = (u.rss_kib, u.anon_kib);
    let check = conns.len().min(20);
    for c in conns.iter_mut().take(check) {
        c.write_all(b"y").await.expect("write");
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.expect("read");
    }
    let n = conns.len();
    let sessions = sim.sessions().len() - sessions_before;
    drop(conns);
    drop(d);
    Idle {
        base,
        loaded,
        conns: n,
        sessions,
    }
}
