//! Moves one local connection's bytes to and from its [`TunnelStream`].
//!
//! An idle connection holds no buffer: reads wait for readiness first and take a
//! buffer only when bytes are there, and the buffer goes once the socket is drained
//! (a thousand idle IDE connections cost little memory). Bytes read are handed on
//! without a copy; bytes received are written straight from the chunk the session
//! delivered.

use std::future::Future;
use std::io;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream, tcp, unix};

use super::ssm::TunnelStream;

/// Smallest read buffer, and the spare room below which a new one is taken. Reads
/// start here: a query or a keystroke should not cost a large buffer, which the
/// allocator would keep after a thousand connections each sent a few bytes at once.
const READ_MIN: usize = 1024;
/// Largest read buffer; a read that fills its buffer doubles the next one up to this.
const READ_MAX: usize = 16 * 1024;

/// The read half of a local connection: readiness, then non-blocking reads.
pub trait ReadHalf: Send {
    /// Waits until a read may make progress.
    fn readable(&self) -> impl Future<Output = io::Result<()>> + Send;
    /// Reads what is there without waiting (`WouldBlock` when nothing is).
    fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize>;
}

/// A local connection that splits into an owned read half and write half.
pub trait LocalConnection: Send + 'static {
    /// The read half.
    type Read: ReadHalf;
    /// The write half.
    type Write: AsyncWrite + Unpin + Send;
    /// Splits the connection.
    fn into_halves(self) -> (Self::Read, Self::Write);
}

macro_rules! local_connection {
    ($stream:ty, $read:ty, $write:ty) => {
        impl ReadHalf for $read {
            fn readable(&self) -> impl Future<Output = io::Result<()>> + Send {
                <$read>::readable(self)
            }
            fn try_read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
                <$read>::try_read_buf(self, buf)
            }
        }

        impl LocalConnection for $stream {
            type Read = $read;
            type Write = $write;
            fn into_halves(self) -> ($read, $write) {
                self.into_split()
            }
        }
    };
}

local_connection!(TcpStream, tcp::OwnedReadHalf, tcp::OwnedWriteHalf);
local_connection!(UnixStream, unix::OwnedReadHalf, unix::OwnedWriteHalf);

/// Relays until both directions have finished (each end's half-close is passed on) or
/// either fails; returns the bytes moved (up, down). Dropping the future closes the
/// tunnelled connection.
pub async fn relay<C: LocalConnection>(conn: C, stream: TunnelStream) -> io::Result<(u64, u64)> {
    let (read, mut write) = conn.into_halves();
    let TunnelStream { mut up, mut down } = stream;
    let upload = async move {
        let mut total = 0u64;
        let mut buf = BytesMut::new();
        let mut size = READ_MIN;
        loop {
            read.readable().await?;
            if buf.capacity() - buf.len() < READ_MIN {
                buf.reserve(size);
            }
            let room = buf.capacity() - buf.len();
            match read.try_read_buf(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    total += n as u64;
                    if n == room {
                        size = (size * 2).min(READ_MAX);
                    }
                    up.send(buf.split().freeze())
                        .await
                        .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
                }
                // Drained: an idle connection keeps no buffer.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    buf = BytesMut::new();
                    size = (size / 2).max(READ_MIN);
                }
                Err(e) => return Err(e),
            }
        }
        up.finish().await;
        Ok(total)
    };
    let download = async move {
        let mut total = 0u64;
        while let Some(chunk) = down.recv().await {
            write.write_all(&chunk).await?;
            total += chunk.len() as u64;
        }
        write.shutdown().await?;
        Ok(total)
    };
    tokio::try_join!(upload, download)
}
