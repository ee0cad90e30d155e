//! IO drivers around the sans-IO protocol core: the Session Manager data channel over
//! a websocket, and the relay between a local connection and a tunnelled one.

pub mod relay;
pub mod ssm;
pub mod websocket;
