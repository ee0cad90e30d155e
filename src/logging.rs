//! Log filtering shared by `bastiond`, the simulator and the plugin drop-in.
//!
//! Some dependencies log whole messages at DEBUG/TRACE, and a few of those messages carry
//! secrets: tungstenite logs every websocket frame (the OpenDataChannel message holds the
//! session token), and the AWS SDK runtime logs response bodies and parsed outputs at
//! TRACE (StartSession and ResumeSession return `TokenValue`, which the SSM model does not
//! mark sensitive). Those targets are capped whatever the user's filter says.

use tracing_subscriber::EnvFilter;

/// `(target, most verbose level allowed)`.
pub const SECRET_BEARING_TARGETS: &[(&str, &str)] = &[
    ("tungstenite", "info"),
    ("tokio_tungstenite", "info"),
    ("aws_smithy_runtime", "debug"),
];

/// The filter from environment variable `var` (default `default`), with the secret-bearing
/// targets capped.
pub fn env_filter(var: &str, default: &str) -> EnvFilter {
    let mut filter = EnvFilter::try_from_env(var).unwrap_or_else(|_| EnvFilter::new(default));
    for (target, level) in SECRET_BEARING_TARGETS {
        if let Ok(d) = format!("{target}={level}").parse() {
            filter = filter.add_directive(d);
        }
    }
    filter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_survive_a_user_trace_filter() {
        let f = env_filter("BASTION_TEST_UNSET_FILTER_VAR", "trace").to_string();
        assert!(f.contains("tungstenite=info"), "{f}");
        assert!(f.contains("aws_smithy_runtime=debug"), "{f}");
    }
}
