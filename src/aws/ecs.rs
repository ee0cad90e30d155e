//! Fargate bastions through aws-sdk-ecs: RunTask, DescribeTasks, StopTask and ListTasks,
//! with errors mapped as for SSM ([`AwsError`]).
//!
//! Session Manager reaches a task's container as the target
//! `ecs:<cluster-name>_<task-id>_<container-runtime-id>` ([`Task::ssm_target`]); ECS
//! reports the container's `runtimeId` once it runs. Endpoints come from the standard
//! settings (`AWS_ENDPOINT_URL_ECS`, `AWS_ENDPOINT_URL`).

use std::collections::BTreeMap;
use std::time::SystemTime;

use aws_sdk_ecs::types::{
    AssignPublicIp, AwsVpcConfiguration, DesiredStatus, Failure, LaunchType, NetworkConfiguration,
    Tag, TaskField,
};
use aws_types::SdkConfig;
use tracing::debug;

use super::ssm::{AwsError, map_err};

/// Most tasks one DescribeTasks call accepts.
const DESCRIBE_BATCH: usize = 100;

/// Most ListTasks pages followed before giving up.
const MAX_PAGES: usize = 1000;

/// What RunTask starts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TaskSpec {
    /// Cluster name or ARN.
    pub cluster: String,
    /// Task definition `family`, `family:revision` or ARN.
    pub task_definition: String,
    /// Subnets of the task's network interface (awsvpc).
    pub subnets: Vec<String>,
    /// Security groups of the task's network interface.
    pub security_groups: Vec<String>,
    /// Give the task a public IP (needed in a public subnet without a NAT gateway).
    pub assign_public_ip: bool,
    /// `startedBy`: at most 36 characters; [`EcsApi::tasks_started_by`] finds the tasks
    /// again by it.
    pub started_by: String,
    /// Tags of the task.
    pub tags: BTreeMap<String, String>,
    /// RunTask `clientToken`: a retry with the same token starts no second task.
    pub client_token: String,
}

/// One container of a task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// The container's name in the task definition.
    pub name: String,
    /// The container runtime's id, once the container runs.
    pub runtime_id: Option<String>,
    /// `PENDING`, `RUNNING`, `STOPPED`, …
    pub last_status: Option<String>,
}

/// A task, as DescribeTasks or RunTask describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// The task ARN.
    pub arn: String,
    /// The last path segment of the ARN.
    pub task_id: String,
    /// The cluster's ARN.
    pub cluster_arn: String,
    /// `PROVISIONING`, `PENDING`, `ACTIVATING`, `RUNNING`, `DEACTIVATING`, `STOPPING`,
    /// `DEPROVISIONING` or `STOPPED`.
    pub last_status: String,
    /// `RUNNING` or `STOPPED`.
    pub desired_status: String,
    /// Why the task stopped (or is stopping).
    pub stopped_reason: Option<String>,
    /// The task's tags (DescribeTasks with `include=TAGS`; RunTask echoes them).
    pub tags: BTreeMap<String, String>,
    /// The task's containers.
    pub containers: Vec<Container>,
    /// When the task was created.
    pub created_at: Option<SystemTime>,
}

impl Task {
    /// The Session Manager target of the named container (or, without a name, of the
    /// first container with a runtime id): `ecs:<cluster-name>_<task-id>_<runtime-id>`.
    /// `None` until the task runs and ECS reports the container's runtime id. `cluster`
    /// is the cluster's name or ARN.
    pub fn ssm_target(&self, cluster: &str, container: Option<&str>) -> Option<String> {
        if self.last_status != "RUNNING" {
            return None;
        }
        let runtime_id = match container {
            Some(name) => self
                .containers
                .iter()
                .find(|c| c.name == name)?
                .runtime_id
                .as_deref(),
            None => self.containers.iter().find_map(|c| c.runtime_id.as_deref()),
        }
        .filter(|r| !r.is_empty())?;
        Some(format!(
            "ecs:{}_{}_{runtime_id}",
            last_segment(cluster),
            self.task_id
        ))
    }

    /// Reads the SDK's task; `None` without a task ARN.
    fn from_sdk(t: &aws_sdk_ecs::types::Task) -> Option<Task> {
        let arn = t.task_arn().filter(|a| !a.is_empty())?.to_owned();
        let owned = |v: Option<&str>| v.unwrap_or_default().to_owned();
        Some(Task {
            task_id: last_segment(&arn).to_owned(),
            cluster_arn: owned(t.cluster_arn()),
            last_status: owned(t.last_status()),
            desired_status: owned(t.desired_status()),
            stopped_reason: t
                .stopped_reason()
                .filter(|r| !r.is_empty())
                .map(str::to_owned),
            tags: t
                .tags()
                .iter()
                .filter_map(|tag| {
                    Some((
                        tag.key()?.to_owned(),
                        tag.value().unwrap_or_default().to_owned(),
                    ))
                })
                .collect(),
            containers: t
                .containers()
                .iter()
                .map(|c| Container {
                    name: owned(c.name()),
                    runtime_id: c.runtime_id().filter(|r| !r.is_empty()).map(str::to_owned),
                    last_status: c.last_status().map(str::to_owned),
                })
                .collect(),
            created_at: t.created_at().and_then(|d| SystemTime::try_from(*d).ok()),
            arn,
        })
    }
}

/// The part after the last `/` (a task or cluster ARN's id or name).
fn last_segment(arn: &str) -> &str {
    arn.rsplit('/').next().unwrap_or(arn)
}

/// A RunTask or DescribeTasks `failures[]` entry as an error a user can act on.
fn failure_error(action: &str, subject: &str, f: &Failure) -> AwsError {
    let reason = f.reason().unwrap_or("unknown reason");
    let detail = f.detail().map(|d| format!(" ({d})")).unwrap_or_default();
    let hint = if reason.starts_with("RESOURCE") || reason.contains("apacity") {
        "; ECS has no capacity for it now: retry later, or add subnets in other Availability Zones"
    } else if reason == "MISSING" {
        "; check that the cluster and the task definition exist in this region"
    } else {
        ""
    };
    AwsError::Other {
        code: format!("{action}Failure"),
        message: format!("ECS could not {subject}: {reason}{detail}{hint}"),
    }
}

/// The ECS API of one account and region.
#[derive(Clone, Debug)]
pub struct EcsApi {
    client: aws_sdk_ecs::Client,
}

impl EcsApi {
    /// A client for `config`.
    pub fn new(config: &SdkConfig) -> EcsApi {
        EcsApi {
            client: aws_sdk_ecs::Client::new(config),
        }
    }

    /// RunTask of one task: launch type FARGATE, awsvpc networking in `subnets` with
    /// `security_groups`, `enableExecuteCommand` (Session Manager needs it), the spec's
    /// `startedBy`, tags and `clientToken`. A `failures[]` answer (no capacity, missing
    /// task definition, …) is an error naming the reason.
    pub async fn run_task(&self, spec: &TaskSpec) -> Result<Task, AwsError> {
        let vpc = AwsVpcConfiguration::builder()
            .set_subnets(Some(spec.subnets.clone()))
            .set_security_groups(Some(spec.security_groups.clone()))
            .assign_public_ip(if spec.assign_public_ip {
                AssignPublicIp::Enabled
            } else {
                AssignPublicIp::Disabled
            })
            .build()
            .map_err(|e| AwsError::Other {
                code: "request".into(),
                message: e.to_string(),
            })?;
        let tags: Vec<Tag> = spec
            .tags
            .iter()
            .map(|(k, v)| Tag::builder().key(k).value(v).build())
            .collect();
        let out = self
            .client
            .run_task()
            .cluster(&spec.cluster)
            .task_definition(&spec.task_definition)
            .count(1)
            .launch_type(LaunchType::Fargate)
            .network_configuration(
                NetworkConfiguration::builder()
                    .awsvpc_configuration(vpc)
                    .build(),
            )
            .enable_execute_command(true)
            .started_by(&spec.started_by)
            .set_tags((!tags.is_empty()).then_some(tags))
            .client_token(&spec.client_token)
            .send()
            .await
            .map_err(|e| cluster_hint(map_err(e), &spec.cluster))?;
        let subject = format!(
            "start a task of {} in cluster {}",
            spec.task_definition, spec.cluster
        );
        if let Some(f) = out.failures().first() {
            return Err(failure_error("RunTask", &subject, f));
        }
        let task = out.tasks().iter().find_map(Task::from_sdk).ok_or_else(|| {
            AwsError::Malformed("RunTask returned neither a task nor a failure".into())
        })?;
        debug!(task = %task.arn, status = %task.last_status, "RunTask");
        Ok(task)
    }

    /// DescribeTasks (`include=TAGS`) of one task (id or ARN); `None` when ECS does not
    /// know it (a `MISSING` failure: it never existed, or stopped long ago).
    pub async fn describe_task(&self, cluster: &str, task: &str) -> Result<Option<Task>, AwsError> {
        let out = self
            .client
            .describe_tasks()
            .cluster(cluster)
            .tasks(task)
            .include(TaskField::Tags)
            .send()
            .await
            .map_err(|e| cluster_hint(map_err(e), cluster))?;
        if let Some(found) = out.tasks().iter().find_map(Task::from_sdk) {
            return Ok(Some(found));
        }
        match out.failures().first() {
            Some(f) if f.reason() != Some("MISSING") => Err(failure_error(
                "DescribeTasks",
                &format!("describe task {task}"),
                f,
            )),
            _ => Ok(None),
        }
    }

    /// StopTask with `reason` (shown in the console and as `stoppedReason`). A task ECS
    /// no longer knows counts as stopped.
    pub async fn stop_task(&self, cluster: &str, task: &str, reason: &str) -> Result<(), AwsError> {
        let result = self
            .client
            .stop_task()
            .cluster(cluster)
            .task(task)
            .reason(reason)
            .send()
            .await
            .map_err(|e| cluster_hint(map_err(e), cluster));
        match result {
            Ok(_) => Ok(()),
            Err(AwsError::Other { code, message })
                if code == "InvalidParameterException" && message.contains("not found") =>
            {
                debug!(task, "StopTask: the task is already gone");
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// ListTasks (`startedBy`, desired status RUNNING, all pages), then DescribeTasks of
    /// what it lists: the tasks a bastion launcher started that are not stopping.
    pub async fn tasks_started_by(
        &self,
        cluster: &str,
        started_by: &str,
    ) -> Result<Vec<Task>, AwsError> {
        let mut arns: Vec<String> = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            let out = self
                .client
                .list_tasks()
                .cluster(cluster)
                .started_by(started_by)
                .desired_status(DesiredStatus::Running)
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(|e| cluster_hint(map_err(e), cluster))?;
            arns.extend(out.task_arns().iter().cloned());
            pages += 1;
            match out.next_token().filter(|t| !t.is_empty()) {
                None => break,
                Some(next) if token.as_deref() == Some(next) || pages >= MAX_PAGES => {
                    return Err(AwsError::Malformed(
                        "ListTasks did not end (repeated or endless NextToken)".into(),
                    ));
                }
                Some(next) => token = Some(next.to_owned()),
            }
        }
        let mut tasks = Vec::with_capacity(arns.len());
        for batch in arns.chunks(DESCRIBE_BATCH) {
            let out = self
                .client
                .describe_tasks()
                .cluster(cluster)
                .set_tasks(Some(batch.to_vec()))
                .include(TaskField::Tags)
                .send()
                .await
                .map_err(|e| cluster_hint(map_err(e), cluster))?;
            tasks.extend(out.tasks().iter().filter_map(Task::from_sdk));
        }
        Ok(tasks)
    }
}

/// `ClusterNotFoundException` names the cluster and the fix.
fn cluster_hint(e: AwsError, cluster: &str) -> AwsError {
    match e {
        AwsError::Other { code, message } if code == "ClusterNotFoundException" => {
            AwsError::Other {
                message: format!(
                    "ECS cluster {cluster} does not exist in this region ({message}); create it \
                     or fix the profile's cluster"
                ),
                code,
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(status: &str, containers: &[(&str, Option<&str>)]) -> Task {
        Task {
            arn: "arn:aws:ecs:us-east-1:123456789012:task/bastions/0f3c9a1b2c3d4e5f".into(),
            task_id: "0f3c9a1b2c3d4e5f".into(),
            cluster_arn: "arn:aws:ecs:us-east-1:123456789012:cluster/bastions".into(),
            last_status: status.into(),
            desired_status: "RUNNING".into(),
            stopped_reason: None,
            tags: BTreeMap::new(),
            containers: containers
                .iter()
                .map(|(n, r)| Container {
                    name: (*n).into(),
                    runtime_id: r.map(str::to_owned),
                    last_status: Some(status.into()),
                })
                .collect(),
            created_at: None,
        }
    }

    #[test]
    fn ssm_target_names_cluster_task_and_runtime_id() {
        let t = task(
            "RUNNING",
            &[
                ("sidecar", None),
                ("bastion", Some("0f3c9a1b2c3d4e5f-2531612879")),
            ],
        );
        let want = "ecs:bastions_0f3c9a1b2c3d4e5f_0f3c9a1b2c3d4e5f-2531612879";
        assert_eq!(t.ssm_target("bastions", None).as_deref(), Some(want));
        assert_eq!(
            t.ssm_target(&t.cluster_arn, Some("bastion")).as_deref(),
            Some(want)
        );
        assert_eq!(t.ssm_target("bastions", Some("sidecar")), None);
        assert_eq!(t.ssm_target("bastions", Some("other")), None);
        let pending = task("PENDING", &[("bastion", Some("x-1"))]);
        assert_eq!(pending.ssm_target("bastions", None), None);
    }

    #[test]
    fn failures_name_the_reason_and_the_fix() {
        let f = Failure::builder().reason("MISSING").arn("arn:x").build();
        let e = failure_error("RunTask", "start a task of td in cluster c", &f);
        assert!(e.to_string().contains("MISSING"), "{e}");
        assert!(e.to_string().contains("task definition exist"), "{e}");
        let f = Failure::builder()
            .reason("Capacity is unavailable at this time.")
            .build();
        let e = failure_error("RunTask", "start", &f);
        assert!(e.to_string().contains("retry later"), "{e}");
    }
}
