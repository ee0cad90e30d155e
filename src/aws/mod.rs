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

pub mod ec2;
pub mod ecs;
pub mod eice_presign;
pub mod ssm;
pub mod sts;
