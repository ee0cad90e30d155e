//! Talking to AWS services.
//!
//! * [`ssm`]: StartSession, ResumeSession and TerminateSession through aws-sdk-ssm, and
//!   the calls on-demand bastions need (GetParameter, DescribeInstanceInformation,
//!   DescribeSessions).
//! * [`ec2`]: a small EC2 Query API client (DescribeInstances for `target_tags`;
//!   RunInstances and TerminateInstances for on-demand bastions).
//! * [`ecs`]: RunTask, DescribeTasks, StopTask and ListTasks for Fargate bastions.
//! * [`sts`]: GetCallerIdentity (the owner of an on-demand bastion).
//! * [`eice_presign`]: the SigV4-presigned `wss://…/openTunnel` URL of an EC2 Instance
//!   Connect Endpoint, byte-identical to the one aws-cli builds.
//! * [`upgrade_sign`]: the SigV4 headers of the data-channel websocket upgrade.
//!
//! The IO drivers (the `transport` module) depend on this module (the StartSession and
//! ResumeSession answers, the upgrade signer), never the other way round.

pub mod ec2;
pub mod ecs;
pub mod eice_presign;
pub mod ssm;
pub mod sts;
pub mod upgrade_sign;

/// Installs ring as the process-wide rustls provider (idempotent). Both ring and
/// aws-lc-rs may be linked in; without an explicit choice rustls refuses to pick. Every
/// TLS client of bastion calls it first: the AWS API clients here and the data-channel
/// websocket.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
