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
//!
//! Every decision is [`lifecycle::decide`]'s (a pure function); [`Bastions`] gathers its
//! inputs (the record, AWS answers, the time), calls it, and executes the [`Step`] it
//! returns.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_types::SdkConfig;
use tokio::sync::{Mutex as AsyncMutex, OnceCell, broadcast};
use tracing::{Instrument, debug, info, info_span, warn};

use super::Host;
use super::cloud::{Cloud, CloudError, Resource, ResourceState, TAG_LAUNCH_ID};
use super::lifecycle::{
    self, Entry, Facts, Input, LEASE, Look, Memory, Now, Observed, Occasion, Reason, Settings,
    Step, TAG_EXPIRES, humanize,
};
use super::registry::{
    DynamoRegistry, FileRegistry, Phase, ProviderKind, Record, Registry, RegistryError, record_key,
};
use super::userdata::LaunchValues;
use crate::api::{BastionStatus, Progress};
use crate::aws::ec2::Ec2Error;
use crate::aws::ssm::{AwsError, AwsTarget, SsmApi};
use crate::config::bastion::{OnDemand, Provider, RegistryLocation};

/// How often Session Manager is polled while a bastion boots.
const POLL_EVERY: Duration = Duration::from_secs(2);

/// What the profile should do after a [`Bastions::tick`]: the part of a step that the
/// profile executes, because it owns the sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing.
    Keep,
    /// [`Step::EndSessionsThenTerminate`]: call [`Bastions::claim_termination`] with this
    /// reason and record version (it refuses if the record changed since), end the
    /// profile's sessions, then call [`Bastions::finish_termination`].
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

/// The clocks, read for a decision.
fn now() -> Now {
    Now {
        ms: now_ms(),
        at: Instant::now(),
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn iso(ms: u64) -> String {
    aws_smithy_types::DateTime::from_millis(ms as i64)
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
}

/// One round of decisions: the record as read, what was observed since, and the time
/// the record was read (which every decision of the round uses).
struct Round {
    record: Entry,
    facts: Facts,
    now: Now,
}

impl Round {
    /// A round whose record is still to be read.
    fn new() -> Round {
        Round {
            record: Entry::Unread,
            facts: Facts::default(),
            now: now(),
        }
    }

    /// A round on a record just read.
    fn read(record: Option<Record>) -> Round {
        Round {
            record: record.into(),
            ..Round::new()
        }
    }

    fn record(&self) -> Option<&Record> {
        match &self.record {
            Entry::Present(r) => Some(r),
            Entry::Unread | Entry::Absent => None,
        }
    }
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

/// A profile's on-demand bastion.
pub struct Bastions {
    profile: String,
    cfg: OnDemand,
    settings: Settings,
    aws: AwsTarget,
    host: Arc<Host>,
    ctx: OnceCell<Ctx>,
    events: broadcast::Sender<Progress>,
    mem: Mutex<Memory>,
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
            settings: Settings {
                daemon_id: host.daemon_id.clone(),
                idle_timeout: cfg.idle_timeout,
                max_lifetime: cfg.max_lifetime,
                lifetime_warning: cfg.lifetime_warning,
                ready_timeout: cfg.ready_timeout,
            },
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

    fn mem(&self) -> std::sync::MutexGuard<'_, Memory> {
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

    /// [`lifecycle::decide`] on `round`, with what this daemon remembers.
    fn decide(&self, occasion: Occasion<'_>, round: &Round) -> Step {
        let memory = self.mem();
        lifecycle::decide(&Input {
            occasion,
            record: &round.record,
            memory: &memory,
            now: round.now,
            facts: &round.facts,
            settings: &self.settings,
        })
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
        tags.insert(TAG_EXPIRES.into(), iso(expires_ms));
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
    /// `ready_timeout` for it, reporting progress as events. One round of decisions per
    /// registry read ([`Occasion::Use`]).
    pub async fn ensure_ready(&self) -> Result<String, BastionError> {
        let span = info_span!("bastion", profile = %self.profile);
        async {
            let ctx = self.ctx().await?;
            let _guard = self.ensure.lock().await;
            let occasion = Occasion::Use {
                deadline: Instant::now() + self.cfg.ready_timeout,
            };
            let mut round = Round::new();
            loop {
                match self.decide(occasion, &round) {
                    Step::Look(Look::Record) => {
                        let record = ctx.registry.get(&ctx.key).await?;
                        self.remember(record.clone());
                        round = Round::read(record);
                    }
                    Step::Look(look) => self.look(ctx, occasion, look, &[], &mut round).await?,
                    Step::GiveUp => {
                        let e = self.timeout_error(ctx, round.record());
                        self.emit("failed", round.record(), Some(e.to_string()));
                        self.mem().last_error = Some(e.to_string());
                        return Err(e);
                    }
                    Step::RecordUse => {
                        let Some(record) = round.record() else {
                            round = Round::new();
                            continue;
                        };
                        let mut next = record.clone();
                        next.phase = Phase::Ready;
                        next.last_used_ms = now_ms();
                        next.version += 1;
                        match ctx.registry.put(&next, Some(record.version)).await {
                            Ok(()) => round.record = Entry::Present(Box::new(next)),
                            Err(RegistryError::Conflict(_)) => round = Round::new(),
                            Err(e) => return Err(e.into()),
                        }
                    }
                    Step::HandOut { target } => {
                        self.emit("ready", round.record(), target.clone());
                        self.remember(round.record().cloned());
                        if let Some(target) = target {
                            return Ok(target);
                        }
                        round = Round::new();
                    }
                    step => {
                        self.act(ctx, occasion, &round, step).await?;
                        round = Round::new();
                    }
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Gathers the fact `look` asks for into `round`. `own`: the profile's live session
    /// ids (not counted as someone else's use). A failure the rules can decide on is
    /// recorded as [`Observed::Failed`]; any other is returned.
    async fn look(
        &self,
        ctx: &Ctx,
        occasion: Occasion<'_>,
        look: Look,
        own: &[String],
        round: &mut Round,
    ) -> Result<(), BastionError> {
        let resource = round
            .record()
            .and_then(|r| r.resource.clone())
            .unwrap_or_default();
        match look {
            Look::Record => {
                *round = Round::read(ctx.registry.get(&ctx.key).await?);
            }
            // Only a tick takes the lock without waiting, and it does so itself.
            Look::Lock => round.facts.lock = Some(false),
            Look::Resource => {
                let reconcile = occasion == Occasion::Reconcile;
                // A connection about to use a ready bastion (not one that boots).
                let using = matches!(occasion, Occasion::Use { .. })
                    && round
                        .record()
                        .is_some_and(|r| matches!(r.phase, Phase::Ready | Phase::Idle));
                round.facts.state = match ctx.cloud.state(&resource).await {
                    Ok(state) => {
                        let alive = !matches!(state, ResourceState::Gone | ResourceState::Stopped);
                        if using && alive {
                            self.mem().verified_at = Some(Instant::now());
                        }
                        Observed::Is(state)
                    }
                    Err(e) if reconcile => return Err(self.cloud_error("checking the bastion", e)),
                    Err(e) => {
                        if using {
                            warn!(error = %e, "cannot check the bastion; using it anyway");
                        }
                        Observed::Failed
                    }
                };
            }
            Look::Online => {
                let online =
                    ctx.cloud.online(&ctx.ssm, &resource).await.map_err(|e| {
                        self.cloud_error("checking whether the bastion is online", e)
                    })?;
                round.facts.online = Some(online);
            }
            Look::Sessions { target } => {
                let tick = matches!(occasion, Occasion::Tick { .. });
                if tick {
                    self.mem().sessions_checked_at = Some(Instant::now());
                }
                round.facts.others = match ctx.ssm.active_sessions(&target).await {
                    Ok(active) => Observed::Is(active.iter().filter(|s| !own.contains(s)).count()),
                    Err(e) if tick => {
                        let message = format!(
                            "cannot tell whether the bastion is in use (ssm:DescribeSessions: {e}); \
                             keeping it until max lifetime"
                        );
                        warn!(profile = %self.profile, "{message}");
                        self.mem().last_error = Some(message);
                        Observed::Failed
                    }
                    Err(_) => Observed::Failed,
                };
            }
            Look::Launch => {
                let mut tags = Self::scope_tags(ctx);
                let launch_id = round.record().map(|r| r.launch_id.clone());
                tags.insert(TAG_LAUNCH_ID.into(), launch_id.unwrap_or_default());
                let found = ctx
                    .cloud
                    .find(&tags)
                    .await
                    .map_err(|e| self.cloud_error("looking for an interrupted launch", e))?;
                round.facts.launched = Some(found);
            }
            Look::Reusable => {
                let found = ctx
                    .cloud
                    .find(&Self::scope_tags(ctx))
                    .await
                    .map_err(|e| self.cloud_error("finding a running bastion", e))?;
                round.facts.reusable = Some(found);
            }
            Look::RecordAgain => {
                let record = ctx.registry.get(&ctx.key).await?;
                round.facts.reread = Some(record.map(|r| r.launch_id));
            }
        }
        Ok(())
    }

    /// Executes a step that acts on the bastion: a registry write, a provider call, a
    /// wait. (The steps particular to one occasion are executed by its own loop.)
    async fn act(
        &self,
        ctx: &Ctx,
        occasion: Occasion<'_>,
        round: &Round,
        step: Step,
    ) -> Result<(), BastionError> {
        match &step {
            Step::Reuse(r) => return self.reuse(ctx, r).await,
            Step::Launch => return self.launch(ctx).await,
            _ => {}
        }
        let Some(record) = round.record() else {
            return Ok(());
        };
        let resource = record.resource.clone().unwrap_or_default();
        match step {
            Step::WaitForHolder => {
                if record.phase == Phase::Launching {
                    let detail = format!("another daemon ({}) is launching it", record.holder);
                    self.emit("waiting_for_launch", Some(record), Some(detail));
                } else {
                    self.emit("waiting_for_termination", Some(record), None);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
            Step::Forget => {
                if occasion == Occasion::Reconcile {
                    info!(resource = %resource, "the registry's bastion is gone; forgetting it");
                } else if record.phase == Phase::WaitingOnline {
                    warn!(resource = %resource, "the bastion stopped while booting");
                } else {
                    warn!(resource = %resource, "the bastion is gone; forgetting it");
                }
                self.forget(ctx, record, "gone").await
            }
            Step::Terminate(reason) => {
                if reason == Reason::Stopped && matches!(occasion, Occasion::Use { .. }) {
                    warn!(resource = %resource, "the bastion was stopped; terminating it");
                }
                self.terminate_record(ctx, record.clone(), &reason.to_string())
                    .await
            }
            Step::FinishTermination => self.finish_terminate(ctx, record.clone()).await,
            Step::MarkReady { target } => {
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
            }
            Step::AwaitOnline { renew_lease } => {
                if renew_lease {
                    let mut next = record.clone();
                    next.version += 1;
                    next.lease_until_ms = now_ms() + ms(LEASE);
                    let _ = ctx.registry.put(&next, Some(record.version)).await;
                }
                self.emit("waiting_online", Some(record), Some(resource));
                tokio::time::sleep(POLL_EVERY).await;
                Ok(())
            }
            Step::AdoptLaunch { resource } => {
                let mut next = record.clone();
                next.version += 1;
                next.phase = Phase::WaitingOnline;
                next.resource = Some(resource.clone());
                next.holder = self.host.daemon_id.clone();
                next.lease_until_ms = now_ms() + ms(LEASE);
                info!(resource = %resource, "adopting the bastion of an interrupted launch");
                match ctx.registry.put(&next, Some(record.version)).await {
                    Ok(()) | Err(RegistryError::Conflict(_)) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            Step::AwaitLaunch => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                Ok(())
            }
            Step::ForgetLaunch => {
                info!(launch_id = %record.launch_id, "an interrupted launch left nothing; forgetting it");
                match ctx.registry.delete(&record.key, record.version).await {
                    Ok(()) | Err(RegistryError::Conflict(_)) => Ok(()),
                    Err(e) => Err(e.into()),
                }
            }
            _ => Ok(()),
        }
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

    /// Reuse before create: adopts a live bastion of this scope and registry that has no
    /// record (a crash lost it).
    async fn reuse(&self, ctx: &Ctx, r: &Resource) -> Result<(), BastionError> {
        let adopted = self.adoption_record(ctx, r);
        match ctx.registry.put(&adopted, None).await {
            Ok(()) => {
                info!(resource = %r.id, "reusing a running bastion");
                self.emit("reusing", Some(&adopted), Some(r.id.clone()));
                Ok(())
            }
            Err(RegistryError::Conflict(_)) => Ok(()),
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
                let failed = Round::read(Some(record.clone()));
                let step = self.decide(Occasion::LaunchFailed { ambiguous }, &failed);
                if step == Step::ForgetLaunch
                    && let Err(d) = ctx.registry.delete(&record.key, record.version).await
                {
                    warn!(error = %d, "cannot remove the failed launch from the registry");
                }
                self.emit("failed", Some(&record), Some(err.to_string()));
                Err(err)
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
    /// it again, or another bastion replaced it; [`Occasion::Claim`]). The profile then
    /// ends its sessions and calls [`Bastions::finish_termination`] with the returned
    /// record.
    pub async fn claim_termination(
        &self,
        reason: &str,
        expect: u64,
    ) -> Result<Option<Record>, BastionError> {
        let ctx = self.ctx().await?;
        let _guard = self.ensure.lock().await;
        let round = Round::read(ctx.registry.get(&ctx.key).await?);
        match (
            self.decide(Occasion::Claim { expect }, &round),
            round.record,
        ) {
            (Step::ClaimTermination, Entry::Present(record)) => {
                self.mark_terminating(ctx, *record, reason).await
            }
            (Step::RecordChanged, _) => {
                info!(profile = %self.profile, reason, "the bastion changed before it could be ended; keeping it");
                Ok(None)
            }
            _ => Ok(None),
        }
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

    /// Called about every second by the profile ([`Occasion::Tick`]): keeps the record's
    /// use time fresh, warns before the max lifetime, decides idle and lifetime
    /// termination, moves on records that no connection waits for, and sweeps the
    /// registry now and then. `connections` are the profile's open connections;
    /// `own_sessions` its live session ids (not counted as someone else's use);
    /// `last_connection` when a connection last started or ended.
    pub async fn tick(
        &self,
        connections: usize,
        own_sessions: &[String],
        last_connection: Instant,
    ) -> Decision {
        let ctx = self.ctx.get();
        let occasion = Occasion::Tick {
            aws: ctx.is_some(),
            connections,
            last_connection,
        };
        let mut round = Round::new();
        // The lifecycle lock, held from [`Look::Lock`] to the end of the tick.
        let mut _held = None;
        loop {
            let step = self.decide(occasion, &round);
            let Some(ctx) = ctx else {
                if step == Step::RetryReconcile {
                    self.mem().swept_at = Some(Instant::now());
                    if let Err(e) = self.reconcile().await {
                        debug!(profile = %self.profile, error = %e, "bastion reconciliation still failing");
                    }
                }
                return Decision::Keep;
            };
            match step {
                Step::Sweep => {
                    self.mem().swept_at = Some(Instant::now());
                    if let Err(e) = self.reconcile().await {
                        warn!(profile = %self.profile, error = %e, "bastion reconciliation failed");
                    }
                    round = Round::new();
                }
                Step::NoteUse { used } => {
                    let mut mem = self.mem();
                    mem.seen_activity = Some(last_connection);
                    if used {
                        mem.last_local_use = Some(Instant::now());
                    }
                }
                Step::Look(Look::Record) => match ctx.registry.get(&ctx.key).await {
                    Ok(record) => {
                        self.remember(record.clone());
                        if record.is_none() {
                            self.mem().absent_since = Some(Instant::now());
                        }
                        round = Round::read(record);
                    }
                    Err(e) => {
                        warn!(profile = %self.profile, error = %e, "cannot read the bastion registry");
                        return Decision::Keep;
                    }
                },
                Step::Look(Look::Lock) => match self.ensure.try_lock() {
                    Ok(guard) => {
                        _held = Some(guard);
                        round.facts.lock = Some(true);
                    }
                    Err(_) => round.facts.lock = Some(false),
                },
                Step::Look(look) => {
                    if let Err(e) = self
                        .look(ctx, occasion, look, own_sessions, &mut round)
                        .await
                    {
                        warn!(profile = %self.profile, error = %e, "bastion lifecycle step failed");
                        return Decision::Keep;
                    }
                }
                Step::WarnLifetime { left } => {
                    let Some(record) = round.record() else {
                        return Decision::Keep;
                    };
                    let message = format!(
                        "bastion {} of profile {} reaches its max lifetime ({}) in {}; its connections will then be closed",
                        record.resource.as_deref().unwrap_or("?"),
                        self.profile,
                        humanize(self.cfg.max_lifetime),
                        humanize(left),
                    );
                    warn!(profile = %self.profile, "{message}");
                    self.emit("lifetime_warning", Some(record), Some(message.clone()));
                    let mut mem = self.mem();
                    mem.warned_launch = Some(record.launch_id.clone());
                    mem.warning = Some(message);
                }
                Step::Touch => {
                    if let Some(record) = round.record() {
                        self.touch(ctx, record).await;
                    }
                    return Decision::Keep;
                }
                Step::MarkIdle => {
                    self.mem().last_local_use = None;
                    if let Some(record) = round.record() {
                        let mut next = record.clone();
                        next.version += 1;
                        next.phase = Phase::Idle;
                        next.last_used_ms = round.now.ms;
                        if ctx.registry.put(&next, Some(record.version)).await.is_ok() {
                            self.emit("idle", Some(&next), None);
                        }
                    }
                    return Decision::Keep;
                }
                Step::EndSessionsThenTerminate { reason, version } => {
                    return Decision::Terminate {
                        reason: reason.to_string(),
                        version,
                    };
                }
                Step::KeepForOthers { sessions } => {
                    info!(profile = %self.profile, sessions, "bastion idle here but used by other sessions; keeping it");
                    return Decision::Keep;
                }
                Step::Nothing => return Decision::Keep,
                step => {
                    if let Err(e) = self.act(ctx, occasion, &round, step).await {
                        warn!(profile = %self.profile, error = %e, "bastion lifecycle step failed");
                    }
                    return Decision::Keep;
                }
            }
        }
    }

    /// Writes use (`ready`, `last_used_ms` = now) while connections use the bastion.
    async fn touch(&self, ctx: &Ctx, record: &Record) {
        let mut next = record.clone();
        next.version += 1;
        next.phase = Phase::Ready;
        next.last_used_ms = now_ms();
        if ctx.registry.put(&next, Some(record.version)).await.is_ok() {
            self.mem().touched_at = Some(Instant::now());
        }
    }

    /// Reconciles the registry with EC2/ECS ([`Occasion::Reconcile`], then
    /// [`Occasion::Stray`] for each live resource, then the [`Occasion::Backstop`]):
    /// finishes what a killed daemon left half done (an interrupted launch is adopted or
    /// forgotten, an interrupted termination completed), forgets bastions that are gone,
    /// ends expired ones, and terminates live bastions of this profile and registry that
    /// no record owns, unless a Session Manager session uses them (then they are adopted).
    /// Any failed call but DescribeSessions fails the reconciliation (it is retried).
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
        let mut round = Round::new();
        loop {
            match self.decide(Occasion::Reconcile, &round) {
                Step::Nothing => break,
                Step::Look(look) => {
                    self.look(ctx, Occasion::Reconcile, look, &[], &mut round)
                        .await?
                }
                step => {
                    self.act(ctx, Occasion::Reconcile, &round, step).await?;
                    break;
                }
            }
        }
        let record = Entry::from(ctx.registry.get(&ctx.key).await?);
        for r in &live {
            let occasion = Occasion::Stray(r);
            let mut round = Round {
                record: record.clone(),
                ..Round::new()
            };
            loop {
                match self.decide(occasion, &round) {
                    Step::Look(look) => self.look(ctx, occasion, look, &[], &mut round).await?,
                    Step::AdoptStray { target } => {
                        info!(resource = %r.id, "adopting a bastion in use that no record owned");
                        let mut adopted = self.adoption_record(ctx, r);
                        adopted.phase = Phase::Ready;
                        adopted.target = target;
                        if let Err(e) = ctx.registry.put(&adopted, None).await {
                            warn!(error = %e, "cannot record the adopted bastion");
                        }
                        break;
                    }
                    Step::LeaveStray => {
                        warn!(resource = %r.id, "a second bastion of this profile is in use; leaving it until its sessions end");
                        break;
                    }
                    Step::TerminateStray => {
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
                        break;
                    }
                    _ => break,
                }
            }
        }
        self.end_long_expired(ctx).await;
        self.mem().swept_at = Some(Instant::now());
        Ok(())
    }

    /// The backstop for every bastion of this profile, whoever launched it and whichever
    /// registry tracks it ([`Occasion::Backstop`]).
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
        let round = Round::new();
        for r in found {
            if self.decide(Occasion::Backstop(&r), &round) != Step::EndExpired {
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
    }
}
