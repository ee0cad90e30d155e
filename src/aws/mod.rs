//! Talking to AWS services.
//!
//! * [`ssm`]: StartSession, ResumeSession and TerminateSession through aws-sdk-ssm.
//! * [`ec2`]: a small EC2 Query API client (DescribeInstances for `target_tags`).
//! * [`eice_presign`]: the SigV4-presigned `wss://…/openTunnel` URL of an EC2 Instance
//!   Connect Endpoint, byte-identical to the one aws-cli builds.

pub mod ec2;
pub mod eice_presign;
pub mod ssm;
