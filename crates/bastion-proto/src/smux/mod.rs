//! Sans-IO smux protocol version 1, wire-compatible with `github.com/xtaci/smux`
//! v1.5.15 (the agent, [A] `go.mod`) and v1.5.16 (the plugin, vendored at [P]
//! `vendor/src/github.com/xtaci/smux/`). The two versions differ only in the type of the
//! send shaper's priority, which never reaches the wire.
//!
//! In mux-mode port sessions the smux byte stream is carried, cut into arbitrary pieces,
//! in PayloadType 1 (Output) payloads of the data channel ([P]
//! `src/sessionmanagerplugin/session/portsession/muxportforwarding.go` fn
//! `transferDataToServer`, `WriteStream`; [A] `agent/session/plugins/port/port_mux.go`
//! fn `transferDataToMgs`, `HandleStreamMessage`). The plugin is the smux client and
//! opens one stream per local TCP connection; the agent is the smux server and dials the
//! destination once per accepted stream.
//!
//! * [`frame`]: the 8-byte frame header, [`Frame`], and an incremental
//!   [`FrameDecoder`] that accepts the byte stream in pieces of any size.
//! * [`session`]: [`Session`], the stream multiplexer (ids, open/close, data
//!   buffering, send scheduling, keepalive), driven by bytes and `now` passed in.
//! * [`config`]: [`Config`], the reference `DefaultConfig` with the keepalive split
//!   into its sending and its enforcing half.
//!
//! Reference file names below are relative to the vendored library, e.g. `session.go`
//! means [P] `vendor/src/github.com/xtaci/smux/session.go`. The full specification is
//! `proto-docs/smux.md`.

pub mod config;
pub mod frame;
pub mod session;

#[cfg(test)]
mod proptests;

use std::fmt;

pub use config::{Config, ConfigError};
pub use frame::{
    Cmd, EncodeError, Frame, FrameDecoder, FrameError, HEADER_SIZE, MAX_PAYLOAD, UPD_SIZE, VERSION,
};
pub use session::{
    CloseReason, Event, Role, Session, SessionError, Stats, StreamError, StreamRead,
};

/// A smux stream identifier (`sid`), a u32 sent little-endian in every frame header
/// (`frame.go` fn `rawHeader.StreamID`).
///
/// Clients open odd ids starting at 3, servers even ids starting at 2 (`session.go` fn
/// `newSession`, `OpenStream`). Id 0 is carried by NOP frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u32);

impl StreamId {
    /// The raw u32 value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u32> for StreamId {
    fn from(v: u32) -> StreamId {
        StreamId(v)
    }
}
