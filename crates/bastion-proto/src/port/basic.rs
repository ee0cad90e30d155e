//! Basic mode (agents that do not multiplex): one connection at a time, its bytes as
//! the stream itself, its end as the DisconnectToPort flag.
//!
//! \[P\] `basicportforwarding.go`: fn `ReadStream` sends what the local connection
//! read, then DisconnectToPort on EOF; fn `startLocalConn` takes the next connection
//! only after the previous one ended. \[A\] `port.go` serves one TCP connection per
//! DisconnectToPort cycle.

use std::collections::VecDeque;

use bytes::Bytes;

use super::StreamKey;
use crate::smux::StreamRead;

/// What waits to go up, in order.
#[derive(Debug)]
pub(super) enum Upload {
    Data(Bytes),
    /// The local connection ended: DisconnectToPort, never before its data.
    Disconnect,
}

/// Basic mode's state (mux mode keeps the same inside the smux session).
#[derive(Debug, Default)]
pub(super) struct Basic {
    /// The open connection.
    pub current: Option<StreamKey>,
    next_key: StreamKey,
    up: VecDeque<Upload>,
    pub up_bytes: usize,
    down: VecDeque<Bytes>,
    pub down_bytes: usize,
}

impl Basic {
    /// Opens the next connection if none is open.
    pub fn open(&mut self) -> Option<StreamKey> {
        if self.current.is_some() {
            return None;
        }
        let key = self.next_key;
        self.next_key = self.next_key.wrapping_add(1);
        self.current = Some(key);
        Some(key)
    }

    pub fn push_up(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.up_bytes += data.len();
        self.up.push_back(Upload::Data(data));
    }

    /// The connection ended locally: DisconnectToPort after its data; what the remote
    /// host sent after that is for nobody.
    pub fn disconnect(&mut self) {
        self.up.push_back(Upload::Disconnect);
        self.current = None;
        self.down.clear();
        self.down_bytes = 0;
    }

    /// The next piece to send, at most `max` bytes.
    pub fn pop_up(&mut self, max: usize) -> Option<Upload> {
        match self.up.pop_front()? {
            Upload::Data(mut d) => {
                let piece = d.split_to(d.len().min(max));
                self.up_bytes -= piece.len();
                if !d.is_empty() {
                    self.up.push_front(Upload::Data(d));
                }
                Some(Upload::Data(piece))
            }
            Upload::Disconnect => Some(Upload::Disconnect),
        }
    }

    /// Queues received bytes; true if the queue was empty (the connection just became
    /// readable).
    pub fn push_down(&mut self, data: Bytes) -> bool {
        let was_empty = self.down.is_empty();
        if data.is_empty() {
            return false;
        }
        self.down_bytes += data.len();
        self.down.push_back(data);
        was_empty
    }

    /// Received bytes for the open connection, at most `max`.
    pub fn pop_down(&mut self, max: usize) -> StreamRead {
        let Some(mut front) = self.down.pop_front() else {
            return StreamRead::Blocked;
        };
        let piece = front.split_to(front.len().min(max));
        if !front.is_empty() {
            self.down.push_front(front);
        }
        self.down_bytes -= piece.len();
        StreamRead::Data(piece)
    }
}
