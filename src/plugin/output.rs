//! Everything the plugin prints, byte for byte, with where it prints it.
//!
//! Tools wrap `session-manager-plugin` and parse its stdout (the "Port N opened" line
//! for an ephemeral port, "Waiting for connections..." as readiness), so each string
//! here is the reference's exact format: [P] = `aws/session-manager-plugin` at tag
//! 1.2.677.0, unchanged in the newest stored files (1.2.835.0: IDX `29db6846`
//! `sessionhandler.go`, `12f93371` `muxportforwarding.go` / `basicportforwarding.go`).
//! All of them go to **stdout** (`fmt.Printf`, `fmt.Println`, `fmt.Fprintf(os.Stdout,
//! …)`, or the `out` writer that `main.go` sets to `os.Stdout`); the plugin writes
//! nothing to stderr itself. Each is flushed at once, since several lines end without a
//! newline until the next one is printed.

use std::io::Write as _;

/// Writes `text` to stdout and flushes it.
pub(super) fn print(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// No arguments. [P] `session.go` fn `ValidateInputAndStartSession` (`len(args) == 1`).
pub(super) fn installed() -> &'static str {
    "\nThe Session Manager plugin was installed successfully. Use the AWS CLI to start a session.\n\n"
}

/// `--version`: the version and a newline. [P] `session.go` fn
/// `ValidateInputAndStartSession` (`fmt.Fprintf(out, "%s\n", version.Version)`).
pub(super) fn version(version: &str) -> String {
    format!("{version}\n")
}

/// One or two arguments that are not `--version`. [P] `session.go` fn
/// `ValidateInputAndStartSession` (`len(args) < LegacyArgumentLength`); note the space
/// before the first `\n`.
pub(super) fn unknown_operation(arg: &str) -> String {
    format!(
        "\nUnknown operation {arg}. \nUse session-manager-plugin --version to check the version.\n\n"
    )
}

/// An operation other than `StartSession`, without a newline. [P] `session.go` fn
/// `ValidateInputAndStartSession` (`fmt.Fprint(out, "Invalid Operation")`).
pub(super) fn invalid_operation() -> &'static str {
    "Invalid Operation"
}

/// A start that failed (the response is not JSON, the local listener cannot be
/// opened). [P] `session.go` fn `ValidateInputAndStartSession`
/// (`fmt.Fprintf(out, "Cannot perform start session: %v\n", err)`).
pub(super) fn cannot_start(reason: &str) -> String {
    format!("Cannot perform start session: {reason}\n")
}

/// First line of every session, before the data channel is opened. [P] `session.go`
/// fn `Execute`.
pub(super) fn starting(session_id: &str) -> String {
    format!("\nStarting session with SessionId: {session_id}\n")
}

/// HandshakeComplete's CustomerMessage, as is, when it is not empty. [P]
/// `streaming.go` fn `handleHandshakeComplete` (`fmt.Fprintln(os.Stdout, …)`).
pub(super) fn customer_message(message: &str) -> Option<String> {
    (!message.is_empty()).then(|| format!("{message}\n"))
}

/// Where the session listens, as the plugin words it. [P] `muxportforwarding.go` fn
/// `handleClientConnections` and `basicportforwarding.go` fn `startLocalListener`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Opened {
    /// `localConnectionType` is not `unix`: the TCP port actually bound.
    Port(u16),
    /// `localConnectionType: unix`: the `localUnixSocket` path.
    UnixSocket(String),
}

fn opened(at: &Opened, session_id: &str) -> String {
    match at {
        Opened::Port(port) => format!("Port {port} opened for sessionId {session_id}."),
        Opened::UnixSocket(path) => {
            format!("Unix socket {path} opened for sessionId {session_id}.")
        }
    }
}

/// The listener is open, in multiplexed mode: the "opened" sentence without a newline
/// (`fmt.Printf("%s", displayMsg)`), then `"\nWaiting for connections...\n"`. [P]
/// `muxportforwarding.go` fn `handleClientConnections`.
pub(super) fn listening_mux(at: &Opened, session_id: &str) -> String {
    format!("{}\nWaiting for connections...\n", opened(at, session_id))
}

/// The listener is open, in basic mode (one connection at a time): the "opened"
/// sentence and a newline (`fmt.Println`), and no "Waiting for connections...". [P]
/// `basicportforwarding.go` fn `startLocalListener`.
pub(super) fn listening_basic(at: &Opened, session_id: &str) -> String {
    format!("{}\n", opened(at, session_id))
}

/// The first accepted connection of a multiplexed session (later ones print nothing:
/// `sync.Once`). [P] `muxportforwarding.go` fn `handleClientConnections`.
pub(super) fn accepted_mux(session_id: &str) -> String {
    format!("\nConnection accepted for session [{session_id}]\n")
}

/// The first accepted connection of a basic session (the re-accepts after a
/// disconnect print nothing: fn `reconnect`). [P] `basicportforwarding.go` fn
/// `startLocalConn`.
pub(super) fn accepted_basic(session_id: &str) -> String {
    format!("Connection accepted for session {session_id}.\n")
}

/// Each ConnectToPortError flag from the agent (multiplexed mode only). [P]
/// `muxportforwarding.go` fn `WriteStream`.
pub(super) fn connect_to_port_error() -> &'static str {
    "\nConnection to destination port failed, check SSM Agent logs.\n"
}

/// A control signal (SIGINT, SIGTSTP, SIGQUIT) arrived. [P] `muxportforwarding.go` /
/// `basicportforwarding.go` fn `handleControlSignals` (`fmt.Println`).
pub(super) fn terminate_signal() -> &'static str {
    "Terminate signal received, exiting.\n"
}

/// The end of a session: after a control signal ([P] fn `handleControlSignals`), or on
/// `channel_closed` with an empty Output ([P] `streaming.go` fn
/// `HandleChannelClosedMessage`).
pub(super) fn exiting(session_id: &str) -> String {
    format!("\n\nExiting session with sessionId: {session_id}.\n\n")
}

/// `channel_closed`: its Output, or [`exiting`] when that is empty. [P] `streaming.go`
/// fn `HandleChannelClosedMessage`.
pub(super) fn channel_closed(session_id: &str, output: &str) -> String {
    if output.is_empty() {
        exiting(session_id)
    } else {
        format!("\n\nSessionId: {session_id} : {output}\n\n")
    }
}

/// ResumeSession returned no token: the session timed out at the service. [P]
/// `sessionhandler.go` fn `ResumeSessionHandler` (1.2.677.0 and IDX `29db6846`).
pub(super) fn timed_out(session_id: &str) -> String {
    format!("Session: {session_id} timed out.\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplexed_listening_lines() {
        assert_eq!(
            listening_mux(&Opened::Port(5432), "u-1"),
            "Port 5432 opened for sessionId u-1.\nWaiting for connections...\n"
        );
        assert_eq!(
            listening_mux(&Opened::UnixSocket("/tmp/s.sock".into()), "u-1"),
            "Unix socket /tmp/s.sock opened for sessionId u-1.\nWaiting for connections...\n"
        );
        assert_eq!(
            listening_basic(&Opened::Port(1), "u-1"),
            "Port 1 opened for sessionId u-1.\n"
        );
    }

    #[test]
    fn channel_closed_with_and_without_output() {
        assert_eq!(
            channel_closed("u-1", ""),
            "\n\nExiting session with sessionId: u-1.\n\n"
        );
        assert_eq!(
            channel_closed("u-1", "Session terminated"),
            "\n\nSessionId: u-1 : Session terminated\n\n"
        );
    }

    #[test]
    fn customer_message_only_when_present() {
        assert_eq!(customer_message(""), None);
        assert_eq!(customer_message("hello").as_deref(), Some("hello\n"));
    }
}
