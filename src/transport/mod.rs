//! IO drivers around the sans-IO protocol core: the Session Manager data channel over
//! a websocket.

pub mod ssm;
pub mod websocket;
