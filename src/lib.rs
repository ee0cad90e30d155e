//! bastion: keyless, on-demand access to private AWS databases over AWS Systems Manager
//! Session Manager.
//!
//! The crate is layered (see `proto-docs/README.md`):
//!
//! * [`proto`]: the sans-IO Session Manager data-channel protocol. It takes bytes and
//!   time as inputs and returns bytes, timers and events; it never touches a socket, a
//!   clock or an async runtime.
//!
//! The IO drivers, the daemon, the control API and the simulator are built on top of it.
//! Dependencies between the modules above it point one way:
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
pub mod proto;
pub mod sim;
pub mod transport;
