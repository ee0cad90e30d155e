//! Every decision of an on-demand bastion's lifecycle, as one pure function: [`decide`].
//!
//! [`decide`] reads no clock, does no IO and needs no runtime: it takes the registry
//! record, what this daemon remembers, the time and what has been observed so far
//! ([`Input`]), and returns the one [`Step`] to take next. The manager
//! ([`super::manager::Bastions`]) only gathers those inputs and executes steps:
//!
//! ```text
//! loop {
//!     match decide(&Input { occasion, record, memory, now, facts, settings }) {
//!         Step::Look(look) => facts / record += the answer of one AWS or registry call
//!         step => execute it (a registry write, a provider call, a wait, an event)
//!     }
//! }
//! ```
//!
//! A fact that costs a call (the record, the resource's state, Session Manager's Active
//! sessions, ...) is asked for with [`Step::Look`] only when a rule needs it, so the calls
//! made are exactly the ones the rules reach, in the order they reach them. Steps that
//! only change what the daemon remembers ([`Step::NoteUse`], [`Step::WarnLifetime`],
//! [`Step::Sweep`]) are followed by another decision; any other step ends the round: the
//! tick returns, a connection waiting for the bastion reads the record again and starts
//! a new round, reconciliation moves on to the next resource.
//!
//! A round's decisions use the time its record was read (`now`), so they are consistent
//! with one another.
//!
//! Every rule, and why it exists, is written on the function that holds it; the unit test
//! `decisions_table` below has one row per situation and asserts the exact step.
//! `proto-docs/ondemand.md` describes the same lifecycle for readers of the protocol.

use std::time::{Duration, Instant};

use super::cloud::{Resource, ResourceState, TAG_LAUNCH_ID};
use super::registry::{Phase, Record};

/// How long a lease on a record in a transient phase holds without renewal.
pub const LEASE: Duration = Duration::from_secs(90);

/// How often a bastion in use is re-checked against EC2/ECS.
const VERIFY_EVERY: Duration = Duration::from_secs(30);

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

/// The tag holding a resource's max lifetime end (ISO 8601).
pub const TAG_EXPIRES: &str = "bastion:expires";

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// The time of a decision, read by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    /// Wall-clock time, Unix ms: compared with the record's times, which other daemons
    /// (on other machines) write too.
    pub ms: u64,
    /// Monotonic time: compared with what this daemon remembers.
    pub at: Instant,
}

impl Now {
    /// Whether `every` has passed since `last` (or nothing happened yet).
    fn due(self, last: Option<Instant>, every: Duration) -> bool {
        last.is_none_or(|t| self.at.saturating_duration_since(t) >= every)
    }
}

/// What the rules read of the profile's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// This daemon's id (the lease holder it writes).
    pub daemon_id: String,
    /// Terminate after this long without a connection and without an Active session.
    pub idle_timeout: Duration,
    /// Terminate this long after launch, even while in use.
    pub max_lifetime: Duration,
    /// Warn this long before the max lifetime ends.
    pub lifetime_warning: Duration,
    /// How long a connection waits for a bastion to come online.
    pub ready_timeout: Duration,
}

impl Settings {
    /// How often use is written to the record while connections use the bastion: often
    /// enough that another daemon never sees it idle for a whole `idle_timeout`.
    pub fn touch_every(&self) -> Duration {
        (self.idle_timeout / 3).min(Duration::from_secs(30))
    }
}

/// What this daemon remembers about a profile's bastion between decisions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Memory {
    /// The record last read (also what `status` shows).
    pub record: Option<Record>,
    /// When the resource was last seen pending or running.
    pub verified_at: Option<Instant>,
    /// A connection used the bastion through this daemon since the record was last
    /// marked idle.
    pub last_local_use: Option<Instant>,
    /// When use was last written while connections were open.
    pub touched_at: Option<Instant>,
    /// The launch whose lifetime warning was given.
    pub warned_launch: Option<String>,
    /// When Session Manager was last asked for Active sessions by an idle decision.
    pub sessions_checked_at: Option<Instant>,
    /// No record was found then: the registry is not read again for a while unless a
    /// connection is open (launches go through `ensure_ready`, which reads it anyway).
    pub absent_since: Option<Instant>,
    /// The profile's last connection start/end seen by the previous tick.
    pub seen_activity: Option<Instant>,
    /// When the registry was last reconciled (or tried).
    pub swept_at: Option<Instant>,
    /// The lifetime warning, for `status` (no rule reads it).
    pub warning: Option<String>,
    /// The last error, for `status` (no rule reads it).
    pub last_error: Option<String>,
}

/// The registry record as far as this decision knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    /// Not read yet in this round.
    Unread,
    /// Read: there is none.
    Absent,
    /// Read.
    Present(Box<Record>),
}

impl From<Option<Record>> for Entry {
    fn from(record: Option<Record>) -> Entry {
        record.map_or(Entry::Absent, |r| Entry::Present(Box::new(r)))
    }
}

/// An answer that may be missing.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Observed<T> {
    /// Not asked yet.
    #[default]
    NotYet,
    /// Asked; the call failed.
    Failed,
    /// The answer.
    Is(T),
}

/// What has been observed in this round, in answer to [`Step::Look`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// [`Look::Lock`]: whether the tick took the lifecycle lock (`Some(false)`: a
    /// connection preparing the bastion holds it).
    pub lock: Option<bool>,
    /// [`Look::Resource`]: the provider's state of the record's resource.
    pub state: Observed<ResourceState>,
    /// [`Look::Online`]: the Session Manager target once the resource is online.
    pub online: Option<Option<String>>,
    /// [`Look::Sessions`]: Active sessions on the target, other than this daemon's own.
    pub others: Observed<usize>,
    /// [`Look::Launch`]: the resources tagged with the record's launch id.
    pub launched: Option<Vec<Resource>>,
    /// [`Look::Reusable`]: the resources of this key and registry.
    pub reusable: Option<Vec<Resource>>,
    /// [`Look::RecordAgain`]: the launch id of the record read again (`None`: no record).
    pub reread: Option<Option<String>>,
}

/// What the decision is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Occasion<'a> {
    /// The profile's tick, about every second, open or not.
    Tick {
        /// Whether the AWS side exists (the first reconciliation got as far as
        /// identifying the caller).
        aws: bool,
        /// The profile's open connections.
        connections: usize,
        /// When a connection of the profile last started or ended.
        last_connection: Instant,
    },
    /// A connection needs the target (`ensure_ready`), waiting at most until `deadline`.
    Use {
        /// When the connection stops waiting (`ready_timeout` after it asked).
        deadline: Instant,
    },
    /// Reconciliation of the record with EC2/ECS (at start, then every 5 minutes).
    Reconcile,
    /// Reconciliation: a live resource of this key and registry. `record` is the record
    /// read after the record's own reconciliation.
    Stray(&'a Resource),
    /// The backstop: a resource of this profile, any owner, any registry.
    Backstop(&'a Resource),
    /// First half of ending the bastion after [`Step::EndSessionsThenTerminate`]:
    /// `expect` is the record version that decision was based on.
    Claim {
        /// The version the decision to end the bastion read.
        expect: u64,
    },
    /// The launch of the `record` (phase `launching`) failed.
    LaunchFailed {
        /// A timeout or a server error: the instance or task may exist anyway.
        ambiguous: bool,
    },
}

/// Everything a decision reads.
#[derive(Clone, Copy, Debug)]
pub struct Input<'a> {
    /// What the decision is about.
    pub occasion: Occasion<'a>,
    /// The registry record.
    pub record: &'a Entry,
    /// What this daemon remembers.
    pub memory: &'a Memory,
    /// The time the round's record was read.
    pub now: Now,
    /// What was observed in this round.
    pub facts: &'a Facts,
    /// The profile's settings and this daemon's id.
    pub settings: &'a Settings,
}

/// A fact to gather before deciding again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Look {
    /// Read the registry record (the round's [`Entry`]).
    Record,
    /// Take the lifecycle lock without waiting ([`Facts::lock`]).
    Lock,
    /// The provider's state of the record's resource ([`Facts::state`]).
    Resource,
    /// Whether Session Manager reaches the record's resource ([`Facts::online`]).
    Online,
    /// Session Manager's Active sessions on `target` ([`Facts::others`]).
    Sessions {
        /// The Session Manager target.
        target: String,
    },
    /// The resources tagged with the record's launch id ([`Facts::launched`]).
    Launch,
    /// The resources of this key and registry ([`Facts::reusable`]).
    Reusable,
    /// The record once more, to see whether it owns the stray now ([`Facts::reread`]).
    RecordAgain,
}

/// Why the bastion is ended (shown in logs, events and the profile's status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// No connection and no Active session for the idle timeout.
    Idle(Duration),
    /// Its max lifetime (the duration) ended: a tick ends its sessions too.
    MaxLifetime(Duration),
    /// Past its max lifetime when a connection or reconciliation found it.
    Expired,
    /// The instance was stopped (it would keep costing for its volumes).
    Stopped,
    /// The instance was stopped while it booted.
    StoppedWhileBooting,
    /// It was not online with Session Manager `ready_timeout` + the lease after launch.
    NeverOnline,
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Idle(d) => write!(
                f,
                "idle for {} (no connection, no Active session)",
                humanize(*d)
            ),
            Reason::MaxLifetime(d) => write!(f, "max lifetime ({}) reached", humanize(*d)),
            Reason::Expired => f.write_str("max lifetime reached"),
            Reason::Stopped => f.write_str("stopped"),
            Reason::StoppedWhileBooting => f.write_str("stopped while booting"),
            Reason::NeverOnline => f.write_str("never came online with Session Manager"),
        }
    }
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing, for now.
    Nothing,
    /// Gather a fact, then decide again.
    Look(Look),
    /// Remember the tick's connection activity (`seen_activity`; `last_local_use` when
    /// `used`), then decide again.
    NoteUse {
        /// A connection is open, or one came and went since the last tick.
        used: bool,
    },
    /// Retry the first reconciliation (the AWS side could not be set up yet); the tick
    /// ends.
    RetryReconcile,
    /// Reconcile the registry with EC2/ECS, then decide again.
    Sweep,
    /// Warn (log and event) that the max lifetime ends in `left`, remember the launch
    /// warned about, then decide again.
    WarnLifetime {
        /// Until the max lifetime ends.
        left: Duration,
    },
    /// Write `ready` with `last_used_ms = now` (connections are using the bastion).
    Touch,
    /// Write `idle` with `last_used_ms = now` (the last connection through this daemon
    /// ended: the idle clock starts).
    MarkIdle,
    /// Hand the ending to the profile, which owns the sessions: claim the record
    /// ([`Occasion::Claim`] with `version`), end the profile's sessions, then terminate.
    EndSessionsThenTerminate {
        /// Why.
        reason: Reason,
        /// The record version the decision read.
        version: u64,
    },
    /// Keep the idle bastion: other Active sessions use it.
    KeepForOthers {
        /// How many.
        sessions: usize,
    },
    /// The connection waited `ready_timeout`: fail it, naming what the bastion is
    /// waiting for.
    GiveUp,
    /// Adopt this live resource of the key and registry (a crash lost its record): write
    /// a `waiting_online` record for it.
    Reuse(Resource),
    /// Write a `launching` record (compare-and-swap on "must not exist"), then launch.
    Launch,
    /// Write `ready` with `last_used_ms = now` before handing out the target, then
    /// decide again on the record written (a conflict: read it again).
    RecordUse,
    /// Give the connection its target (`None`: the record names none; read it again).
    HandOut {
        /// The Session Manager target, else the resource.
        target: Option<String>,
    },
    /// Another daemon's live lease covers the record's transient phase: wait a second,
    /// then read it again.
    WaitForHolder,
    /// Delete the record: its resource is gone.
    Forget,
    /// Write `terminating` (taking the lease; a conflict: leave it), terminate, delete the
    /// record. The profile's sessions are not ended first.
    Terminate(Reason),
    /// Terminate the `terminating` record's resource (idempotent), delete the record.
    FinishTermination,
    /// Write `ready` with this target: Session Manager reaches the resource.
    MarkReady {
        /// The Session Manager target.
        target: String,
    },
    /// Not online yet: report progress and poll again later, renewing the lease first
    /// when `renew_lease`.
    AwaitOnline {
        /// The lease is ours and half gone.
        renew_lease: bool,
    },
    /// Adopt the resource an interrupted launch left: write `waiting_online` with it,
    /// taking the lease.
    AdoptLaunch {
        /// Its id.
        resource: String,
    },
    /// Nothing found for the launch yet, but it may still be invisible: look again in a
    /// second.
    AwaitLaunch,
    /// Delete the `launching` record: nothing was launched.
    ForgetLaunch,
    /// Write `terminating` on the record read, then return it to the profile, which ends
    /// its sessions and terminates.
    ClaimTermination,
    /// The record is not the one the decision was based on (a use in between, another
    /// daemon's step): leave it; the next tick reads it again and decides afresh.
    RecordChanged,
    /// Adopt the stray (an Active session uses it and there is no record): write a
    /// `ready` record for it.
    AdoptStray {
        /// Its Session Manager target.
        target: Option<String>,
    },
    /// Leave the stray (an Active session uses it but the record owns another bastion),
    /// with a warning.
    LeaveStray,
    /// Terminate the stray: no record owns it and nothing uses it.
    TerminateStray,
    /// End the resource: long past its `bastion:expires`.
    EndExpired,
}

/// The next step. See the module documentation for how it is used; each rule is written
/// on the function of its occasion.
pub fn decide(input: &Input<'_>) -> Step {
    match input.occasion {
        Occasion::Tick {
            aws,
            connections,
            last_connection,
        } => tick(input, aws, connections, last_connection),
        Occasion::Use { deadline } => use_it(input, deadline),
        Occasion::Reconcile => reconcile(input),
        Occasion::Stray(resource) => stray(input, resource),
        Occasion::Backstop(resource) => backstop(input.now, resource),
        Occasion::Claim { expect } => claim(input.record, expect),
        Occasion::LaunchFailed { ambiguous } => launch_failed(ambiguous),
    }
}

/// Whether this daemon may act on a record in a transient phase (`launching`,
/// `terminating`, an overdue `waiting_online`): it holds the lease, or the holder's
/// lease ran out (that daemon died or lost its way; the lease is then taken over with a
/// compare-and-swap on the version read).
fn may_take_over(input: &Input<'_>, r: &Record) -> bool {
    r.holder == input.settings.daemon_id || r.lease_until_ms <= input.now.ms
}

/// The tick, about every second for every on-demand profile, open or not.
///
/// Before the record is read:
///
/// 1. No AWS side yet (the first reconciliation failed: no network, SSO expired): retry
///    the reconciliation every 30 s, so that a bastion left by a previous run is still
///    reaped; nothing else.
/// 2. Every 5 minutes, while no connection is open: reconcile (a sweep).
/// 3. A connection open now, or one that came and went since the last tick (a `psql -c`
///    of 300 ms), is use: remember it, so that the record is marked idle once it ends.
///    A connection that came and went while no record was known used no bastion.
/// 4. No record 15 s ago and no connection: do not read the registry again yet (a
///    DynamoDB read per second per profile would cost for nothing).
///
/// With a `ready` or `idle` record:
///
/// 5. **Max lifetime**: at `expires_ms`, end the sessions, then terminate, even while
///    connections use it ([`Step::EndSessionsThenTerminate`]).
/// 6. **Lifetime warning**: `lifetime_warning` before `expires_ms`, warn once per launch.
/// 7. Connections open: write use (`ready`, `last_used_ms = now`) when the record says
///    `idle`, and otherwise at most every [`Settings::touch_every`], so that other
///    daemons, and an idle decision in progress, see the bastion in use.
/// 8. The last connection through this daemon ended: write `idle`; the idle clock starts.
/// 9. **Idle reaping**: `last_used_ms` older than `idle_timeout` and, asking Session
///    Manager at most every `min(10 s, idle_timeout)`, no Active session on the target
///    other than this daemon's own: end the sessions, then terminate. The profile first
///    claims the record ([`Occasion::Claim`]): the termination happens only if the record
///    still has the version read here (a use in between, here or by another daemon,
///    cancels it). Another session keeps the bastion; a failed DescribeSessions keeps it
///    too (missing permission: until its max lifetime). The lease is not consulted: a
///    `ready`/`idle` record's holder is whoever launched it; use by another daemon shows
///    as `last_used_ms` and as its Active sessions.
///
/// With a record in a transient phase: [`unattended`], under the lifecycle lock, taken
/// without waiting: a connection preparing the bastion holds it and moves the record on
/// itself.
fn tick(input: &Input<'_>, aws: bool, connections: usize, last_connection: Instant) -> Step {
    let (mem, now) = (input.memory, input.now);
    let record = match input.record {
        Entry::Unread => {
            if !aws {
                return if now.due(mem.swept_at, CTX_RETRY) {
                    Step::RetryReconcile
                } else {
                    Step::Nothing
                };
            }
            if connections == 0 && now.due(mem.swept_at, SWEEP_EVERY) {
                return Step::Sweep;
            }
            let new_activity = mem.seen_activity.is_some_and(|t| last_connection > t);
            let used = connections > 0 || (new_activity && mem.record.is_some());
            if mem.seen_activity != Some(last_connection) || (used && mem.last_local_use.is_none())
            {
                return Step::NoteUse { used };
            }
            let quiet = mem
                .absent_since
                .is_some_and(|t| !now.due(Some(t), ABSENT_RECHECK));
            if quiet && connections == 0 {
                return Step::Nothing;
            }
            return Step::Look(Look::Record);
        }
        Entry::Absent => return Step::Nothing,
        Entry::Present(r) => r,
    };
    if !matches!(record.phase, Phase::Ready | Phase::Idle) {
        let step = unattended(input, record);
        return match input.facts.lock {
            _ if step == Step::Nothing => Step::Nothing,
            None => Step::Look(Look::Lock),
            Some(false) => Step::Nothing,
            Some(true) => step,
        };
    }
    let settings = input.settings;
    if now.ms >= record.expires_ms {
        return Step::EndSessionsThenTerminate {
            reason: Reason::MaxLifetime(settings.max_lifetime),
            version: record.version,
        };
    }
    if now.ms + ms(settings.lifetime_warning) >= record.expires_ms
        && mem.warned_launch.as_deref() != Some(record.launch_id.as_str())
    {
        return Step::WarnLifetime {
            left: Duration::from_millis(record.expires_ms - now.ms),
        };
    }
    if connections > 0 {
        let due = now.due(mem.touched_at, settings.touch_every());
        return if due || record.phase != Phase::Ready {
            Step::Touch
        } else {
            Step::Nothing
        };
    }
    if mem.last_local_use.is_some() {
        return Step::MarkIdle;
    }
    if now.ms < record.last_used_ms + ms(settings.idle_timeout) {
        return Step::Nothing;
    }
    match input.facts.others {
        Observed::NotYet => {
            let every = SESSIONS_CHECK_EVERY.min(settings.idle_timeout);
            if now.due(mem.sessions_checked_at, every) {
                let target = record.target.clone().or(record.resource.clone());
                Step::Look(Look::Sessions {
                    target: target.unwrap_or_default(),
                })
            } else {
                Step::Nothing
            }
        }
        Observed::Is(0) => Step::EndSessionsThenTerminate {
            reason: Reason::Idle(settings.idle_timeout),
            version: record.version,
        },
        Observed::Is(sessions) => Step::KeepForOthers { sessions },
        Observed::Failed => Step::Nothing,
    }
}

/// A record in a transient phase that no connection waits for (a restarted daemon, a
/// launch whose client went away), seen by a tick:
///
/// * `waiting_online` that is ours or whose lease ran out, still not online
///   `ready_timeout` + the lease after its launch: terminate it (it never will be).
/// * `waiting_online` otherwise: poll it ([`poll_online`]).
/// * `launching` that is ours or whose lease ran out: recover it ([`recover_launch`]).
/// * `terminating` that is ours or whose lease ran out: finish the termination.
/// * Anything else: another daemon holds a live lease on it; leave it to that daemon.
fn unattended(input: &Input<'_>, r: &Record) -> Step {
    let never_online = input.now.ms >= r.created_ms + ms(input.settings.ready_timeout) + ms(LEASE);
    match r.phase {
        Phase::WaitingOnline if may_take_over(input, r) && never_online => {
            Step::Terminate(Reason::NeverOnline)
        }
        Phase::WaitingOnline => poll_online(input, r),
        Phase::Launching if may_take_over(input, r) => recover_launch(input, r),
        Phase::Terminating if may_take_over(input, r) => Step::FinishTermination,
        _ => Step::Nothing,
    }
}

/// `waiting_online`: one poll.
///
/// * Online with Session Manager: write `ready` with its target.
/// * Not online, and the provider says it is gone (terminated while booting by its own
///   shutdown, a colleague, the console): forget it (a waiting connection then launches
///   another).
/// * Not online and stopped: terminate it (a stopped instance still costs its volumes).
/// * Otherwise (pending, running, or the state could not be read): report progress and
///   poll again; the holder renews its lease once half of it is gone, so that nobody
///   takes the boot over.
fn poll_online(input: &Input<'_>, r: &Record) -> Step {
    match &input.facts.online {
        None => Step::Look(Look::Online),
        Some(Some(target)) => Step::MarkReady {
            target: target.clone(),
        },
        Some(None) => match &input.facts.state {
            Observed::NotYet => Step::Look(Look::Resource),
            Observed::Is(ResourceState::Gone) => Step::Forget,
            Observed::Is(ResourceState::Stopped) => Step::Terminate(Reason::StoppedWhileBooting),
            Observed::Is(_) | Observed::Failed => Step::AwaitOnline {
                renew_lease: r.holder == input.settings.daemon_id
                    && r.lease_until_ms < input.now.ms + ms(LEASE) / 2,
            },
        },
    }
}

/// `launching` left by a daemon that died (or by a launch that failed ambiguously):
///
/// * A resource tagged with the record's launch id exists: adopt it (`waiting_online`).
/// * None, but the record is younger than 15 s: look again in a second
///   (DescribeInstances is eventually consistent just after RunInstances).
/// * None after that: nothing was launched; delete the record.
fn recover_launch(input: &Input<'_>, r: &Record) -> Step {
    let Some(found) = &input.facts.launched else {
        return Step::Look(Look::Launch);
    };
    match found.iter().find(|x| x.state != ResourceState::Gone) {
        Some(x) => Step::AdoptLaunch {
            resource: x.id.clone(),
        },
        None if input.now.ms < r.created_ms + ms(LAUNCH_VISIBILITY) => Step::AwaitLaunch,
        None => Step::ForgetLaunch,
    }
}

/// A connection needs the target (`ensure_ready`): one round per registry read, until a
/// target is handed out or the connection gives up.
///
/// * `ready_timeout` passed (checked right after the read): give up, naming what the
///   bastion waits for.
/// * No record: **reuse before create**: adopt the newest live (pending or running)
///   resource of this key and registry (a crash lost its record), else launch. The
///   `launching` record is created with "must not exist": exactly one creator wins; the
///   others see the record and wait.
/// * `ready`/`idle`: [`use_ready`].
/// * `waiting_online`: [`poll_online`].
/// * `launching`/`terminating` under another daemon's live lease: wait for it.
/// * `launching` otherwise: [`recover_launch`]; `terminating` otherwise: finish it.
fn use_it(input: &Input<'_>, deadline: Instant) -> Step {
    let record = match input.record {
        Entry::Unread => return Step::Look(Look::Record),
        _ if input.now.at >= deadline => return Step::GiveUp,
        Entry::Absent => {
            let Some(found) = &input.facts.reusable else {
                return Step::Look(Look::Reusable);
            };
            let mut live: Vec<&Resource> = found
                .iter()
                .filter(|r| matches!(r.state, ResourceState::Running(_) | ResourceState::Pending))
                .collect();
            live.sort_by_key(|r| std::cmp::Reverse(r.launched_ms));
            return match live.first() {
                Some(r) => Step::Reuse((*r).clone()),
                None => Step::Launch,
            };
        }
        Entry::Present(r) => r,
    };
    match record.phase {
        Phase::Ready | Phase::Idle => use_ready(input, record),
        Phase::WaitingOnline => poll_online(input, record),
        Phase::Launching | Phase::Terminating if !may_take_over(input, record) => {
            Step::WaitForHolder
        }
        Phase::Launching => recover_launch(input, record),
        Phase::Terminating => Step::FinishTermination,
    }
}

/// A `ready` or `idle` record a connection wants to use:
///
/// * Past `expires_ms`: terminate it (a new one is launched in the next round).
/// * Not seen running for 30 s: ask the provider. Gone: forget it. Stopped: terminate it.
///   The check failed: use it anyway.
/// * **Use is written before the target is handed out**: when the record says `idle`,
///   or its `last_used_ms` is older than [`Settings::touch_every`], write `ready` with
///   `last_used_ms = now` first, so that an idle decision taken meanwhile (here or by
///   another daemon) sees the new version and does not terminate under the connection.
/// * Then hand out the target (else the resource id).
fn use_ready(input: &Input<'_>, r: &Record) -> Step {
    let now = input.now;
    if now.ms >= r.expires_ms {
        return Step::Terminate(Reason::Expired);
    }
    if now.due(input.memory.verified_at, VERIFY_EVERY) {
        match &input.facts.state {
            Observed::NotYet => return Step::Look(Look::Resource),
            Observed::Is(ResourceState::Gone) => return Step::Forget,
            Observed::Is(ResourceState::Stopped) => return Step::Terminate(Reason::Stopped),
            Observed::Is(_) | Observed::Failed => {}
        }
    }
    let fresh = now.ms < r.last_used_ms + ms(input.settings.touch_every());
    if r.phase == Phase::Idle || !fresh {
        return Step::RecordUse;
    }
    Step::HandOut {
        target: r.target.clone().or(r.resource.clone()),
    }
}

/// Reconciliation of the record, after the live resources of this key and registry were
/// listed (resources first: a record is written before its launch, so every resource
/// listed already has its record by the time the record is read):
///
/// * `launching`, ours or lease expired: [`recover_launch`].
/// * `terminating`, ours or lease expired: terminate again (idempotent), delete.
/// * `waiting_online`/`ready`/`idle`: the resource is gone (a record with no resource):
///   delete the record. Stopped: terminate it. Past `expires_ms`: terminate it.
/// * Otherwise (another daemon's live lease), or no record: nothing.
///
/// The live resources the record does not own are then decided one by one ([`stray`]),
/// and every resource of the profile passes the [`backstop`].
fn reconcile(input: &Input<'_>) -> Step {
    let r = match input.record {
        Entry::Unread => return Step::Look(Look::Record),
        Entry::Absent => return Step::Nothing,
        Entry::Present(r) => r,
    };
    match r.phase {
        Phase::Launching if may_take_over(input, r) => recover_launch(input, r),
        Phase::Terminating if may_take_over(input, r) => Step::FinishTermination,
        Phase::WaitingOnline | Phase::Ready | Phase::Idle => match &input.facts.state {
            Observed::NotYet => Step::Look(Look::Resource),
            Observed::Is(ResourceState::Gone) => Step::Forget,
            Observed::Is(ResourceState::Stopped) => Step::Terminate(Reason::Stopped),
            _ if input.now.ms >= r.expires_ms => Step::Terminate(Reason::Expired),
            _ => Step::Nothing,
        },
        Phase::Launching | Phase::Terminating => Step::Nothing,
    }
}

/// **Orphans**: a live resource of this key and registry (reconciliation):
///
/// * The record owns it (same launch id): nothing; the record's rules apply.
/// * An Active session uses it (running with a target; a failed DescribeSessions counts
///   as used: never terminate what may be in use): adopt it when there is no record,
///   else leave it, with a warning, until its sessions end.
/// * Nothing uses it: read the record again (another daemon may have adopted it since
///   the record was read); still not owned: terminate it.
fn stray(input: &Input<'_>, resource: &Resource) -> Step {
    let launch_id = resource.tags.get(TAG_LAUNCH_ID);
    let record = match input.record {
        Entry::Unread => return Step::Look(Look::Record),
        Entry::Absent => None,
        Entry::Present(r) => Some(r),
    };
    if record.is_some_and(|r| Some(&r.launch_id) == launch_id) {
        return Step::Nothing;
    }
    let target = match &resource.state {
        ResourceState::Running(t) => t.clone(),
        _ => None,
    };
    let used = match (&target, &input.facts.others) {
        (None, _) => false,
        (Some(t), Observed::NotYet) => {
            return Step::Look(Look::Sessions { target: t.clone() });
        }
        (Some(_), Observed::Is(n)) => *n > 0,
        (Some(_), Observed::Failed) => true,
    };
    if used {
        return if record.is_none() {
            Step::AdoptStray { target }
        } else {
            Step::LeaveStray
        };
    }
    match &input.facts.reread {
        None => Step::Look(Look::RecordAgain),
        Some(Some(id)) if Some(id) == launch_id => Step::Nothing,
        Some(_) => Step::TerminateStray,
    }
}

/// **Expired backstop**: any resource of this profile (any owner, any registry) whose
/// `bastion:expires` passed more than 10 minutes ago is ended: the max lifetime applies
/// even in use, an EC2 instance normally shut itself down long before, and a Fargate
/// task has no self-shutdown. A missing or unreadable tag ends nothing.
fn backstop(now: Now, resource: &Resource) -> Step {
    let limit = now.ms.saturating_sub(ms(EXPIRED_GRACE));
    let expires = resource.tags.get(TAG_EXPIRES).and_then(|t| {
        let t =
            aws_smithy_types::DateTime::from_str(t, aws_smithy_types::date_time::Format::DateTime)
                .ok()?;
        u64::try_from(t.to_millis().ok()?).ok()
    });
    if expires.is_some_and(|t| t < limit) {
        Step::EndExpired
    } else {
        Step::Nothing
    }
}

/// **Claim, then end sessions, then terminate.** A tick decided to end the bastion with
/// the record at version `expect`; read under the lifecycle lock, the record must still
/// have that version and be `ready`, `idle` or `waiting_online`. Then `terminating` is
/// written (a compare-and-swap: a use in between makes it lose) before any session is
/// ended, so a bastion is never cut under a connection that just started. A record
/// changed under us (a use, another daemon's step: every write bumps the version) is
/// left alone: the next tick reads it again and decides afresh.
fn claim(record: &Entry, expect: u64) -> Step {
    match record {
        Entry::Unread => Step::Look(Look::Record),
        Entry::Absent => Step::Nothing,
        Entry::Present(r)
            if r.version == expect
                && matches!(r.phase, Phase::Ready | Phase::Idle | Phase::WaitingOnline) =>
        {
            Step::ClaimTermination
        }
        Entry::Present(_) => Step::RecordChanged,
    }
}

/// A failed launch: a definite error (permission, capacity, quota, configuration)
/// deletes the `launching` record. A timeout or server error may have launched it
/// anyway: the record stays, and recovery ([`recover_launch`]) adopts what appears or
/// forgets the launch once 15 s have passed.
fn launch_failed(ambiguous: bool) -> Step {
    if ambiguous {
        Step::Nothing
    } else {
        Step::ForgetLaunch
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::ondemand::registry::ProviderKind;

    /// The wall clock of the launch (Unix ms).
    const T0: u64 = 1_800_000_000_000;
    const S: u64 = 1000;
    const MIN: u64 = 60 * S;
    const H: u64 = 60 * MIN;
    /// When most rows decide: an hour after the launch.
    const NOW: u64 = H;

    /// Both clocks, as milliseconds after the launch.
    struct Clock(Instant);

    impl Clock {
        fn at(&self, ms: u64) -> Now {
            Now {
                ms: T0 + ms,
                at: self.instant(ms),
            }
        }

        fn instant(&self, ms: u64) -> Instant {
            self.0 + Duration::from_millis(ms)
        }
    }

    fn settings() -> Settings {
        Settings {
            daemon_id: "me".into(),
            idle_timeout: Duration::from_secs(10 * 60),
            max_lifetime: Duration::from_secs(8 * 3600),
            lifetime_warning: Duration::from_secs(15 * 60),
            ready_timeout: Duration::from_secs(5 * 60),
        }
    }

    /// Launched by this daemon at `T0` (launch `L1`, instance `i-1`), last used then,
    /// version 7.
    fn record(phase: Phase) -> Record {
        Record {
            key: "db@arn:aws:iam::1:user/me".into(),
            version: 7,
            launch_id: "L1".into(),
            provider: ProviderKind::Ec2,
            phase,
            resource: Some("i-1".into()),
            target: Some("i-1".into()),
            profile: "db".into(),
            owner: "arn:aws:iam::1:user/me".into(),
            holder: "me".into(),
            lease_until_ms: T0 + 90 * S,
            created_ms: T0,
            expires_ms: T0 + 8 * H,
            last_used_ms: T0,
        }
    }

    fn present(phase: Phase, edit: impl FnOnce(&mut Record)) -> Entry {
        let mut r = record(phase);
        edit(&mut r);
        Entry::Present(Box::new(r))
    }

    /// Held by another daemon whose lease runs for another minute.
    fn others_lease(r: &mut Record) {
        r.holder = "other".into();
        r.lease_until_ms = T0 + NOW + MIN;
    }

    /// A resource of this key and registry.
    fn resource(
        id: &str,
        launch_id: &str,
        state: ResourceState,
        launched_ms: Option<u64>,
    ) -> Resource {
        Resource {
            id: id.into(),
            state,
            tags: BTreeMap::from([(TAG_LAUNCH_ID.to_owned(), launch_id.to_owned())]),
            launched_ms,
        }
    }

    fn expiring(id: &str, expires_ms: u64) -> Resource {
        let mut r = resource(id, "L5", ResourceState::Running(Some(id.into())), None);
        let tag = aws_smithy_types::DateTime::from_millis(expires_ms as i64)
            .fmt(aws_smithy_types::date_time::Format::DateTime)
            .unwrap_or_default();
        r.tags.insert(TAG_EXPIRES.into(), tag);
        r
    }

    fn facts(edit: impl FnOnce(&mut Facts)) -> Facts {
        let mut f = Facts::default();
        edit(&mut f);
        f
    }

    struct Row<'a> {
        name: &'static str,
        occasion: Occasion<'a>,
        record: Entry,
        memory: Memory,
        now: Now,
        facts: Facts,
        expect: Step,
    }

    /// One row per situation: the inputs, and the exact step `decide` must take.
    #[test]
    fn decisions_table() {
        let c = Clock(Instant::now());
        let now = c.at(NOW);
        let ago = |ms: u64| c.instant(NOW - ms);
        let last = c.instant(10 * MIN);
        let tick = |connections| Occasion::Tick {
            aws: true,
            connections,
            last_connection: last,
        };
        let using = Occasion::Use {
            deadline: c.instant(NOW + 5 * MIN),
        };
        // A tick that swept and saw the last connection already, with a bastion known.
        let settled = || Memory {
            record: Some(record(Phase::Idle)),
            swept_at: Some(ago(MIN)),
            seen_activity: Some(last),
            ..Memory::default()
        };
        let verified = || Memory {
            verified_at: Some(ago(5 * S)),
            ..Memory::default()
        };
        let base = || Row {
            name: "",
            occasion: Occasion::Reconcile,
            record: Entry::Unread,
            memory: Memory::default(),
            now,
            facts: Facts::default(),
            expect: Step::Nothing,
        };
        let orphan = resource(
            "i-9",
            "L9",
            ResourceState::Running(Some("i-9".into())),
            None,
        );
        let booting_orphan = resource("i-8", "L8", ResourceState::Pending, None);
        let own = resource(
            "i-1",
            "L1",
            ResourceState::Running(Some("i-1".into())),
            None,
        );
        let long_expired = expiring("i-5", T0 + NOW - 11 * MIN);
        let just_expired = expiring("i-6", T0 + NOW - 5 * MIN);
        let untagged = resource("i-7", "L7", ResourceState::Running(None), None);
        let mut unreadable = untagged.clone();
        unreadable.tags.insert(TAG_EXPIRES.into(), "soon".into());

        let rows = [
            // ---- tick, before the record is read ----
            Row {
                name: "no AWS side yet: retry the first reconciliation",
                occasion: Occasion::Tick {
                    aws: false,
                    connections: 0,
                    last_connection: last,
                },
                expect: Step::RetryReconcile,
                ..base()
            },
            Row {
                name: "no AWS side yet, retried 10 s ago: nothing",
                occasion: Occasion::Tick {
                    aws: false,
                    connections: 2,
                    last_connection: last,
                },
                memory: Memory {
                    swept_at: Some(ago(10 * S)),
                    ..Memory::default()
                },
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "sweep due, no connection: reconcile",
                occasion: tick(0),
                memory: Memory {
                    swept_at: Some(ago(5 * MIN)),
                    ..settled()
                },
                expect: Step::Sweep,
                ..base()
            },
            Row {
                name: "sweep due but a connection is open: no sweep, read the record",
                occasion: tick(1),
                memory: Memory {
                    swept_at: Some(ago(5 * MIN)),
                    last_local_use: Some(ago(S)),
                    ..settled()
                },
                expect: Step::Look(Look::Record),
                ..base()
            },
            Row {
                name: "a connection came and went since the last tick: it is use",
                occasion: tick(0),
                memory: Memory {
                    seen_activity: Some(c.instant(5 * MIN)),
                    ..settled()
                },
                expect: Step::NoteUse { used: true },
                ..base()
            },
            Row {
                name: "a connection came and went while no bastion was known: not use",
                occasion: tick(0),
                memory: Memory {
                    seen_activity: Some(c.instant(5 * MIN)),
                    record: None,
                    ..settled()
                },
                expect: Step::NoteUse { used: false },
                ..base()
            },
            Row {
                name: "a connection open: it is use",
                occasion: tick(1),
                memory: settled(),
                expect: Step::NoteUse { used: true },
                ..base()
            },
            Row {
                name: "no record 5 s ago, no connection: the registry is not read",
                occasion: tick(0),
                memory: Memory {
                    absent_since: Some(ago(5 * S)),
                    record: None,
                    ..settled()
                },
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "no record 20 s ago: read the registry again",
                occasion: tick(0),
                memory: Memory {
                    absent_since: Some(ago(20 * S)),
                    record: None,
                    ..settled()
                },
                expect: Step::Look(Look::Record),
                ..base()
            },
            Row {
                name: "tick: no record",
                occasion: tick(0),
                record: Entry::Absent,
                expect: Step::Nothing,
                ..base()
            },
            // ---- tick: idle ----
            Row {
                name: "idle past idle_timeout, no connection: ask Session Manager",
                occasion: tick(0),
                record: present(Phase::Idle, |_| {}),
                expect: Step::Look(Look::Sessions {
                    target: "i-1".into(),
                }),
                ..base()
            },
            Row {
                name: "idle past idle_timeout, no connection, no other Active session: end sessions then terminate",
                occasion: tick(0),
                record: present(Phase::Idle, |_| {}),
                facts: facts(|f| f.others = Observed::Is(0)),
                expect: Step::EndSessionsThenTerminate {
                    reason: Reason::Idle(Duration::from_secs(600)),
                    version: 7,
                },
                ..base()
            },
            Row {
                name: "idle past idle_timeout but another Active session: keep it",
                occasion: tick(0),
                record: present(Phase::Idle, |_| {}),
                facts: facts(|f| f.others = Observed::Is(1)),
                expect: Step::KeepForOthers { sessions: 1 },
                ..base()
            },
            Row {
                name: "idle past idle_timeout, DescribeSessions failed: keep it",
                occasion: tick(0),
                record: present(Phase::Idle, |_| {}),
                facts: facts(|f| f.others = Observed::Failed),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "idle past idle_timeout, Session Manager asked 5 s ago: wait",
                occasion: tick(0),
                record: present(Phase::Idle, |_| {}),
                memory: Memory {
                    sessions_checked_at: Some(ago(5 * S)),
                    ..Memory::default()
                },
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "idle for less than idle_timeout: nothing",
                occasion: tick(0),
                record: present(Phase::Idle, |r| r.last_used_ms = T0 + NOW - 9 * MIN),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "idle past idle_timeout under another daemon's lease: the lease is not consulted",
                occasion: tick(0),
                record: present(Phase::Idle, others_lease),
                facts: facts(|f| f.others = Observed::Is(0)),
                expect: Step::EndSessionsThenTerminate {
                    reason: Reason::Idle(Duration::from_secs(600)),
                    version: 7,
                },
                ..base()
            },
            Row {
                name: "the last connection through this daemon ended: mark idle",
                occasion: tick(0),
                record: present(Phase::Ready, |_| {}),
                memory: Memory {
                    last_local_use: Some(ago(S)),
                    ..Memory::default()
                },
                expect: Step::MarkIdle,
                ..base()
            },
            // ---- tick: connections ----
            Row {
                name: "stale use but a connection open, use written 5 s ago: nothing",
                occasion: tick(1),
                record: present(Phase::Ready, |_| {}),
                memory: Memory {
                    touched_at: Some(ago(5 * S)),
                    last_local_use: Some(ago(S)),
                    ..Memory::default()
                },
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "a connection open, use written 30 s ago: write use",
                occasion: tick(1),
                record: present(Phase::Ready, |_| {}),
                memory: Memory {
                    touched_at: Some(ago(30 * S)),
                    ..Memory::default()
                },
                expect: Step::Touch,
                ..base()
            },
            Row {
                name: "a connection open and the record says idle: write use",
                occasion: tick(1),
                record: present(Phase::Idle, |_| {}),
                memory: Memory {
                    touched_at: Some(ago(5 * S)),
                    ..Memory::default()
                },
                expect: Step::Touch,
                ..base()
            },
            // ---- tick: max lifetime ----
            Row {
                name: "lifetime warning due: warn",
                occasion: tick(1),
                record: present(Phase::Ready, |_| {}),
                now: c.at(8 * H - 10 * MIN),
                expect: Step::WarnLifetime {
                    left: Duration::from_secs(600),
                },
                ..base()
            },
            Row {
                name: "lifetime warning given for this launch: not again",
                occasion: tick(1),
                record: present(Phase::Ready, |_| {}),
                now: c.at(8 * H - 10 * MIN),
                memory: Memory {
                    warned_launch: Some("L1".into()),
                    touched_at: Some(c.instant(8 * H - 10 * MIN - 5 * S)),
                    ..Memory::default()
                },
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "lifetime warning given for an earlier launch: warn",
                occasion: tick(0),
                record: present(Phase::Ready, |_| {}),
                now: c.at(8 * H - 10 * MIN),
                memory: Memory {
                    warned_launch: Some("L0".into()),
                    ..Memory::default()
                },
                expect: Step::WarnLifetime {
                    left: Duration::from_secs(600),
                },
                ..base()
            },
            Row {
                name: "lifetime end with connections open: end sessions then terminate",
                occasion: tick(3),
                record: present(Phase::Ready, |_| {}),
                now: c.at(8 * H),
                expect: Step::EndSessionsThenTerminate {
                    reason: Reason::MaxLifetime(Duration::from_secs(8 * 3600)),
                    version: 7,
                },
                ..base()
            },
            // ---- tick: transient phases, unattended ----
            Row {
                name: "launching under another daemon's live lease: leave it",
                occasion: tick(0),
                record: present(Phase::Launching, others_lease),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "terminating under another daemon's live lease: leave it",
                occasion: tick(0),
                record: present(Phase::Terminating, others_lease),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "launching whose holder's lease ran out: take the lifecycle lock first",
                occasion: tick(0),
                record: present(Phase::Launching, |r| r.holder = "other".into()),
                expect: Step::Look(Look::Lock),
                ..base()
            },
            Row {
                name: "a connection preparing the bastion holds the lock: leave it to it",
                occasion: tick(0),
                record: present(Phase::Launching, |r| r.holder = "other".into()),
                facts: facts(|f| f.lock = Some(false)),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "launching whose holder's lease ran out, lock taken: look for the launch",
                occasion: tick(0),
                record: present(Phase::Launching, |r| r.holder = "other".into()),
                facts: facts(|f| f.lock = Some(true)),
                expect: Step::Look(Look::Launch),
                ..base()
            },
            Row {
                name: "terminating of ours: finish it",
                occasion: tick(0),
                record: present(Phase::Terminating, |_| {}),
                facts: facts(|f| f.lock = Some(true)),
                expect: Step::FinishTermination,
                ..base()
            },
            Row {
                name: "waiting_online past ready_timeout + lease: terminate",
                occasion: tick(0),
                record: present(Phase::WaitingOnline, |_| {}),
                now: c.at(5 * MIN + 90 * S),
                facts: facts(|f| f.lock = Some(true)),
                expect: Step::Terminate(Reason::NeverOnline),
                ..base()
            },
            Row {
                name: "waiting_online overdue under another daemon's live lease: only poll it",
                occasion: tick(0),
                record: present(Phase::WaitingOnline, others_lease),
                facts: facts(|f| f.lock = Some(true)),
                expect: Step::Look(Look::Online),
                ..base()
            },
            // ---- a connection needs the target ----
            Row {
                name: "use: read the record",
                occasion: using,
                expect: Step::Look(Look::Record),
                ..base()
            },
            Row {
                name: "use: ready_timeout passed: give up",
                occasion: Occasion::Use { deadline: now.at },
                record: present(Phase::WaitingOnline, |_| {}),
                expect: Step::GiveUp,
                ..base()
            },
            Row {
                name: "use: no record: list live bastions first",
                occasion: using,
                record: Entry::Absent,
                expect: Step::Look(Look::Reusable),
                ..base()
            },
            Row {
                name: "use: no record, live bastions without one: reuse the newest",
                occasion: using,
                record: Entry::Absent,
                facts: facts(|f| {
                    f.reusable = Some(vec![
                        resource("i-2", "L2", ResourceState::Stopped, Some(T0 + 3 * S)),
                        resource("i-3", "L3", ResourceState::Running(None), Some(T0)),
                        resource("i-4", "L4", ResourceState::Pending, Some(T0 + 2 * S)),
                        resource("i-5", "L5", ResourceState::Pending, None),
                    ])
                }),
                expect: Step::Reuse(resource(
                    "i-4",
                    "L4",
                    ResourceState::Pending,
                    Some(T0 + 2 * S),
                )),
                ..base()
            },
            Row {
                name: "use: no record, nothing to reuse: launch",
                occasion: using,
                record: Entry::Absent,
                facts: facts(|f| {
                    f.reusable = Some(vec![resource("i-2", "L2", ResourceState::Gone, None)])
                }),
                expect: Step::Launch,
                ..base()
            },
            Row {
                name: "use: past its max lifetime: terminate",
                occasion: Occasion::Use {
                    deadline: c.instant(8 * H + 5 * MIN),
                },
                record: present(Phase::Ready, |_| {}),
                now: c.at(8 * H),
                expect: Step::Terminate(Reason::Expired),
                ..base()
            },
            Row {
                name: "use: not checked for 30 s: ask the provider",
                occasion: using,
                record: present(Phase::Ready, |_| {}),
                expect: Step::Look(Look::Resource),
                ..base()
            },
            Row {
                name: "use: a record whose resource is gone: forget it",
                occasion: using,
                record: present(Phase::Ready, |_| {}),
                facts: facts(|f| f.state = Observed::Is(ResourceState::Gone)),
                expect: Step::Forget,
                ..base()
            },
            Row {
                name: "use: the instance was stopped: terminate it",
                occasion: using,
                record: present(Phase::Idle, |_| {}),
                facts: facts(|f| f.state = Observed::Is(ResourceState::Stopped)),
                expect: Step::Terminate(Reason::Stopped),
                ..base()
            },
            Row {
                name: "use: the check failed: use it anyway, writing use first",
                occasion: using,
                record: present(Phase::Ready, |_| {}),
                facts: facts(|f| f.state = Observed::Failed),
                expect: Step::RecordUse,
                ..base()
            },
            Row {
                name: "use: an idle record: write use before handing out the target",
                occasion: using,
                record: present(Phase::Idle, |r| r.last_used_ms = T0 + NOW),
                memory: verified(),
                expect: Step::RecordUse,
                ..base()
            },
            Row {
                name: "use: ready, use written 5 s ago: hand out the target",
                occasion: using,
                record: present(Phase::Ready, |r| r.last_used_ms = T0 + NOW - 5 * S),
                memory: verified(),
                expect: Step::HandOut {
                    target: Some("i-1".into()),
                },
                ..base()
            },
            Row {
                name: "use: launching under another daemon's live lease: wait for it",
                occasion: using,
                record: present(Phase::Launching, others_lease),
                expect: Step::WaitForHolder,
                ..base()
            },
            Row {
                name: "use: terminating under another daemon's live lease: wait for it",
                occasion: using,
                record: present(Phase::Terminating, others_lease),
                expect: Step::WaitForHolder,
                ..base()
            },
            Row {
                name: "use: terminating whose lease ran out: finish it",
                occasion: using,
                record: present(Phase::Terminating, |r| r.holder = "other".into()),
                expect: Step::FinishTermination,
                ..base()
            },
            // ---- waiting_online ----
            Row {
                name: "waiting_online: ask Session Manager",
                occasion: using,
                record: present(Phase::WaitingOnline, |_| {}),
                expect: Step::Look(Look::Online),
                ..base()
            },
            Row {
                name: "waiting_online, online: write ready",
                occasion: using,
                record: present(Phase::WaitingOnline, |_| {}),
                facts: facts(|f| f.online = Some(Some("i-1".into()))),
                expect: Step::MarkReady {
                    target: "i-1".into(),
                },
                ..base()
            },
            Row {
                name: "waiting_online, not online: ask the provider",
                occasion: using,
                record: present(Phase::WaitingOnline, |_| {}),
                facts: facts(|f| f.online = Some(None)),
                expect: Step::Look(Look::Resource),
                ..base()
            },
            Row {
                name: "waiting_online, gone while booting: forget it",
                occasion: using,
                record: present(Phase::WaitingOnline, |_| {}),
                facts: facts(|f| {
                    f.online = Some(None);
                    f.state = Observed::Is(ResourceState::Gone);
                }),
                expect: Step::Forget,
                ..base()
            },
            Row {
                name: "waiting_online, stopped while booting: terminate it",
                occasion: using,
                record: present(Phase::WaitingOnline, |_| {}),
                facts: facts(|f| {
                    f.online = Some(None);
                    f.state = Observed::Is(ResourceState::Stopped);
                }),
                expect: Step::Terminate(Reason::StoppedWhileBooting),
                ..base()
            },
            Row {
                name: "waiting_online, our lease half gone: renew it and wait",
                occasion: using,
                record: present(Phase::WaitingOnline, |r| {
                    r.lease_until_ms = T0 + NOW + 44 * S
                }),
                facts: facts(|f| {
                    f.online = Some(None);
                    f.state = Observed::Is(ResourceState::Running(None));
                }),
                expect: Step::AwaitOnline { renew_lease: true },
                ..base()
            },
            Row {
                name: "waiting_online under another daemon's lease: wait without renewing",
                occasion: using,
                record: present(Phase::WaitingOnline, |r| r.holder = "other".into()),
                facts: facts(|f| {
                    f.online = Some(None);
                    f.state = Observed::Failed;
                }),
                expect: Step::AwaitOnline { renew_lease: false },
                ..base()
            },
            // ---- an interrupted or failed launch ----
            Row {
                name: "interrupted launch: look for what it launched",
                occasion: using,
                record: present(Phase::Launching, |_| {}),
                expect: Step::Look(Look::Launch),
                ..base()
            },
            Row {
                name: "interrupted launch left an instance: adopt it",
                occasion: using,
                record: present(Phase::Launching, |_| {}),
                facts: facts(|f| {
                    f.launched = Some(vec![
                        resource("i-0", "L1", ResourceState::Gone, None),
                        resource("i-2", "L1", ResourceState::Pending, None),
                    ])
                }),
                expect: Step::AdoptLaunch {
                    resource: "i-2".into(),
                },
                ..base()
            },
            Row {
                name: "interrupted launch, nothing visible 14 s after: look again",
                occasion: using,
                record: present(Phase::Launching, |_| {}),
                now: c.at(14 * S),
                facts: facts(|f| f.launched = Some(Vec::new())),
                expect: Step::AwaitLaunch,
                ..base()
            },
            Row {
                name: "interrupted launch, nothing visible 15 s after: forget it",
                occasion: using,
                record: present(Phase::Launching, |_| {}),
                now: c.at(15 * S),
                facts: facts(|f| f.launched = Some(Vec::new())),
                expect: Step::ForgetLaunch,
                ..base()
            },
            Row {
                name: "launch failed ambiguously: keep the launching record",
                occasion: Occasion::LaunchFailed { ambiguous: true },
                record: present(Phase::Launching, |_| {}),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "launch failed definitely: delete the launching record",
                occasion: Occasion::LaunchFailed { ambiguous: false },
                record: present(Phase::Launching, |_| {}),
                expect: Step::ForgetLaunch,
                ..base()
            },
            // ---- claim, then end sessions, then terminate ----
            Row {
                name: "claim: the record is the one decided on: write terminating",
                occasion: Occasion::Claim { expect: 7 },
                record: present(Phase::Idle, |_| {}),
                expect: Step::ClaimTermination,
                ..base()
            },
            Row {
                name: "claim: record changed under us (a use bumped the version): leave it",
                occasion: Occasion::Claim { expect: 6 },
                record: present(Phase::Ready, |_| {}),
                expect: Step::RecordChanged,
                ..base()
            },
            Row {
                name: "claim: another daemon claimed it first: leave it",
                occasion: Occasion::Claim { expect: 7 },
                record: present(Phase::Terminating, others_lease),
                expect: Step::RecordChanged,
                ..base()
            },
            Row {
                name: "claim: the record is gone: nothing",
                occasion: Occasion::Claim { expect: 7 },
                record: Entry::Absent,
                expect: Step::Nothing,
                ..base()
            },
            // ---- reconciliation of the record ----
            Row {
                name: "reconcile: ask the provider about the record's resource",
                record: present(Phase::Idle, |_| {}),
                expect: Step::Look(Look::Resource),
                ..base()
            },
            Row {
                name: "reconcile: a record with no resource: forget it",
                record: present(Phase::Ready, |_| {}),
                facts: facts(|f| f.state = Observed::Is(ResourceState::Gone)),
                expect: Step::Forget,
                ..base()
            },
            Row {
                name: "reconcile: a stopped instance: terminate it",
                record: present(Phase::WaitingOnline, |_| {}),
                facts: facts(|f| f.state = Observed::Is(ResourceState::Stopped)),
                expect: Step::Terminate(Reason::Stopped),
                ..base()
            },
            Row {
                name: "reconcile: past its max lifetime: terminate it",
                record: present(Phase::Ready, |_| {}),
                now: c.at(8 * H),
                facts: facts(|f| f.state = Observed::Is(ResourceState::Running(None))),
                expect: Step::Terminate(Reason::Expired),
                ..base()
            },
            Row {
                name: "reconcile: running within its lifetime: nothing",
                record: present(Phase::Ready, |_| {}),
                facts: facts(|f| f.state = Observed::Is(ResourceState::Running(None))),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "reconcile: launching under another daemon's live lease: leave it",
                record: present(Phase::Launching, others_lease),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "reconcile: terminating whose lease ran out: finish it",
                record: present(Phase::Terminating, |r| r.holder = "other".into()),
                expect: Step::FinishTermination,
                ..base()
            },
            Row {
                name: "reconcile: no record",
                record: Entry::Absent,
                expect: Step::Nothing,
                ..base()
            },
            // ---- orphans ----
            Row {
                name: "stray: the record's own resource: nothing",
                occasion: Occasion::Stray(&own),
                record: present(Phase::Ready, |_| {}),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "orphan with a target: ask Session Manager",
                occasion: Occasion::Stray(&orphan),
                record: Entry::Absent,
                expect: Step::Look(Look::Sessions {
                    target: "i-9".into(),
                }),
                ..base()
            },
            Row {
                name: "orphan in use, no record: adopt it",
                occasion: Occasion::Stray(&orphan),
                record: Entry::Absent,
                facts: facts(|f| f.others = Observed::Is(1)),
                expect: Step::AdoptStray {
                    target: Some("i-9".into()),
                },
                ..base()
            },
            Row {
                name: "orphan, DescribeSessions failed: counts as used",
                occasion: Occasion::Stray(&orphan),
                record: Entry::Absent,
                facts: facts(|f| f.others = Observed::Failed),
                expect: Step::AdoptStray {
                    target: Some("i-9".into()),
                },
                ..base()
            },
            Row {
                name: "orphan in use while the record owns another bastion: leave it",
                occasion: Occasion::Stray(&orphan),
                record: present(Phase::Ready, |_| {}),
                facts: facts(|f| f.others = Observed::Is(2)),
                expect: Step::LeaveStray,
                ..base()
            },
            Row {
                name: "orphan unused: read the record again first",
                occasion: Occasion::Stray(&orphan),
                record: Entry::Absent,
                facts: facts(|f| f.others = Observed::Is(0)),
                expect: Step::Look(Look::RecordAgain),
                ..base()
            },
            Row {
                name: "orphan unused, adopted by another daemon meanwhile: leave it",
                occasion: Occasion::Stray(&orphan),
                record: Entry::Absent,
                facts: facts(|f| {
                    f.others = Observed::Is(0);
                    f.reread = Some(Some("L9".into()));
                }),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "orphan unused, still no record: terminate it",
                occasion: Occasion::Stray(&orphan),
                record: Entry::Absent,
                facts: facts(|f| {
                    f.others = Observed::Is(0);
                    f.reread = Some(None);
                }),
                expect: Step::TerminateStray,
                ..base()
            },
            Row {
                name: "booting orphan (no target) beside the record's bastion: terminate it",
                occasion: Occasion::Stray(&booting_orphan),
                record: present(Phase::Ready, |_| {}),
                facts: facts(|f| f.reread = Some(Some("L1".into()))),
                expect: Step::TerminateStray,
                ..base()
            },
            // ---- expired backstop ----
            Row {
                name: "backstop: expired more than 10 min ago: end it",
                occasion: Occasion::Backstop(&long_expired),
                expect: Step::EndExpired,
                ..base()
            },
            Row {
                name: "backstop: expired 5 min ago: leave it to its own shutdown",
                occasion: Occasion::Backstop(&just_expired),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "backstop: no expires tag: nothing",
                occasion: Occasion::Backstop(&untagged),
                expect: Step::Nothing,
                ..base()
            },
            Row {
                name: "backstop: unreadable expires tag: nothing",
                occasion: Occasion::Backstop(&unreadable),
                expect: Step::Nothing,
                ..base()
            },
        ];

        let settings = settings();
        let mut wrong = Vec::new();
        for row in &rows {
            let step = decide(&Input {
                occasion: row.occasion,
                record: &row.record,
                memory: &row.memory,
                now: row.now,
                facts: &row.facts,
                settings: &settings,
            });
            if step != row.expect {
                wrong.push(format!(
                    "{}:\n    got  {step:?}\n    want {:?}",
                    row.name, row.expect
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} rows:\n{}",
            wrong.len(),
            rows.len(),
            wrong.join("\n")
        );
    }

    /// The reasons read as before the rules moved here (logs, events and tests quote them).
    #[test]
    fn reasons_and_durations_read_as_before() {
        let cases = [
            (
                Reason::Idle(Duration::from_secs(3)),
                "idle for 3s (no connection, no Active session)",
            ),
            (
                Reason::MaxLifetime(Duration::from_secs(15)),
                "max lifetime (15s) reached",
            ),
            (Reason::Expired, "max lifetime reached"),
            (Reason::Stopped, "stopped"),
            (Reason::StoppedWhileBooting, "stopped while booting"),
            (
                Reason::NeverOnline,
                "never came online with Session Manager",
            ),
        ];
        for (reason, text) in cases {
            assert_eq!(reason.to_string(), text);
        }
        assert_eq!(humanize(Duration::from_secs(90)), "1m30s");
        assert_eq!(humanize(Duration::from_secs(8 * 3600)), "8h");
        assert_eq!(humanize(Duration::from_secs(5400)), "1h30m");
    }
}
