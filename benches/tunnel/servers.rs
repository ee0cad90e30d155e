//! The local servers every path reaches: a sink, a source and an echo server.

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The bytes the source sends (and the upload sends): cheap, not compressible by eye.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// The three servers' ports.
#[derive(Clone, Copy)]
pub struct Servers {
    /// Reads an 8-byte length, then that many bytes; answers their SHA-256.
    pub sink: u16,
    /// Reads an 8-byte length, then sends that many bytes of [`pattern`].
    pub source: u16,
    /// Echoes everything.
    pub echo: u16,
}

impl Servers {
    pub async fn start() -> Servers {
        Servers {
            sink: sink_server().await,
            source: source_server().await,
            echo: echo_server().await,
        }
    }
}

async fn sink_server() -> u16 {
    serve(|mut c| async move {
        let Ok(len) = c.read_u64().await else { return };
        let mut h = Sha256::new();
        let mut left = len as usize;
        let mut buf = vec![0u8; 256 * 1024];
        while left > 0 {
            let n = match c.read(&mut buf[..left.min(256 * 1024)]).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            h.update(&buf[..n]);
            left -= n;
        }
        let _ = c.write_all(&h.finalize()).await;
    })
    .await
}

async fn source_server() -> u16 {
    serve(|mut c| async move {
        let Ok(len) = c.read_u64().await else { return };
        let data = pattern(len as usize);
        let _ = c.write_all(&data).await;
    })
    .await
}

async fn echo_server() -> u16 {
    serve(|c| async move {
        let (mut r, mut w) = c.into_split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

async fn serve<F, Fut>(handler: F) -> u16
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((c, _)) = l.accept().await {
            let _ = c.set_nodelay(true);
            tokio::spawn(handler(c));
        }
    });
    port
}
