//! The plugin's control signals.
//!
//! A port session handles SIGINT (Ctrl+C), SIGTSTP (Ctrl+Z) and SIGQUIT (Ctrl+\) and
//! nothing else ([P] `sessionutil/control_signals_unix.go` `ControlSignals`, registered
//! by `muxportforwarding.go` / `basicportforwarding.go` fn `handleControlSignals` when
//! the streams are initialised, after the handshake). So:
//!
//! * Ctrl+Z ends the session instead of suspending the process.
//! * SIGTERM and SIGHUP keep their default action: the process is killed by the
//!   signal, prints nothing and sends nothing (the Go runtime re-raises them).
//! * Before the handshake no handler exists, so a control signal has its default (or
//!   inherited) action: the AWS CLI runs the plugin with SIGINT, SIGQUIT and SIGTSTP
//!   ignored (`awscli/compat.py` `ignore_user_entered_signals`), and a handler installed
//!   later replaces that, as Go's `signal.Notify` does.
//! * Only the first control signal is acted on; the handler stays installed, so later
//!   ones are swallowed (the plugin's goroutine reads its channel once).

use tokio::signal::unix::{Signal, SignalKind, signal};

/// The installed handlers.
pub(super) struct ControlSignals {
    handlers: Vec<Signal>,
}

impl ControlSignals {
    /// Installs the handlers. A signal that cannot be hooked keeps its default action.
    pub(super) fn install() -> ControlSignals {
        let handlers = [
            SignalKind::interrupt(),
            SignalKind::from_raw(rustix::process::Signal::TSTP.as_raw()),
            SignalKind::quit(),
        ]
        .into_iter()
        .filter_map(|kind| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle a control signal");
                None
            }
        })
        .collect();
        ControlSignals { handlers }
    }

    /// Resolves when any of the control signals arrives.
    pub(super) async fn recv(&mut self) {
        if self.handlers.is_empty() {
            return std::future::pending().await;
        }
        let waits = self
            .handlers
            .iter_mut()
            .map(|s| Box::pin(s.recv()))
            .collect::<Vec<_>>();
        let _ = futures_util::future::select_all(waits).await;
    }
}
