//! Sans-IO implementation of the Session Manager data-channel protocol.
//!
//! Every rule here names its source in the reference implementations,
//! `aws/session-manager-plugin` ("[P]") and `aws/amazon-ssm-agent` ("[A]"); the full
//! specification is `proto-docs/`.
//!
//! Nothing in this module performs IO or reads a clock: callers pass bytes and `now`
//! in, and take frames, timers and events out.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod channel;
pub mod crypto;
pub mod kind;
pub mod liveness;
pub mod message;
pub mod payload;
pub mod port;
pub mod rtt;
pub mod session;
pub mod smux;
pub mod version;
