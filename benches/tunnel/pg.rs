//! pgbench, select-only, through a port (a tunnel's or the server's).

use std::process::Command;

/// Fills the pgbench tables (scale 1) on the server at `port`.
pub fn init(port: u16) {
    let out = Command::new("pgbench")
        .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1", "-U", "postgres"])
        .arg("-p")
        .arg(port.to_string())
        .arg("postgres")
        .output()
        .expect("run pgbench -i (install postgresql-client)");
    assert!(
        out.status.success(),
        "pgbench -i failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `pgbench -S -c 8 -j 2 -T secs`: (tps without connection time, average latency ms).
pub async fn select_only(port: u16, secs: u64) -> (f64, f64) {
    let out = tokio::process::Command::new("pgbench")
        .args([
            "-n",
            "-S",
            "-c",
            "8",
            "-j",
            "2",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
        ])
        .arg("-T")
        .arg(secs.to_string())
        .arg("-p")
        .arg(port.to_string())
        .arg("postgres")
        .output()
        .await
        .expect("run pgbench");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pgbench failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .unwrap_or_else(|| panic!("no {prefix:?} in pgbench output: {text}"))
    };
    (field("tps ="), field("latency average ="))
}
