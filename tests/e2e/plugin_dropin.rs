//! `bastionctl session-manager-plugin ...`: the plugin's argv contract and its
//! user-visible output (strings, streams, exit codes, signals) against the in-process
//! simulator, over real sockets, with the real binary. Every expected string is the
//! plugin's own (see `src/plugin/output.rs` for the sources).

use crate::sim_util;

use std::net::SocketAddr;
use std::os::unix::process::ExitStatusExt as _;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};

const BIN: &str = env!("CARGO_BIN_EXE_bastionctl");
const TARGET: &str = "i-0123456789abcdef0";
const ENV_NAME: &str = "AWS_SSM_START_SESSION_RESPONSE";

/// A simulator that knows the test's credentials (it refuses upgrades signed by
/// unknown keys).
async fn sim() -> bastion_sim::SimHandle {
    sim_util::start(
        bastion_sim::SimConfig::default()
            .with_credential("AKIDTEST", "dummy-secret", None)
            .with_credential(ProcessProfile::AKID, ProcessProfile::SECRET, None),
    )
    .await
}

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
        .env_remove("BASTION_LOG")
        .env_remove("SSM_PLUGIN_SKIP_CLIENT_CONFIGURE")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// The plugin's output of a run that ended.
struct Ended {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

async fn run_to_end(cmd: &mut Command) -> Ended {
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("the plugin exits within 60 s")
        .unwrap();
    Ended {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A running plugin whose stdout and stderr are collected as they come.
struct Running {
    child: Child,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

fn collect(
    mut pipe: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (Arc<Mutex<Vec<u8>>>, tokio::task::JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let task = tokio::spawn(async move {
        let mut chunk = vec![0u8; 64 * 1024];
        while let Ok(n) = pipe.read(&mut chunk).await {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&chunk[..n]);
        }
    });
    (buf, task)
}

impl Running {
    fn spawn(cmd: &mut Command) -> Running {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (stdout, out_task) = collect(child.stdout.take().unwrap());
        let (stderr, err_task) = collect(child.stderr.take().unwrap());
        Running {
            child,
            stdout,
            stderr,
            readers: vec![out_task, err_task],
        }
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits (30 s at most) until stdout contains `text`.
    async fn wait_stdout(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.stdout().contains(text) {
            assert!(
                Instant::now() < deadline,
                "no {text:?} on stdout within 30 s; stdout {:?}, stderr {:?}",
                self.stdout(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The port of the "Port N opened for sessionId ID." line, once printed.
    async fn port(&self, session_id: &str) -> u16 {
        let tail = format!(" opened for sessionId {session_id}.");
        self.wait_stdout(&tail).await;
        let out = self.stdout();
        let line = out.lines().find(|l| l.ends_with(&tail)).unwrap();
        line.strip_prefix("Port ")
            .and_then(|l| l.strip_suffix(&tail))
            .unwrap()
            .parse()
            .unwrap()
    }

    fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id().unwrap() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    async fn wait(mut self) -> Ended {
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .expect("the plugin exits within 30 s")
            .unwrap();
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
        }
        Ended {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

fn port_request(remote_port: u16) -> Value {
    json!({
        "Target": TARGET,
        "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
        "Parameters": {
            "host": ["127.0.0.1"],
            "portNumber": [remote_port.to_string()],
            "localPortNumber": ["0"],
        },
    })
}

/// Calls StartSession at `api` and returns (response body, SessionId).
async fn start_session(api: SocketAddr, request: &Value) -> (String, String) {
    let r = sim_util::ssm(api, "StartSession", request.clone()).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let id = r.json()["SessionId"].as_str().unwrap().to_owned();
    (String::from_utf8(r.body).unwrap(), id)
}

/// The CLI's way: the response in `AWS_SSM_START_SESSION_RESPONSE`, its name in argv.
fn session_command(response: &str, profile: &str, request: &Value, endpoint: &str) -> Command {
    let mut cmd = plugin_command();
    cmd.env(ENV_NAME, response).args([
        "session-manager-plugin",
        ENV_NAME,
        "us-east-1",
        "StartSession",
        profile,
        &request.to_string(),
        endpoint,
    ]);
    cmd
}

/// One 64 KiB echo through the plugin's port.
async fn echo_once(port: u16) {
    let mut data = vec![0u8; 64 * 1024];
    fastrand::fill(&mut data);
    let conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (mut r, mut w) = conn.into_split();
    let want = Sha256::digest(&data);
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w
    });
    let mut got = vec![0u8; 64 * 1024];
    tokio::time::timeout(Duration::from_secs(60), r.read_exact(&mut got))
        .await
        .expect("echo within 60 s")
        .unwrap();
    drop(writer.await.unwrap());
    assert_eq!(Sha256::digest(&got), want);
}

fn assert_no_debug_lines(stderr: &str) {
    for marker in [" DEBUG ", " TRACE "] {
        assert!(
            !stderr.contains(marker),
            "a{marker}line at the default level: {stderr}"
        );
    }
}

#[tokio::test]
async fn argv_errors_print_the_plugins_strings_on_stdout_and_exit_0() {
    let bare = run_to_end(plugin_command().arg("session-manager-plugin")).await;
    assert_eq!(bare.status.code(), Some(0));
    assert_eq!(
        bare.stdout,
        "\nThe Session Manager plugin was installed successfully. Use the AWS CLI to start a session.\n\n"
    );

    let version = run_to_end(plugin_command().args(["session-manager-plugin", "--version"])).await;
    assert_eq!(version.status.code(), Some(0));
    // The AWS CLI's check: ^\d+(\.\d+){0,3}$ and newer than 1.2.497.0.
    let v = version.stdout.strip_suffix('\n').expect("one line");
    let parts: Vec<u32> = v.split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(parts.len(), 4, "{v}");
    assert!(parts > vec![1, 2, 497, 0], "{v}");

    let unknown = run_to_end(plugin_command().args(["session-manager-plugin", "frobnicate"])).await;
    assert_eq!(unknown.status.code(), Some(0));
    assert_eq!(
        unknown.stdout,
        "\nUnknown operation frobnicate. \nUse session-manager-plugin --version to check the version.\n\n"
    );

    let invalid = run_to_end(plugin_command().args([
        "session-manager-plugin",
        "{}",
        "us-east-1",
        "GetSession",
        "",
    ]))
    .await;
    assert_eq!(invalid.status.code(), Some(0));
    assert_eq!(invalid.stdout, "Invalid Operation");

    // The variable named but not set: the plugin reads "" and cannot parse it.
    let mut unset = plugin_command();
    unset.env_remove(ENV_NAME).args([
        "session-manager-plugin",
        ENV_NAME,
        "us-east-1",
        "StartSession",
        "",
        "{}",
    ]);
    let unset = run_to_end(&mut unset).await;
    assert_eq!(unset.status.code(), Some(0), "{}", unset.stderr);
    assert!(
        unset.stdout.starts_with("Cannot perform start session: ") && unset.stdout.ends_with('\n'),
        "{:?}",
        unset.stdout
    );
    for e in [&bare, &version, &unknown, &invalid, &unset] {
        assert_eq!(e.stderr, "", "the plugin writes nothing to stderr");
    }
}

/// Start, port opened, connection accepted, four parallel echoes, SIGINT: stdout is
/// exactly the plugin's, stderr is empty at the default level, exit 0, and the session
/// is terminated at the service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_port_session_prints_exactly_what_the_plugin_prints() {
    let sim = sim().await;
    let echo = sim_util::echo_server().await;
    let request = port_request(echo);
    let (response, id) = start_session(sim.local_addr(), &request).await;
    let plugin = Running::spawn(&mut session_command(
        &response,
        "",
        &request,
        &sim.endpoint_url(),
    ));
    let port = plugin.port(&id).await;

    let mut tasks = Vec::new();
    for _ in 0..4 {
        tasks.push(tokio::spawn(echo_once(port)));
    }
    for t in tasks {
        t.await.unwrap();
    }
    plugin.wait_stdout("Connection accepted").await;
    plugin.signal(rustix::process::Signal::INT);
    let end = plugin.wait().await;
    assert_eq!(end.status.code(), Some(0), "{:?}", end.stderr);
    assert_eq!(
        end.stdout,
        format!(
            "\nStarting session with SessionId: {id}\n\
             Port {port} opened for sessionId {id}.\nWaiting for connections...\n\
             \nConnection accepted for session [{id}]\n\
             Terminate signal received, exiting.\n\
             \n\nExiting session with sessionId: {id}.\n\n"
        )
    );
    assert_eq!(end.stderr, "");
    assert!(
        sim.wait_terminated(&id, Duration::from_secs(10)).await,
        "session not terminated"
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());
}

/// SIGTERM is not one of the plugin's control signals: the process dies of it,
/// printing nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_kills_the_plugin_as_it_kills_aws_plugin() {
    let sim = sim().await;
    let request = port_request(sim_util::echo_server().await);
    let (response, id) = start_session(sim.local_addr(), &request).await;
    let plugin = Running::spawn(&mut session_command(
        &response,
        "",
        &request,
        &sim.endpoint_url(),
    ));
    plugin.port(&id).await;
    let before = plugin.stdout();
    plugin.signal(rustix::process::Signal::TERM);
    let end = plugin.wait().await;
    assert_eq!(
        end.status.signal(),
        Some(rustix::process::Signal::TERM.as_raw()),
        "{:?}",
        end.status
    );
    assert_eq!(end.stdout, before);
}

/// `channel_closed` with an Output: "SessionId: ID : OUTPUT", exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn channel_closed_prints_its_output_and_exits_0() {
    let sim = sim().await;
    let request = port_request(sim_util::echo_server().await);
    let (response, id) = start_session(sim.local_addr(), &request).await;
    let plugin = Running::spawn(&mut session_command(
        &response,
        "",
        &request,
        &sim.endpoint_url(),
    ));
    let port = plugin.port(&id).await;
    echo_once(port).await;
    assert!(sim.terminate_session(&id, Some("Session closed by an administrator".into())));
    let end = plugin.wait().await;
    assert_eq!(end.status.code(), Some(0), "{:?}", end.stderr);
    assert!(
        end.stdout.ends_with(&format!(
            "\nConnection accepted for session [{id}]\n\
             \n\nSessionId: {id} : Session closed by an administrator\n\n"
        )),
        "{:?}",
        end.stdout
    );
    assert_no_debug_lines(&end.stderr);
}

/// The agent cannot reach the remote port: one ConnectToPortError line per
/// connection, the session stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_remote_port_prints_connect_to_port_error() {
    let sim = sim().await;
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap().port()
    };
    let request = port_request(closed);
    let (response, id) = start_session(sim.local_addr(), &request).await;
    let plugin = Running::spawn(&mut session_command(
        &response,
        "",
        &request,
        &sim.endpoint_url(),
    ));
    let port = plugin.port(&id).await;
    let line = "\nConnection to destination port failed, check SSM Agent logs.\n";
    for n in 1..=2 {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut buf = [0u8; 16];
        // The agent closes the stream after the flag: the connection reads EOF.
        let read = tokio::time::timeout(Duration::from_secs(30), conn.read(&mut buf))
            .await
            .expect("the refused connection is closed within 30 s");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        let deadline = Instant::now() + Duration::from_secs(30);
        while plugin.stdout().matches(line).count() < n {
            assert!(Instant::now() < deadline, "{:?}", plugin.stdout());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    plugin.signal(rustix::process::Signal::INT);
    let end = plugin.wait().await;
    assert_eq!(end.status.code(), Some(0));
    assert_eq!(end.stdout.matches(line).count(), 2, "{:?}", end.stdout);
    assert!(
        end.stdout.ends_with(&format!(
            "{line}Terminate signal received, exiting.\n\n\nExiting session with sessionId: {id}.\n\n"
        )),
        "{:?}",
        end.stdout
    );
}

/// An SSM API stand-in in front of the simulator: it forwards every call except
/// ResumeSession, which it answers with no TokenValue (the service's "timed out"), and
/// records the access key id that signed each call.
struct TimedOutResume {
    addr: SocketAddr,
    calls: Arc<Mutex<Vec<(String, String)>>>,
}

impl TimedOutResume {
    async fn start(upstream: SocketAddr) -> TimedOutResume {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let seen = calls.clone();
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(serve(conn, upstream, seen.clone()));
            }
        });
        TimedOutResume { addr, calls }
    }

    fn endpoint_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self) -> Vec<(String, String)> {
        self.calls.lock().unwrap().clone()
    }
}

/// Serves HTTP/1.1 requests (keep-alive) on `conn`.
async fn serve(mut conn: TcpStream, upstream: SocketAddr, seen: Arc<Mutex<Vec<(String, String)>>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_owned();
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let len: usize = header("content-length").parse().unwrap_or(0);
        while buf.len() < head_end + 4 + len {
            let mut chunk = [0u8; 8192];
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = buf[head_end + 4..head_end + 4 + len].to_vec();
        buf.drain(..head_end + 4 + len);
        let op = header("x-amz-target");
        let akid = header("authorization")
            .split("Credential=")
            .nth(1)
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_owned();
        seen.lock().unwrap().push((op.clone(), akid));
        let (status, content_type, answer) = if op == "AmazonSSM.ResumeSession" {
            let id: Value = serde_json::from_slice(&body).unwrap_or_default();
            (
                200,
                "application/x-amz-json-1.1".to_owned(),
                json!({ "SessionId": id["SessionId"] })
                    .to_string()
                    .into_bytes(),
            )
        } else {
            let path = request_line.split(' ').nth(1).unwrap_or("/").to_owned();
            let forwarded: Vec<(&str, &str)> = headers
                .iter()
                .filter(|(k, _)| {
                    !["host", "content-length", "connection"]
                        .contains(&k.to_ascii_lowercase().as_str())
                })
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let r = sim_util::http(upstream, "POST", &path, &forwarded, &body).await;
            let ct = r
                .header("content-type")
                .unwrap_or("application/x-amz-json-1.1")
                .to_owned();
            (r.status, ct, r.body)
        };
        let reply = format!(
            "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        if conn.write_all(reply.as_bytes()).await.is_err() || conn.write_all(&answer).await.is_err()
        {
            return;
        }
    }
}

/// A profile whose credentials come from a `credential_process` that records the
/// environment it was started with.
struct ProcessProfile {
    dir: PathBuf,
}

impl ProcessProfile {
    const NAME: &str = "dropin";
    const AKID: &str = "AKIDPROFILEPROCESS";
    const SECRET: &str = "process-secret";

    fn create() -> ProcessProfile {
        let dir = std::env::temp_dir().join(format!("bastion-dropin-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("creds.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nenv > '{}'\necho '{{\"Version\": 1, \"AccessKeyId\": \"{}\", \"SecretAccessKey\": \"{}\"}}'\n",
                dir.join("env.txt").display(),
                Self::AKID,
                Self::SECRET
            ),
        )
        .unwrap();
        let mut perms = std::fs::metadata(&script).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&script, perms).unwrap();
        std::fs::write(
            dir.join("config"),
            format!(
                "[profile {}]\ncredential_process = {}\n",
                Self::NAME,
                script.display()
            ),
        )
        .unwrap();
        ProcessProfile { dir }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// The environment the credential process saw, once it ran.
    fn child_env(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("env.txt")).ok()
    }
}

impl Drop for ProcessProfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// ResumeSession without a token after a websocket cut: "Session: ID timed out.",
/// exit 0. The same run checks two things the plugin does before any of that: the
/// PROFILE argument's credentials sign the calls (not the environment's), and the
/// response variable is gone from the environment of a child (the profile's
/// `credential_process`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_empty_resume_token_times_out_with_the_profiles_credentials() {
    let sim = sim().await;
    sim.update_faults(|f| {
        f.cut_after_ms = Some(300);
        f.max_cuts = Some(1);
    })
    .unwrap();
    let api = TimedOutResume::start(sim.local_addr()).await;
    let profile = ProcessProfile::create();
    let request = port_request(sim_util::echo_server().await);
    let (response, id) = start_session(sim.local_addr(), &request).await;
    let mut cmd = session_command(
        &response,
        ProcessProfile::NAME,
        &request,
        &api.endpoint_url(),
    );
    cmd.env("AWS_CONFIG_FILE", profile.config());
    let end = Running::spawn(&mut cmd).wait().await;

    assert_eq!(end.status.code(), Some(0), "{:?}", end.stderr);
    assert!(
        end.stdout.ends_with(&format!("Session: {id} timed out.\n")),
        "{:?}",
        end.stdout
    );
    assert!(
        end.stdout
            .starts_with(&format!("\nStarting session with SessionId: {id}\n"))
    );
    let calls = api.calls();
    let resume: Vec<_> = calls
        .iter()
        .filter(|(op, _)| op == "AmazonSSM.ResumeSession")
        .collect();
    assert!(!resume.is_empty(), "no ResumeSession: {calls:?}");
    for (op, akid) in &calls {
        assert_eq!(
            akid,
            ProcessProfile::AKID,
            "{op} signed with the wrong credentials"
        );
    }
    let child_env = profile.child_env().expect("the credential process ran");
    assert!(
        child_env.contains("AWS_CONFIG_FILE="),
        "the dump is an environment"
    );
    assert!(
        !child_env.contains(ENV_NAME),
        "a child inherited {ENV_NAME}"
    );
    assert_no_debug_lines(&end.stderr);
}

#[tokio::test]
async fn a_shell_document_is_refused_on_stderr_with_exit_1() {
    let sim = sim().await;
    let request = json!({ "Target": TARGET });
    let (response, id) = start_session(sim.local_addr(), &request).await;
    let end = run_to_end(&mut session_command(
        &response,
        "",
        &request,
        &sim.endpoint_url(),
    ))
    .await;
    assert_eq!(end.status.code(), Some(1), "{:?}", end.stderr);
    assert_eq!(
        end.stdout,
        format!("\nStarting session with SessionId: {id}\n")
    );
    assert!(
        end.stderr.contains("not a port-forwarding document"),
        "{}",
        end.stderr
    );
    assert!(
        sim.wait_terminated(&id, Duration::from_secs(10)).await,
        "session not terminated"
    );
}

/// Runs the drop-in at `BASTION_LOG=level` through a session start, a websocket cut and
/// resume (ResumeSession through the endpoint argument), an echo and SIGINT, with the
/// simulator behind a relay that records every token it issues; no such token may
/// appear in the plugin's stdout or stderr.
async fn plugin_logs_no_token_at(level: &str) -> Ended {
    let sim = sim().await;
    let snoop = sim_util::TokenSnoop::start(sim.local_addr()).await;
    sim.update_faults(|f| {
        f.cut_after_bytes = Some(64 * 1024);
        f.max_cuts = Some(1);
    })
    .unwrap();
    let request = port_request(sim_util::echo_server().await);
    let (response, id) = start_session(snoop.addr, &request).await;
    let mut cmd = session_command(&response, "", &request, &snoop.endpoint_url());
    cmd.env("BASTION_LOG", level);
    let plugin = Running::spawn(&mut cmd);
    let port = plugin.port(&id).await;

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
    let counters = sim.session(&id).unwrap().counters;
    assert!(counters.connections >= 2, "no resume: {counters:?}");

    plugin.signal(rustix::process::Signal::INT);
    let end = plugin.wait().await;
    assert_eq!(end.status.code(), Some(0), "{:?}", end.status);
    assert!(
        sim.wait_terminated(&id, Duration::from_secs(10)).await,
        "session not terminated"
    );
    assert!(sim.violations().is_empty(), "{:?}", sim.violations());

    let tokens = snoop.tokens();
    assert!(
        tokens.len() >= 2,
        "the relay saw the StartSession and ResumeSession tokens: {}",
        tokens.len()
    );
    assert!(
        end.stdout
            .ends_with(&format!("\n\nExiting session with sessionId: {id}.\n\n")),
        "{:?}",
        end.stdout
    );
    let level_word = level.split(',').next().unwrap().to_uppercase();
    assert!(
        end.stderr.contains(&level_word),
        "no {level_word} line: the log was not captured at {level}"
    );
    sim_util::assert_no_token_in(&tokens, "plugin's stdout", &end.stdout);
    sim_util::assert_no_token_in(&tokens, "plugin's stderr", &end.stderr);
    end
}

/// At `info` (the daemon's default) no dependency is raised to DEBUG by a log cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_logs_no_token_at_info_level() {
    let end = plugin_logs_no_token_at("info").await;
    assert_no_debug_lines(&end.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_logs_no_token_at_debug_level() {
    plugin_logs_no_token_at("debug").await;
}

/// Plain `BASTION_LOG=trace`: tungstenite logs every frame (the OpenDataChannel one has
/// the token) and aws_smithy_runtime the ResumeSession body; `bastion::logging` caps both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugin_logs_no_token_at_trace_level() {
    let end = plugin_logs_no_token_at("trace").await;
    for line in end.stderr.lines() {
        let capped_to_info = line.contains(" tungstenite") || line.contains(" tokio_tungstenite");
        assert!(
            !(capped_to_info && (line.contains(" DEBUG ") || line.contains(" TRACE "))),
            "above tungstenite's cap: {line}"
        );
        assert!(
            !(line.contains(" aws_smithy_runtime") && line.contains(" TRACE ")),
            "above aws_smithy_runtime's cap: {line}"
        );
    }
}

/// An agent too old for smux (≤ 3.0.196.0): basic mode's lines, which differ from the
/// multiplexed ones (no "Waiting for connections...", another accepted line).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn basic_mode_prints_the_basic_lines() {
    let mut config =
        bastion_sim::SimConfig::default().with_credential("AKIDTEST", "dummy-secret", None);
    config.agent_version = "3.0.161.0".into();
    let sim = sim_util::start(config).await;
    let request = port_request(sim_util::echo_server().await);
    let (response, id) = start_session(sim.local_addr(), &request).await;
    let plugin = Running::spawn(&mut session_command(
        &response,
        "",
        &request,
        &sim.endpoint_url(),
    ));
    let port = plugin.port(&id).await;
    echo_once(port).await;
    plugin.wait_stdout("Connection accepted").await;
    plugin.signal(rustix::process::Signal::INT);
    let end = plugin.wait().await;
    assert_eq!(end.status.code(), Some(0), "{:?}", end.stderr);
    assert_eq!(
        end.stdout,
        format!(
            "\nStarting session with SessionId: {id}\n\
             Port {port} opened for sessionId {id}.\n\
             Connection accepted for session {id}.\n\
             Terminate signal received, exiting.\n\
             \n\nExiting session with sessionId: {id}.\n\n"
        )
    );
}
