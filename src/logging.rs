//! Log filtering shared by `bastiond`, the simulator and the plugin drop-in.
//!
//! Some dependencies log whole messages at DEBUG/TRACE, and a few of those messages carry
//! secrets: tungstenite logs every websocket frame (the OpenDataChannel message holds the
//! session token), and the AWS SDK runtime logs response bodies and parsed outputs at
//! TRACE (StartSession and ResumeSession return `TokenValue`, which the SSM model does not
//! mark sensitive). Those targets are capped whatever the user's filter says.
//!
//! A cap only ever lowers a level. Adding `aws_smithy_runtime=debug` as an `EnvFilter`
//! directive would *raise* that target to DEBUG under the default `info`, and `EnvFilter`
//! has no "at most" operator, so the caps are a second filter, [`caps`], intersected with
//! the user's ([`FilterExt::and`]): an event is written only when both allow it, which
//! makes each target's effective level min(user's level, cap). This holds for every form
//! of user directive (per module, per span, per field) without parsing them.

use std::io::IsTerminal as _;

use tracing::level_filters::LevelFilter;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{Targets, combinator::And};
use tracing_subscriber::layer::{Filter, SubscriberExt as _};
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry, fmt};

use tracing_subscriber::filter::FilterExt as _;

/// `(target, most verbose level allowed)`. A target covers its submodules
/// (`aws_smithy_runtime::client::orchestrator` is capped by `aws_smithy_runtime`).
pub const SECRET_BEARING_TARGETS: &[(&str, LevelFilter)] = &[
    ("tungstenite", LevelFilter::INFO),
    ("tokio_tungstenite", LevelFilter::INFO),
    ("aws_smithy_runtime", LevelFilter::DEBUG),
];

/// The user's filter from environment variable `var`, or `default` when it is unset or
/// does not parse.
pub fn user_filter(var: &str, default: &str) -> EnvFilter {
    EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(default))
}

/// The caps alone: everything is allowed except the capped targets above their cap.
pub fn caps() -> Targets {
    Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(SECRET_BEARING_TARGETS.iter().copied())
}

/// `user` intersected with [`caps`]: the filter to put on an output layer.
pub fn capped<S>(user: EnvFilter) -> And<EnvFilter, Targets, S>
where
    EnvFilter: Filter<S>,
    Targets: Filter<S>,
{
    user.and(caps())
}

/// Installs the process's subscriber: human-readable lines on stderr (colours only on a
/// terminal), filtered by `var` (default `default`) under the caps. Does nothing if a
/// subscriber is already installed.
pub fn init_stderr(var: &str, default: &str) {
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_filter(capped::<Registry>(user_filter(var, default)));
    let _ = tracing_subscriber::registry().with(layer).try_init();
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    /// Collects what the fmt layer writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().map_err(|_| io::ErrorKind::Other)?.extend(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// Emits one event per (target, level) of interest under the user's filter
    /// `directives` with the caps, and returns the `target:LEVEL` pairs that were written.
    fn written_under(directives: &str) -> Vec<String> {
        let out = Captured::default();
        let layer = fmt::layer()
            .with_writer(out.clone())
            .with_ansi(false)
            .without_time()
            .with_filter(capped::<Registry>(EnvFilter::new(directives)));
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, || {
            // `target:` must be a literal, hence one line per pair.
            tracing::trace!(target: "tungstenite", "m");
            tracing::debug!(target: "tungstenite", "m");
            tracing::info!(target: "tungstenite", "m");
            tracing::debug!(target: "tokio_tungstenite::compat", "m");
            tracing::info!(target: "tokio_tungstenite::compat", "m");
            tracing::trace!(target: "aws_smithy_runtime::client::orchestrator", "m");
            tracing::debug!(target: "aws_smithy_runtime::client::orchestrator", "m");
            tracing::info!(target: "aws_smithy_runtime::client::orchestrator", "m");
            tracing::trace!(target: "bastion::transport", "m");
            tracing::debug!(target: "bastion::transport", "m");
            tracing::info!(target: "bastion::transport", "m");
            tracing::warn!(target: "bastion::transport", "m");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| {
                let mut words = l.split_whitespace();
                let level = words.next().unwrap_or_default().to_owned();
                let target = words.next().unwrap_or_default().trim_end_matches(':');
                format!("{target}:{level}")
            })
            .collect()
    }

    #[test]
    fn the_default_info_is_not_raised_by_a_cap() {
        assert_eq!(
            written_under("info"),
            [
                "tungstenite:INFO",
                "tokio_tungstenite::compat:INFO",
                "aws_smithy_runtime::client::orchestrator:INFO",
                "bastion::transport:INFO",
                "bastion::transport:WARN",
            ]
        );
    }

    #[test]
    fn a_trace_request_is_lowered_to_each_cap() {
        assert_eq!(
            written_under("trace"),
            [
                "tungstenite:INFO",
                "tokio_tungstenite::compat:INFO",
                "aws_smithy_runtime::client::orchestrator:DEBUG",
                "aws_smithy_runtime::client::orchestrator:INFO",
                "bastion::transport:TRACE",
                "bastion::transport:DEBUG",
                "bastion::transport:INFO",
                "bastion::transport:WARN",
            ]
        );
    }

    #[test]
    fn a_more_specific_user_directive_cannot_escape_its_cap() {
        let got = written_under("warn,aws_smithy_runtime::client=trace,tungstenite=trace");
        assert_eq!(
            got,
            [
                "tungstenite:INFO",
                "aws_smithy_runtime::client::orchestrator:DEBUG",
                "aws_smithy_runtime::client::orchestrator:INFO",
                "bastion::transport:WARN",
            ]
        );
    }

    #[test]
    fn a_quieter_user_level_wins_over_a_cap() {
        assert_eq!(
            written_under("error,bastion=debug"),
            [
                "bastion::transport:DEBUG",
                "bastion::transport:INFO",
                "bastion::transport:WARN"
            ]
        );
    }
}
