//! `bastionctl`: the bastion control client. Talks to `bastiond` over its control
//! socket (`proto-docs/control-api.md`).
//!
//! Exit codes: 0 success, 1 the daemon answered with an error (or could not be
//! reached for another reason), 2 usage, 3 the daemon is not running.

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use bastion::api::{OpenEvent, ProfileState, ProfileStatus, Progress, ReloadResult};
use bastion::ctl::{Client, CtlError, profile_route};
use clap::{Parser, Subcommand};
use hyper::Method;

/// The name AWS tools spawn; see `bastion::plugin`.
const PLUGIN_NAME: &str = "session-manager-plugin";

#[derive(Debug, Parser)]
#[command(
    name = "bastionctl",
    version,
    about = "Control bastiond: open, close and inspect tunnels"
)]
struct Cli {
    /// The daemon's control socket [default: $XDG_RUNTIME_DIR/bastion/control.sock, or
    /// /run/bastion/control.sock for the system service].
    #[arg(long, global = true, env = "BASTION_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Machine output: the API's JSON (NDJSON progress events for `open --warm`).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Open a profile's listeners (the session starts on the first connection).
    Open {
        /// Profile name.
        name: String,
        /// Start the session now and report progress until it is ready.
        #[arg(long)]
        warm: bool,
    },
    /// Close a profile: stop listening and end its session.
    Close {
        /// Profile name.
        name: String,
    },
    /// List the configured profiles.
    List,
    /// Show the status of every profile, or the details of one.
    Status {
        /// Profile name.
        name: Option<String>,
    },
    /// Re-read the configuration (unchanged profiles keep their sessions).
    Reload,
    /// Follow an on-demand bastion's lifecycle (launch, boot progress, idle, lifetime
    /// warning, termination) until interrupted.
    Events {
        /// Profile name.
        name: String,
    },
}

/// Runs the drop-in with `args` (its own argv, program name first). The StartSession
/// response's environment variable is read and unset first, while this process has a
/// single thread, so that no child (a `credential_process`, say) inherits the session
/// token ([P] `session.go` fn `ValidateInputAndStartSession`: `os.Unsetenv`).
fn run_plugin(args: Vec<String>) -> ExitCode {
    let env_response = bastion::plugin::response_variable(&args).map(|name| {
        let value = std::env::var(name).unwrap_or_default();
        // SAFETY: nothing has started a thread yet (this runs first in `main`, before
        // any runtime), so no other thread can read or write the environment meanwhile.
        unsafe { std::env::remove_var(name) };
        value
    });
    bastion::plugin::main(args, env_response)
}

fn main() -> ExitCode {
    // Drop-in for AWS's session-manager-plugin: run as `session-manager-plugin ARGS...`
    // (argv[0], e.g. through a symlink) or `bastionctl session-manager-plugin ARGS...`.
    let args: Vec<String> = std::env::args().collect();
    let invoked_as_plugin = args.first().is_some_and(|a0| {
        std::path::Path::new(a0)
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.strip_suffix(".exe").unwrap_or(n) == PLUGIN_NAME)
    });
    if invoked_as_plugin {
        return run_plugin(args);
    }
    if args.get(1).is_some_and(|a| a == PLUGIN_NAME) {
        return run_plugin(args[1..].to_vec());
    }
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(bastion::ctl::default_socket_path);
    let client = Client::new(socket);
    let result = if cli.json {
        runtime.block_on(run_json(&cli, &client))
    } else {
        runtime.block_on(run(&cli, &client)).map_err(Failed::from)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed {
            error: e @ CtlError::NotRunning { .. },
            ..
        }) => {
            eprintln!("{e}");
            ExitCode::from(3)
        }
        Err(Failed {
            error,
            json_printed,
        }) => {
            if cli.json
                && !json_printed
                && let CtlError::Api { error, .. } = &error
            {
                println!("{}", serde_json::json!({ "error": error }));
            }
            eprintln!("error: {}", one_line(&error.to_string()));
            ExitCode::from(1)
        }
    }
}

/// A failed command; with `--json`, whether the error JSON already reached stdout.
struct Failed {
    error: CtlError,
    json_printed: bool,
}

impl From<CtlError> for Failed {
    fn from(error: CtlError) -> Self {
        Failed {
            error,
            json_printed: false,
        }
    }
}

fn api_failure(error: bastion::api::ApiError) -> CtlError {
    CtlError::Api {
        status: error.code.http_status(),
        error,
    }
}

async fn run(cli: &Cli, client: &Client) -> Result<(), CtlError> {
    match &cli.command {
        Command::List => {
            let profiles = client.list().await?;
            print!("{}", list_table(&profiles));
        }
        Command::Status { name: Some(name) } => {
            print!("{}", detail_table(&client.status(name).await?))
        }
        Command::Status { name: None } => print!("{}", status_table(&client.list().await?)),
        Command::Open { name, warm: false } => {
            let status = client.open(name).await?;
            println!("{name}: listening; the session starts on the first connection");
            print!("{}", detail_table(&status));
        }
        Command::Open { name, warm: true } => {
            let status = open_warm_live(client, name).await?;
            println!("{name}: ready");
            print!("{}", detail_table(&status));
        }
        Command::Close { name } => {
            let status = client.close(name).await?;
            println!("{name}: closed");
            print!("{}", detail_table(&status));
        }
        Command::Reload => print!("{}", reload_table(&client.reload().await?)),
        Command::Events { name } => {
            let mut stream = client.events(name).await?;
            while let Some(line) = stream.next_line().await? {
                if let OpenEvent::Progress(p) = line.event {
                    println!("{}", progress_text(&p, 0.0));
                }
            }
        }
    }
    Ok(())
}

async fn run_json(cli: &Cli, client: &Client) -> Result<(), Failed> {
    let none = None::<&()>;
    let value = match &cli.command {
        Command::List | Command::Status { name: None } => {
            client.call_raw(Method::GET, "/v1/profiles", none).await?
        }
        Command::Status { name: Some(name) } => {
            client
                .call_raw(Method::GET, &profile_route(name, None), none)
                .await?
        }
        Command::Open { name, warm: false } => {
            client
                .call_raw(
                    Method::POST,
                    &profile_route(name, Some("open")),
                    Some(&serde_json::json!({ "warm": false })),
                )
                .await?
        }
        Command::Open { name, warm: true } => {
            let mut stream = client.open_warm(name).await?;
            let mut stdout = std::io::stdout().lock();
            while let Some(line) = stream.next_line().await? {
                let _ = writeln!(stdout, "{}", line.raw);
                let _ = stdout.flush();
                if let OpenEvent::Error { error } = line.event {
                    return Err(Failed {
                        error: api_failure(error),
                        json_printed: true,
                    });
                }
            }
            return Ok(());
        }
        Command::Close { name } => {
            client
                .call_raw(Method::POST, &profile_route(name, Some("close")), none)
                .await?
        }
        Command::Reload => client.call_raw(Method::POST, "/v1/reload", none).await?,
        Command::Events { name } => {
            let mut stream = client.events(name).await?;
            let mut stdout = std::io::stdout().lock();
            while let Some(line) = stream.next_line().await? {
                let _ = writeln!(stdout, "{}", line.raw);
                let _ = stdout.flush();
            }
            return Ok(());
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(value.trim_ascii_end());
    let _ = stdout.write_all(b"\n");
    Ok(())
}

/// `open --warm` with a live progress line on a terminal, plain lines otherwise.
async fn open_warm_live(client: &Client, name: &str) -> Result<ProfileStatus, CtlError> {
    let mut stream = client.open_warm(name).await?;
    let tty = std::io::stderr().is_terminal();
    let mut current: Option<(Progress, Instant)> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let clear = |tty: bool| {
        if tty {
            eprint!("\r\x1b[2K");
        }
    };
    loop {
        tokio::select! {
            line = stream.next_line() => {
                let line = match line {
                    Ok(Some(l)) => l,
                    Ok(None) => {
                        clear(tty);
                        return Err(CtlError::Protocol("the progress stream ended without a result".into()));
                    }
                    Err(e) => {
                        clear(tty);
                        return Err(e);
                    }
                };
                match line.event {
                    OpenEvent::Progress(p) => {
                        if tty {
                            current = Some((p, Instant::now()));
                            redraw(current.as_ref());
                        } else if p.phase != "failed" {
                            // (A failure is reported once, by the final error line.)
                            eprintln!("{}", progress_text(&p, 0.0));
                        }
                    }
                    OpenEvent::Status { status } => {
                        clear(tty);
                        return Ok(*status);
                    }
                    OpenEvent::Error { error } => {
                        clear(tty);
                        return Err(api_failure(error));
                    }
                }
            }
            _ = tick.tick(), if tty => redraw(current.as_ref()),
        }
    }
}

fn progress_text(p: &Progress, extra: f64) -> String {
    let mut s = format!("{} {:.1}s", p.phase, p.elapsed_secs + extra);
    if let Some(r) = &p.resource
        && p.detail.as_deref() != Some(r.as_str())
    {
        s.push(' ');
        s.push_str(r);
    }
    if let Some(d) = &p.detail {
        s.push(' ');
        s.push_str(&one_line(d));
    }
    s
}

fn redraw(current: Option<&(Progress, Instant)>) {
    if let Some((p, since)) = current {
        let live = !matches!(p.phase.as_str(), "ready" | "failed");
        let extra = if live {
            since.elapsed().as_secs_f64()
        } else {
            0.0
        };
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", progress_text(p, extra));
        let _ = err.flush();
    }
}

/// Multi-line messages (configuration errors) on one line.
fn one_line(s: &str) -> String {
    let mut out = String::new();
    for line in s.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if !out.is_empty() {
            out.push_str(if out.ends_with(':') { " " } else { "; " });
        }
        out.push_str(line);
    }
    out
}

fn dash(s: Option<&str>) -> String {
    s.filter(|s| !s.is_empty())
        .map_or_else(|| "-".to_owned(), one_line)
}

fn state_name(s: ProfileState) -> &'static str {
    match s {
        ProfileState::Closed => "closed",
        ProfileState::Listening => "listening",
        ProfileState::Connecting => "connecting",
        ProfileState::Ready => "ready",
        ProfileState::Resuming => "resuming",
        ProfileState::Error => "error",
    }
}

fn listen_text(p: &ProfileStatus) -> String {
    if p.listen.is_empty() {
        "-".to_owned()
    } else {
        p.listen.join(", ")
    }
}

/// `1.5 KiB`, `12.0 MiB`.
fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `42s`, `3m05s`, `1h02m`, `2d03h`.
fn human_duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s}s"),
        s if s < 3600 => format!("{}m{:02}s", s / 60, s % 60),
        s if s < 86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

/// Aligned columns, two spaces apart, no trailing blanks.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header_row: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header_row).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            if i + 1 < row.len() {
                line.push_str(&" ".repeat(widths[i].saturating_sub(cell.chars().count())));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn list_table(profiles: &[ProfileStatus]) -> String {
    if profiles.is_empty() {
        return "no profiles configured\n".to_owned();
    }
    let rows: Vec<Vec<String>> = profiles
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                state_name(p.state).to_owned(),
                listen_text(p),
                p.target.clone(),
                p.remote.clone(),
                p.connections.to_string(),
            ]
        })
        .collect();
    table(
        &["NAME", "STATE", "LISTEN", "TARGET", "REMOTE", "CONNS"],
        &rows,
    )
}

fn status_table(profiles: &[ProfileStatus]) -> String {
    if profiles.is_empty() {
        return "no profiles configured\n".to_owned();
    }
    let rows: Vec<Vec<String>> = profiles
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                state_name(p.state).to_owned(),
                listen_text(p),
                p.target.clone(),
                session_text(p),
                dash(p.agent_version.as_deref()),
                dash(p.mode.as_deref()),
                p.connections.to_string(),
                human_bytes(p.bytes_up),
                human_bytes(p.bytes_down),
                p.uptime_secs.map_or_else(|| "-".to_owned(), human_duration),
                dash(p.last_error.as_deref()),
            ]
        })
        .collect();
    table(
        &[
            "NAME",
            "STATE",
            "LISTEN",
            "TARGET",
            "SESSION",
            "AGENT",
            "MODE",
            "CONNS",
            "UP",
            "DOWN",
            "UPTIME",
            "LAST ERROR",
        ],
        &rows,
    )
}

/// The first session id, with the number of further pool sessions.
fn session_text(p: &ProfileStatus) -> String {
    match (p.session_id.as_deref(), p.sessions.len()) {
        (None, _) => "-".to_owned(),
        (Some(id), 0 | 1) => id.to_owned(),
        (Some(id), n) => format!("{id} +{}", n - 1),
    }
}

fn detail_table(p: &ProfileStatus) -> String {
    let rows: Vec<Vec<String>> = [
        ("name", p.name.clone()),
        ("state", state_name(p.state).to_owned()),
        ("listen", listen_text(p)),
        ("target", p.target.clone()),
        ("remote", p.remote.clone()),
        (
            "sessions",
            if p.sessions.is_empty() {
                "-".to_owned()
            } else {
                p.sessions.join(" ")
            },
        ),
        ("agent", dash(p.agent_version.as_deref())),
        ("mode", dash(p.mode.as_deref())),
        (
            "connections",
            format!("{} open, {} total", p.connections, p.total_connections),
        ),
        (
            "bytes",
            format!(
                "{} up, {} down",
                human_bytes(p.bytes_up),
                human_bytes(p.bytes_down)
            ),
        ),
        (
            "uptime",
            p.uptime_secs.map_or_else(|| "-".to_owned(), human_duration),
        ),
        (
            "resumes",
            format!("{} ({} attempts)", p.resumes, p.resume_attempts),
        ),
        ("last error", dash(p.last_error.as_deref())),
    ]
    .into_iter()
    .chain(p.bastion.as_ref().map(bastion_rows).unwrap_or_default())
    .map(|(k, v)| vec![format!("{k}:"), v])
    .collect();
    let mut widths = 0;
    for r in &rows {
        widths = widths.max(r[0].len());
    }
    rows.iter()
        .map(|r| format!("  {:<widths$}  {}\n", r[0], r[1]))
        .collect()
}

/// The on-demand bastion's rows of `status NAME`.
fn bastion_rows(b: &bastion::api::BastionStatus) -> Vec<(&'static str, String)> {
    let mut phase = b.phase.clone();
    if let Some(age) = b.age_secs {
        phase.push_str(&format!(" (launched {} ago)", human_duration(age)));
    }
    vec![
        (
            "bastion",
            format!(
                "{} on demand, {}registry {}",
                b.provider,
                if b.shared { "shared, " } else { "" },
                b.registry
            ),
        ),
        ("bastion phase", phase),
        (
            "bastion id",
            dash(b.target.as_deref().or(b.resource.as_deref())),
        ),
        (
            "expires in",
            b.expires_in_secs
                .map_or_else(|| "-".to_owned(), human_duration),
        ),
        (
            "idle for",
            b.idle_secs.map_or_else(|| "-".to_owned(), human_duration),
        ),
        ("warning", dash(b.warning.as_deref())),
        ("bastion error", dash(b.last_error.as_deref())),
    ]
}

fn reload_table(r: &ReloadResult) -> String {
    let row = |what: &str, names: &[String]| {
        vec![
            what.to_owned(),
            if names.is_empty() {
                "-".to_owned()
            } else {
                names.join(", ")
            },
        ]
    };
    table(
        &["CHANGE", "PROFILES"],
        &[
            row("added", &r.added),
            row("removed", &r.removed),
            row("changed", &r.changed),
            row("unchanged", &r.unchanged),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humans() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 * 1024 * 1024), "5.0 MiB");
        assert_eq!(human_duration(42), "42s");
        assert_eq!(human_duration(185), "3m05s");
        assert_eq!(human_duration(3720), "1h02m");
        assert_eq!(human_duration(2 * 86400 + 3 * 3600), "2d03h");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["A", "BB"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz\n");
    }
}
