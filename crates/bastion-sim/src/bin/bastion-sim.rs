//! `bastion-sim`: the Session Manager simulator (service API, data channel and agent)
//! alone, for tests, benches, interop checks with other clients, and demos.
//!
//! Prints exactly one line, `listening http://127.0.0.1:PORT`, on stdout once ready;
//! logs go to stderr (`RUST_LOG`, default info). Runs until SIGTERM or SIGINT.
//! `proto-docs/simulator.md` lists every flag and knob.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use bastion_sim::process::{init_logging, shutdown_signal};
use bastion_sim::{Credential, Ec2Targets, Faults, SimConfig, Simulator, TargetPolicy};
use clap::Parser;

/// The simulator's command line.
#[derive(Debug, Parser)]
#[command(
    name = "bastion-sim",
    version,
    about = "The Session Manager simulator: service API, data channel and agent on loopback"
)]
struct SimArgs {
    /// Address to listen on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0", env = "BASTION_SIM_LISTEN")]
    listen: SocketAddr,
    /// Allow a --listen address that is not loopback (the simulator's API checks no
    /// credentials).
    #[arg(long)]
    allow_non_loopback: bool,
    /// AgentVersion the simulated agent reports (mux when > 3.0.196.0).
    #[arg(long, default_value = bastion_sim::DEFAULT_AGENT_VERSION)]
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
    #[arg(long, default_value = bastion_sim::DEFAULT_MIN_CLIENT_VERSION)]
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

fn run_sim(args: SimArgs) -> ExitCode {
    init_logging();
    let config = match args.config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bastion-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bastion-sim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let sim = match Simulator::bind(config).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("bastion-sim: cannot listen: {e}");
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
    run_sim(SimArgs::parse())
}
