//! `bastion-demo`: the real `bastiond` against the simulator, with a demo service behind
//! a demo profile; prints commands to try. README's first command.
//!
//! The simulator runs in this process and plays AWS; the daemon is the `bastiond` built
//! beside this binary, started exactly as a user starts it and pointed at the simulator
//! through the standard `AWS_ENDPOINT_URL_SSM` setting.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use bastion_sim::process::{init_logging, shutdown_signal};
use bastion_sim::{SimConfig, Simulator};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => Some(rt),
        Err(e) => {
            eprintln!("bastion-demo: cannot start the runtime: {e}");
            None
        }
    }
}

/// A tiny HTTP service the demo profile tunnels to.
async fn demo_service() -> std::io::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let body = "Hello from the far side of Session Manager: this reply crossed the \
                            bastion daemon, a websocket data channel and the agent.\n";
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(reply.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    Ok(port)
}

fn free_local_port(preferred: u16) -> u16 {
    std::net::TcpListener::bind(("127.0.0.1", preferred))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(preferred)
}

/// The demo daemon's credentials, registered with the demo's simulator so that its
/// signed upgrades verify.
const DEMO_ACCESS_KEY_ID: &str = "AKIDDEMO";
const DEMO_SECRET: &str = "demo-secret";

fn run_demo() -> ExitCode {
    init_logging();
    let Some(rt) = runtime() else {
        return ExitCode::FAILURE;
    };
    rt.block_on(async move {
        let config = SimConfig::default().with_credential(DEMO_ACCESS_KEY_ID, DEMO_SECRET, None);
        let sim = match Simulator::bind(config).await {
            Ok(s) => s.spawn(),
            Err(e) => {
                eprintln!("bastion-demo: cannot start the simulator: {e}");
                return ExitCode::FAILURE;
            }
        };
        let service_port = match demo_service().await {
            Ok(p) => p,
            Err(e) => {
                eprintln!("bastion-demo: cannot start the demo service: {e}");
                return ExitCode::FAILURE;
            }
        };
        let dir = std::env::temp_dir().join(format!("bastion-demo-{}", std::process::id()));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            eprintln!("bastion-demo: {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        let local_port = free_local_port(18080);
        let config = format!(
            "# bastion demo: the simulator plays AWS; 127.0.0.1:{service_port} plays the database.\n\
             [profiles.demo]\n\
             target = \"i-0123456789abcdef0\"\n\
             remote_host = \"127.0.0.1\"\n\
             remote_port = {service_port}\n\
             local_port = {local_port}\n\
             bind = [\"127.0.0.1\"]\n\
             autostart = true\n"
        );
        let config_file = dir.join("config.toml");
        let socket = dir.join("control.sock");
        if let Err(e) = std::fs::write(&config_file, config) {
            eprintln!("bastion-demo: {}: {e}", config_file.display());
            return ExitCode::FAILURE;
        }
        // The real daemon, built beside this binary (`cargo build` builds both).
        let exe = std::env::current_exe()
            .map(|e| e.with_file_name("bastiond"))
            .unwrap_or_else(|_| PathBuf::from("bastiond"));
        if !exe.exists() {
            eprintln!(
                "bastion-demo: {} not found: run `cargo build` (it builds bastiond and bastion-demo)",
                exe.display()
            );
            return ExitCode::FAILURE;
        }
        // The daemon reaches the simulator exactly as it reaches AWS: through the
        // standard endpoint setting, with (dummy) credentials from the environment.
        let mut child = match tokio::process::Command::new(&exe)
            .arg("run")
            .arg("--config")
            .arg(&config_file)
            .arg("--socket")
            .arg(&socket)
            .env("AWS_ENDPOINT_URL_SSM", sim.endpoint_url())
            .env("AWS_ACCESS_KEY_ID", DEMO_ACCESS_KEY_ID)
            .env("AWS_SECRET_ACCESS_KEY", DEMO_SECRET)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env_remove("AWS_PROFILE")
            .kill_on_drop(true)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("bastion-demo: cannot start {}: {e}", exe.display());
                return ExitCode::FAILURE;
            }
        };
        // Wait for the daemon's listener, then send one request through the tunnel.
        let mut reply = String::new();
        for _ in 0..200 {
            if let Ok(mut conn) = tokio::net::TcpStream::connect(("127.0.0.1", local_port)).await {
                let _ = conn.write_all(b"GET / HTTP/1.1\r\nhost: demo\r\n\r\n").await;
                let _ = tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut reply)).await;
                if !reply.is_empty() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let first_body_line = reply.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
        let ctl = exe.with_file_name("bastionctl");
        println!();
        if first_body_line.is_empty() {
            println!("The demo tunnel did not answer; see the log above.");
        } else {
            println!("Tunnel works. The demo service answered through Session Manager:");
            println!("  {first_body_line}");
        }
        println!();
        println!("Try it yourself (Ctrl-C here stops the demo):");
        println!("  curl http://127.0.0.1:{local_port}/");
        println!("  {} --socket {} status", ctl.display(), socket.display());
        println!("  {} --socket {} close demo", ctl.display(), socket.display());
        println!("  {} --socket {} open demo --warm", ctl.display(), socket.display());
        println!("  curl -s {}/sim/sessions   # what the simulated AWS side saw", sim.endpoint_url());
        println!();
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = child.wait() => {
                eprintln!("bastion-demo: the daemon exited");
            }
        }
        if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), child.wait()).await;
        sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        if first_body_line.is_empty() { ExitCode::FAILURE } else { ExitCode::SUCCESS }
    })
}

fn main() -> ExitCode {
    run_demo()
}
