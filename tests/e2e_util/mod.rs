//! End-to-end harness: a throwaway PostgreSQL server, the simulator, and a real
//! `bastiond run` process pointed at the simulator through the standard
//! `AWS_ENDPOINT_URL_SSM` setting.
#![allow(dead_code)]

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
        let child = Command::new(env!("CARGO_BIN_EXE_bastiond"))
            .args(["run", "--config"])
            .arg(&cfg)
            .arg("--socket")
            .arg(&socket)
            .env("AWS_ENDPOINT_URL_SSM", endpoint)
            .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
            .env("AWS_SECRET_ACCESS_KEY", "secret-test-key")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "debug")
            .env_remove("AWS_PROFILE")
            .envs(env.iter().copied())
            .stdout(std::fs::File::create(dir.join("stdout.log")).expect("stdout file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn bastiond");
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
