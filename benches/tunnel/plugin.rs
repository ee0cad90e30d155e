//! Optional comparison: AWS's session-manager-plugin (`BENCH_PLUGIN=/path/to/it`, not
//! part of the repository) against the same simulator and servers, one plugin process
//! (one session) per server, started the way the AWS CLI starts it.

use std::process::Stdio;
use std::time::{Duration, Instant};

use bastion_sim::SimHandle;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::probes::first_byte;
use super::servers::Servers;
use super::sim_util;

/// One plugin process forwarding a local port to one server.
pub struct Forward {
    pub child: Child,
    pub pid: u32,
    pub port: u16,
}

/// The plugin's processes for the sink, the source and the echo server.
pub struct PluginPath {
    pub sink: Forward,
    pub source: Forward,
    pub echo: Forward,
    /// Plugin process spawned → first byte back through it (the echo forward).
    pub start_to_first_byte: Duration,
}

/// `session-manager-plugin --version`.
pub fn version(plugin: &str) -> String {
    std::process::Command::new(plugin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// StartSession on the simulator, then the plugin with the CLI's six arguments; waits
/// for its "Port N opened" line.
async fn forward(sim: &SimHandle, plugin: &str, remote: u16) -> Forward {
    let request = json!({
        "Target": "i-0123456789abcdef0",
        "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
        "Parameters": {
            "host": ["127.0.0.1"],
            "portNumber": [remote.to_string()],
            "localPortNumber": ["0"],
        },
    });
    let r = sim_util::ssm(sim.local_addr(), "StartSession", request.clone()).await;
    assert_eq!(r.status, 200, "StartSession for the plugin");
    let response = String::from_utf8_lossy(&r.body).into_owned();
    let mut child = Command::new(plugin)
        .args([
            response.as_str(),
            "us-east-1",
            "StartSession",
            "",
            &request.to_string(),
            &sim.endpoint_url(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the plugin");
    let pid = child.id().expect("plugin pid");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix("Port ")
                && let Some(n) = rest.split(' ').next().and_then(|n| n.parse().ok())
            {
                return n;
            }
        }
        panic!("plugin stdout ended before 'Port N opened'");
    })
    .await
    .expect("no 'Port N opened' from the plugin within 30 s");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Forward { child, pid, port }
}

impl PluginPath {
    pub async fn start(sim: &SimHandle, plugin: &str, servers: Servers) -> PluginPath {
        let started = Instant::now();
        let echo = forward(sim, plugin, servers.echo).await;
        // The session's handshake may still be running: the first byte waits for it.
        let start_to_first_byte = started.elapsed() + first_byte(echo.port).await;
        PluginPath {
            sink: forward(sim, plugin, servers.sink).await,
            source: forward(sim, plugin, servers.source).await,
            echo,
            start_to_first_byte,
        }
    }

    /// Ends the plugin processes.
    pub async fn stop(mut self) {
        for f in [&mut self.sink, &mut self.source, &mut self.echo] {
            let _ = f.child.kill().await;
        }
    }
}
