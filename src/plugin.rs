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
//!   plugin recognises the name by its `AWS_SSM_START_SESSION_RESPONSE` prefix.
//! * `PROFILE` may be empty; `REQUEST` is the StartSession request JSON (`Target`,
//!   `DocumentName`, `Parameters`); `ENDPOINT` is the SSM endpoint URL the CLI used.
//!
//! Port sessions listen on `127.0.0.1:<localPortNumber>` (`0` or absent: ephemeral) and
//! carry every accepted connection over one [`Tunnel`]. SIGINT / SIGTERM send the
//! TerminateSession flag and call the TerminateSession API, then exit 0.

use std::collections::HashMap;
use std::io::Write as _;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;
use tokio::net::TcpListener;

use crate::aws::ssm::{AwsTarget, SsmApi, load_config_with_endpoint};
use crate::proto::session::DataMode;
use crate::transport::ssm::{
    ResumeError, Resumer, SessionTicket, Tunnel, TunnelConfig, TunnelError,
};

/// The plugin version `--version` reports. The AWS CLI reads it for two things only
/// (`awscli/customizations/sessionmanager.py`): above 1.2.497.0 it passes the
/// StartSession response through the `AWS_SSM_START_SESSION_RESPONSE` environment
/// variable, and below its `RECOMMENDED_MINIMUM_PLUGIN_VERSION` (1.2.764.0 in awscli
/// 1.46) it prints an "outdated SessionManagerPlugin" warning on every start. The argv
/// contract is the same for all versions since 1.2.497.0.
pub const PLUGIN_VERSION: &str = "1.2.764.0";

/// Prefix of the environment variable name that carries the StartSession response.
pub const RESPONSE_ENV_PREFIX: &str = "AWS_SSM_START_SESSION_RESPONSE";

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

/// Runs the plugin. `args[0]` is the program name (as in `argv`), followed by the
/// plugin's arguments.
pub fn main(args: Vec<String>) -> ExitCode {
    let mut out = std::io::stdout();
    match args.len() {
        0 | 1 => {
            let _ = write!(
                out,
                "\nThe Session Manager plugin was installed successfully. \
                 Use the AWS CLI to start a session.\n\n"
            );
            return ExitCode::SUCCESS;
        }
        2 if args[1] == "--version" => {
            let _ = writeln!(out, "{PLUGIN_VERSION}");
            return ExitCode::SUCCESS;
        }
        2 | 3 => {
            eprintln!(
                "\nUnknown operation {}. \nUse session-manager-plugin --version to check the version.\n",
                args[1]
            );
            return ExitCode::from(1);
        }
        _ => {}
    }
    let inv = match parse(&args) {
        Ok(inv) => inv,
        Err(e) => {
            eprintln!("Cannot perform start session: {e}");
            return ExitCode::from(1);
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(crate::logging::env_filter("BASTION_LOG", "warn"))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
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
    match runtime.block_on(run(inv)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Cannot perform start session: {e}");
            ExitCode::from(1)
        }
    }
}

fn parse(args: &[String]) -> Result<Invocation, String> {
    let response = if args[1].starts_with(RESPONSE_ENV_PREFIX) {
        // The plugin also unsets the variable; `remove_var` is unsafe in a
        // multi-threaded process and nothing here spawns children, so it stays.
        std::env::var(&args[1])
            .map_err(|_| format!("environment variable {} is not set", args[1]))?
    } else {
        args[1].clone()
    };
    let region = args[2].clone();
    if args[3] != "StartSession" {
        return Err(format!("Invalid Operation {}", args[3]));
    }
    let non_empty = |i: usize| args.get(i).filter(|s| !s.is_empty()).cloned();
    let profile = non_empty(4);
    let request = match args.get(5) {
        Some(s) if !s.is_empty() => serde_json::from_str(s)
            .map_err(|e| format!("the StartSession request argument is not valid JSON: {e}"))?,
        _ => StartRequestJson::default(),
    };
    let endpoint = non_empty(6);
    Ok(Invocation {
        response,
        region,
        profile,
        request,
        endpoint,
    })
}

fn ticket(inv: &Invocation) -> Result<SessionTicket, String> {
    let resp: StartResponseJson = serde_json::from_str(&inv.response)
        .map_err(|e| format!("the StartSession response is not valid JSON: {e}"))?;
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

fn flush_print(s: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(s.as_bytes());
    let _ = out.flush();
}

async fn run(inv: Invocation) -> Result<(), String> {
    let ticket = ticket(&inv)?;
    let session_id = ticket.session_id.clone();
    flush_print(&format!(
        "\nStarting session with SessionId: {session_id}\n"
    ));

    let target = AwsTarget {
        profile: inv.profile.clone(),
        region: Some(inv.region.clone()).filter(|r| !r.is_empty()),
        // The AWS CLI that spawned us uses the full default chain, IMDS included.
        imds: true,
    };
    let api = SsmApi::new(&load_config_with_endpoint(&target, inv.endpoint.as_deref()).await);

    let document = inv.request.document_name.clone().unwrap_or_default();
    let document_name = document.rsplit('/').next().unwrap_or_default();
    if document_name.is_empty() || NON_PORT_DOCUMENTS.contains(&document_name) {
        let _ = api.terminate_session(&session_id).await;
        return Err(format!(
            "document {:?} is not a port-forwarding document; this drop-in supports only \
             port sessions (AWS-StartPortForwardingSession, \
             AWS-StartPortForwardingSessionToRemoteHost); use AWS's session-manager-plugin \
             for shell sessions",
            if document.is_empty() {
                "SSM-SessionManagerRunShell"
            } else {
                document.as_str()
            }
        ));
    }
    let local_port = inv
        .request
        .parameters
        .get("localPortNumber")
        .and_then(|v| v.first())
        .map(String::as_str)
        .unwrap_or("0");
    let local_port: u16 = if local_port.is_empty() {
        0
    } else {
        match local_port.parse() {
            Ok(p) => p,
            Err(_) => {
                let _ = api.terminate_session(&session_id).await;
                return Err(format!("invalid localPortNumber {local_port:?}"));
            }
        }
    };

    let resume_api = api.clone();
    let resume_id = session_id.clone();
    let resumer: Resumer = Arc::new(move || {
        let api = resume_api.clone();
        let id = resume_id.clone();
        Box::pin(async move {
            api.resume_session(&id).await.map_err(|e| match e {
                e if e.is_retryable() => ResumeError::Retry(e.to_string()),
                e => ResumeError::Fatal(e.to_string()),
            })
        })
    });
    let tunnel = match Tunnel::connect(ticket, TunnelConfig::default(), Some(resumer)).await {
        Ok(t) => Arc::new(t),
        Err(e) => {
            let _ = api.terminate_session(&session_id).await;
            return Err(match e {
                TunnelError::NotPortForwarding(kind) => format!(
                    "the session is not port forwarding (type {kind}); this drop-in supports \
                     only port sessions"
                ),
                e => e.to_string(),
            });
        }
    };

    let listener = match TcpListener::bind(("127.0.0.1", local_port)).await {
        Ok(l) => l,
        Err(e) => {
            tunnel.terminate().await;
            let _ = api.terminate_session(&session_id).await;
            return Err(format!("cannot listen on 127.0.0.1:{local_port}: {e}"));
        }
    };
    let port = listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(local_port);
    flush_print(&format!(
        "Port {port} opened for sessionId {session_id}.\nWaiting for connections...\n"
    ));

    let mux = tunnel.info().mode == DataMode::Mux;
    let announced = Arc::new(AtomicBool::new(false));
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => {
                tunnel.terminate().await;
                if let Err(e) = api.terminate_session(&session_id).await {
                    eprintln!("TerminateSession failed: {e}");
                }
                flush_print(&format!("\n\nExiting session with sessionId: {session_id}.\n\n"));
                return Ok(());
            }
            why = tunnel.wait_ended() => {
                tracing::info!(reason = %why, "session ended");
                flush_print(&format!("\n\nExiting session with sessionId: {session_id}.\n\n"));
                return Ok(());
            }
            accepted = listener.accept() => {
                let (conn, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        continue;
                    }
                };
                tracing::info!(%peer, session_id = %session_id, "connection accepted");
                if mux {
                    if !announced.swap(true, Ordering::Relaxed) {
                        flush_print(&format!("\nConnection accepted for session [{session_id}]\n"));
                    }
                } else {
                    flush_print(&format!("Connection accepted for session {session_id}.\n"));
                }
                let tunnel = tunnel.clone();
                tokio::spawn(async move {
                    match tunnel.open_stream().await {
                        Ok(stream) => {
                            if let Err(e) = crate::transport::relay::relay(conn, stream).await {
                                tracing::debug!(error = %e, "connection ended with an error");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot open a stream"),
                    }
                });
            }
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
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
        let inv = parse(&args(&[
            "session-manager-plugin",
            r#"{"SessionId":"s","StreamUrl":"wss://x","TokenValue":"t"}"#,
            "eu-west-1",
            "StartSession",
            "",
            r#"{"Target":"i-1","DocumentName":"AWS-StartPortForwardingSession","Parameters":{"localPortNumber":["0"]}}"#,
            "https://ssm.eu-west-1.amazonaws.com",
        ]))
        .unwrap();
        assert_eq!(inv.profile, None);
        assert_eq!(inv.region, "eu-west-1");
        assert_eq!(inv.request.target, "i-1");
        assert_eq!(
            inv.endpoint.as_deref(),
            Some("https://ssm.eu-west-1.amazonaws.com")
        );
        assert_eq!(ticket(&inv).unwrap().session_id, "s");
        assert!(parse(&args(&["p", "{}", "r", "Other", ""])).is_err());
    }
}
