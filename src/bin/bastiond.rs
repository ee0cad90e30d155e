//! `bastiond`: the bastion daemon.
//!
//! The daemon's listeners, session pool and control API are not built yet (see the
//! project issues). Today it reports its version and runs the SSM simulator
//! (`bastiond sim`).

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bastion::sim::{Faults, SimConfig, Simulator, TargetPolicy};
use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bastiond", version, about = "The bastion daemon")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the SSM simulator (service API, data channel and agent) until killed.
    ///
    /// Prints exactly one line, `listening http://127.0.0.1:PORT`, on stdout once ready;
    /// logs go to stderr (RUST_LOG, default info).
    Sim(SimArgs),
}

#[derive(Debug, Args)]
struct SimArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0", env = "BASTION_SIM_LISTEN")]
    listen: SocketAddr,
    /// Allow a --listen address that is not loopback (the simulator checks no
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
    /// Accept only these targets (comma-separated); default: any i-/mi- id or ecs: target.
    #[arg(long, value_delimiter = ',')]
    targets: Vec<String>,
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
}

fn nonzero_secs(s: u64) -> Option<Duration> {
    (s > 0).then(|| Duration::from_secs(s))
}

impl SimArgs {
    fn config(&self) -> Result<SimConfig, String> {
        if !self.listen.ip().is_loopback() && !self.allow_non_loopback {
            return Err(format!(
                "refusing to listen on non-loopback address {} (the simulator checks no \
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
            targets: if self.targets.is_empty() {
                TargetPolicy::AnyValid
            } else {
                TargetPolicy::Only(self.targets.clone())
            },
            idle_timeout: nonzero_secs(self.idle_timeout_secs),
            max_session_duration: nonzero_secs(self.max_session_secs),
            ws_recycle: match self.ws_recycle_ms {
                Some(0) => None,
                Some(ms) => Some(Duration::from_millis(ms)),
                None => nonzero_secs(self.ws_recycle_secs),
            },
            token_ttl: Duration::from_secs(self.token_ttl_secs.max(1)),
            faults,
            ..SimConfig::default()
        })
    }
}

/// Log targets capped at INFO whatever RUST_LOG says: at TRACE/DEBUG tungstenite logs
/// whole websocket messages, and the OpenDataChannel message carries the session token.
const SECRET_BEARING_TARGETS: &[&str] = &["tungstenite", "tokio_tungstenite"];

fn init_logging() {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    for target in SECRET_BEARING_TARGETS {
        if let Ok(d) = format!("{target}=info").parse() {
            filter = filter.add_directive(d);
        }
    }
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Sim(args)) => run_sim(args),
        None => {
            eprintln!(
                "bastiond {}: the daemon is not implemented yet; use --version or `bastiond sim`",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
