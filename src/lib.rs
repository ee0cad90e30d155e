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
