//! Client-side measurements against a local port (a tunnel's or a server's).

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::servers::pattern;

pub async fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let _ = c.set_nodelay(true);
    c
}

/// Sends `data` to the sink on `port`; MB/s from connect to the digest coming back.
pub async fn upload(port: u16, data: &[u8]) -> f64 {
    let want = Sha256::digest(data);
    let started = Instant::now();
    let mut c = connect(port).await;
    c.write_u64(data.len() as u64).await.expect("write");
    c.write_all(data).await.expect("write");
    let mut got = [0u8; 32];
    c.read_exact(&mut got).await.expect("digest");
    assert_eq!(&got[..], &want[..], "upload SHA-256");
    data.len() as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// Fetches `len` bytes from the source on `port`; checks them; (MB/s, seconds).
pub async fn download(port: u16, len: usize) -> (f64, f64) {
    let started = Instant::now();
    let mut c = connect(port).await;
    c.write_u64(len as u64).await.expect("write");
    let mut got = Vec::with_capacity(len);
    c.read_to_end(&mut got).await.expect("read");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(got.len(), len, "download length");
    assert_eq!(
        Sha256::digest(&got),
        Sha256::digest(pattern(len)),
        "download SHA-256"
    );
    (len as f64 / secs / 1e6, secs)
}

/// `conns` concurrent downloads of `len` bytes each: aggregate MB/s (all bytes over the
/// wall time from the first connect to the last byte).
pub async fn aggregate_download(port: u16, conns: usize, len: usize) -> f64 {
    let started = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(download(port, len)))
        .collect();
    for t in tasks {
        t.await.expect("download task");
    }
    (conns * len) as f64 / started.elapsed().as_secs_f64() / 1e6
}

/// p50, p99 and max.
pub fn percentiles(mut v: Vec<Duration>) -> [Duration; 3] {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    [at(0.5), at(0.99), v[v.len() - 1]]
}

/// `n` sequential round trips of `size` bytes through the echo server on `port`.
pub async fn round_trips(port: u16, n: usize, size: usize) -> [Duration; 3] {
    let mut c = connect(port).await;
    let msg = vec![7u8; size];
    let mut back = vec![0u8; size];
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(&msg).await.expect("write");
        c.read_exact(&mut back).await.expect("read");
        times.push(t.elapsed());
    }
    percentiles(times)
}

/// One new connection to the echo server on `port`: connect, one byte there and back.
pub async fn first_byte(port: u16) -> Duration {
    let t = Instant::now();
    let mut c = connect(port).await;
    c.write_all(b"x").await.expect("write");
    let mut b = [0u8; 1];
    c.read_exact(&mut b).await.expect("read");
    t.elapsed()
}

/// `n` sequential new connections (connect → first byte back): p50, p99.
pub async fn connects(port: u16, n: usize) -> [Duration; 2] {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        times.push(first_byte(port).await);
    }
    let p = percentiles(times);
    [p[0], p[1]]
}
