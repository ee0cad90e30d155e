//! Dialing the Session Manager data-channel websocket.
//!
//! As the plugin does ([P] `src/websocketutil/websocketutil.go` fn `OpenConnection`):
//! the StreamUrl is used exactly as returned, no subprotocol, and the SigV4 headers of
//! [`crate::aws::upgrade_sign`] on the upgrade GET (plugin 1.2.764.0 and later); the token
//! goes inside the first TEXT message.
//! `wss://` uses rustls (ring) with the platform's root certificates; `ws://` is
//! refused unless the host is a loopback address (the simulator).
//!
//! `wss://` goes through the proxy that the environment names for HTTPS, as the AWS SDK
//! calls do (`HTTPS_PROXY` / `https_proxy`, else `ALL_PROXY`, minus `NO_PROXY`; see
//! [`Matcher::from_env`]): a `CONNECT host:443` tunnel, with `Proxy-Authorization: Basic`
//! when the proxy URL carries a user. `ws://` (loopback only) always goes direct.

use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::Duration;

use http::HeaderValue;
use hyper_util::client::proxy::matcher::Matcher;
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::aws::install_crypto_provider;
use crate::aws::upgrade_sign::UpgradeHeaders;

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
    /// The TCP connection to the host or the proxy failed.
    #[error("cannot connect to {0}: {1}")]
    Tcp(String, #[source] std::io::Error),
    /// The proxy refused or garbled the CONNECT tunnel.
    #[error("proxy {0}: {1}")]
    Proxy(String, String),
    /// The TLS or websocket handshake failed.
    #[error("websocket connect failed: {0}")]
    Connect(#[source] Box<tokio_tungstenite::tungstenite::Error>),
    /// The connect did not finish in time.
    #[error("websocket connect timed out after {0:?}")]
    Timeout(Duration),
    /// The StreamUrl's host is not a Session Manager data-channel endpoint: signed
    /// upgrades carry credentials-derived headers and must go nowhere else.
    #[error(
        "refusing to connect to {0}: not a Session Manager endpoint (ssmmessages.<region>.amazonaws.com \
         and its FIPS, dual-stack, China and VPC-endpoint forms); name a private endpoint with the \
         profile setting stream_url_hosts"
    )]
    NotSessionManager(String),
}

/// The URL's host (lowercase, brackets kept for IPv6), or an error.
fn url_host(url: &str) -> Result<String, DialError> {
    let (_, rest) = url
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
    Ok(host.to_ascii_lowercase())
}

/// An AWS region name: `us-east-1`, `eu-central-2`, `us-gov-west-1`, `cn-north-1`.
fn is_region(label: &str) -> bool {
    let parts: Vec<&str> = label.split('-').collect();
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[0].bytes().all(|b| b.is_ascii_lowercase())
        && parts[1..parts.len() - 1]
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase()))
        && parts[parts.len() - 1].parse::<u8>().is_ok_and(|n| n > 0)
}

/// True for the Session Manager data-channel hosts (plugin 1.2.889.0 started to check
/// this; its exact rule is not published, so this one is ours, from the endpoint names
/// AWS documents for `ssmmessages`):
/// `ssmmessages[-fips].<region>.amazonaws.com[.cn]`, dual-stack
/// `ssmmessages[-fips].<region>.api.aws` / `.api.amazonwebservices.com.cn`, and
/// interface VPC endpoints `vpce-<id>[-<az>].ssmmessages.<region>.vpce.amazonaws.com[.cn]`.
pub fn is_session_manager_host(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    const SUFFIXES: &[&str] = &[
        ".amazonaws.com",
        ".amazonaws.com.cn",
        ".api.aws",
        ".api.amazonwebservices.com.cn",
    ];
    let Some(rest) = SUFFIXES.iter().find_map(|s| host.strip_suffix(s)) else {
        return false;
    };
    let labels: Vec<&str> = rest.split('.').collect();
    match labels.as_slice() {
        [service, region] => {
            (*service == "ssmmessages" || *service == "ssmmessages-fips") && is_region(region)
        }
        [vpce, "ssmmessages", region, "vpce"] => {
            vpce.starts_with("vpce-")
                && vpce.len() > 5
                && vpce.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && is_region(region)
        }
        _ => false,
    }
}

/// Checks, before anything is sent, that `url` goes to Session Manager: `wss://` to a
/// [`is_session_manager_host`] host or to one of `extra_hosts` (a private endpoint name
/// the user configured), or `ws://` to loopback (the simulator).
pub fn check_stream_url(url: &str, extra_hosts: &[String]) -> Result<(), DialError> {
    check_scheme(url)?;
    let host = url_host(url)?;
    if is_loopback_host(&host)
        || is_session_manager_host(&host)
        || extra_hosts.iter().any(|h| h.eq_ignore_ascii_case(&host))
    {
        Ok(())
    } else {
        Err(DialError::NotSessionManager(host))
    }
}

/// True for `localhost` and loopback IP literals.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn check_scheme(url: &str) -> Result<(), DialError> {
    let (scheme, _) = url
        .split_once("://")
        .ok_or_else(|| DialError::BadUrl("missing scheme".into()))?;
    let host = url_host(url)?;
    match scheme.to_ascii_lowercase().as_str() {
        "wss" => Ok(()),
        "ws" if is_loopback_host(&host) => Ok(()),
        "ws" => Err(DialError::InsecureScheme(host)),
        other => Err(DialError::BadUrl(format!("unsupported scheme {other}"))),
    }
}

/// The environment's proxy settings, read once per process (as the SDK's client does).
fn env_proxy() -> &'static Matcher {
    static PROXY: OnceLock<Matcher> = OnceLock::new();
    PROXY.get_or_init(Matcher::from_env)
}

/// Opens the websocket to `url` (the StreamUrl, unmodified), through the environment's
/// HTTPS proxy when one applies.
pub async fn dial(
    url: &str,
    headers: &UpgradeHeaders,
    timeout: Duration,
) -> Result<DataChannelSocket, DialError> {
    dial_via(url, headers, timeout, env_proxy()).await
}

/// [`dial`] with explicit proxy settings.
pub async fn dial_via(
    url: &str,
    headers: &UpgradeHeaders,
    timeout: Duration,
    proxy: &Matcher,
) -> Result<DataChannelSocket, DialError> {
    check_scheme(url)?;
    install_crypto_provider();
    let mut request = url
        .into_client_request()
        .map_err(|e| DialError::BadUrl(e.to_string()))?;
    for (name, value) in &headers.0 {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| DialError::BadUrl(format!("bad upgrade header name {name}")))?;
        let mut value = HeaderValue::from_str(value).map_err(|_| {
            DialError::BadUrl(format!("header {name} has a value HTTP cannot carry"))
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert(name, value);
    }
    let uri = request.uri();
    let tls = uri
        .scheme_str()
        .is_some_and(|s| s.eq_ignore_ascii_case("wss"));
    let host = uri
        .host()
        .ok_or_else(|| DialError::BadUrl("missing host".into()))?
        .to_owned();
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let via = if tls {
        format!("https://{host}:{port}/")
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| proxy.intercept(&u))
    } else {
        None
    };
    let connect = async {
        let stream = match &via {
            Some(p) => connect_via_proxy(p.uri(), p.basic_auth(), &host, port).await?,
            None => {
                let bare = host.trim_start_matches('[').trim_end_matches(']');
                TcpStream::connect((bare, port))
                    .await
                    .map_err(|e| DialError::Tcp(format!("{host}:{port}"), e))?
            }
        };
        let _ = stream.set_nodelay(true);
        tokio_tungstenite::client_async_tls_with_config(request, stream, Some(ws_config()), None)
            .await
            .map_err(|e| DialError::Connect(Box::new(e)))
    };
    match tokio::time::timeout(timeout, connect).await {
        Err(_) => Err(DialError::Timeout(timeout)),
        Ok(Err(e)) => Err(e),
        Ok(Ok((socket, _response))) => Ok(socket),
    }
}

/// Websocket settings: a 32 KiB read buffer instead of tungstenite's 128 KiB, which it
/// zero-fills before every read; most reads return one or a few frames of about 1 KiB
/// (the service's messages carry at most 1 KiB of data, and every one is acknowledged),
/// so the fill cost more than the reads themselves (4.5% of the daemon's CPU time in an
/// upload profile).
fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(32 * 1024)
}

/// Largest proxy reply head we read.
const MAX_PROXY_REPLY: usize = 16 * 1024;

/// Opens a `CONNECT host:port` tunnel through an HTTP proxy and returns the stream
/// positioned after the proxy's reply head.
pub async fn connect_via_proxy(
    proxy: &http::Uri,
    auth: Option<&HeaderValue>,
    host: &str,
    port: u16,
) -> Result<TcpStream, DialError> {
    // The proxy's address, without any credentials.
    let proxy_host = proxy.host().unwrap_or_default();
    let bare = proxy_host.trim_start_matches('[').trim_end_matches(']');
    let proxy_port = proxy.port_u16().unwrap_or(match proxy.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    let name = format!("{proxy_host}:{proxy_port}");
    if proxy.scheme_str() == Some("https") {
        return Err(DialError::Proxy(
            name,
            "TLS to the proxy itself (https:// proxy URL) is not supported; use http://".into(),
        ));
    }
    let mut stream = TcpStream::connect((bare, proxy_port))
        .await
        .map_err(|e| DialError::Tcp(name.clone(), e))?;
    let mut head = format!("CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n");
    if let Some(auth) = auth.and_then(|a| a.to_str().ok()) {
        head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .await
        .map_err(|e| DialError::Tcp(name.clone(), e))?;
    // Read the reply head byte by byte: nothing after it may be consumed, since the TLS
    // handshake follows on the same stream.
    let mut reply = Vec::with_capacity(256);
    while !reply.ends_with(b"\r\n\r\n") {
        if reply.len() >= MAX_PROXY_REPLY {
            return Err(DialError::Proxy(name, "reply head too long".into()));
        }
        let b = stream
            .read_u8()
            .await
            .map_err(|e| DialError::Proxy(name.clone(), format!("closed during CONNECT: {e}")))?;
        reply.push(b);
    }
    let status_line = String::from_utf8_lossy(&reply);
    let status_line = status_line.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let version_ok = parts.next().is_some_and(|v| v.starts_with("HTTP/1."));
    match parts.next() {
        Some(code) if version_ok && code.len() == 3 && code.starts_with('2') => Ok(stream),
        _ => Err(DialError::Proxy(
            name,
            format!("refused CONNECT {host}:{port}: {status_line}"),
        )),
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

#[cfg(test)]
mod proxy_tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::net::TcpListener;

    /// A CONNECT proxy: records each request head, answers `reply`, and (for 200)
    /// splices the client to `upstream`.
    async fn proxy(reply: &'static str, upstream: Option<u16>) -> (u16, Arc<Mutex<Vec<String>>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    match c.read_u8().await {
                        Ok(b) => head.push(b),
                        Err(_) => break,
                    }
                }
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&head).into_owned());
                let _ = c.write_all(reply.as_bytes()).await;
                if let Some(up) = upstream {
                    let mut u = TcpStream::connect(("127.0.0.1", up)).await.unwrap();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
                    });
                }
            }
        });
        (port, seen)
    }

    #[tokio::test]
    async fn connect_tunnel_carries_a_websocket() {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        // A websocket echo server behind the proxy.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ws_port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (c, _) = l.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(c).await.unwrap();
            while let Some(Ok(m)) = ws.next().await {
                if m.is_binary() && ws.send(m).await.is_err() {
                    break;
                }
            }
        });
        let (pport, seen) = proxy(
            "HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\n",
            Some(ws_port),
        )
        .await;
        let proxy_uri: http::Uri = format!("http://127.0.0.1:{pport}").parse().unwrap();
        let auth = HeaderValue::from_static("Basic dTpw");
        let stream = connect_via_proxy(&proxy_uri, Some(&auth), "ssmmessages.example", ws_port)
            .await
            .expect("tunnel");
        let url = format!("ws://127.0.0.1:{ws_port}/v1/data-channel/s");
        let (mut ws, _) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        ws.send(Message::binary(vec![7u8; 3000])).await.unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_data().as_ref(), &[7u8; 3000][..]);
        let head = seen.lock().unwrap()[0].clone();
        assert!(
            head.starts_with(&format!(
                "CONNECT ssmmessages.example:{ws_port} HTTP/1.1\r\n"
            )),
            "{head}"
        );
        assert!(
            head.contains("Proxy-Authorization: Basic dTpw\r\n"),
            "{head}"
        );
    }

    #[tokio::test]
    async fn wss_dials_use_the_https_proxy_unless_no_proxy_matches() {
        let (pport, seen) = proxy(
            "HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n",
            None,
        )
        .await;
        let matcher = Matcher::builder()
            .https(format!("http://user:secret@127.0.0.1:{pport}"))
            .no("bypass.invalid")
            .build();
        let url =
            "wss://ssmmessages.bastion-test.invalid/v1/data-channel/s-1?role=publish_subscribe";
        let err = dial_via(
            url,
            &UpgradeHeaders::default(),
            Duration::from_secs(5),
            &matcher,
        )
        .await
        .expect_err("proxy refuses");
        assert!(
            matches!(&err, DialError::Proxy(_, m) if m.contains("407")),
            "{err}"
        );
        let head = seen.lock().unwrap()[0].clone();
        assert!(
            head.starts_with("CONNECT ssmmessages.bastion-test.invalid:443 HTTP/1.1\r\n"),
            "{head}"
        );
        // user:secret, base64.
        assert!(
            head.contains("Proxy-Authorization: Basic dXNlcjpzZWNyZXQ="),
            "{head}"
        );
        // NO_PROXY: direct (and .invalid does not resolve), the proxy sees nothing new.
        let err = dial_via(
            "wss://ssmmessages.bypass.invalid/v1/x",
            &UpgradeHeaders::default(),
            Duration::from_secs(5),
            &matcher,
        )
        .await
        .expect_err("no such host");
        assert!(matches!(err, DialError::Tcp(..)), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 1);
        // ws:// to loopback never uses the proxy.
        let err = dial_via(
            "ws://127.0.0.1:1/x",
            &UpgradeHeaders::default(),
            Duration::from_secs(5),
            &matcher,
        )
        .await
        .expect_err("nothing listens on port 1");
        assert!(matches!(err, DialError::Tcp(..)), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn only_session_manager_hosts_are_dialled() {
        for ok in [
            "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/s?role=publish_subscribe",
            "wss://ssmmessages-fips.us-gov-west-1.amazonaws.com/v1/data-channel/s",
            "wss://ssmmessages.cn-north-1.amazonaws.com.cn/v1/data-channel/s",
            "wss://ssmmessages.eu-west-1.api.aws/v1/data-channel/s",
            "wss://vpce-0a1b2c3d4e5f6a7b8-abcdefgh.ssmmessages.eu-west-1.vpce.amazonaws.com/v1/x",
            "wss://SSMMESSAGES.US-EAST-1.AMAZONAWS.COM/v1/x",
            "ws://127.0.0.1:8080/v1/data-channel/s",
            "wss://ssm.internal.corp/v1/data-channel/s",
        ] {
            assert!(
                check_stream_url(ok, &["ssm.internal.corp".into()]).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "wss://evil.example.com/v1/data-channel/s",
            "wss://ssmmessages.us-east-1.amazonaws.com.evil.example/v1/x",
            "wss://ssm.us-east-1.amazonaws.com/v1/x",
            "wss://ssmmessages.not-a-region.amazonaws.com/v1/x",
            "wss://x.ssmmessages.us-east-1.amazonaws.com/v1/x",
            "wss://user@evil.example/v1/x",
            "ws://ssmmessages.us-east-1.amazonaws.com/v1/x",
        ] {
            assert!(check_stream_url(bad, &[]).is_err(), "{bad}");
        }
    }
}
