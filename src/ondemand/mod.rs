//! On-demand bastions: EC2 instances and Fargate tasks that exist only while used.

pub mod registry;
