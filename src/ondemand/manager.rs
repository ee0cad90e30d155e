//! The lifecycle of one profile's on-demand bastion:
//!
//! ```text
//! (none) → launching → waiting_online → ready ⇄ idle → terminating → (gone)
//! ```
//!
//! Each phase is written to the registry before the step it names is taken, with a
//! compare-and-swap on the record's version, so two daemons sharing a registry never both
//! launch or both terminate, and a daemon killed at any point finds, on its next start,
//! a record that says what it was doing ([`Bastions::reconcile`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_types::SdkConfig;
use tokio::sync::{Mutex as AsyncMutex, OnceCell, broadcast};
use tracing::{Instrument, debug, info, info_span, warn};

use super::Host;
use super::cloud::{Cloud, CloudError, Resource, ResourceState, TAG_LAUNCH_ID};
use super::registry::{
    DynamoRegistry, FileRegistry, Phase, ProviderKind, Record, Registry, RegistryError, record_key,
};
use super::userdata::LaunchValues;
use crate::api::{BastionStatus, Progress};
use crate::aws::ec2::Ec2Error;
use crate::aws::ssm::{AwsError, AwsTarget, SsmApi};
use crate::config::bastion::{OnDemand, Provider, RegistryLocation};

/// How long a lease on a record in a transient phase holds without renewal.
const LEASE: Duration = Duration::from_secs(90);

/// How often a bastion in use is re-checked against EC2/ECS.
const VERIFY_EVERY: Duration = Duration::from_secs(30);

/// How often Session Manager is polled while a bastion boots.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// How often the registry and the provider are reconciled while the daemon runs.
const SWEEP_EVERY: Duration = Duration::from_secs(5 * 60);

/// Without a bastion and without connections, the registry is read this often (a
/// colleague's launch of a shared bastion is noticed this late; a DynamoDB read each
/// second per profile would cost for nothing).
const ABSENT_RECHECK: Duration = Duration::from_secs(15);

/// How often a daemon without AWS access yet retries its first reconciliation.
const CTX_RETRY: Duration = Duration::from_secs(30);

/// How long after a launch record an instance may still be invisible to DescribeInstances
/// (EC2 is eventually consistent just after RunInstances).
const LAUNCH_VISIBILITY: Duration = Duration::from_secs(15);

/// Resources past their `bastion:expires` by this much are ended by any daemon that sees
/// them, whoever owns them.
const EXPIRED_GRACE: Duration = Duration::from_secs(10 * 60);

/// How often idle checks may call DescribeSessions.
const SESSIONS_CHECK_EVERY: Duration = Duration::from_secs(10);

/// What the profile should do after a [`Bastions::tick`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing.
    Keep,
    /// End the profile's sessions and call [`Bastions::terminate_now`] with this reason
    /// and record version (which it refuses to act on if the record changed since).
    Terminate {
        /// Why (for logs and events).
        reason: String,
        /// The record version the decision was based on.
        version: u64,
    },
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn iso(ms: u64) -> String {
    aws_smithy_types::DateTime::from_millis(ms as i64)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

/// The AWS side, created on first use.
struct Ctx {
    cloud: Cloud,
    ssm: SsmApi,
    registry: Registry,
    owner: String,
    key: String,
    region: String,
}

/// What the daemon last learned, for `status`.
#[derive(Default)]
struct Mem {
    record: Option<Record>,
    verified_at: Option<Instant>,
    last_local_use: Option<Instant>,
    touched_at: Option<Instant>,
    warned_launch: Option<String>,
    warning: Option<String>,
    last_error: Option<String>,
    sessions_checked_at: Option<Instant>,
    /// No record was found then: the registry is not read again for a while unless a
    /// connection is open (launches go through `ensure_ready`, which reads it anyway).
    absent_since: Option<Instant>,
    /// The profile's last connection start/end seen by the previous tick.
    seen_activity: Option<Instant>,
    swept_at: Option<Instant>,
}

/// A profile's on-demand bastion.
pub struct Bastions {
    profile: String,
    cfg: OnDemand,
    aws: AwsTarget,
    host: Arc<Host>,
    ctx: OnceCell<Ctx>,
    events: broadcast::Sender<Progress>,
    mem: Mutex<Mem>,
    ensure: AsyncMutex<()>,
}

/// Why the on-demand bastion could not be made ready or ended. The daemon keeps it
/// typed; the control API gives each variant its error code.
#[derive(Debug, thiserror::Error)]
pub enum BastionError {
    /// Who launches could not be found out (sts:GetCallerIdentity): no usable
    /// credentials.
    #[error("cannot tell who is launching the bastion (sts:GetCallerIdentity): {0}")]
    Identity(AwsError),
    /// The EC2 client could not be built (no region, bad endpoint, no credentials
    /// provider).
    #[error(transparent)]
    Ec2Client(Ec2Error),
    /// A provider call failed; the message names the profile and what was being done.
    #[error(transparent)]
    Cloud(CloudError),
    /// The registry could not be read or written.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The bastion runs but did not come online with Session Manager in time; the
    /// message says what to check.
    #[error("{0}")]
    NotOnline(String),
    /// The bastion was not ready in time for another reason (another daemon still
    /// launching or ending it).
    #[error("{0}")]
    Timeout(String),
}

impl Bastions {
    /// The bastion of `profile`, configured by `cfg`.
    pub fn new(profile: &str, cfg: OnDemand, aws: AwsTarget, host: Arc<Host>) -> Arc<Bastions> {
        Arc::new(Bastions {
            profile: profile.to_owned(),
            cfg,
            aws,
            host,
            ctx: OnceCell::new(),
            events: broadcast::channel(64).0,
            mem: Mutex::default(),
            ensure: AsyncMutex::new(()),
        })
    }

    /// Lifecycle events (phase changes, progress while booting, warnings).
    pub fn subscribe(&self) -> broadcast::Receiver<Progress> {
        self.events.subscribe()
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Mem> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, phase: &str, record: Option<&Record>, detail: Option<String>) {
        let elapsed = record.map_or(0.0, |r| {
            now_ms().saturating_sub(r.created_ms) as f64 / 1000.0
        });
        let _ = self.events.send(Progress {
            phase: phase.to_owned(),
            elapsed_secs: elapsed,
            detail,
            resource: record.and_then(|r| r.resource.clone()),
        });
    }

    fn remember(&self, record: Option<Record>) {
        let mut mem = self.mem();
        if record.is_some() {
            mem.absent_since = None;
        }
        mem.record = record;
    }

    async fn ctx(&self) -> Result<&Ctx, BastionError> {
        self.ctx
            .get_or_try_init(|| async {
                let config = crate::aws::ssm::load_config(&self.aws).await;
                self.build_ctx(&config).await
            })
            .await
    }

    async fn build_ctx(&self, config: &SdkConfig) -> Result<Ctx, BastionError> {
        let identity = crate::aws::sts::caller_identity(config)
            .await
            .map_err(BastionError::Identity)?;
        let cloud = match &self.cfg.provider {
            Provider::Ec2(spec) => Cloud::Ec2 {
                ec2: crate::aws::ec2::Ec2Api::new(config).map_err(BastionError::Ec2Client)?,
                spec: Box::new(spec.clone()),
            },
            Provider::Fargate(spec) => Cloud::Fargate {
                ecs: crate::aws::ecs::EcsApi::new(config),
                spec: Box::new(spec.clone()),
            },
        };
        let registry = match &self.cfg.registry {
            RegistryLocation::Local => Registry::File(FileRegistry::new(
                self.host.state_dir.join("registry.json"),
                &self.host.daemon_id,
            )),
            RegistryLocation::DynamoDb(table) => {
                Registry::Dynamo(DynamoRegistry::new(config, table))
            }
        };
        let owner = stable_owner(&identity.arn);
        Ok(Ctx {
            key: record_key(&self.profile, &owner, self.cfg.shared),
            owner,
            ssm: SsmApi::new(config),
            region: config.region().map(|r| r.to_string()).unwrap_or_default(),
            cloud,
            registry,
        })
    }

    fn provider_kind(&self) -> ProviderKind {
        match self.cfg.provider {
            Provider::Ec2(_) => ProviderKind::Ec2,
            Provider::Fargate(_) => ProviderKind::Fargate,
        }
    }

    fn is_mine(&self, r: &Record) -> bool {
        r.holder == self.host.daemon_id
    }

    /// A transient record we may act on: ours, or its holder's lease ran out.
    fn may_take_over(&self, r: &Record) -> bool {
        self.is_mine(r) || r.lease_until_ms <= now_ms()
    }

    fn tags(&self, ctx: &Ctx, launch_id: &str, expires_ms: u64) -> BTreeMap<String, String> {
        let mut tags = self.cfg.tags.clone();
        tags.insert("Name".into(), format!("bastion-{}", self.profile));
        tags.insert("bastion:managed-by".into(), "bastion".into());
        tags.insert("bastion:profile".into(), self.profile.clone());
        tags.insert("bastion:key".into(), ctx.key.clone());
        tags.insert("bastion:registry".into(), ctx.registry.id());
        tags.insert("bastion:owner".into(), ctx.owner.clone());
        tags.insert(TAG_LAUNCH_ID.into(), launch_id.to_owned());
        tags.insert("bastion:expires".into(), iso(expires_ms));
        tags
    }

    fn scope_tags(ctx: &Ctx) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("bastion:key".to_owned(), ctx.key.clone()),
            ("bastion:registry".to_owned(), ctx.registry.id()),
        ])
    }

    /// Makes sure the bastion runs and Session Manager reaches it; returns the session
    /// target. Launches one if none exists (reusing a live one first), and waits at most
    /// `ready_timeout` for it, reporting progress as events.
    pub async fn ensure_ready(&self) -> Result<String, BastionError> {
        let span = info_span!("bastion", profile = %self.profile);
        async {
            let ctx = self.ctx().await?;
            let _guard = self.ensure.lock().await;
            let deadline = Instant::now() + self.cfg.ready_timeout;
            loop {
                let record = ctx.registry.get(&ctx.key).await?;
                self.remember(record.clone());
                if Instant::now() >= deadline {
                    let e = self.timeout_error(ctx, record.as_ref());
                    self.emit("failed", record.as_ref(), Some(e.to_string()));
                    self.mem().last_error = Some(e.to_string());
                    return Err(e);
                }
                let Some(record) = record else {
                    if !self.adopt_live(ctx).await? {
                        self.launch(ctx).await?;
                    }
                    continue;
                };
                match record.phase {
                    Phase::Ready | Phase::Idle => {
                        if let Some(target) = self.use_ready(ctx, record).await? {
                            return Ok(target);
                        }
                    }
                    Phase::WaitingOnline => self.poll_online(ctx, record).await?,
                    Phase::Launching if !self.may_take_over(&record) => {
                        self.emit(
                            "waiting_for_launch",
                            Some(&record),
                            Some(format!(
                                "another daemon ({}) is launching it",
                                record.holder
                            )),
                        );
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Phase::Launching => self.recover_launching(ctx, record).await?,
                    Phase::Terminating if !self.may_take_over(&record) => {
                        self.emit("waiting_for_termination", Some(&record), None);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Phase::Terminating => self.finish_terminate(ctx, record).await?,
                }
            }
        }
        .instrument(span)
        .await
    }

    fn timeout_error(&self, ctx: &Ctx, record: Option<&Record>) -> BastionError {
        let waited = self.cfg.ready_timeout.as_secs();
        match record {
            Some(r) if r.phase == Phase::WaitingOnline => {
                let resource = r.resource.clone().unwrap_or_default();
                let hint = match &self.cfg.provider {
                    Provider::Ec2(spec) => format!(
                        "check that {} can reach the Session Manager endpoints (a NAT gateway, or VPC \
                         endpoints for ssm, ssmmessages and ec2messages) and that the instance profile{} \
                         grants AmazonSSMManagedInstanceCore",
                        spec.subnet.as_deref().map_or("its subnet".to_owned(), |s| format!("subnet {s}")),
                        spec.instance_profile.as_deref().map_or(String::new(), |p| format!(" {p}")),
                    ),
                    Provider::Fargate(_) => "check that the task definition enables ECS exec (task role with \
                        ssmmessages permissions) and that its subnets reach the Session Manager endpoints"
                        .to_owned(),
                };
                BastionError::NotOnline(format!(
                    "bastion {resource} of profile {} did not come online with Session Manager \
                     within {waited} s; {hint}",
                    self.profile
                ))
            }
            Some(r) => BastionError::Timeout(format!(
                "bastion of profile {} still {} after {waited} s (registry {}, holder {})",
                self.profile,
                r.phase.as_str(),
                ctx.registry.id(),
                r.holder
            )),
            None => BastionError::Timeout(format!(
                "no bastion for profile {} after {waited} s",
                self.profile
            )),
        }
    }

    /// A ready record: checks now and then that the resource still runs; returns the
    /// target, or `None` to look again.
    async fn use_ready(&self, ctx: &Ctx, record: Record) -> Result<Option<String>, BastionError> {
        if now_ms() >= record.expires_ms {
            self.terminate_record(ctx, record, "max lifetime reached")
                .await?;
            return Ok(None);
        }
        let stale = self
            .mem()
            .verified_at
            .is_none_or(|t| t.elapsed() >= VERIFY_EVERY);
        if stale {
            let resource = record.resource.clone().unwrap_or_default();
            match ctx.cloud.state(&resource).await {
                Ok(ResourceState::Gone) => {
                    warn!(resource = %resource, "the bastion is gone; forgetting it");
                    self.forget(ctx, &record, "gone").await?;
                    return Ok(None);
                }
                Ok(ResourceState::Stopped) => {
                    warn!(resource = %resource, "the bastion was stopped; terminating it");
                    self.terminate_record(ctx, record, "stopped").await?;
                    return Ok(None);
                }
                Ok(_) => self.mem().verified_at = Some(Instant::now()),
                Err(e) => warn!(error = %e, "cannot check the bastion; using it anyway"),
            }
        }
        let mut record = record;
        let fresh = now_ms() < record.last_used_ms + ms(self.touch_every());
        if record.phase == Phase::Idle || !fresh {
            // A new use: recorded before the target is handed out, so that an idle
            // decision taken meanwhile (here or by another daemon) sees the new version.
            let mut next = record.clone();
            next.phase = Phase::Ready;
            next.last_used_ms = now_ms();
            next.version += 1;
            match ctx.registry.put(&next, Some(record.version)).await {
                Ok(()) => record = next,
                Err(RegistryError::Conflict(_)) => return Ok(None),
                Err(e) => return Err(e.into()),
            }
        }
        let target = record.target.clone().or(record.resource.clone());
        self.emit("ready", Some(&record), target.clone());
        self.remember(Some(record));
        Ok(target)
    }

    /// Reuse before create: a live bastion of this scope in this registry without a record
    /// (a crash lost it) is adopted.
    async fn adopt_live(&self, ctx: &Ctx) -> Result<bool, BastionError> {
        let mut found = ctx
            .cloud
            .find(&Self::scope_tags(ctx))
            .await
            .map_err(|e| self.cloud_error("finding a running bastion", e))?;
        found.retain(|r| matches!(r.state, ResourceState::Running(_) | ResourceState::Pending));
        found.sort_by_key(|r| std::cmp::Reverse(r.launched_ms));
        let Some(r) = found.into_iter().next() else {
            return Ok(false);
        };
        let adopted = self.adoption_record(ctx, &r);
        match ctx.registry.put(&adopted, None).await {
            Ok(()) => {
                info!(resource = %r.id, "reusing a running bastion");
                self.emit("reusing", Some(&adopted), Some(r.id.clone()));
                Ok(true)
            }
            Err(RegistryError::Conflict(_)) => Ok(true),
            Err(e) => Err(e.into()),
        }
    }

    fn adoption_record(&self, ctx: &Ctx, r: &Resource) -> Record {
        let now = now_ms();
        let created = r.launched_ms.unwrap_or(now);
        Record {
            key: ctx.key.clone(),
            version: 1,
            launch_id: r.tags.get(TAG_LAUNCH_ID).cloned().unwrap_or_default(),
            provider: self.provider_kind(),
            phase: Phase::WaitingOnline,
            resource: Some(r.id.clone()),
            target: None,
            profile: self.profile.clone(),
            owner: r
                .tags
                .get("bastion:owner")
                .cloned()
                .unwrap_or_else(|| ctx.owner.clone()),
            holder: self.host.daemon_id.clone(),
            lease_until_ms: now + ms(LEASE),
            created_ms: created,
            expires_ms: created + ms(self.cfg.max_lifetime),
            last_used_ms: now,
        }
    }

    /// `e` with the profile and what was being done, remembered for `status`.
    fn cloud_error(&self, doing: &str, e: CloudError) -> BastionError {
        let message = format!("profile {}: {doing}: {}", self.profile, e.message);
        self.mem().last_error = Some(message.clone());
        BastionError::Cloud(CloudError { message, ..e })
    }

    /// Records `launching`, then launches.
    async fn launch(&self, ctx: &Ctx) -> Result<(), BastionError> {
        let now = now_ms();
        let record = Record {
            key: ctx.key.clone(),
            version: 1,
            launch_id: uuid::Uuid::new_v4().to_string(),
            provider: self.provider_kind(),
            phase: Phase::Launching,
            resource: None,
            target: None,
            profile: self.profile.clone(),
            owner: ctx.owner.clone(),
            holder: self.host.daemon_id.clone(),
            lease_until_ms: now + ms(LEASE),
            created_ms: now,
            expires_ms: now + ms(self.cfg.max_lifetime),
            last_used_ms: now,
        };
        match ctx.registry.put(&record, None).await {
            Ok(()) => {}
            Err(RegistryError::Conflict(_)) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        info!(launch_id = %record.launch_id, provider = ctx.cloud.kind(), "launching a bastion");
        self.emit("launching", Some(&record), None);
        let tags = self.tags(ctx, &record.launch_id, record.expires_ms);
        let values = LaunchValues {
            launch_id: record.launch_id.clone(),
            owner: ctx.owner.clone(),
            region: ctx.region.clone(),
            max_lifetime: self.cfg.max_lifetime,
        };
        match ctx.cloud.launch(&ctx.ssm, &tags, &values).await {
            Ok(resource) => {
                let mut next = record.clone();
                next.version += 1;
                next.phase = Phase::WaitingOnline;
                next.resource = Some(resource.id.clone());
                next.lease_until_ms = now_ms() + ms(LEASE);
                info!(resource = %resource.id, "bastion launched; waiting for Session Manager");
                ctx.registry.put(&next, Some(record.version)).await?;
                self.emit("launched", Some(&next), Some(resource.id));
                Ok(())
            }
            Err(e) => {
                let ambiguous = e.retryable;
                let err = self.cloud_error("cannot launch a bastion", e);
                warn!(error = %err, "launch failed");
                if ambiguous {
                    // A timeout or server error: EC2/ECS may have launched it anyway. The
                    // `launching` record stays; recovery adopts what appears, or forgets
                    // the launch once it cannot be invisible any more.
                } else if let Err(d) = ctx.registry.delete(&record.key, record.version).await {
                    warn!(error = %d, "cannot remove the failed launch from the registry");
                }
                self.emit("failed", Some(&record), Some(err.to_string()));
                Err(err)
            }
        }
    }

    /// `waiting_online`: one poll of Session Manager (and of the resource).
    async fn poll_online(&self, ctx: &Ctx, record: Record) -> Result<(), BastionError> {
        let resource = record.resource.clone().unwrap_or_default();
        let online = ctx
            .cloud
            .online(&ctx.ssm, &resource)
            .await
            .map_err(|e| self.cloud_error("checking whether the bastion is online", e))?;
        if let Some(target) = online {
            let mut next = record.clone();
            next.version += 1;
            next.phase = Phase::Ready;
            next.target = Some(target.clone());
            next.last_used_ms = now_ms();
            match ctx.registry.put(&next, Some(record.version)).await {
                Ok(()) => {
                    info!(resource = %resource, target = %target, "bastion online");
                    self.mem().verified_at = Some(Instant::now());
                    Ok(())
                }
                Err(RegistryError::Conflict(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        } else {
            match ctx.cloud.state(&resource).await {
                Ok(ResourceState::Gone) => {
                    // Terminated while booting (by its own shutdown, a colleague, the
                    // console): forget it; the caller's loop launches another.
                    warn!(resource = %resource, "the bastion stopped while booting");
                    return self.forget(ctx, &record, "gone").await;
                }
                Ok(ResourceState::Stopped) => {
                    return self
                        .terminate_record(ctx, record, "stopped while booting")
                        .await;
                }
                _ => {}
            }
            if self.is_mine(&record) && record.lease_until_ms < now_ms() + ms(LEASE) / 2 {
                let mut next = record.clone();
                next.version += 1;
                next.lease_until_ms = now_ms() + ms(LEASE);
                let _ = ctx.registry.put(&next, Some(record.version)).await;
            }
            self.emit("waiting_online", Some(&record), Some(resource));
            tokio::time::sleep(POLL_EVERY).await;
            Ok(())
        }
    }

    /// `launching` left by a daemon that died: adopts what it launched, or forgets it.
    async fn recover_launching(&self, ctx: &Ctx, record: Record) -> Result<(), BastionError> {
        let mut tags = Self::scope_tags(ctx);
        tags.insert(TAG_LAUNCH_ID.into(), record.launch_id.clone());
        let found = ctx
            .cloud
            .find(&tags)
            .await
            .map_err(|e| self.cloud_error("looking for an interrupted launch", e))?;
        match found.into_iter().find(|r| r.state != ResourceState::Gone) {
            Some(r) => {
                let mut next = record.clone();
                next.version += 1;
                next.phase = Phase::WaitingOnline;
                next.resource = Some(r.id.clone());
                next.holder = self.host.daemon_id.clone();
                next.lease_until_ms = now_ms() + ms(LEASE);
                info!(resource = %r.id, "adopting the bastion of an interrupted launch");
                match ctx.registry.put(&next, Some(record.version)).await {
                    Ok(()) | Err(RegistryError::Conflict(_)) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            None if now_ms() < record.created_ms + ms(LAUNCH_VISIBILITY) => {
                // Just launched: DescribeInstances may not show it yet.
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
            None => {
                info!(launch_id = %record.launch_id, "an interrupted launch left nothing; forgetting it");
                match ctx.registry.delete(&record.key, record.version).await {
                    Ok(()) | Err(RegistryError::Conflict(_)) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    async fn forget(&self, ctx: &Ctx, record: &Record, phase: &str) -> Result<(), BastionError> {
        match ctx.registry.delete(&record.key, record.version).await {
            Ok(()) => {
                self.emit(phase, Some(record), record.resource.clone());
                self.remember(None);
                Ok(())
            }
            Err(RegistryError::Conflict(_)) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Records `terminating`, then terminates.
    async fn terminate_record(
        &self,
        ctx: &Ctx,
        record: Record,
        reason: &str,
    ) -> Result<(), BastionError> {
        match self.mark_terminating(ctx, record, reason).await? {
            Some(next) => self.finish_terminate(ctx, next).await,
            None => Ok(()),
        }
    }

    /// Writes `terminating` (taking the lease); `None` when someone else wrote first.
    async fn mark_terminating(
        &self,
        ctx: &Ctx,
        record: Record,
        reason: &str,
    ) -> Result<Option<Record>, BastionError> {
        let mut next = record.clone();
        next.version += 1;
        next.phase = Phase::Terminating;
        next.holder = self.host.daemon_id.clone();
        next.lease_until_ms = now_ms() + ms(LEASE);
        match ctx.registry.put(&next, Some(record.version)).await {
            Ok(()) => {}
            Err(RegistryError::Conflict(_)) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        info!(resource = ?next.resource, reason, "terminating the bastion");
        self.emit("terminating", Some(&next), Some(reason.to_owned()));
        Ok(Some(next))
    }

    /// `terminating`: terminate (idempotent), then delete the record.
    async fn finish_terminate(&self, ctx: &Ctx, record: Record) -> Result<(), BastionError> {
        let mut ids: Vec<String> = record.resource.iter().cloned().collect();
        if ids.is_empty() {
            let mut tags = Self::scope_tags(ctx);
            tags.insert(TAG_LAUNCH_ID.into(), record.launch_id.clone());
            ids = ctx
                .cloud
                .find(&tags)
                .await
                .map_err(|e| self.cloud_error("looking for the bastion to terminate", e))?
                .into_iter()
                .map(|r| r.id)
                .collect();
        }
        for id in &ids {
            ctx.cloud
                .terminate(id, "bastion: idle or max lifetime")
                .await
                .map_err(|e| self.cloud_error("cannot terminate the bastion", e))?;
        }
        self.forget(ctx, &record, "terminated").await
    }

    /// First half of ending the bastion after [`Decision::Terminate`]: records
    /// `terminating`, unless the record changed since the decision (`expect`: someone used
    /// it again, or another bastion replaced it). The profile then ends its sessions and
    /// calls [`Bastions::finish_termination`] with the returned record.
    pub async fn claim_termination(
        &self,
        reason: &str,
        expect: u64,
    ) -> Result<Option<Record>, BastionError> {
        let ctx = self.ctx().await?;
        let _guard = self.ensure.lock().await;
        let Some(record) = ctx.registry.get(&ctx.key).await? else {
            return Ok(None);
        };
        let endable = matches!(
            record.phase,
            Phase::Ready | Phase::Idle | Phase::WaitingOnline
        );
        if record.version != expect || !endable {
            info!(profile = %self.profile, reason, "the bastion changed before it could be ended; keeping it");
            return Ok(None);
        }
        self.mark_terminating(ctx, record, reason).await
    }

    /// Ends whatever bastion is recorded now (its profile is going away).
    pub async fn end_now(&self, reason: &str) -> Result<(), BastionError> {
        let ctx = self.ctx().await?;
        let version = match ctx.registry.get(&ctx.key).await? {
            Some(r) => r.version,
            None => return Ok(()),
        };
        match self.claim_termination(reason, version).await? {
            Some(record) => self.finish_termination(record).await,
            None => Ok(()),
        }
    }

    /// Second half: terminates (idempotent) and deletes the record.
    pub async fn finish_termination(&self, record: Record) -> Result<(), BastionError> {
        let ctx = self.ctx().await?;
        let _guard = self.ensure.lock().await;
        self.finish_terminate(ctx, record).await
    }

    /// Called about every second by the profile: keeps the record's use time fresh, warns
    /// before the max lifetime, decides idle and lifetime termination, and sweeps the
    /// registry now and then. `connections` are the profile's open connections;
    /// `own_sessions` its live session ids (not counted as someone else's use).
    pub async fn tick(
        &self,
        connections: usize,
        own_sessions: &[String],
        last_connection: Instant,
    ) -> Decision {
        let Some(ctx) = self.ctx.get() else {
            // The first reconciliation failed (no network or credentials yet): retry, so
            // that a bastion left by a previous run is still reaped.
            let due = self.mem().swept_at.is_none_or(|t| t.elapsed() >= CTX_RETRY);
            if due {
                self.mem().swept_at = Some(Instant::now());
                if let Err(e) = self.reconcile().await {
                    debug!(profile = %self.profile, error = %e, "bastion reconciliation still failing");
                }
            }
            return Decision::Keep;
        };
        let sweep_due = self
            .mem()
            .swept_at
            .is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
        if sweep_due && connections == 0 {
            self.mem().swept_at = Some(Instant::now());
            if let Err(e) = self.reconcile().await {
                warn!(profile = %self.profile, error = %e, "bastion reconciliation failed");
            }
        }
        {
            // A connection open now, or one that came and went since the last tick (a
            // `psql -c` of 300 ms), is use.
            let mut mem = self.mem();
            let new_activity = mem.seen_activity.is_some_and(|t| last_connection > t);
            mem.seen_activity = Some(last_connection);
            if connections > 0 || (new_activity && mem.record.is_some()) {
                mem.last_local_use = Some(Instant::now());
            }
        }
        let quiet = self
            .mem()
            .absent_since
            .is_some_and(|t| t.elapsed() < ABSENT_RECHECK);
        if quiet && connections == 0 {
            return Decision::Keep;
        }
        let record = match ctx.registry.get(&ctx.key).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                self.remember(None);
                self.mem().absent_since = Some(Instant::now());
                return Decision::Keep;
            }
            Err(e) => {
                warn!(profile = %self.profile, error = %e, "cannot read the bastion registry");
                return Decision::Keep;
            }
        };
        self.remember(Some(record.clone()));
        if !matches!(record.phase, Phase::Ready | Phase::Idle) {
            self.advance_unattended(ctx, record).await;
            return Decision::Keep;
        }
        let now = now_ms();
        if now >= record.expires_ms {
            return Decision::Terminate {
                reason: format!("max lifetime ({}) reached", humanize(self.cfg.max_lifetime)),
                version: record.version,
            };
        }
        if now + ms(self.cfg.lifetime_warning) >= record.expires_ms {
            let first = self.mem().warned_launch.as_deref() != Some(record.launch_id.as_str());
            if first {
                let message = format!(
                    "bastion {} of profile {} reaches its max lifetime ({}) in {}; its connections will then be closed",
                    record.resource.as_deref().unwrap_or("?"),
                    self.profile,
                    humanize(self.cfg.max_lifetime),
                    humanize(Duration::from_millis(record.expires_ms - now)),
                );
                warn!(profile = %self.profile, "{message}");
                self.emit("lifetime_warning", Some(&record), Some(message.clone()));
                let mut mem = self.mem();
                mem.warned_launch = Some(record.launch_id.clone());
                mem.warning = Some(message);
            }
        }
        if connections > 0 {
            self.touch(ctx, record).await;
            return Decision::Keep;
        }
        let used_here = self.mem().last_local_use.take().is_some();
        if used_here {
            // The last connection through this daemon just ended: the idle clock starts.
            let mut next = record.clone();
            next.version += 1;
            next.phase = Phase::Idle;
            next.last_used_ms = now;
            if ctx.registry.put(&next, Some(record.version)).await.is_ok() {
                self.emit("idle", Some(&next), None);
            }
            return Decision::Keep;
        }
        let idle_since = record.last_used_ms;
        if now < idle_since + ms(self.cfg.idle_timeout) {
            return Decision::Keep;
        }
        let due = self
            .mem()
            .sessions_checked_at
            .is_none_or(|t| t.elapsed() >= SESSIONS_CHECK_EVERY.min(self.cfg.idle_timeout));
        if !due {
            return Decision::Keep;
        }
        self.mem().sessions_checked_at = Some(Instant::now());
        let target = record
            .target
            .clone()
            .or(record.resource.clone())
            .unwrap_or_default();
        match ctx.ssm.active_sessions(&target).await {
            Ok(active) => {
                let others: Vec<&String> = active
                    .iter()
                    .filter(|s| !own_sessions.contains(s))
                    .collect();
                if others.is_empty() {
                    Decision::Terminate {
                        reason: format!(
                            "idle for {} (no connection, no Active session)",
                            humanize(self.cfg.idle_timeout)
                        ),
                        version: record.version,
                    }
                } else {
                    info!(profile = %self.profile, sessions = others.len(), "bastion idle here but used by other sessions; keeping it");
                    Decision::Keep
                }
            }
            Err(e) => {
                let message = format!(
                    "cannot tell whether the bastion is in use (ssm:DescribeSessions: {e}); \
                     keeping it until max lifetime"
                );
                warn!(profile = %self.profile, "{message}");
                self.mem().last_error = Some(message);
                Decision::Keep
            }
        }
    }

    /// Moves a record in a transient phase on when no connection is waiting for it (a
    /// restarted daemon, a launch whose client went away): a booting bastion is polled
    /// (and terminated if it never comes online), an interrupted launch or termination
    /// of ours, or of a daemon whose lease ran out, is finished.
    async fn advance_unattended(&self, ctx: &Ctx, record: Record) {
        let Ok(_guard) = self.ensure.try_lock() else {
            return;
        };
        let result = match record.phase {
            Phase::WaitingOnline
                if self.may_take_over(&record)
                    && now_ms() >= record.created_ms + ms(self.cfg.ready_timeout) + ms(LEASE) =>
            {
                self.terminate_record(ctx, record, "never came online with Session Manager")
                    .await
            }
            Phase::WaitingOnline => self.poll_online(ctx, record).await,
            Phase::Launching if self.may_take_over(&record) => {
                self.recover_launching(ctx, record).await
            }
            Phase::Terminating if self.may_take_over(&record) => {
                self.finish_terminate(ctx, record).await
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            warn!(profile = %self.profile, error = %e, "bastion lifecycle step failed");
        }
    }

    /// How often use is written to the record while connections use the bastion.
    fn touch_every(&self) -> Duration {
        (self.cfg.idle_timeout / 3).min(Duration::from_secs(30))
    }

    /// Refreshes `last_used` (and `ready`) while connections use the bastion.
    async fn touch(&self, ctx: &Ctx, record: Record) {
        let every = self.touch_every();
        let due = self.mem().touched_at.is_none_or(|t| t.elapsed() >= every);
        if !due && record.phase == Phase::Ready {
            return;
        }
        let mut next = record.clone();
        next.version += 1;
        next.phase = Phase::Ready;
        next.last_used_ms = now_ms();
        if ctx.registry.put(&next, Some(record.version)).await.is_ok() {
            self.mem().touched_at = Some(Instant::now());
        }
    }

    /// Reconciles the registry with EC2/ECS: finishes what a killed daemon left half done
    /// (an interrupted launch is adopted or forgotten, an interrupted termination
    /// completed), forgets bastions that are gone, ends expired ones, and terminates live
    /// bastions of this profile and registry that no record owns, unless a Session
    /// Manager session uses them (then they are adopted).
    pub async fn reconcile(&self) -> Result<(), BastionError> {
        let ctx = self.ctx().await?;
        let Ok(_guard) = self.ensure.try_lock() else {
            return Ok(());
        };
        // Resources first, records second: a record is written before its launch, so any
        // resource seen here has its record by the time the records are read.
        let live = ctx
            .cloud
            .find(&Self::scope_tags(ctx))
            .await
            .map_err(|e| self.cloud_error("listing bastions", e))?;
        if let Some(record) = ctx.registry.get(&ctx.key).await? {
            match record.phase {
                Phase::Launching if self.may_take_over(&record) => {
                    self.recover_launching(ctx, record).await?
                }
                Phase::Terminating if self.may_take_over(&record) => {
                    self.finish_terminate(ctx, record).await?
                }
                Phase::WaitingOnline | Phase::Ready | Phase::Idle => {
                    let resource = record.resource.clone().unwrap_or_default();
                    let state = ctx
                        .cloud
                        .state(&resource)
                        .await
                        .map_err(|e| self.cloud_error("checking the bastion", e))?;
                    if state == ResourceState::Gone {
                        info!(resource = %resource, "the registry's bastion is gone; forgetting it");
                        self.forget(ctx, &record, "gone").await?;
                    } else if state == ResourceState::Stopped {
                        self.terminate_record(ctx, record, "stopped").await?;
                    } else if now_ms() >= record.expires_ms {
                        self.terminate_record(ctx, record, "max lifetime reached")
                            .await?;
                    }
                }
                _ => {}
            }
        }
        let owned = ctx.registry.get(&ctx.key).await?.map(|r| r.launch_id);
        for r in live {
            if r.tags.get(TAG_LAUNCH_ID) == owned.as_ref() && owned.is_some() {
                continue;
            }
            let target = match &r.state {
                ResourceState::Running(t) => t.clone(),
                _ => None,
            };
            let used = match &target {
                Some(t) => ctx
                    .ssm
                    .active_sessions(t)
                    .await
                    .map(|s| !s.is_empty())
                    .unwrap_or(true),
                None => false,
            };
            if used && owned.is_none() {
                info!(resource = %r.id, "adopting a bastion in use that no record owned");
                let mut adopted = self.adoption_record(ctx, &r);
                adopted.phase = Phase::Ready;
                adopted.target = target;
                if let Err(e) = ctx.registry.put(&adopted, None).await {
                    warn!(error = %e, "cannot record the adopted bastion");
                }
            } else if used {
                warn!(resource = %r.id, "a second bastion of this profile is in use; leaving it until its sessions end");
            } else {
                // Another daemon may have adopted it since the record was read.
                let now_owned = ctx
                    .registry
                    .get(&ctx.key)
                    .await?
                    .is_some_and(|rec| Some(&rec.launch_id) == r.tags.get(TAG_LAUNCH_ID));
                if now_owned {
                    continue;
                }
                info!(resource = %r.id, "terminating a bastion that no registry record owns");
                if let Err(e) = ctx.cloud.terminate(&r.id, "bastion: orphan").await {
                    warn!(resource = %r.id, error = %e, "cannot terminate an orphaned bastion");
                } else {
                    let _ = self.events.send(Progress {
                        phase: "orphan_terminated".into(),
                        elapsed_secs: 0.0,
                        detail: Some(r.id.clone()),
                        resource: Some(r.id.clone()),
                    });
                }
            }
        }
        self.end_long_expired(ctx).await;
        self.mem().swept_at = Some(Instant::now());
        Ok(())
    }

    /// A backstop for every bastion of this profile, whoever launched it and whichever
    /// registry tracks it: past its `bastion:expires` tag by [`EXPIRED_GRACE`], it is
    /// ended (max lifetime applies even in use; an EC2 instance normally shut itself down
    /// long before, a Fargate task cannot).
    async fn end_long_expired(&self, ctx: &Ctx) {
        let tags = BTreeMap::from([
            ("bastion:managed-by".to_owned(), "bastion".to_owned()),
            ("bastion:profile".to_owned(), self.profile.clone()),
        ]);
        let found = match ctx.cloud.find(&tags).await {
            Ok(f) => f,
            Err(e) => {
                warn!(profile = %self.profile, error = %e, "cannot list this profile's bastions");
                return;
            }
        };
        let limit = now_ms().saturating_sub(ms(EXPIRED_GRACE));
        for r in found {
            let expired = r
                .tags
                .get("bastion:expires")
                .and_then(|t| {
                    aws_smithy_types::DateTime::from_str(
                        t,
                        aws_smithy_types::date_time::Format::DateTime,
                    )
                    .ok()
                })
                .and_then(|t| u64::try_from(t.to_millis().ok()?).ok())
                .is_some_and(|t| t < limit);
            if !expired {
                continue;
            }
            info!(resource = %r.id, "ending a bastion long past its max lifetime");
            match ctx
                .cloud
                .terminate(&r.id, "bastion: max lifetime long passed")
                .await
            {
                Ok(()) => {
                    let _ = self.events.send(Progress {
                        phase: "expired_terminated".into(),
                        elapsed_secs: 0.0,
                        detail: Some(r.id.clone()),
                        resource: Some(r.id.clone()),
                    });
                }
                Err(e) => warn!(resource = %r.id, error = %e, "cannot end an expired bastion"),
            }
        }
    }

    /// What `status` shows.
    pub fn status(&self) -> BastionStatus {
        let mem = self.mem();
        let now = now_ms();
        let r = mem.record.as_ref();
        BastionStatus {
            provider: match self.cfg.provider {
                Provider::Ec2(_) => "ec2".into(),
                Provider::Fargate(_) => "fargate".into(),
            },
            phase: r.map_or("none", |r| r.phase.as_str()).to_owned(),
            resource: r.and_then(|r| r.resource.clone()),
            target: r.and_then(|r| r.target.clone()),
            registry: match &self.cfg.registry {
                RegistryLocation::Local => "local".into(),
                RegistryLocation::DynamoDb(t) => format!("dynamodb:{t}"),
            },
            shared: self.cfg.shared,
            holder: r.map(|r| r.holder.clone()),
            age_secs: r.map(|r| now.saturating_sub(r.created_ms) / 1000),
            expires_in_secs: r.map(|r| r.expires_ms.saturating_sub(now) / 1000),
            idle_secs: r
                .filter(|r| r.phase == Phase::Idle)
                .map(|r| now.saturating_sub(r.last_used_ms) / 1000),
            warning: mem.warning.clone(),
            last_error: mem.last_error.clone(),
        }
    }
}

/// Whether two versions of a profile manage the same bastion (same registry record key
/// and tags): the same `bastion` scope settings and AWS settings.
pub fn same_scope(a: &crate::config::Profile, b: &crate::config::Profile) -> bool {
    match (&a.bastion, &b.bastion) {
        (Some(x), Some(y)) => {
            x.registry == y.registry
                && x.shared == y.shared
                && std::mem::discriminant(&x.provider) == std::mem::discriminant(&y.provider)
                && a.aws_profile == b.aws_profile
                && a.region == b.region
        }
        _ => false,
    }
}

/// The owner part of a registry key: the caller's ARN, without the session name of a
/// role session the SDK named itself (`assume-role-from-profile-<ms>`,
/// `web-identity-token-<ms>`, `botocore-session-<s>`), which changes at every start. A
/// session named by a person (an SSO user name, a `role_session_name`) stays.
pub fn stable_owner(arn: &str) -> String {
    let Some((head, session)) = arn
        .contains(":assumed-role/")
        .then(|| arn.rsplit_once('/'))
        .flatten()
    else {
        return arn.to_owned();
    };
    let generated = [
        "assume-role-from-profile-",
        "web-identity-token-",
        "botocore-session-",
    ]
    .iter()
    .any(|p| {
        session
            .strip_prefix(p)
            .is_some_and(|rest| !rest.is_empty() && rest.chars().all(|c| c.is_ascii_digit()))
    });
    if generated {
        head.to_owned()
    } else {
        arn.to_owned()
    }
}

/// `90s`, `5m`, `8h`, `1h30m`.
pub fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    match (s / 3600, s % 3600 / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, 0) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_are_stable_across_generated_role_sessions() {
        let generated =
            "arn:aws:sts::123456789012:assumed-role/dba/assume-role-from-profile-1795424270695";
        assert_eq!(
            stable_owner(generated),
            "arn:aws:sts::123456789012:assumed-role/dba"
        );
        assert_eq!(
            stable_owner("arn:aws:sts::1:assumed-role/ci/web-identity-token-17954"),
            "arn:aws:sts::1:assumed-role/ci"
        );
        for kept in [
            "arn:aws:sts::1:assumed-role/AWSReservedSSO_Admin_0a1b/alice@example.com",
            "arn:aws:sts::1:assumed-role/dba/assume-role-from-profile-x",
            "arn:aws:iam::1:user/bob",
            "arn:aws:sts::1:assumed-role/dba/botocore-session-",
        ] {
            assert_eq!(stable_owner(kept), kept);
        }
        assert_eq!(humanize(Duration::from_secs(90)), "1m30s");
        assert_eq!(humanize(Duration::from_secs(8 * 3600)), "8h");
        assert_eq!(humanize(Duration::from_secs(5400)), "1h30m");
    }
}
