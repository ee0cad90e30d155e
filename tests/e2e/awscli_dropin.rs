//! The AWS CLI (v1, from PyPI, in the test venv: `BASTION_TEST_VENV`, default
//! `target/test-venv`; scripts/test.sh installs it) runs `aws ssm start-session` against
//! the in-process simulator and spawns `session-manager-plugin` from PATH, which is
//! `bastionctl` through a symlink of that name: the drop-in, with the argv and the
//! environment exactly as the CLI passes them.

use crate::sim_util;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_bastionctl");
const TARGET: &str = "i-0123456789abcdef0";

fn venv() -> PathBuf {
    match std::env::var_os("BASTION_TEST_VENV") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"),
    }
}

fn aws_bin() -> PathBuf {
    let bin = venv().join("bin/aws");
    assert!(
        bin.exists(),
        "aws (awscli v1) not found at {}: install it with \
         `python3 -m venv target/test-venv && target/test-venv/bin/pip install awscli` \
         (scripts/test.sh does this), or point BASTION_TEST_VENV at a venv that has it",
        bin.display()
    );
    bin
}

/// A temporary directory holding `session-manager-plugin -> bastionctl`, removed on drop.
struct PluginDir(PathBuf);

impl PluginDir {
    fn new() -> PluginDir {
        let dir = std::env::temp_dir().join(format!(
            "bastion-awscli-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(dir.join("home")).unwrap();
        std::os::unix::fs::symlink(BIN, dir.join("session-manager-plugin")).unwrap();
        PluginDir(dir)
    }
}

impl Drop for PluginDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The process ids whose parent is `parent` (from /proc).
fn children_of(parent: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

fn nul_separated(path: &Path) -> Vec<String> {
    std::fs::read(path)
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// Collects every line of `r` into `into` (and returns when it ends).
fn collect_lines(
    r: impl AsyncRead + Unpin + Send + 'static,
    into: Arc<Mutex<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut s = into.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aws_ssm_start_session_spawns_the_drop_in_and_keeps_every_byte() {
    let aws = aws_bin();
    let sim = sim_util::start_default().await;
    let addr = sim.local_addr();
    let echo = sim_util::echo_server().await;
    let plugin_dir = PluginDir::new();
    let local_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let parameters = format!(
        r#"{{"host":["127.0.0.1"],"portNumber":["{echo}"],"localPortNumber":["{local_port}"]}}"#
    );
    let endpoint = sim.endpoint_url();

    let mut cmd = Command::new(&aws);
    cmd.args([
        "ssm",
        "start-session",
        "--target",
        TARGET,
        "--document-name",
        "AWS-StartPortForwardingSessionToRemoteHost",
        "--parameters",
        &parameters,
        "--endpoint-url",
        &endpoint,
        "--region",
        "us-east-1",
    ])
    // Nothing from the user's environment or ~/.aws: dummy credentials, no config files.
    .env_clear()
    .env(
        "PATH",
        format!("{}:/usr/local/bin:/usr/bin:/bin", plugin_dir.0.display()),
    )
    .env("HOME", plugin_dir.0.join("home"))
    .env("AWS_ACCESS_KEY_ID", "AKIDTEST")
    .env("AWS_SECRET_ACCESS_KEY", "dummy-secret")
    .env("AWS_CONFIG_FILE", plugin_dir.0.join("no-such-config"))
    .env(
        "AWS_SHARED_CREDENTIALS_FILE",
        plugin_dir.0.join("no-such-credentials"),
    )
    .env("AWS_EC2_METADATA_DISABLED", "true")
    .env("AWS_PAGER", "")
    // bastion's own log line ("connection accepted") on stderr proves which plugin ran.
    .env("BASTION_LOG", "bastion=info")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    // Its own process group, as a terminal's foreground job: Ctrl-C goes to the group.
    .process_group(0)
    .kill_on_drop(true);
    let mut child = cmd.spawn().expect("run aws");
    let aws_pid = child.id().unwrap();
    let stderr = Arc::new(Mutex::new(String::new()));
    let stderr_task = collect_lines(child.stderr.take().unwrap(), stderr.clone());
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let stdout = Arc::new(Mutex::new(String::new()));

    // "Port N opened for sessionId S." once the plugin listens.
    let (port, session_id) = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            stdout.lock().unwrap().push_str(&format!("{line}\n"));
            if let Some(rest) = line.strip_prefix("Port ") {
                let (n, tail) = rest.split_once(' ').unwrap();
                let id = tail
                    .strip_prefix("opened for sessionId ")
                    .and_then(|t| t.strip_suffix('.'))
                    .unwrap_or_else(|| panic!("odd line {line:?}"));
                return (n.parse::<u16>().unwrap(), id.to_owned());
            }
        }
        panic!(
            "aws stdout ended: {}\nstderr: {}",
            stdout.lock().unwrap(),
            stderr.lock().unwrap()
        );
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no 'Port N opened' line within 60 s; stdout: {}\nstderr: {}",
            stdout.lock().unwrap(),
            stderr.lock().unwrap()
        )
    });
    assert_eq!(port, local_port, "the plugin listens on localPortNumber");
    // Go on with the same reader: what it has buffered past the Port line (the
    // "Waiting for connections..." line) belongs to the output too.
    let stdout_task = {
        let stdout = stdout.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let mut s = stdout.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        })
    };

    // The process the CLI spawned: our binary, through the symlink, with the CLI's argv.
    let plugins: Vec<u32> = children_of(aws_pid)
        .into_iter()
        .filter(|&pid| {
            nul_separated(&PathBuf::from(format!("/proc/{pid}/cmdline")))
                .first()
                .is_some_and(|a| a == "session-manager-plugin")
        })
        .collect();
    assert_eq!(plugins.len(), 1, "plugin children of aws: {plugins:?}");
    let plugin_pid = plugins[0];
    let exe = std::fs::read_link(format!("/proc/{plugin_pid}/exe")).unwrap();
    assert_eq!(
        exe.canonicalize().unwrap_or(exe.clone()),
        Path::new(BIN).canonicalize().unwrap(),
        "the CLI ran another session-manager-plugin"
    );
    let environ = nul_separated(&PathBuf::from(format!("/proc/{plugin_pid}/environ")));
    // Read raw: the empty profile argument is an empty field between two NULs.
    let raw_argv: Vec<String> = std::fs::read(format!("/proc/{plugin_pid}/cmdline"))
        .unwrap()
        .strip_suffix(&[0])
        .unwrap()
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    assert_eq!(raw_argv.len(), 7, "{raw_argv:?}");
    assert_eq!(raw_argv[0], "session-manager-plugin");
    // awscli ≥ 1.2.497.0-aware: the response travels in an environment variable.
    assert_eq!(
        raw_argv[1], "AWS_SSM_START_SESSION_RESPONSE",
        "{raw_argv:?}"
    );
    assert_eq!(raw_argv[2], "us-east-1");
    assert_eq!(raw_argv[3], "StartSession");
    assert_eq!(raw_argv[4], "", "no --profile: an empty profile argument");
    let request: Value = serde_json::from_str(&raw_argv[5]).unwrap();
    assert_eq!(request["Target"], TARGET, "{request}");
    assert_eq!(
        request["DocumentName"], "AWS-StartPortForwardingSessionToRemoteHost",
        "{request}"
    );
    assert_eq!(
        request["Parameters"]["portNumber"][0],
        echo.to_string(),
        "{request}"
    );
    assert_eq!(raw_argv[6], endpoint);
    let response = environ
        .iter()
        .find_map(|kv| kv.strip_prefix("AWS_SSM_START_SESSION_RESPONSE="))
        .expect("the response variable is in the plugin's environment");
    let response: Value = serde_json::from_str(response).unwrap();
    assert_eq!(response["SessionId"], session_id.as_str());
    assert!(
        response["TokenValue"]
            .as_str()
            .is_some_and(|t| !t.is_empty())
    );

    // Several MiB echoed through the drop-in, on four connections at once.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(async move {
            let mut data = vec![0u8; 1 << 20];
            fastrand::fill(&mut data);
            let want = Sha256::digest(&data);
            let conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
            let (mut r, mut w) = conn.into_split();
            // No half-close before the echo is back (a FIN ends a smux stream both ways).
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
    .unwrap_or_else(|_| panic!("echo through the drop-in did not finish within 120 s"));
    let counters = sim.session(&session_id).unwrap().counters;
    assert!(counters.streams_opened >= 4, "{counters:?}");

    // Ctrl-C: SIGINT to the foreground group. The CLI ignores it while the plugin runs;
    // the plugin ends the session and exits 0, and so does the CLI.
    let pgid = rustix::process::Pid::from_raw(aws_pid as i32).unwrap();
    rustix::process::kill_process_group(pgid, rustix::process::Signal::INT).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "aws did not exit after SIGINT; stderr: {}",
                stderr.lock().unwrap()
            )
        })
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), stdout_task).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), stderr_task).await;
    let out = stdout.lock().unwrap().clone();
    let err = stderr.lock().unwrap().clone();
    eprintln!("aws stdout:\n{out}\naws stderr:\n{err}");
    assert_eq!(
        status.code(),
        Some(0),
        "{status:?}\nstdout: {out}\nstderr: {err}"
    );
    assert!(
        !Path::new(&format!("/proc/{plugin_pid}")).exists(),
        "the plugin outlived the CLI"
    );
    assert!(
        out.contains(&format!("Starting session with SessionId: {session_id}")),
        "{out}"
    );
    // The plugin's lines, byte for byte (line-collected: the CLI passes the plugin's
    // stdout through unchanged).
    assert!(
        out.contains(&format!(
            "Port {local_port} opened for sessionId {session_id}.\nWaiting for connections...\n\n\
             Connection accepted for session [{session_id}]\n"
        )),
        "{out}"
    );
    assert!(
        out.ends_with(&format!(
            "Terminate signal received, exiting.\n\n\nExiting session with sessionId: {session_id}.\n\n"
        )),
        "{out}"
    );
    assert!(
        err.contains("connection accepted") && err.contains("bastion::plugin"),
        "bastion's log line is missing: {err}"
    );

    // The one session the CLI started is Terminated, without protocol violations.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = sim.session(&session_id).expect("session").status;
        if status == "Terminated" {
            break;
        }
        assert!(Instant::now() < deadline, "session status {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, all) = sim_util::get_json(addr, "/sim/sessions").await;
    assert_eq!(code, 200);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all}");
    assert_eq!(all[0]["session_id"], session_id.as_str());
    assert_eq!(all[0]["status"], "Terminated");
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
    sim_util::assert_no_violations(addr).await;
}
