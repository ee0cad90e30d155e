//! Log caps only lower a level: `bastiond run` at the default `info` writes no DEBUG or
//! TRACE line, from bastion or from a dependency (the caps on tungstenite and
//! aws_smithy_runtime used to be directives that raised those targets to DEBUG).

use crate::e2e_util;
use crate::sim_util;

use e2e_util::{DaemonProcess, echo_roundtrip, free_port, profile, wait_listening};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daemon_at_info_writes_no_debug_line() {
    // Registers the daemon's credential (e2e_util::DAEMON_ACCESS_KEY_ID).
    let sim = sim_util::start_default().await;
    let echo = sim_util::echo_server().await;
    let local = free_port();
    let mut d = DaemonProcess::start_with_env(
        &profile("echo", echo, local),
        &sim.endpoint_url(),
        &[("RUST_LOG", "info")],
    );
    wait_listening(local, &d);
    // StartSession through the SDK, a signed upgrade, a handshake and data: every path
    // whose dependencies log at DEBUG.
    echo_roundtrip(local, 256 * 1024).await;
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    let log = d.log_text();
    assert!(log.contains(" INFO "), "the log was not captured: {log}");
    for marker in [" DEBUG ", " TRACE "] {
        let line = log.lines().find(|l| l.contains(marker));
        assert!(line.is_none(), "a{marker}line at info: {line:?}");
    }
}
