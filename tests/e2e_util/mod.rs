//! End-to-end harness: throwaway PostgreSQL and MariaDB servers, the simulator, and a real
//! `bastiond run` process pointed at the simulator through the standard
//! `AWS_ENDPOINT_URL_SSM` setting; moto_server for the AWS control plane ([`moto`]).
#![allow(dead_code)]

pub mod moto;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn pg_bin(name: &str) -> PathBuf {
    // Debian installs each major version under /usr/lib/postgresql/<major>/bin.
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .collect()
        })
        .unwrap_or_default();
    dirs.sort();
    if let Some(p) = dirs.iter().rev().map(|d| d.join(name)).find(|p| p.exists()) {
        return p;
    }
    panic!(
        "PostgreSQL server binary {name} not found: run ./scripts/test.sh (it installs postgresql), \
         or `sudo apt-get install postgresql`"
    );
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Runs a PostgreSQL tool as the `postgres` user when we are root (initdb refuses root).
fn pg_command(tool: &str) -> Command {
    let bin = pg_bin(tool);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    }
}

/// A PostgreSQL cluster in a temporary directory, stopped on drop.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
}

impl PgServer {
    pub fn start() -> PgServer {
        let dir =
            std::env::temp_dir().join(format!("bastion-pg-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("pg dir");
        if is_root() {
            let ok = Command::new("chown")
                .args(["postgres:", dir.to_str().unwrap_or_default()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "chown of the PostgreSQL directory failed (is there a postgres user?)"
            );
        }
        let data = dir.join("data");
        let out = pg_command("initdb")
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
            dir.display()
        );
        let out = pg_command("pg_ctl")
            .args([
                "-D",
                data.to_str().unwrap_or_default(),
                "-l",
                dir.join("log").to_str().unwrap_or_default(),
                "-w",
                "-o",
                &opts,
                "start",
            ])
            .output()
            .expect("run pg_ctl");
        assert!(
            out.status.success(),
            "pg_ctl start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        PgServer { port, dir }
    }

    /// Runs `psql -c SQL` against `port` (the server's or a tunnel's) and returns stdout.
    pub fn psql(port: u16, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = pg_command("pg_ctl")
            .args([
                "-D",
                self.dir.join("data").to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "stop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A MariaDB server or client tool (`mariadbd` lives in /usr/sbin on Debian, which is
/// not on every user's PATH).
fn mariadb_bin(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| {
        panic!(
            "MariaDB tool {name} not found: run ./scripts/test.sh (it installs mariadb-server \
             and mariadb-client), or `sudo apt-get install mariadb-server mariadb-client`"
        )
    })
}

/// A throwaway MariaDB server in a temporary directory, on a free port of 127.0.0.1
/// (user `root`, no password), shut down on drop.
pub struct MariaDbServer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

impl MariaDbServer {
    pub fn start() -> MariaDbServer {
        let dir = std::env::temp_dir().join(format!(
            "bastion-mariadb-{}-{}",
            std::process::id(),
            free_port()
        ));
        // Its own tmpdir: a starting mariadbd (mariadb-install-db runs one) deletes every
        // `#sql*` file in its tmpdir, including the temporary tables of other servers
        // that share /tmp, and so makes concurrent installs fail at random.
        let tmp = dir.join("tmp");
        std::fs::create_dir_all(&tmp).expect("mariadb dir");
        // As root the server runs as `mysql` (mariadbd refuses root without --user);
        // otherwise as the current user.
        let mut user_arg = Vec::new();
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "mysql:", dir.to_str().unwrap_or_default()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(
                ok,
                "chown of the MariaDB directory failed (is there a mysql user?)"
            );
            user_arg.push("--user=mysql".to_owned());
        }
        let data = dir.join("data");
        let out = Command::new(mariadb_bin("mariadb-install-db"))
            .arg("--no-defaults")
            .args(&user_arg)
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .output()
            .expect("run mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let err_log = dir.join("err.log");
        let child = Command::new(mariadb_bin("mariadbd"))
            .arg("--no-defaults")
            .args(&user_arg)
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("sock").display()))
            .arg(format!("--pid-file={}", dir.join("pid").display()))
            .arg(format!("--log-error={}", err_log.display()))
            .args([
                "--skip-log-bin",
                "--innodb-flush-log-at-trx-commit=0",
                "--innodb-buffer-pool-size=64M",
                "--max-connections=200",
                "--max-allowed-packet=64M",
                "--local-infile=1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mariadbd");
        let mut server = MariaDbServer { port, dir, child };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "mariadbd exited ({status}) before answering; its log:\n{}",
                    std::fs::read_to_string(&err_log).unwrap_or_default()
                );
            }
            let ping = Command::new(mariadb_bin("mariadb-admin"))
                .args(["--no-defaults", "--protocol=TCP", "-h127.0.0.1", "-uroot"])
                .arg(format!("-P{port}"))
                .arg("ping")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ping {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "mariadbd did not answer on 127.0.0.1:{port} within 60 s; its log:\n{}",
                std::fs::read_to_string(&err_log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `mariadb` client against 127.0.0.1:`port` (the server's or a tunnel's), as
    /// root, batch mode without column names; add `-e SQL` or stdin.
    pub fn client(port: u16) -> Command {
        let mut c = Command::new(mariadb_bin("mariadb"));
        c.args([
            "--no-defaults",
            "--protocol=TCP",
            "-h127.0.0.1",
            "-uroot",
            "--batch",
            "--skip-column-names",
            "--default-character-set=utf8mb4",
            "--connect-timeout=20",
        ])
        .arg(format!("-P{port}"));
        c
    }

    /// Runs `mariadb -e SQL` against `port` and returns stdout (trailing newline trimmed).
    pub fn query(port: u16, sql: &str) -> String {
        let out = Self::client(port)
            .args(["-e", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run mariadb");
        assert!(
            out.status.success(),
            "mariadb failed on port {port} ({sql}): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .trim_end_matches('\n')
            .to_owned()
    }
}

impl Drop for MariaDbServer {
    fn drop(&mut self) {
        let _ = Command::new(mariadb_bin("mariadb-admin"))
            .args(["--no-defaults", "--protocol=TCP", "-h127.0.0.1", "-uroot"])
            .arg(format!("-P{}", self.port))
            .args(["--shutdown-timeout=10", "shutdown"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The credential [`DaemonProcess`] gives the daemon (tests/sim_util's `start` registers
/// it too).
pub const DAEMON_ACCESS_KEY_ID: &str = "AKIDDAEMON";
/// Its secret.
pub const DAEMON_SECRET: &str = "secret-test-key";

/// `config` with the daemon's credential registered, so that the simulator accepts the
/// daemon's signed upgrades.
#[allow(dead_code)]
pub fn with_daemon_credential(config: bastion_sim::SimConfig) -> bastion_sim::SimConfig {
    config.with_credential(DAEMON_ACCESS_KEY_ID, DAEMON_SECRET, None)
}

/// A daemon profile (TOML) forwarding `127.0.0.1:local_port` to `127.0.0.1:remote_port`
/// through instance `i-0123456789abcdef0`, listening from the start.
pub fn profile(name: &str, remote_port: u16, local_port: u16) -> String {
    format!(
        "[profiles.{name}]\ntarget = \"i-0123456789abcdef0\"\nremote_host = \"127.0.0.1\"\n\
         remote_port = {remote_port}\nlocal_port = {local_port}\nbind = [\"127.0.0.1\"]\nautostart = true\n"
    )
}

/// Sends `len` bytes of a pattern to `port` while reading them back (an echo server
/// behind the tunnel), and checks they come back unchanged within 60 s.
pub async fn echo_roundtrip(port: u16, len: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let data: Vec<u8> = (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let (mut rd, mut wr) = conn.split();
    let mut back = vec![0u8; data.len()];
    let send = async { wr.write_all(&data).await.expect("send") };
    let recv = async {
        tokio::time::timeout(Duration::from_secs(60), rd.read_exact(&mut back))
            .await
            .expect("echo within 60 s")
            .expect("read echo");
    };
    tokio::join!(send, recv);
    assert!(back == data, "the echo differs from what was sent");
}

/// Waits until the daemon listens on `port`.
pub fn wait_listening(port: u16, d: &DaemonProcess) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !d.listening_on(port) {
        assert!(
            Instant::now() < deadline,
            "daemon never listened on {port}; log:\n{}",
            d.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts that the simulator saw no protocol violation in any session.
pub fn assert_no_violations(sim: &bastion_sim::SimHandle) {
    for s in sim.sessions() {
        assert!(
            s.violations.is_empty(),
            "session {} violations: {:?}",
            s.session_id,
            s.violations
        );
    }
}

/// Waits until the simulator reports session `id` Terminated.
pub async fn wait_terminated(sim: &bastion_sim::SimHandle, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sim.session(id).map(|s| s.status).unwrap_or_default();
        if status == "Terminated" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "session {id} not terminated: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `bastiond run` process, killed on drop. Its stderr (the log) is kept in a file.
pub struct DaemonProcess {
    pub child: Child,
    pub socket: PathBuf,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl DaemonProcess {
    /// Starts `bastiond run` with `config` (TOML text), AWS pointed at `endpoint`, at
    /// `RUST_LOG=debug`.
    pub fn start(config: &str, endpoint: &str) -> DaemonProcess {
        Self::start_with_env(config, endpoint, &[])
    }

    /// Like [`DaemonProcess::start`], with extra environment variables (which override
    /// the defaults, e.g. `("RUST_LOG", "trace")`). Stdout is kept in `stdout.log`.
    pub fn start_with_env(config: &str, endpoint: &str, env: &[(&str, &str)]) -> DaemonProcess {
        let dir =
            std::env::temp_dir().join(format!("bastion-d-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("daemon dir");
        let cfg = dir.join("config.toml");
        std::fs::write(&cfg, config).expect("write config");
        let socket = dir.join("control.sock");
        let log = dir.join("bastiond.log");
        // `BASTIOND_WRAPPER="valgrind --tool=callgrind"` runs the daemon under a tool
        // (for profiles; benches/tunnel.rs).
        let wrapper = std::env::var("BASTIOND_WRAPPER").unwrap_or_default();
        let mut words = wrapper.split_whitespace();
        let mut command = match words.next() {
            Some(tool) => {
                let mut c = Command::new(tool);
                c.args(words).arg(env!("CARGO_BIN_EXE_bastiond"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_bastiond")),
        };
        command
            .args(["run", "--config"])
            .arg(&cfg)
            .arg("--socket")
            .arg(&socket)
            .env("AWS_ENDPOINT_URL_SSM", endpoint)
            .env("AWS_ACCESS_KEY_ID", DAEMON_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", DAEMON_SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "debug")
            .env("BASTION_STATE_DIR", dir.join("state"))
            .env_remove("AWS_PROFILE")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(dir.join("stdout.log")).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"));
        // A test killed by a timeout must not leave its daemon behind.
        // SAFETY: the closure only makes one async-signal-safe system call (prctl).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut command, || {
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))
                .map_err(std::io::Error::from)
            });
        }
        let child = command.spawn().expect("spawn bastiond");
        let d = DaemonProcess {
            child,
            socket,
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !d.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "bastiond did not create its socket; log:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// True once the daemon reports a listener on `port` (asked over the control API:
    /// a TCP probe would be a connection, and start a session).
    pub fn listening_on(&self, port: u16) -> bool {
        let (code, out, _) = self.ctl(&["--json", "list"]);
        code == 0 && out.contains(&format!(":{port}\""))
    }

    /// What the daemon wrote to stdout.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self.dir.join("stdout.log")).unwrap_or_default()
    }

    /// Runs `bastionctl --socket S ARGS` and returns (exit code, stdout, stderr).
    pub fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_bastionctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run bastionctl");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "bastiond did not exit after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
