//! The local end of a port session: where to listen, from the session's properties.
//!
//! The plugin reads its parameters from the properties the agent sends in the
//! HandshakeRequest (the document's, with the request's values substituted), not from
//! the StartSession request ([P] `portsession.go` fn `Initialize`, `PortParameters`:
//! `portNumber`, `localPortNumber`, `localUnixSocket`, `localConnectionType`, `type`).

use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use super::output::Opened;

/// `type` of a session that forwards to a local listener; anything else is forwarded
/// over stdin/stdout ([P] `portsession.go` `LocalPortForwardingType`, fn `Initialize`).
const LOCAL_PORT_FORWARDING: &str = "LocalPortForwarding";

/// [P] `portsession.go` `PortParameters` (every field a string).
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", default)]
struct PortParameters {
    local_port_number: String,
    local_unix_socket: String,
    local_connection_type: String,
    #[serde(rename = "type")]
    kind: String,
}

/// Where the drop-in listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum LocalEndpoint {
    /// `127.0.0.1:<port>`; 0 picks a free port. The plugin listens on `localhost:<port>`
    /// ([P] `muxportforwarding.go` fn `handleClientConnections`, empty means `"0"`),
    /// which Go resolves to 127.0.0.1 first.
    Tcp(u16),
    /// `localConnectionType: unix`: a Unix socket at `localUnixSocket` ([P] same fn).
    Unix(PathBuf),
}

/// Why the properties do not describe a local listener.
#[derive(Debug, Error, PartialEq, Eq)]
pub(super) enum EndpointError {
    /// Not a `LocalPortForwarding` session: the plugin forwards it over stdin/stdout.
    #[error(
        "the session is a {0:?} port session (forwarded over stdin/stdout, as for \
         AWS-StartSSHSession); this drop-in supports only sessions that listen locally \
         (AWS-StartPortForwardingSession, AWS-StartPortForwardingSessionToRemoteHost)"
    )]
    NotLocal(String),
    /// `localPortNumber` is not a port.
    #[error("invalid localPortNumber {0:?}")]
    BadPort(String),
}

impl LocalEndpoint {
    /// The endpoint the session's `properties` ask for.
    pub(super) fn from_properties(properties: &Value) -> Result<LocalEndpoint, EndpointError> {
        let params: PortParameters = serde_json::from_value(properties.clone()).unwrap_or_default();
        if params.kind != LOCAL_PORT_FORWARDING {
            return Err(EndpointError::NotLocal(params.kind));
        }
        if params.local_connection_type == "unix" {
            return Ok(LocalEndpoint::Unix(PathBuf::from(params.local_unix_socket)));
        }
        let port = params.local_port_number.trim();
        if port.is_empty() {
            return Ok(LocalEndpoint::Tcp(0));
        }
        port.parse()
            .map(LocalEndpoint::Tcp)
            .map_err(|_| EndpointError::BadPort(params.local_port_number.clone()))
    }

    /// Opens the listener. The error text follows Go's `net.Listen` errors
    /// (`listen tcp 127.0.0.1:5432: …`), which the plugin prints.
    pub(super) async fn bind(&self) -> Result<(Listener, Opened), String> {
        match self {
            LocalEndpoint::Tcp(port) => {
                let l = TcpListener::bind(("127.0.0.1", *port))
                    .await
                    .map_err(|e| format!("listen tcp 127.0.0.1:{port}: {e}"))?;
                let bound = l.local_addr().map(|a| a.port()).unwrap_or(*port);
                Ok((Listener::Tcp(l), Opened::Port(bound)))
            }
            LocalEndpoint::Unix(path) => {
                let l = UnixListener::bind(path)
                    .map_err(|e| format!("listen unix {}: {e}", path.display()))?;
                Ok((
                    Listener::Unix(l, path.clone()),
                    Opened::UnixSocket(path.display().to_string()),
                ))
            }
        }
    }
}

/// An accepted local connection.
pub(super) enum Accepted {
    /// From the TCP listener.
    Tcp(TcpStream),
    /// From the Unix socket listener.
    Unix(UnixStream),
}

/// The open listener. A Unix socket's file is removed when it is dropped, so that the
/// next session can bind the same path (the plugin leaves it behind: `os.Exit` skips
/// Go's unlink-on-close).
pub(super) enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket and its path.
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// The next connection. A TCP connection gets TCP_NODELAY, as every connection of
    /// the plugin has (Go's `net` package turns Nagle's algorithm off on each TCP
    /// connection it makes or accepts: `TCPConn.SetNoDelay`, "the default is true"), and
    /// as the daemon's listeners do. With Nagle on, a reply that reaches us in two
    /// messages (anything over the agent's 1 KiB per message, 1 ms apart) is written in
    /// two pieces and the second waits for the client's delayed ACK: 1,500-byte echo
    /// round trips through the drop-in had a p99 of ~45 ms instead of ~2.5 ms.
    pub(super) async fn accept(&self) -> std::io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(c, _)| {
                let _ = c.set_nodelay(true);
                Accepted::Tcp(c)
            }),
            Listener::Unix(l, _) => l.accept().await.map(|(c, _)| Accepted::Unix(c)),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn endpoints_from_properties() {
        let props = |v: Value| LocalEndpoint::from_properties(&v);
        assert_eq!(
            props(
                json!({"type": "LocalPortForwarding", "portNumber": "22", "localPortNumber": "2222"})
            ),
            Ok(LocalEndpoint::Tcp(2222))
        );
        assert_eq!(
            props(json!({"type": "LocalPortForwarding", "localPortNumber": ""})),
            Ok(LocalEndpoint::Tcp(0))
        );
        assert_eq!(
            props(
                json!({"type": "LocalPortForwarding", "localConnectionType": "unix",
                         "localUnixSocket": "/tmp/x.sock", "localPortNumber": "1"})
            ),
            Ok(LocalEndpoint::Unix(PathBuf::from("/tmp/x.sock")))
        );
        assert_eq!(
            props(json!({"portNumber": "22"})),
            Err(EndpointError::NotLocal(String::new()))
        );
        assert_eq!(
            props(json!({"type": "LocalPortForwarding", "localPortNumber": "http"})),
            Err(EndpointError::BadPort("http".into()))
        );
    }

    #[tokio::test]
    async fn accepted_tcp_connections_have_nagle_off() {
        let (listener, opened) = LocalEndpoint::Tcp(0).bind().await.unwrap();
        let Opened::Port(port) = opened else {
            panic!("{opened:?}");
        };
        let _client = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let Ok(Accepted::Tcp(conn)) = listener.accept().await else {
            panic!("no TCP connection accepted");
        };
        assert!(conn.nodelay().unwrap());
    }

    #[tokio::test]
    async fn a_unix_socket_is_removed_with_its_listener() {
        let dir = std::env::temp_dir().join(format!("bastion-plugin-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let (listener, opened) = LocalEndpoint::Unix(path.clone()).bind().await.unwrap();
        assert_eq!(opened, Opened::UnixSocket(path.display().to_string()));
        let client = UnixStream::connect(&path).await.unwrap();
        assert!(matches!(listener.accept().await, Ok(Accepted::Unix(_))));
        drop(client);
        drop(listener);
        assert!(!path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
