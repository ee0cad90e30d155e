//! `bastiond`: the bastion daemon.
//!
//! * `bastiond run`: the daemon (profiles, listeners, sessions, control socket).
//! * `bastiond --check-config`: validate the configuration and exit.
//! * `bastiond demo`: the daemon against the embedded simulator, with a demo service.
//! * `bastiond sim`: the SSM simulator alone.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bastion::config::Config;
use bastion::daemon::Daemon;
use bastion::daemon::control::{self, SocketAccess};
use bastion::sim::{Credential, Ec2Targets, Faults, SimConfig, Simulator, TargetPolicy};
use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Parser)]
#[command(name = "bastiond", version, about = "The bastion daemon")]
struct Cli {
    /// Validate the configuration (every error with file:line:column) and exit.
    #[arg(long)]
    check_config: bool,
    /// Configuration file (default: $XDG_CONFIG_HOME/bastion/config.toml).
    #[arg(long, global = true, env = "BASTION_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon until SIGTERM/SIGINT; SIGHUP reloads the configuration.
    Run(RunArgs),
    /// Run the daemon against the embedded SSM simulator, with a demo service behind a
    /// demo profile, and print commands to try.
    Demo,
    /// Run the SSM simulator (service API, data channel and agent) until killed.
    ///
    /// Prints exactly one line, `listening http://127.0.0.1:PORT`, on stdout once ready;
    /// logs go to stderr (RUST_LOG, default info).
    Sim(Box<SimArgs>),
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Control socket (default: $XDG_RUNTIME_DIR/bastion/control.sock, or
    /// $RUNTIME_DIRECTORY/control.sock under systemd).
    #[arg(long, env = "BASTION_SOCKET")]
    socket: Option<PathBuf>,
    /// Seconds open connections may take to finish on SIGTERM.
    #[arg(long, default_value_t = 10)]
    grace_secs: u64,
    /// State directory: the daemon's id and the local bastion registry (default:
    /// $STATE_DIRECTORY under systemd, else $XDG_STATE_HOME/bastion, else
    /// ~/.local/state/bastion).
    #[arg(long, env = "BASTION_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct SimArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0", env = "BASTION_SIM_LISTEN")]
    listen: SocketAddr,
    /// Allow a --listen address that is not loopback (the simulator's API checks no
    /// credentials).
    #[arg(long)]
    allow_non_loopback: bool,
    /// AgentVersion the simulated agent reports (mux when > 3.0.196.0).
    #[arg(long, default_value = bastion::sim::DEFAULT_AGENT_VERSION)]
    agent_version: String,
    /// Agent pause after each message it sends, in ms (0 turns pacing off).
    #[arg(long, default_value_t = 1)]
    agent_pacing_ms: u64,
    /// Agent delay before its HandshakeRequest, in ms.
    #[arg(long, default_value_t = 0)]
    handshake_delay_ms: u64,
    /// Agent delay before it acknowledges each client message, in ms (0: at once).
    #[arg(long, default_value_t = 0)]
    agent_ack_delay_ms: u64,
    /// Accept only these targets (comma-separated); default: any i-/mi- id or ecs: target.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
    /// Consult this EC2 Query endpoint (e.g. moto_server, `http://127.0.0.1:5000`): an
    /// `i-` target is Online only while running there and past --boot-delay-secs.
    #[arg(long)]
    ec2_endpoint: Option<String>,
    /// With --ec2-endpoint: seconds after an instance's launchTime before its agent is
    /// Online.
    #[arg(long, default_value_t = 0, requires = "ec2_endpoint")]
    boot_delay_secs: u64,
    /// Idle timeout in seconds (0: none).
    #[arg(long, default_value_t = 20 * 60)]
    idle_timeout_secs: u64,
    /// Maximum session duration in seconds (0: none).
    #[arg(long, default_value_t = 0)]
    max_session_secs: u64,
    /// Close every websocket with code 1000 after this many seconds (0: never).
    #[arg(long, default_value_t = 60 * 60)]
    ws_recycle_secs: u64,
    /// Like --ws-recycle-secs, in milliseconds (overrides it).
    #[arg(long)]
    ws_recycle_ms: Option<u64>,
    /// Lifetime of a StartSession/ResumeSession token in seconds.
    #[arg(long, default_value_t = 60)]
    token_ttl_secs: u64,
    /// Initial fault knobs as JSON (the body of POST /sim/faults).
    #[arg(long)]
    faults: Option<String>,
    /// A credential the data plane accepts upgrade signatures from:
    /// `AKID:SECRET` or `AKID:SECRET:SESSION_TOKEN` (repeatable).
    #[arg(long = "credential", value_name = "AKID:SECRET[:TOKEN]")]
    credentials: Vec<String>,
    /// The region upgrade signatures must be scoped to.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Accept unsigned websocket upgrades (clients before plugin 1.2.764.0).
    #[arg(long)]
    allow_unsigned_upgrades: bool,
    /// Hand out presigned StreamUrls (query-string SigV4 made by the simulator).
    #[arg(long)]
    presigned_stream_urls: bool,
    /// Accept an upgrade that uses a cell-number superseded by ResumeSession (plugins
    /// 1.2.764.0-1.2.814.0 re-dial the original StreamUrl).
    #[arg(long)]
    allow_superseded_cells: bool,
    /// Lowest ClientVersion that is not a violation (`none`: no floor).
    #[arg(long, default_value = bastion::sim::DEFAULT_MIN_CLIENT_VERSION)]
    min_client_version: String,
}

/// `AKID:SECRET[:TOKEN]` (a secret may not contain `:`; AWS secrets never do).
fn parse_credential(s: &str) -> Result<(String, Credential), String> {
    let mut parts = s.splitn(3, ':');
    let akid = parts.next().unwrap_or_default();
    let secret = parts.next().unwrap_or_default();
    if akid.is_empty() || secret.is_empty() {
        return Err(format!(
            "--credential {akid:?}...: expected AKID:SECRET[:TOKEN]"
        ));
    }
    let credential = Credential {
        secret_access_key: secret.to_owned(),
        session_token: parts.next().filter(|t| !t.is_empty()).map(str::to_owned),
    };
    Ok((akid.to_owned(), credential))
}

fn nonzero_secs(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

impl SimArgs {
    fn config(&self) -> Result<SimConfig, String> {
        if !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            return Err(format!(
                "refusing to listen on non-loopback address {} (the simulator's API checks no \
                 credentials); pass --allow-non-loopback to override",
                self.listen
            ));
        }
        let faults: Faults = match &self.faults {
            Some(json) => serde_json::from_str(json).map_err(|e| format!("--faults: {e}"))?,
            None => Faults::default(),
        };
        faults.validate().map_err(|e| format!("--faults: {e}"))?;
        Ok(SimConfig {
            listen: self.listen,
            agent_version: self.agent_version.clone(),
            agent_pacing: Duration::from_millis(self.agent_pacing_ms),
            agent_handshake_delay: Duration::from_millis(self.handshake_delay_ms),
            agent_ack_delay: Duration::from_millis(self.agent_ack_delay_ms),
            targets: if self.targets.is_empty() {
                TargetPolicy::AnyValid
            } else {
                TargetPolicy::Only(self.targets.clone())
            },
            ec2: self.ec2_endpoint.as_ref().map(|e| Ec2Targets {
                endpoint: e.trim_end_matches('/').to_owned(),
                boot_delay: Duration::from_secs(self.boot_delay_secs),
            }),
            idle_timeout: nonzero_secs(self.idle_timeout_secs),
            max_session_duration: nonzero_secs(self.max_session_secs),
            ws_recycle: match self.ws_recycle_ms {
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
                None => nonzero_secs(self.ws_recycle_secs),
            },
            token_ttl: Duration::from_secs(self.token_ttl_secs.max(1)),
            faults,
            region: self.region.clone(),
            credentials: self
                .credentials
                .iter()
                .map(|c| parse_credential(c))
                .collect::<Result<_, _>>()?,
            require_signed_upgrades: !self.allow_unsigned_upgrades,
            presigned_stream_urls: self.presigned_stream_urls,
            expire_superseded_cells: !self.allow_superseded_cells,
            min_client_version: (!self.min_client_version.eq_ignore_ascii_case("none"))
                .then(|| self.min_client_version.clone()),
            ..SimConfig::default()
        })
    }
}

fn init_logging() {
    bastion::logging::init_stderr("RUST_LOG", "info");
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn run_sim(args: SimArgs) -> ExitCode {
    init_logging();
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bastiond sim: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bastiond sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let sim = match Simulator::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bastiond sim: cannot listen: {e}");
                return ExitCode::FAILURE;
            }
        };
        let addr = sim.local_addr();
        let handle = sim.spawn();
        let mut out = std::io::stdout().lock();
        if writeln!(out, "listening http://{addr}")
            .and_then(|()| out.flush())
            .is_err()
        {
            handle.shutdown().await;
            return ExitCode::FAILURE;
        }
        drop(out);
        shutdown_signal().await;
        tracing::info!("shutting down");
        handle.shutdown().await;
        ExitCode::SUCCESS
    })
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("bastiond: cannot start the runtime: {e}");
            None
        }
    }
}

fn config_path(explicit: Option<PathBuf>) -> Result<PathBuf, String> {
    explicit
        .or_else(bastion::config::default_path)
        .ok_or_else(|| {
            "no configuration path: set --config, BASTION_CONFIG, XDG_CONFIG_HOME or HOME"
                .to_owned()
        })
}

fn load_config(path: &Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|errors| {
        eprintln!("{errors}");
        ExitCode::from(2)
    })
}

fn check_config(path: Option<PathBuf>) -> ExitCode {
    let path = match config_path(path) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bastiond: {e}");
            return ExitCode::from(2);
        }
    };
    match load_config(&path) {
        Ok(c) => {
            println!("{}: ok ({} profiles)", path.display(), c.profiles.len());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn socket_path(explicit: Option<PathBuf>) -> PathBuf {
    explicit
        .or_else(|| {
            std::env::var_os("RUNTIME_DIRECTORY")
                .map(|d| PathBuf::from(d).join(control::SOCKET_FILE_NAME))
        })
        .unwrap_or_else(control::default_socket_path)
}

/// Resolves on SIGTERM or SIGINT; calls `on_hup` on every SIGHUP.
async fn serve_signals(daemon: Arc<Daemon>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        let _ = tokio::signal::ctrl_c().await;
        return;
    };
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hup.recv() => {
                match daemon.reload().await {
                    Ok(r) => tracing::info!(?r, "reloaded on SIGHUP"),
                    Err(e) => tracing::error!(error = %e.message, "reload on SIGHUP failed"),
                }
            }
        }
    }
}

fn run_daemon(config: Option<PathBuf>, args: RunArgs) -> ExitCode {
    init_logging();
    let path = match config_path(config) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("bastiond: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match load_config(&path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    let socket = socket_path(args.socket);
    rt.block_on(async move {
        let on_demand = config.profiles.values().any(|p| p.bastion.is_some());
        let host = match args.state_dir.or_else(bastion::ondemand::default_state_dir) {
            Some(dir) => match bastion::ondemand::Host::open(&dir) {
                Ok(h) => Some(Arc::new(h)),
                Err(e) if on_demand => {
                    eprintln!("bastiond: state directory {}: {e}", dir.display());
                    return ExitCode::FAILURE;
                }
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "no state directory; on-demand bastions unavailable");
                    None
                }
            },
            None if on_demand => {
                eprintln!("bastiond: on-demand bastions need a state directory: pass --state-dir or set HOME");
                return ExitCode::FAILURE;
            }
            None => None,
        };
        let daemon = Daemon::new(&path, config, host);
        let listener = match control::bind(&socket, SocketAccess::default()).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("bastiond: control socket {}: {e}", socket.display());
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(socket = %socket.display(), config = %path.display(), "bastiond ready");
        daemon.end_leftover_sessions().await;
        daemon.autostart().await;
        daemon.start_bastions();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(control::serve_listener(
            daemon.clone(),
            listener,
            async move {
                let _ = stop_rx.await;
            },
        ));
        serve_signals(daemon.clone()).await;
        tracing::info!("shutting down");
        daemon.shutdown(Duration::from_secs(args.grace_secs)).await;
        let _ = stop_tx.send(());
        let _ = server.await;
        ExitCode::SUCCESS
    })
}

/// A tiny HTTP service the demo profile tunnels to.
async fn demo_service() -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let body = "Hello from the far side of Session Manager: this reply crossed the \
                            bastion daemon, a websocket data channel and the agent.\n";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(port)
}

fn free_local_port(preferred: u16) -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(preferred)
}

/// The demo daemon's credentials, registered with the demo's simulator so that its
/// signed upgrades verify.
const DEMO_ACCESS_KEY_ID: &str = "AKIDDEMO";
const DEMO_SECRET: &str = "demo-secret";

fn run_demo() -> ExitCode {
    init_logging();
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let config = SimConfig::default().with_credential(DEMO_ACCESS_KEY_ID, DEMO_SECRET, None);
        let sim = match Simulator::bind(config).await {
            Ok(s) => s.spawn(),
            Err(e) => {
                eprintln!("bastiond demo: cannot start the simulator: {e}");
                return ExitCode::FAILURE;
            }
        };
        let service_port = match demo_service().await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("bastiond demo: cannot start the demo service: {e}");
                return ExitCode::FAILURE;
            }
        };
        let dir = std::env::temp_dir().join(format!("bastion-demo-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("bastiond demo: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        let local_port = free_local_port(18080);
        let config = format!(
            "# bastion demo: the simulator plays AWS; 127.0.0.1:{service_port} plays the database.\n\
             [profiles.demo]\n\
             target = \"i-0123456789abcdef0\"\n\
             remote_host = \"127.0.0.1\"\n\
             remote_port = {service_port}\n\
             local_port = {local_port}\n\
             bind = [\"127.0.0.1\"]\n\
             autostart = true\n"
        );
        let config_file = dir.join("config.toml");
        let socket = dir.join("control.sock");
        if let Err(e) = std::fs::write(&config_file, config) {
            eprintln!("bastiond demo: {}: {e}", config_file.display());
            return ExitCode::FAILURE;
        }
        let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("bastiond"));
        // The daemon reaches the simulator exactly as it reaches AWS: through the
        // standard endpoint setting, with (dummy) credentials from the environment.
        let mut child = match tokio::process::Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&config_file)
            .arg("--socket")
            .arg(&socket)
            .env("AWS_ENDPOINT_URL_SSM", sim.endpoint_url())
            .env("AWS_ACCESS_KEY_ID", DEMO_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", DEMO_SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bastiond demo: cannot start {}: {e}", exe.display());
                return ExitCode::FAILURE;
            }
        };
        // Wait for the daemon's listener, then send one request through the tunnel.
        let mut reply = String::new();
        for _ in 0..200 {
            if let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", local_port)).await {
                let _ = conn.write_all(b"GET / HTTP/1.1\r\nhost: demo\r\n\r\n").await;
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut reply)).await;
                if !reply.is_empty() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first_body_line = reply.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
        let ctl = exe.with_file_name("bastionctl");
        println!();
        if first_body_line.is_empty() {
            println!("The demo tunnel did not answer; see the log above.");
        } else {
            println!("Tunnel works. The demo service answered through Session Manager:");
            println!("  {first_body_line}");
        }
        println!();
        println!("Try it yourself (Ctrl-C here stops the demo):");
        println!("  curl http://127.0.0.1:{local_port}/");
        println!("  {} --socket {} status", ctl.display(), socket.display());
        println!("  {} --socket {} close demo", ctl.display(), socket.display());
        println!("  {} --socket {} open demo --warm", ctl.display(), socket.display());
        println!("  curl -s {}/sim/sessions   # what the simulated AWS side saw", sim.endpoint_url());
        println!();
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = child.wait() => {
                eprintln!("bastiond demo: the daemon exited");
            }
        }
        if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        if first_body_line.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check_config {
        return check_config(cli.config);
    }
    match cli.command {
        Some(Command::Run(args)) => run_daemon(cli.config, args),
        Some(Command::Demo) => run_demo(),
        Some(Command::Sim(args)) => run_sim(*args),
        None => {
            eprintln!(
                "bastiond {}: choose a command: run, demo, sim (or --check-config); see --help",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
