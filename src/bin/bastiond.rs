//! `bastiond`: the bastion daemon.
//!
//! * `bastiond run`: the daemon (profiles, listeners, sessions, control socket).
//! * `bastiond --check-config`: validate the configuration and exit.
//!
//! The simulator and the demo are not part of this binary: they are `bastion-sim` and
//! `bastion-demo` (crate `bastion-sim`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use bastion::config::Config;
use bastion::daemon::Daemon;
use bastion::daemon::control::{self, SocketAccess};
use clap::{Args, Parser, Subcommand};

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

fn init_logging() {
    bastion::logging::init_stderr("RUST_LOG", "info");
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
                .map(|d| PathBuf::from(d).join(bastion::api::SOCKET_FILE_NAME))
        })
        .unwrap_or_else(bastion::api::default_socket_path)
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
                    Err(e) => tracing::error!(error = %e, "reload on SIGHUP failed"),
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.check_config {
        return check_config(cli.config);
    }
    match cli.command {
        Some(Command::Run(args)) => run_daemon(cli.config, args),
        None => {
            eprintln!(
                "bastiond {}: choose a command: run (or --check-config); see --help",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
