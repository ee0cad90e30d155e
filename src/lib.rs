//! bastion: keyless, on-demand access to private AWS databases over AWS Systems Manager
//! Session Manager. This crate is the product: the daemon `bastiond`, the CLI
//! `bastionctl` (also a drop-in `session-manager-plugin`), and the library they share.
//!
//! # Layout
//!
//! The workspace has three crates, each using only the ones below it:
//!
//! * `bastion` (this crate):
//!   * [`daemon`]: profiles, listeners, the session pool, the control API server
//!     (Unix socket, HTTP/JSON, peer uid checked).
//!   * [`ondemand`]: where a tunnel lands when no bastion runs: EC2 / Fargate bastions,
//!     their registry (local file or DynamoDB), the session ledger.
//!   * [`transport`]: the IO driver of a Session Manager session (signed websocket,
//!     resume, relay of local connections); thin around [`proto`].
//!   * [`aws`]: the AWS calls (SDK clients and a small EC2 Query client), SigV4 uses.
//!   * [`config`] (profile TOML), [`api`] (control-API types shared by the daemon and
//!     [`ctl`]), [`plugin`] (the drop-in's contract), [`logging`] (level caps that only
//!     lower).
//! * `bastion-proto`, re-exported as [`proto`]: the sans-IO Session Manager protocol
//!   (codec, payloads, channel, handshake, KMS crypto, smux, version rules). Bytes and
//!   `now` in; bytes, timers and events out; no tokio, socket or clock.
//! * `bastion-sim`: the simulator (service API, data plane, agent, faults) for tests,
//!   benches and `bastion-demo`; never linked into `bastiond`.
//!
//! `proto-docs/` is the wire specification, rule by rule with its source.
//!
//! # The data path of one byte
//!
//! An IDE connects to `127.0.0.1:5432`, a listener of profile `pg` ([`daemon`]). The
//! connection claims a session of the profile's pool (started on first use, on an
//! on-demand bastion if configured) and is relayed ([`transport`]) as one smux stream
//! (or the basic-mode connection) of that session. The bytes become smux PSH frames,
//! cut into `input_stream_data` ClientMessages of at most 1 KiB with a sequence number
//! and a SHA-256 digest ([`proto`] channel), written to the signed websocket; Session
//! Manager relays them to the agent, which acknowledges each and writes to the database.
//! Replies come back as `output_stream_data`, are acknowledged, reordered by sequence
//! number, demultiplexed by stream id and written to the IDE's socket.
//!
//! Dependencies between the modules of this crate point one way:
//!
//! * [`transport`] (the IO driver of a session) uses [`aws`] for what the service
//!   answered (`aws::ssm::SessionTicket`, `Resumed`) and for signing the websocket
//!   upgrade (`aws::upgrade_sign`); [`aws`] never imports [`transport`].
//! * [`api`] is the control API's wire contract: request and answer bodies, the error
//!   codes with their HTTP statuses (`api::ErrorCode`) and the socket paths. The server
//!   ([`daemon::control`]) and the client ([`ctl`]) both use it and not each other.
//! * The daemon's own errors are typed (`daemon::DaemonError` and the enums it wraps);
//!   they become `api::ApiError` only in [`daemon::control`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod aws;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod logging;
pub mod ondemand;
pub mod plugin;
pub use bastion_proto as proto;
pub mod transport;
