//! Pure helpers for talking to AWS services: request builders and signers that take
//! credentials, names and time as inputs and return strings, with no IO and no clock.
//!
//! * [`eice_presign`]: the SigV4-presigned `wss://…/openTunnel` URL of an EC2 Instance
//!   Connect Endpoint, byte-identical to the one aws-cli builds.

pub mod eice_presign;
pub mod ssm;
