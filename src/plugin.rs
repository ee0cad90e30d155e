//! Drop-in for AWS's `session-manager-plugin`, for port-forwarding sessions.
//!
//! The AWS CLI (and every tool that copies it) calls StartSession itself and then runs
//! the plugin with ([C] `awscli/customizations/sessionmanager.py`
//! `StartSessionCaller.invoke`; [P] `session.go` fn `ValidateInputAndStartSession`):
//!
//! ```text
//! session-manager-plugin RESPONSE REGION StartSession PROFILE REQUEST [ENDPOINT]
//! ```
//!
//! * `RESPONSE`: the StartSession response JSON, or (plugin ≥ 1.2.497.0, which the CLI
//!   learns from `--version`) the name of an environment variable holding it; the
//!   plugin recognises the name by its `AWS_SSM_START_SESSION_RESPONSE` prefix, and
//!   unsets the variable before anything else so that no child process inherits the
//!   session token. The unsetting is the binary's job ([`response_variable`]): it must
//!   happen while the process has one thread.
//! * `PROFILE` may be empty; when set (the CLI passes it only for `--profile`, aws-cli
//!   PR #8705), its credentials sign every call, before any environment credentials,
//!   as the Go SDK does for an explicit `WithSharedConfigProfile` ([P] `sdkutil/
//!   awsconfig.go` fn `GetDefaultConfig`; aws-sdk-go issue #2727).
//! * `REQUEST` is the StartSession request JSON (`Target`, `DocumentName`,
//!   `Parameters`); `ENDPOINT` is the SSM endpoint URL the CLI used.
//!
//! What the user sees is the plugin's, byte for byte: see [`output`] for the strings
//! and `proto-docs/dropin.md` for the table of paths, streams and exit codes. The rule
//! for exit codes: every path the plugin has exits 0, as the plugin's do (its `main`
//! returns or calls `os.Exit(0)` on every path), even a failed start, which it reports
//! on stdout; where the plugin has no path (a shell document, which this drop-in does
//! not support) or would hang with a dead listener (the data channel cannot be opened
//! or resumed), the drop-in writes the reason to stderr and exits 1.

mod listen;
mod output;
mod signals;

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aws_config::SdkConfig;
use aws_config::profile::ProfileFileCredentialsProvider;
use aws_config::provider_config::ProviderConfig;
use aws_credential_types::provider::SharedCredentialsProvider;
use serde::Deserialize;
use thiserror::Error;

use crate::aws::ssm::{AwsTarget, SessionTicket, SsmApi, http_client, load_config_with_endpoint};
use crate::aws::upgrade_sign::UpgradeSigner;
use crate::proto::session::DataMode;
use crate::transport::relay::relay;
use crate::transport::ssm::{ResumeError, Resumer, Tunnel, TunnelConfig, TunnelEnd, TunnelError};
use listen::{Accepted, LocalEndpoint};

/// The plugin version `--version` reports. The AWS CLI reads it for two things only
/// (`awscli/customizations/sessionmanager.py`): above 1.2.497.0 it passes the
/// StartSession response through the `AWS_SSM_START_SESSION_RESPONSE` environment
/// variable, and below its `RECOMMENDED_MINIMUM_PLUGIN_VERSION` (1.2.764.0 in awscli
/// 1.46) it prints an "outdated SessionManagerPlugin" warning on every start. The argv
/// contract is the same for all versions since 1.2.497.0.
pub const PLUGIN_VERSION: &str = crate::proto::version::DEFAULT_CLIENT_VERSION;

/// Prefix of the environment variable name that carries the StartSession response.
pub const RESPONSE_ENV_PREFIX: &str = "AWS_SSM_START_SESSION_RESPONSE";

/// argv length (program name included) from which the arguments are a session's
/// ([P] `session.go` `LegacyArgumentLength`: RESPONSE REGION OPERATION, no profile).
const LEGACY_ARGUMENT_LENGTH: usize = 4;

/// With `SSM_PLUGIN_SKIP_CLIENT_CONFIGURE=true` the plugin looks up no credentials and
/// dials the websocket unsigned ([P] 1.2.804.0+, IDX `29db6846` `sessionhandler.go` fn
/// `OpenDataChannel`).
const SKIP_CLIENT_CONFIGURE: &str = "SSM_PLUGIN_SKIP_CLIENT_CONFIGURE";

/// How long the TerminateSession API call may delay the exit after a control signal
/// (the plugin exits at once; the call is our addition, see [`on_control_signal`]).
const TERMINATE_API_BOUND: Duration = Duration::from_secs(5);

/// How often the ConnectToPortError count is looked at.
const PORT_ERROR_POLL: Duration = Duration::from_millis(100);

/// Documents whose sessions are not port forwarding to a local listener.
const NON_PORT_DOCUMENTS: &[&str] = &[
    "SSM-SessionManagerRunShell",
    "AWS-StartInteractiveCommand",
    "AWS-StartNonInteractiveCommand",
    "AWS-StartSSHSession",
];

/// The parsed argv.
#[derive(Debug)]
struct Invocation {
    response: String,
    region: String,
    profile: Option<String>,
    request: StartRequestJson,
    endpoint: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct StartRequestJson {
    target: String,
    document_name: Option<String>,
    parameters: HashMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StartResponseJson {
    session_id: Option<String>,
    stream_url: Option<String>,
    token_value: Option<String>,
}

/// How a session run ended badly.
#[derive(Debug, Error)]
enum Failure {
    /// A failure on a path the plugin has: "Cannot perform start session: …" on
    /// stdout, exit 0.
    #[error("{0}")]
    Reported(String),
    /// A failure on a path the plugin does not have, or where it would hang: stderr,
    /// exit 1.
    #[error("{0}")]
    Drop(String),
}

/// The name of the environment variable that holds the StartSession response, when
/// `args` (`argv`, program name first) name one. The binary reads it and unsets it
/// before it starts any thread ([P] `session.go` fn `ValidateInputAndStartSession`:
/// `os.Getenv` then `os.Unsetenv`), then passes the value to [`main`].
pub fn response_variable(args: &[String]) -> Option<&str> {
    if args.len() < LEGACY_ARGUMENT_LENGTH {
        return None;
    }
    args.get(1)
        .map(String::as_str)
        .filter(|a| a.starts_with(RESPONSE_ENV_PREFIX))
}

/// Runs the plugin. `args[0]` is the program name (as in `argv`), followed by the
/// plugin's arguments; `env_response` is the value of the variable
/// [`response_variable`] named (empty when it was not set, as `os.Getenv` gives).
pub fn main(args: Vec<String>, env_response: Option<String>) -> ExitCode {
    match args.len() {
        0 | 1 => {
            output::print(output::installed());
            return ExitCode::SUCCESS;
        }
        2 if args[1] == "--version" => {
            output::print(&output::version(PLUGIN_VERSION));
            return ExitCode::SUCCESS;
        }
        2 | 3 => {
            output::print(&output::unknown_operation(&args[1]));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let Some(inv) = parse(&args, env_response) else {
        output::print(output::invalid_operation());
        return ExitCode::SUCCESS;
    };
    crate::logging::init_stderr("BASTION_LOG", "warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("Cannot perform start session: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(run(inv));
    // The plugin ends with `os.Exit`: nothing left running delays the exit.
    runtime.shutdown_background();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Reported(e)) => {
            output::print(&output::cannot_start(&e));
            ExitCode::SUCCESS
        }
        Err(Failure::Drop(e)) => {
            eprintln!("Cannot perform start session: {e}");
            ExitCode::from(1)
        }
    }
}

/// The argv of a session (at least [`LEGACY_ARGUMENT_LENGTH`] entries), or `None` when
/// the operation is not StartSession. The request JSON is read leniently, as the
/// plugin ignores its parse error.
fn parse(args: &[String], env_response: Option<String>) -> Option<Invocation> {
    let response = if response_variable(args).is_some() {
        env_response.unwrap_or_default()
    } else {
        args[1].clone()
    };
    if args[3] != "StartSession" {
        return None;
    }
    let non_empty = |i: usize| args.get(i).filter(|s| !s.is_empty()).cloned();
    Some(Invocation {
        response,
        region: args[2].clone(),
        profile: non_empty(4),
        request: args
            .get(5)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
        endpoint: non_empty(6),
    })
}

fn ticket(inv: &Invocation) -> Result<SessionTicket, String> {
    let resp: StartResponseJson = serde_json::from_str(&inv.response).map_err(|e| e.to_string())?;
    let field = |v: Option<String>, name: &str| {
        v.filter(|s| !s.is_empty())
            .ok_or_else(|| format!("the StartSession response has no {name}"))
    };
    Ok(SessionTicket {
        session_id: field(resp.session_id, "SessionId")?,
        stream_url: field(resp.stream_url, "StreamUrl")?,
        token_value: field(resp.token_value, "TokenValue")?,
        target: inv.request.target.clone(),
    })
}

/// The SDK configuration for the session's calls. With a PROFILE argument that
/// profile's credentials are used and nothing else (an explicit profile outranks
/// environment credentials in the Go SDK the plugin uses, and in the CLI that started
/// it); without one, the standard chain.
async fn sdk_config(inv: &Invocation) -> SdkConfig {
    let target = AwsTarget {
        profile: inv.profile.clone(),
        region: Some(inv.region.clone()).filter(|r| !r.is_empty()),
        // The AWS CLI that spawned us uses the full default chain, IMDS included.
        imds: true,
    };
    let config = load_config_with_endpoint(&target, inv.endpoint.as_deref()).await;
    let Some(profile) = &inv.profile else {
        return config;
    };
    let conf = ProviderConfig::default()
        .with_http_client(http_client())
        .with_region(config.region().cloned());
    let credentials = ProfileFileCredentialsProvider::builder()
        .configure(&conf)
        .profile_name(profile)
        .build();
    config
        .into_builder()
        .credentials_provider(SharedCredentialsProvider::new(credentials))
        .build()
}

/// Signs websocket upgrades with the session's credentials, unless the user opted out
/// ([`SKIP_CLIENT_CONFIGURE`]).
fn upgrade_signer(config: &SdkConfig, region: &str) -> Option<UpgradeSigner> {
    if std::env::var(SKIP_CLIENT_CONFIGURE).is_ok_and(|v| v == "true") {
        return None;
    }
    let region = config
        .region()
        .map(|r| r.to_string())
        .unwrap_or_else(|| region.to_owned());
    config
        .credentials_provider()
        .map(|p| UpgradeSigner::new(region, p))
}

fn resumer(api: &SsmApi, session_id: &str) -> Resumer {
    let api = api.clone();
    let id = session_id.to_owned();
    Arc::new(move || {
        let api = api.clone();
        let id = id.clone();
        Box::pin(async move {
            api.resume_session(&id).await.map_err(|e| match e {
                e if e.is_retryable() => ResumeError::Retry(e.to_string()),
                e => ResumeError::Fatal(e.to_string()),
            })
        })
    })
}

async fn run(inv: Invocation) -> Result<(), Failure> {
    let ticket = ticket(&inv).map_err(Failure::Reported)?;
    let session_id = ticket.session_id.clone();
    output::print(&output::starting(&session_id));

    let config = sdk_config(&inv).await;
    let api = SsmApi::new(&config);
    let document = inv.request.document_name.clone().unwrap_or_default();
    let document_name = document.rsplit('/').next().unwrap_or_default();
    if document_name.is_empty() || NON_PORT_DOCUMENTS.contains(&document_name) {
        let _ = api.terminate_session(&session_id).await;
        return Err(Failure::Drop(format!(
            "document {:?} is not a port-forwarding document; this drop-in supports only \
             port sessions (AWS-StartPortForwardingSession, \
             AWS-StartPortForwardingSessionToRemoteHost); use AWS's session-manager-plugin \
             for shell sessions",
            if document.is_empty() {
                "SSM-SessionManagerRunShell"
            } else {
                document.as_str()
            }
        )));
    }

    let tunnel_config = TunnelConfig {
        signer: upgrade_signer(&config, &inv.region),
        ..TunnelConfig::default()
    };
    let resume = resumer(&api, &session_id);
    let tunnel = match Tunnel::connect(ticket, tunnel_config, Some(resume)).await {
        Ok(t) => Arc::new(t),
        Err(e) => {
            let _ = api.terminate_session(&session_id).await;
            return Err(Failure::Drop(match e {
                TunnelError::NotPortForwarding(kind) => format!(
                    "the session is not port forwarding (type {kind}); this drop-in supports \
                     only port sessions"
                ),
                e => e.to_string(),
            }));
        }
    };
    if let Some(m) = output::customer_message(&tunnel.info().customer_message) {
        output::print(&m);
    }
    let endpoint = match (
        tunnel.info().mode,
        LocalEndpoint::from_properties(&tunnel.info().properties),
    ) {
        (DataMode::Mux | DataMode::Basic, Ok(e)) => e,
        (_, Err(e)) => return Err(end_early(&tunnel, &api, Failure::Drop(e.to_string())).await),
        (DataMode::StandardStream, Ok(_)) => {
            let why = "the agent forwards this session over stdin/stdout, which this drop-in \
                       does not support";
            return Err(end_early(&tunnel, &api, Failure::Drop(why.into())).await);
        }
    };
    // [P] fn `InitializeStreams`: the handlers are installed before the listener opens.
    let mut signals = signals::ControlSignals::install();
    let (listener, opened) = match endpoint.bind().await {
        Ok(l) => l,
        Err(e) => return Err(end_early(&tunnel, &api, Failure::Reported(e)).await),
    };
    let mux = tunnel.info().mode == DataMode::Mux;
    output::print(&if mux {
        output::listening_mux(&opened, &session_id)
    } else {
        output::listening_basic(&opened, &session_id)
    });

    let mut announced = false;
    let mut terminating = false;
    let mut port_errors = tunnel.stats().connect_to_port_errors;
    let mut poll = tokio::time::interval(PORT_ERROR_POLL);
    loop {
        tokio::select! {
            _ = signals.recv() => {
                if !terminating {
                    terminating = true;
                    if on_control_signal(&tunnel, &api, &session_id).await {
                        return Ok(());
                    }
                }
            }
            end = tunnel.wait_end() => return on_end(end, &api, &session_id).await,
            _ = poll.tick(), if mux => {
                let now = tunnel.stats().connect_to_port_errors;
                for _ in port_errors..now {
                    output::print(output::connect_to_port_error());
                }
                port_errors = now;
            }
            accepted = listener.accept() => {
                let conn = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                tracing::info!(session_id = %session_id, "connection accepted");
                if !announced {
                    announced = true;
                    output::print(&if mux {
                        output::accepted_mux(&session_id)
                    } else {
                        output::accepted_basic(&session_id)
                    });
                }
                tokio::spawn(forward(tunnel.clone(), conn));
            }
        }
    }
}

/// Carries one local connection over its own stream of the tunnel.
async fn forward(tunnel: Arc<Tunnel>, conn: Accepted) {
    let stream = match tunnel.open_stream().await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open a stream");
            return;
        }
    };
    let result = match conn {
        Accepted::Tcp(c) => relay(c, stream).await,
        Accepted::Unix(c) => relay(c, stream).await,
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
}

/// Ends a session that cannot go on before its listener is open, and returns `why`.
async fn end_early(tunnel: &Tunnel, api: &SsmApi, why: Failure) -> Failure {
    tunnel.terminate().await;
    let _ = api.terminate_session(tunnel.session_id()).await;
    why
}

/// A control signal: [P] fn `handleControlSignals`. When the agent handles the
/// TerminateSession flag (always in multiplexed mode; basic mode above agent
/// 2.3.722.0) the flag is sent, the exit line printed and the process ends (true).
/// Otherwise the plugin only calls the TerminateSession API and waits for the service
/// to close the channel (false). In the first case we also call the API, bounded by
/// [`TERMINATE_API_BOUND`], after the exit line: the plugin's flag is best effort, and
/// a lost flag would leave the session open until the idle timeout.
async fn on_control_signal(tunnel: &Tunnel, api: &SsmApi, session_id: &str) -> bool {
    output::print(output::terminate_signal());
    let flag = tunnel.info().mode == DataMode::Mux || tunnel.info().supports_terminate_flag;
    if flag {
        tunnel.terminate().await;
        output::print(&output::exiting(session_id));
    }
    match tokio::time::timeout(TERMINATE_API_BOUND, api.terminate_session(session_id)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "TerminateSession failed"),
        Err(_) => tracing::warn!("TerminateSession did not answer in time"),
    }
    flag
}

/// The session ended on its own.
async fn on_end(end: TunnelEnd, api: &SsmApi, session_id: &str) -> Result<(), Failure> {
    tracing::info!(reason = %end, "session ended");
    match end {
        TunnelEnd::ChannelClosed { output } => {
            output::print(&output::channel_closed(session_id, &output));
            Ok(())
        }
        TunnelEnd::ResumeTimedOut => {
            output::print(&output::timed_out(session_id));
            Ok(())
        }
        // [P] `session.go` fn `handleStreamMessageResendTimeout` calls the
        // TerminateSession API, after which the service closes the channel; our driver
        // has stopped, so the closing is not awaited and its empty-output line printed.
        TunnelEnd::ResendTimeout { .. } => {
            let _ = api.terminate_session(session_id).await;
            output::print(&output::exiting(session_id));
            Ok(())
        }
        TunnelEnd::Terminated | TunnelEnd::Dropped => {
            output::print(&output::exiting(session_id));
            Ok(())
        }
        // The plugin keeps its listener open on a dead session here.
        end @ (TunnelEnd::Smux(_) | TunnelEnd::ResumeRefused(_) | TunnelEnd::WebsocketLost(_)) => {
            let _ = api.terminate_session(session_id).await;
            Err(Failure::Drop(format!("session {session_id} ended: {end}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_the_cli_argv() {
        let inv = parse(
            &args(&[
                "session-manager-plugin",
                r#"{"SessionId":"s","StreamUrl":"wss://x","TokenValue":"t"}"#,
                "eu-west-1",
                "StartSession",
                "",
                r#"{"Target":"i-1","DocumentName":"AWS-StartPortForwardingSession","Parameters":{"localPortNumber":["0"]}}"#,
                "https://ssm.eu-west-1.amazonaws.com",
            ]),
            None,
        )
        .unwrap();
        assert_eq!(inv.profile, None);
        assert_eq!(inv.region, "eu-west-1");
        assert_eq!(inv.request.target, "i-1");
        assert_eq!(
            inv.endpoint.as_deref(),
            Some("https://ssm.eu-west-1.amazonaws.com")
        );
        assert_eq!(ticket(&inv).unwrap().session_id, "s");
        assert!(parse(&args(&["p", "{}", "r", "Other", ""]), None).is_none());
    }

    #[test]
    fn the_response_variable_is_named_only_in_a_session_argv() {
        let a = args(&["p", "AWS_SSM_START_SESSION_RESPONSE", "r", "StartSession"]);
        assert_eq!(
            response_variable(&a),
            Some("AWS_SSM_START_SESSION_RESPONSE")
        );
        let inv = parse(&a, Some(r#"{"SessionId":"e"}"#.into())).unwrap();
        assert_eq!(inv.response, r#"{"SessionId":"e"}"#);
        assert_eq!(
            response_variable(&args(&["p", "AWS_SSM_START_SESSION_RESPONSE"])),
            None
        );
        assert_eq!(
            response_variable(&args(&["p", "{}", "r", "StartSession"])),
            None
        );
        // An unset variable reads as empty, which is not JSON (the plugin's path too).
        let inv = parse(&a, None).unwrap();
        assert!(ticket(&inv).is_err());
    }
}
