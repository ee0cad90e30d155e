//! The provider side of an on-demand bastion: launching, inspecting and terminating an
//! EC2 instance or a Fargate task, and telling when Session Manager can reach it.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::aws::ec2::{Ec2Api, Ec2Error, LaunchSpec, LaunchTemplateRef};
use crate::aws::ecs::{EcsApi, TaskSpec};
use crate::aws::ssm::{AwsError, SsmApi};
use crate::config::bastion::{Ami, Ec2Bastion, FargateBastion};
use crate::ondemand::userdata::LaunchValues;

/// Instance states that count as alive (not yet gone).
const LIVE_EC2_STATES: &[&str] = &["pending", "running", "stopping", "stopped"];

/// What kind of provider failure a [`CloudError`] is: what the user has to change
/// (the control API gives each its own error code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloudErrorKind {
    /// The caller lacks an IAM permission (the message names the action).
    MissingPermission,
    /// No capacity for the instance type or task now.
    Capacity,
    /// An account quota stops the launch.
    Quota,
    /// The profile's `bastion` settings are refused (subnet, AMI parameter, cluster, ...).
    InvalidConfig,
    /// No usable credentials.
    Credentials,
    /// Throttled.
    Throttled,
    /// Anything else AWS answered.
    Aws,
}

/// A provider call failed; `kind` says what kind of failure it is.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{message}")]
pub struct CloudError {
    /// What kind of failure.
    pub kind: CloudErrorKind,
    /// A sentence for the user.
    pub message: String,
    /// Whether retrying later may help.
    pub retryable: bool,
}

impl From<Ec2Error> for CloudError {
    fn from(e: Ec2Error) -> CloudError {
        let kind = match &e {
            Ec2Error::AccessDenied { .. } => CloudErrorKind::MissingPermission,
            Ec2Error::Capacity { .. } => CloudErrorKind::Capacity,
            Ec2Error::Quota { .. } => CloudErrorKind::Quota,
            Ec2Error::InvalidParameter { .. } => CloudErrorKind::InvalidConfig,
            Ec2Error::AuthFailure { .. } | Ec2Error::Credentials(_) => CloudErrorKind::Credentials,
            Ec2Error::Throttled { .. } => CloudErrorKind::Throttled,
            _ => CloudErrorKind::Aws,
        };
        CloudError {
            kind,
            retryable: e.is_retryable(),
            message: e.to_string(),
        }
    }
}

impl CloudError {
    /// Maps an SDK-backed (SSM, ECS) error of `action`.
    pub fn from_aws(action: &str, e: AwsError) -> CloudError {
        let (kind, message) = match &e {
            AwsError::AccessDenied(m) => (
                CloudErrorKind::MissingPermission,
                format!(
                    "not authorized to perform {action} (the caller needs this IAM permission): {m}"
                ),
            ),
            AwsError::Credentials(_) => (CloudErrorKind::Credentials, e.to_string()),
            AwsError::Throttled(_) => (CloudErrorKind::Throttled, format!("{action}: {e}")),
            AwsError::Other { code, .. }
                if code.contains("Capacity")
                    || code == "PlatformTaskDefinitionIncompatibilityException" =>
            {
                (CloudErrorKind::Capacity, format!("{action}: {e}"))
            }
            AwsError::Other { code, .. } if code.contains("Limit") || code.contains("Quota") => {
                (CloudErrorKind::Quota, format!("{action}: {e}"))
            }
            AwsError::Other { code, .. }
                if code.contains("InvalidParameter")
                    || code == "ClusterNotFoundException"
                    || code == "ParameterNotFound" =>
            {
                (CloudErrorKind::InvalidConfig, format!("{action}: {e}"))
            }
            _ => (CloudErrorKind::Aws, format!("{action}: {e}")),
        };
        CloudError {
            kind,
            retryable: e.is_retryable(),
            message,
        }
    }
}

/// A launched instance or task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resource {
    /// `i-…` or the task ARN.
    pub id: String,
    /// Pending, running or gone.
    pub state: ResourceState,
    /// Its tags.
    pub tags: BTreeMap<String, String>,
    /// When it was launched (Unix ms), if known.
    pub launched_ms: Option<u64>,
}

/// What the provider says about a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResourceState {
    /// Starting.
    Pending,
    /// Running; the Session Manager target once it is known.
    Running(Option<String>),
    /// An EC2 instance stopping or stopped: unusable, but still costing (its volumes)
    /// until terminated.
    Stopped,
    /// Terminated (or shutting down), or unknown.
    Gone,
}

/// An on-demand bastion provider with its AWS clients.
#[derive(Clone, Debug)]
pub enum Cloud {
    /// EC2.
    Ec2 {
        /// EC2 API.
        ec2: Ec2Api,
        /// The profile's settings.
        spec: Box<Ec2Bastion>,
    },
    /// Fargate.
    Fargate {
        /// ECS API.
        ecs: EcsApi,
        /// The profile's settings.
        spec: Box<FargateBastion>,
    },
}

/// Tag key holding the launch id.
pub const TAG_LAUNCH_ID: &str = "bastion:launch-id";

fn system_ms(t: std::time::SystemTime) -> Option<u64> {
    t.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

impl Cloud {
    /// `ec2` or `fargate`.
    pub fn kind(&self) -> &'static str {
        match self {
            Cloud::Ec2 { .. } => "ec2",
            Cloud::Fargate { .. } => "fargate",
        }
    }

    /// Launches one bastion carrying `tags` (which include [`TAG_LAUNCH_ID`]).
    pub async fn launch(
        &self,
        ssm: &SsmApi,
        tags: &BTreeMap<String, String>,
        launch: &LaunchValues,
    ) -> Result<Resource, CloudError> {
        match self {
            Cloud::Ec2 { ec2, spec } => {
                let image_id = match &spec.ami {
                    Ami::Id(id) => Some(id.clone()),
                    Ami::FromTemplate => None,
                    Ami::Parameter(name) => Some(
                        ssm.get_parameter(name)
                            .await
                            .map_err(|e| CloudError::from_aws("ssm:GetParameter (AMI)", e))?,
                    ),
                };
                let user_data = spec
                    .user_data
                    .render(launch)
                    .map_err(|message| CloudError {
                        kind: CloudErrorKind::InvalidConfig,
                        message,
                        retryable: false,
                    })?;
                let launch_spec = LaunchSpec {
                    launch_template: spec.launch_template.as_ref().map(|(id, version)| {
                        LaunchTemplateRef {
                            id_or_name: id.clone(),
                            version: version.clone(),
                        }
                    }),
                    image_id,
                    instance_type: spec.instance_type.clone(),
                    subnet_id: spec.subnet.clone(),
                    security_group_ids: spec.security_groups.clone(),
                    instance_profile: spec.instance_profile.clone(),
                    user_data: Some(user_data),
                    tags: tags.clone(),
                    client_token: launch.launch_id.clone(),
                    shutdown_terminates: true,
                };
                let instance = ec2.run_instance(&launch_spec).await?;
                Ok(ec2_resource(instance))
            }
            Cloud::Fargate { ecs, spec } => {
                let task = ecs
                    .run_task(&TaskSpec {
                        cluster: spec.cluster.clone(),
                        task_definition: spec.task_definition.clone(),
                        subnets: spec.subnets.clone(),
                        security_groups: spec.security_groups.clone(),
                        assign_public_ip: spec.assign_public_ip,
                        started_by: STARTED_BY.to_owned(),
                        tags: tags.clone(),
                        client_token: launch.launch_id.clone(),
                    })
                    .await
                    .map_err(|e| CloudError::from_aws("ecs:RunTask", e))?;
                Ok(self.task_resource(task))
            }
        }
    }

    /// The resource's current state (`Gone` when it no longer exists).
    pub async fn state(&self, id: &str) -> Result<ResourceState, CloudError> {
        match self {
            Cloud::Ec2 { ec2, .. } => {
                let filters = [crate::aws::ec2::Filter::new("instance-id", [id])];
                let found = ec2.describe_instances(&filters).await?;
                Ok(found
                    .into_iter()
                    .find(|i| i.id == id)
                    .map_or(ResourceState::Gone, |i| ec2_resource(i).state))
            }
            Cloud::Fargate { ecs, spec } => {
                let task = ecs
                    .describe_task(&spec.cluster, id)
                    .await
                    .map_err(|e| CloudError::from_aws("ecs:DescribeTasks", e))?;
                Ok(task.map_or(ResourceState::Gone, |t| self.task_resource(t).state))
            }
        }
    }

    /// Whether Session Manager reports the resource online (EC2: DescribeInstanceInformation
    /// PingStatus `Online`; Fargate: the task runs and its container has a runtime id).
    /// Returns the session target when it does.
    pub async fn online(&self, ssm: &SsmApi, id: &str) -> Result<Option<String>, CloudError> {
        match self.state(id).await? {
            ResourceState::Running(target) => match self {
                Cloud::Ec2 { .. } => {
                    let ping = ssm
                        .ping_status(id)
                        .await
                        .map_err(|e| CloudError::from_aws("ssm:DescribeInstanceInformation", e))?;
                    Ok((ping.as_deref() == Some("Online")).then(|| id.to_owned()))
                }
                Cloud::Fargate { .. } => Ok(target),
            },
            _ => Ok(None),
        }
    }

    /// Terminates the instance or stops the task (idempotent).
    pub async fn terminate(&self, id: &str, reason: &str) -> Result<(), CloudError> {
        match self {
            Cloud::Ec2 { ec2, .. } => {
                ec2.terminate_instances(&[id.to_owned()]).await?;
                Ok(())
            }
            Cloud::Fargate { ecs, spec } => ecs
                .stop_task(&spec.cluster, id, reason)
                .await
                .map_err(|e| CloudError::from_aws("ecs:StopTask", e)),
        }
    }

    /// Every live resource carrying all of `tags`.
    pub async fn find(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Resource>, CloudError> {
        match self {
            Cloud::Ec2 { ec2, .. } => Ok(ec2
                .instances_with_tags(tags, LIVE_EC2_STATES)
                .await?
                .into_iter()
                .map(ec2_resource)
                .collect()),
            Cloud::Fargate { ecs, spec } => Ok(ecs
                .tasks_started_by(&spec.cluster, STARTED_BY)
                .await
                .map_err(|e| CloudError::from_aws("ecs:ListTasks", e))?
                .into_iter()
                .map(|t| self.task_resource(t))
                .filter(|r| {
                    r.state != ResourceState::Gone
                        && tags.iter().all(|(k, v)| r.tags.get(k) == Some(v))
                })
                .collect()),
        }
    }

    fn task_resource(&self, task: crate::aws::ecs::Task) -> Resource {
        let (cluster, container) = match self {
            Cloud::Fargate { spec, .. } => (cluster_name(&spec.cluster), spec.container.as_deref()),
            Cloud::Ec2 { .. } => ("", None),
        };
        let state = match (task.desired_status.as_str(), task.last_status.as_str()) {
            ("STOPPED", _)
            | (_, "DEPROVISIONING" | "STOPPING" | "DEACTIVATING" | "STOPPED" | "DELETED") => {
                ResourceState::Gone
            }
            (_, "RUNNING") => ResourceState::Running(task.ssm_target(cluster, container)),
            _ => ResourceState::Pending,
        };
        Resource {
            id: task.arn.clone(),
            state,
            launched_ms: task.created_at.and_then(system_ms),
            tags: task.tags,
        }
    }
}

/// `startedBy` of every bastion task (ECS allows 36 characters).
pub const STARTED_BY: &str = "bastion";

/// The cluster's name from a name or an ARN (`arn:…:cluster/NAME`).
pub fn cluster_name(cluster: &str) -> &str {
    cluster.rsplit('/').next().unwrap_or(cluster)
}

fn ec2_resource(i: crate::aws::ec2::Instance) -> Resource {
    let state = match i.state.as_str() {
        "pending" => ResourceState::Pending,
        "running" => ResourceState::Running(Some(i.id.clone())),
        "stopping" | "stopped" => ResourceState::Stopped,
        _ => ResourceState::Gone,
    };
    Resource {
        launched_ms: i.launch_time.and_then(system_ms),
        id: i.id,
        state,
        tags: i.tags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_errors_get_codes_a_user_can_act_on() {
        let ec2 =
            |code: &str| CloudError::from(Ec2Error::from_code("RunInstances", 400, code, "m"));
        assert_eq!(
            ec2("UnauthorizedOperation").kind,
            CloudErrorKind::MissingPermission
        );
        assert!(
            ec2("UnauthorizedOperation")
                .message
                .contains("ec2:RunInstances")
        );
        assert_eq!(
            ec2("InsufficientInstanceCapacity").kind,
            CloudErrorKind::Capacity
        );
        assert_eq!(ec2("VcpuLimitExceeded").kind, CloudErrorKind::Quota);
        assert_eq!(ec2("InstanceLimitExceeded").kind, CloudErrorKind::Quota);
        assert_eq!(
            ec2("InvalidSubnetID.NotFound").kind,
            CloudErrorKind::InvalidConfig
        );
        assert_eq!(ec2("RequestLimitExceeded").kind, CloudErrorKind::Throttled);
        assert!(ec2("RequestLimitExceeded").retryable);
        let aws = |e| CloudError::from_aws("ecs:RunTask", e);
        let denied = aws(AwsError::AccessDenied("no".into()));
        assert_eq!(denied.kind, CloudErrorKind::MissingPermission);
        assert!(denied.message.contains("ecs:RunTask"), "{}", denied.message);
        let missing = aws(AwsError::Other {
            code: "ClusterNotFoundException".into(),
            message: "Cluster not found.".into(),
        });
        assert_eq!(missing.kind, CloudErrorKind::InvalidConfig);
        assert_eq!(
            cluster_name("arn:aws:ecs:eu-west-1:1:cluster/bastions"),
            "bastions"
        );
        assert_eq!(cluster_name("bastions"), "bastions");
    }
}
