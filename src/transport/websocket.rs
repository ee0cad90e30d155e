//! Dialing the Session Manager data-channel websocket.
//!
//! As the plugin does ([P] `src/websocketutil/websocketutil.go` fn `OpenConnection`):
//! the StreamUrl is used exactly as returned, with no authentication header and no
//! subprotocol; the only credential is the token inside the first TEXT message.
//! `wss://` uses rustls (ring) with the platform's root certificates; `ws://` is
//! refused unless the host is a loopback address (the simulator).

use std::net::IpAddr;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A connected data-channel websocket.
pub type DataChannelSocket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Why the websocket could not be opened.
#[derive(Debug, Error)]
pub enum DialError {
    /// The URL cannot be parsed or has no host.
    #[error("invalid stream URL: {0}")]
    BadUrl(String),
    /// `ws://` to a host that is not loopback: tokens would cross the network in clear.
    #[error("refusing unencrypted ws:// to non-loopback host {0}; only wss:// is allowed")]
    InsecureScheme(String),
    /// The TCP, TLS or websocket handshake failed.
    #[error("websocket connect failed: {0}")]
    Connect(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The connect did not finish in time.
    #[error("websocket connect timed out after {0:?}")]
    Timeout(Duration),
}

/// True for `localhost` and loopback IP literals.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn check_scheme(url: &str) -> Result<(), DialError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| DialError::BadUrl("missing scheme".into()))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit('@').next().unwrap_or_default();
    let host = if host_port.starts_with('[') {
        host_port.split(']').next().map(|h| format!("{h}]"))
    } else {
        host_port.split(':').next().map(str::to_owned)
    }
    .unwrap_or_default();
    if host.is_empty() {
        return Err(DialError::BadUrl("missing host".into()));
    }
    match scheme.to_ascii_lowercase().as_str() {
        "wss" => Ok(()),
        "ws" if is_loopback_host(&host) => Ok(()),
        "ws" => Err(DialError::InsecureScheme(host)),
        other => Err(DialError::BadUrl(format!("unsupported scheme {other}"))),
    }
}

/// Installs ring as the process-wide rustls provider (idempotent). Both ring and
/// aws-lc-rs may be linked in; without an explicit choice rustls refuses to pick.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Opens the websocket to `url` (the StreamUrl, unmodified).
pub async fn dial(url: &str, timeout: Duration) -> Result<DataChannelSocket, DialError> {
    check_scheme(url)?;
    install_crypto_provider();
    let request = url
        .into_client_request()
        .map_err(|e| DialError::BadUrl(e.to_string()))?;
    let connect = tokio_tungstenite::connect_async_tls_with_config(request, None, true, None);
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Err(DialError::Timeout(timeout)),
        Ok(Err(e)) => Err(DialError::Connect(Box::new(e))),
        Ok(Ok((socket, _response))) => Ok(socket),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_only_to_loopback() {
        assert!(
            check_scheme("ws://127.0.0.1:8080/v1/data-channel/s?role=publish_subscribe").is_ok()
        );
        assert!(check_scheme("ws://localhost/x").is_ok());
        assert!(check_scheme("ws://[::1]:9/x").is_ok());
        assert!(check_scheme("wss://ssmmessages.eu-west-1.amazonaws.com/v1/x").is_ok());
        assert!(matches!(
            check_scheme("ws://ssmmessages.eu-west-1.amazonaws.com/v1/x"),
            Err(DialError::InsecureScheme(_))
        ));
        assert!(matches!(
            check_scheme("ws://10.0.0.1/x"),
            Err(DialError::InsecureScheme(_))
        ));
        assert!(matches!(
            check_scheme("http://127.0.0.1/"),
            Err(DialError::BadUrl(_))
        ));
        assert!(matches!(
            check_scheme("no-scheme"),
            Err(DialError::BadUrl(_))
        ));
        assert!(matches!(
            check_scheme("ws:///path"),
            Err(DialError::BadUrl(_))
        ));
    }
}
