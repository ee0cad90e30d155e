//! Launching and terminating on-demand bastion instances: RunInstances and
//! TerminateInstances over [`Ec2Api::call`].
//!
//! RunInstances carries the launch's `ClientToken`, so a retry of `call` (or of the whole
//! launch by a restarted daemon with the recorded token) returns the instance of the
//! first attempt instead of starting a second one.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use tracing::debug;

use super::{Ec2Api, Ec2Error, Instance, XmlElement, parse_instance};

/// Longest `ClientToken` EC2 accepts.
const MAX_CLIENT_TOKEN: usize = 64;

/// A launch template to launch from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchTemplateRef {
    /// `lt-…` (sent as `LaunchTemplateId`), or a name (`LaunchTemplateName`).
    pub id_or_name: String,
    /// `$Latest`, `$Default` or a version number; `None` means the default version.
    pub version: Option<String>,
}

/// What RunInstances launches. Fields left `None` come from the launch template (or
/// from EC2's defaults: the default VPC's subnet and security group).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The launch template, if any.
    pub launch_template: Option<LaunchTemplateRef>,
    /// `ami-…`.
    pub image_id: Option<String>,
    /// E.g. `t3.micro`.
    pub instance_type: Option<String>,
    /// `subnet-…`.
    pub subnet_id: Option<String>,
    /// `sg-…` ids.
    pub security_group_ids: Vec<String>,
    /// Instance profile name, or its ARN when it starts with `arn:`.
    pub instance_profile: Option<String>,
    /// User data as plain text (base64-encoded on the wire).
    pub user_data: Option<String>,
    /// Tags for the instance and its volumes.
    pub tags: BTreeMap<String, String>,
    /// Idempotency token: at most 64 ASCII characters.
    pub client_token: String,
    /// `InstanceInitiatedShutdownBehavior=terminate`: a `shutdown` inside the instance
    /// terminates it.
    pub shutdown_terminates: bool,
}

/// The RunInstances parameters for `spec`: one instance, IMDSv2 required, the tags on
/// the instance and on its volumes.
pub fn run_instances_params(spec: &LaunchSpec) -> Vec<(String, String)> {
    let mut p: Vec<(String, String)> = Vec::new();
    let mut put = |name: &str, value: &str| p.push((name.to_owned(), value.to_owned()));
    put("MinCount", "1");
    put("MaxCount", "1");
    put("ClientToken", &spec.client_token);
    if let Some(lt) = &spec.launch_template {
        if lt.id_or_name.starts_with("lt-") {
            put("LaunchTemplate.LaunchTemplateId", &lt.id_or_name);
        } else {
            put("LaunchTemplate.LaunchTemplateName", &lt.id_or_name);
        }
        if let Some(v) = &lt.version {
            put("LaunchTemplate.Version", v);
        }
    }
    if let Some(v) = &spec.image_id {
        put("ImageId", v);
    }
    if let Some(v) = &spec.instance_type {
        put("InstanceType", v);
    }
    if let Some(v) = &spec.subnet_id {
        put("SubnetId", v);
    }
    for (n, sg) in spec.security_group_ids.iter().enumerate() {
        put(&format!("SecurityGroupId.{}", n + 1), sg);
    }
    if let Some(profile) = &spec.instance_profile {
        if profile.starts_with("arn:") {
            put("IamInstanceProfile.Arn", profile);
        } else {
            put("IamInstanceProfile.Name", profile);
        }
    }
    if let Some(data) = &spec.user_data {
        put("UserData", &BASE64.encode(data.as_bytes()));
    }
    if spec.shutdown_terminates {
        put("InstanceInitiatedShutdownBehavior", "terminate");
    }
    put("MetadataOptions.HttpTokens", "required");
    if !spec.tags.is_empty() {
        for (s, resource) in ["instance", "volume"].iter().enumerate() {
            let s = s + 1;
            put(&format!("TagSpecification.{s}.ResourceType"), resource);
            for (n, (k, v)) in spec.tags.iter().enumerate() {
                let n = n + 1;
                put(&format!("TagSpecification.{s}.Tag.{n}.Key"), k);
                put(&format!("TagSpecification.{s}.Tag.{n}.Value"), v);
            }
        }
    }
    p
}

/// Reads a `<RunInstancesResponse>`: its single instance.
pub fn parse_run_instances(root: &XmlElement) -> Result<Instance, Ec2Error> {
    let items: Vec<&XmlElement> = root.items("instancesSet").collect();
    match items.as_slice() {
        [one] => parse_instance(one),
        other => Err(Ec2Error::Malformed(format!(
            "RunInstances returned {} instances, expected 1",
            other.len()
        ))),
    }
}

/// Reads a `<TerminateInstancesResponse>`: `(instance id, current state)` per instance.
pub fn parse_terminate_instances(root: &XmlElement) -> Result<Vec<(String, String)>, Ec2Error> {
    root.items("instancesSet")
        .map(|item| {
            let id = item
                .child_text("instanceId")
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    Ec2Error::Malformed("TerminateInstances lists an instance without id".into())
                })?;
            let state = item
                .path(&["currentState", "name"])
                .map(|n| n.text.trim())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| {
                    Ec2Error::Malformed(format!("TerminateInstances gives {id} no currentState"))
                })?;
            Ok((id.to_owned(), state.to_owned()))
        })
        .collect()
}

/// The instance ids an `InvalidInstanceID.NotFound` message names ("The instance IDs
/// 'i-1, i-2' do not exist").
pub(super) fn ids_in_message(message: &str) -> Vec<String> {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("i-") && w.len() > 2)
        .map(str::to_owned)
        .collect()
}

/// The outcome of one TerminateInstances call.
enum Batch {
    Done(Vec<(String, String)>),
    /// `InvalidInstanceID.NotFound`, with its message.
    NotFound(String),
}

impl Ec2Api {
    /// RunInstances of one instance (`MinCount=MaxCount=1`) with
    /// `MetadataOptions.HttpTokens=required`; the instance as RunInstances describes it
    /// (usually `pending`). Retried calls carry the same `ClientToken`, so they return the
    /// same instance.
    pub async fn run_instance(&self, spec: &LaunchSpec) -> Result<Instance, Ec2Error> {
        let token = &spec.client_token;
        if token.is_empty() || token.len() > MAX_CLIENT_TOKEN || !token.is_ascii() {
            return Err(Ec2Error::Config(format!(
                "the RunInstances client token must be 1 to {MAX_CLIENT_TOKEN} ASCII characters"
            )));
        }
        let root = self
            .call("RunInstances", &run_instances_params(spec))
            .await?;
        let instance = parse_run_instances(&root)?;
        debug!(instance = %instance.id, state = %instance.state, "RunInstances");
        Ok(instance)
    }

    /// TerminateInstances of `ids`: `(id, current state)` for each instance EC2 knows.
    /// Ids EC2 does not know (`InvalidInstanceID.NotFound`: never existed, or terminated
    /// long ago) are left out rather than failing the call.
    pub async fn terminate_instances(
        &self,
        ids: &[String],
    ) -> Result<Vec<(String, String)>, Ec2Error> {
        let mut remaining: Vec<String> = ids.to_vec();
        remaining.sort();
        remaining.dedup();
        // Each NotFound answer removes at least one id, so this ends.
        while !remaining.is_empty() {
            let message = match self.terminate_batch(&remaining).await? {
                Batch::Done(states) => return Ok(states),
                Batch::NotFound(message) => message,
            };
            let missing = ids_in_message(&message);
            let before = remaining.len();
            remaining.retain(|id| !missing.contains(id));
            debug!(missing = ?missing, "TerminateInstances: unknown instances left out");
            if remaining.len() == before {
                // The message names none of ours: find the unknown ones one at a time.
                let mut states = Vec::new();
                for id in &remaining {
                    if let Batch::Done(s) = self.terminate_batch(std::slice::from_ref(id)).await? {
                        states.extend(s);
                    }
                }
                return Ok(states);
            }
        }
        Ok(Vec::new())
    }

    async fn terminate_batch(&self, ids: &[String]) -> Result<Batch, Ec2Error> {
        let params: Vec<(String, String)> = ids
            .iter()
            .enumerate()
            .map(|(n, id)| (format!("InstanceId.{}", n + 1), id.clone()))
            .collect();
        match self.call("TerminateInstances", &params).await {
            Ok(root) => Ok(Batch::Done(parse_terminate_instances(&root)?)),
            Err(Ec2Error::Service { code, message, .. })
                if code == "InvalidInstanceID.NotFound" =>
            {
                Ok(Batch::NotFound(message))
            }
            Err(e) => Err(e),
        }
    }
}
