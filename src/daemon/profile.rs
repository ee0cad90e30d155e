//! One profile at run time: its listeners, its Session Manager session (started on the
//! first connection), the connections riding on it, and the idle reaper.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::transport::relay::{LocalConnection, relay};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api::{ProfileState, ProfileStatus, Progress};
use crate::aws::ssm::{AwsError, SsmApi, StartRequest};
use crate::config::{DOC_REMOTE_HOST, Listen, Profile, Target};
use crate::ondemand::Host;
use crate::ondemand::manager::{BastionError, Bastions, Decision};
use crate::proto::session::DataMode;
use crate::proto::version::{REMOTE_HOST_SUPPORTED_FROM_AGENT_VERSION, agent_supports_remote_host};
use crate::transport::ssm::{
    ResumeError, Resumer, Tunnel, TunnelConfig, TunnelError, TunnelStats, TunnelStream,
};

/// Gives a profile its SSM API client (cached per AWS profile and region).
pub type ApiProvider = Arc<
    dyn Fn(&Profile) -> std::pin::Pin<Box<dyn std::future::Future<Output = SsmApi> + Send>>
        + Send
        + Sync,
>;

/// One session of the profile's pool.
struct Live {
    tunnel: Arc<Tunnel>,
    ready_at: Instant,
    /// Connections assigned to it (counted here, not by the driver, so that
    /// simultaneous arrivals spread at once).
    streams: Arc<AtomicUsize>,
    /// When a connection last started or ended on it.
    last_activity: Instant,
}

/// A connection's claim on a pool session; releasing it (on drop) updates the
/// session's idle clock.
struct Claim<'a> {
    profile: &'a ProfileRuntime,
    tunnel: Arc<Tunnel>,
    streams: Arc<AtomicUsize>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        self.streams.fetch_sub(1, Ordering::Relaxed);
        let mut inner = self.profile.lock();
        if let Some(l) = inner
            .live
            .iter_mut()
            .find(|l| Arc::ptr_eq(&l.tunnel, &self.tunnel))
        {
            l.last_activity = Instant::now();
        }
    }
}

struct Inner {
    state: ProfileState,
    /// Stops this opening's accept loops and idle reaper (a new one per `open`).
    listening: Option<CancellationToken>,
    listen_desc: Vec<String>,
    /// The session pool: connections are striped over up to `max_sessions` sessions.
    live: Vec<Live>,
    last_error: Option<String>,
    last_activity: Instant,
    /// What the sessions that already ended carried.
    done: Totals,
}

/// Counters summed over a profile's sessions, live and ended.
#[derive(Clone, Debug, Default)]
struct Totals {
    bytes_up: u64,
    bytes_down: u64,
    resumes: u64,
    resume_attempts: u64,
}

impl Totals {
    /// Adds one session's counters.
    fn absorb(&mut self, s: &TunnelStats) {
        self.bytes_up += s.bytes_up;
        self.bytes_down += s.bytes_down;
        self.resumes += s.resumes;
        self.resume_attempts += s.resume_attempts;
    }
}

/// A profile's run-time state. Cheap to share.
pub struct ProfileRuntime {
    profile: Profile,
    tunnel_config: TunnelConfig,
    api: ApiProvider,
    inner: Mutex<Inner>,
    opening: AsyncMutex<()>,
    connecting: AsyncMutex<()>,
    /// One permit per open connection, `max_connections` in all: a permit is freed
    /// when its connection's task ends, however it ends.
    permits: Arc<Semaphore>,
    /// The connections' tasks, so that shutdown can wait for them.
    connections: TaskTracker,
    total_connections: AtomicU64,
    tags: Mutex<TagResolution>,
    /// The on-demand bastion (profiles with a `bastion` section).
    bastion: Option<Arc<Bastions>>,
    /// The task that ticks the bastion's lifecycle (runs while the profile exists).
    bastion_ticker: Mutex<Option<JoinHandle<()>>>,
    /// The daemon's state directory (session ledger).
    host: Option<Arc<Host>>,
}

/// `target_tags` at run time.
#[derive(Default)]
struct TagResolution {
    /// The EC2 client, created on first use.
    ec2: Option<crate::aws::ec2::Ec2Api>,
    /// The instance the tags last resolved to.
    instance: Option<String>,
}

/// Why a profile could not open or a connection found no session. Kept typed inside
/// the daemon: the control API gives each variant its error code, and the message (in
/// words a user can act on) is also the profile's `last_error`.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// A TCP listen address is taken by another process.
    #[error("profile {profile}: cannot listen on {addr}: {source}")]
    PortInUse {
        /// The profile.
        profile: String,
        /// The address.
        addr: SocketAddr,
        /// The bind error.
        source: std::io::Error,
    },
    /// A listener could not be opened for another reason (a Unix socket path included,
    /// even when another process listens on it).
    #[error("profile {profile}: cannot listen on {addr}: {source}")]
    Listen {
        /// The profile.
        profile: String,
        /// The address or socket path.
        addr: String,
        /// The bind error.
        source: std::io::Error,
    },
    /// `target_tags`: the EC2 client or DescribeInstances failed (described for the
    /// profile: region, credentials, permissions).
    #[error("{0}")]
    Ec2Lookup(String),
    /// `target_tags`: no running instance carries the tags.
    #[error("{0}")]
    NoMatchingInstance(String),
    /// StartSession failed (described for the profile, with what to check).
    #[error("{0}")]
    StartSession(String),
    /// An on-demand bastion needs the daemon's state directory, and there is none.
    #[error(
        "profile {profile} launches its bastion on demand, but the daemon has no state directory \
         (start bastiond with --state-dir or set XDG_STATE_HOME)"
    )]
    NoStateDir {
        /// The profile.
        profile: String,
    },
    /// The websocket or the handshake failed, or the session ended under a new stream.
    #[error(transparent)]
    Session(#[from] TunnelError),
    /// A session that just came up was gone before a connection could use it.
    #[error("the new session ended at once")]
    EndedAtOnce,
    /// The agent is too old for the remote-host document: it would forward to the
    /// instance's own port instead.
    #[error(
        "the SSM agent on {target} is version {agent}, too old for {} \
         (needs {} or newer); update the agent \
         (AWS-UpdateSSMAgent) or use a bastion with a current agent",
        DOC_REMOTE_HOST,
        REMOTE_HOST_SUPPORTED_FROM_AGENT_VERSION
    )]
    AgentTooOld {
        /// The profile's target.
        target: String,
        /// The agent's version.
        agent: String,
    },
    /// The on-demand bastion could not be made ready.
    #[error(transparent)]
    Bastion(#[from] BastionError),
}

fn describe_aws_error(profile: &Profile, e: &AwsError) -> String {
    match e {
        AwsError::TargetNotConnected(_) => format!(
            "target {} is not connected to Session Manager (is the SSM agent running, and can it reach the SSM endpoints?): {e}",
            profile.target
        ),
        AwsError::Credentials(_) => match &profile.aws_profile {
            Some(p) => format!("{e}; if this profile uses SSO, run `aws sso login --profile {p}`"),
            None => format!("{e}; if you use SSO, run `aws sso login`"),
        },
        _ => e.to_string(),
    }
}

/// At most this many tag-matched instances are tried when Session Manager reports the
/// chosen one as not connected.
const MAX_TAG_CANDIDATES: usize = 5;
/// TerminateSession calls for a session that ended on its own: with the backoff of
/// [`SsmApi::terminate_session_retrying`], about two minutes of trying.
const SELF_ENDED_TERMINATE_ATTEMPTS: u32 = 8;

fn describe_ec2_error(profile: &Profile, e: &crate::aws::ec2::Ec2Error) -> String {
    use crate::aws::ec2::Ec2Error;
    let what = format!(
        "cannot resolve target_tags ({}) with EC2 DescribeInstances",
        match &profile.target {
            Target::Tags(tags) => crate::aws::ec2::describe_tags(tags),
            other => other.to_string(),
        }
    );
    match e {
        Ec2Error::AccessDenied { .. } => {
            format!("{what}: {e} (or set `target` to the instance id instead of target_tags)")
        }
        Ec2Error::Credentials(_) | Ec2Error::AuthFailure { .. } => match &profile.aws_profile {
            Some(p) => {
                format!("{what}: {e}; if this profile uses SSO, run `aws sso login --profile {p}`")
            }
            None => format!("{what}: {e}; if you use SSO, run `aws sso login`"),
        },
        _ => format!("{what}: {e}"),
    }
}

impl ProfileRuntime {
    /// A closed profile. `host` is needed by profiles with a `bastion` section.
    pub fn new(
        profile: Profile,
        mut tunnel_config: TunnelConfig,
        api: ApiProvider,
        host: Option<Arc<Host>>,
    ) -> Arc<Self> {
        tunnel_config.connect_timeout = profile.connect_timeout;
        tunnel_config.stream_url_hosts = profile.stream_url_hosts.clone();
        let bastion = match (&profile.bastion, host.clone()) {
            (Some(cfg), Some(host)) => Some(Bastions::new(
                &profile.name,
                cfg.clone(),
                crate::aws::ssm::AwsTarget {
                    profile: profile.aws_profile.clone(),
                    region: profile.region.clone(),
                    imds: profile.imds,
                },
                host,
            )),
            _ => None,
        };
        let permits = Arc::new(Semaphore::new(profile.max_connections));
        Arc::new(ProfileRuntime {
            host,
            bastion,
            bastion_ticker: Mutex::default(),
            profile,
            tunnel_config,
            api,
            inner: Mutex::new(Inner {
                state: ProfileState::Closed,
                listening: None,
                listen_desc: Vec::new(),
                live: Vec::new(),
                last_error: None,
                last_activity: Instant::now(),
                done: Totals::default(),
            }),
            opening: AsyncMutex::new(()),
            connecting: AsyncMutex::new(()),
            permits,
            connections: TaskTracker::new(),
            total_connections: AtomicU64::new(0),
            tags: Mutex::default(),
        })
    }

    /// The profile's settings.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tags(&self) -> std::sync::MutexGuard<'_, TagResolution> {
        self.tags.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The target as status shows it: for `target_tags`, with the instance they last
    /// resolved to (`tags:Name=bastion → i-0123…`).
    fn target_desc(&self) -> String {
        match (&self.profile.target, &self.tags().instance) {
            (Target::Tags(_), Some(id)) => format!("{} → {id}", self.profile.target),
            (Target::OnDemand(_), _) => match self.bastion.as_ref().map(|b| b.status()) {
                Some(s) => match s.target.or(s.resource) {
                    Some(t) => format!("{} → {t}", self.profile.target),
                    None => self.profile.target.to_string(),
                },
                None => self.profile.target.to_string(),
            },
            (t, _) => t.to_string(),
        }
    }

    /// Opens the listeners (idempotent). With `warm`, also starts the session now,
    /// reporting progress on `progress`.
    pub async fn open(
        self: &Arc<Self>,
        warm: bool,
        progress: Option<mpsc::Sender<Progress>>,
    ) -> Result<ProfileStatus, ProfileError> {
        let started = Instant::now();
        let report = |phase: &str, detail: Option<String>| {
            if let Some(p) = &progress {
                let _ = p.try_send(Progress {
                    phase: phase.to_owned(),
                    elapsed_secs: started.elapsed().as_secs_f64(),
                    detail,
                    resource: None,
                });
            }
        };
        {
            let _opening = self.opening.lock().await;
            if self.lock().state == ProfileState::Closed {
                self.start_listeners().await?;
            }
        }
        report("listening", Some(self.lock().listen_desc.join(" ")));
        self.start_bastion();
        if warm {
            // While a bastion boots, its lifecycle events are the progress.
            let relay = match (&self.bastion, &progress) {
                (Some(b), Some(p)) => {
                    let mut events = b.subscribe();
                    let p = p.clone();
                    Some(tokio::spawn(async move {
                        while let Ok(e) = events.recv().await {
                            let _ = p.send(e).await;
                        }
                    }))
                }
                _ => None,
            };
            report("starting_session", None);
            let result = self.ensure_tunnel().await;
            if let Some(r) = relay {
                // Let events already sent reach the client before the final line.
                tokio::task::yield_now().await;
                r.abort();
            }
            match result {
                Ok(t) => report("ready", Some(t.session_id().to_owned())),
                Err(e) => {
                    report("failed", Some(e.to_string()));
                    return Err(e);
                }
            }
        }
        Ok(self.status())
    }

    async fn start_listeners(self: &Arc<Self>) -> Result<(), ProfileError> {
        let stop = CancellationToken::new();
        let mut desc = Vec::new();
        match &self.profile.listen {
            Listen::Tcp { addrs, port } => {
                // Bind them all before serving any: a taken port fails the whole open.
                let mut bound = Vec::new();
                for ip in addrs {
                    let addr = SocketAddr::new(*ip, *port);
                    let listener = TcpListener::bind(addr).await.map_err(|e| {
                        let profile = self.profile.name.clone();
                        if e.kind() == std::io::ErrorKind::AddrInUse {
                            ProfileError::PortInUse {
                                profile,
                                addr,
                                source: e,
                            }
                        } else {
                            ProfileError::Listen {
                                profile,
                                addr: addr.to_string(),
                                source: e,
                            }
                        }
                    })?;
                    desc.push(
                        listener
                            .local_addr()
                            .map_or(addr.to_string(), |a| a.to_string()),
                    );
                    bound.push(listener);
                }
                for listener in bound {
                    tokio::spawn(self.clone().accept_loop(listener, stop.clone()));
                }
            }
            Listen::Unix(path) => {
                let listener = bind_unix(path).map_err(|e| ProfileError::Listen {
                    profile: self.profile.name.clone(),
                    addr: path.display().to_string(),
                    source: e,
                })?;
                desc.push(format!("unix:{}", path.display()));
                tokio::spawn(self.clone().accept_loop(listener, stop.clone()));
            }
        }
        info!(profile = %self.profile.name, listen = %desc.join(" "), "listening");
        {
            let me = Arc::downgrade(self);
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {}
                    }
                    let Some(me) = me.upgrade() else { return };
                    me.reap_if_idle().await;
                }
            });
        }
        let mut inner = self.lock();
        if let Some(old) = inner.listening.replace(stop) {
            old.cancel();
        }
        inner.listen_desc = desc;
        inner.state = ProfileState::Listening;
        inner.last_activity = Instant::now();
        Ok(())
    }

    /// Accepts connections (TCP or Unix) until `stop`; each is served by its own task.
    async fn accept_loop<L: Accept>(self: Arc<Self>, listener: L, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                a = listener.accept_one() => a,
            };
            match accepted {
                Ok((conn, peer)) => self.clone().spawn_connection(conn, peer),
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    fn spawn_connection<C: LocalConnection>(self: Arc<Self>, conn: C, peer: String) {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            warn!(profile = %self.profile.name, "max_connections reached; refusing a connection");
            self.lock().last_error = Some(format!(
                "refused a connection: max_connections ({}) reached",
                self.profile.max_connections
            ));
            return;
        };
        let id = self.total_connections.fetch_add(1, Ordering::Relaxed) + 1;
        let span = info_span!("connection", profile = %self.profile.name, id, peer = %peer);
        let tracker = self.connections.clone();
        let task = async move {
            self.lock().last_activity = Instant::now();
            let result = self.serve_connection(conn).await;
            drop(permit);
            self.lock().last_activity = Instant::now();
            match result {
                Ok((up, down)) => debug!(up, down, "connection closed"),
                Err(e) => {
                    warn!(error = %e, "connection failed");
                    self.lock().last_error = Some(e.to_string());
                }
            }
        }
        .instrument(span);
        tracker.spawn(task);
    }

    /// Connections open now.
    fn open_connections(&self) -> usize {
        self.profile
            .max_connections
            .saturating_sub(self.permits.available_permits())
    }

    async fn serve_connection<C: LocalConnection>(
        &self,
        conn: C,
    ) -> Result<(u64, u64), ProfileError> {
        // Boxed: starting a session (AWS calls, maybe a bastion launch) is a large
        // future, and a connection's task would otherwise keep its size for life.
        let (claim, stream) = Box::pin(self.claim_stream()).await?;
        debug!(session_id = %claim.tunnel.session_id(), "connection on session");
        let result = relay(conn, stream).await;
        drop(claim);
        match result {
            Ok(totals) => Ok(totals),
            Err(e) => {
                debug!(error = %e, "connection ended with an error");
                Ok((0, 0))
            }
        }
    }

    /// A session for a new connection, and the connection's stream on it.
    async fn claim_stream(&self) -> Result<(Claim<'_>, TunnelStream), ProfileError> {
        let mut claim = self.claim_session().await?;
        let stream = match claim.tunnel.open_stream().await {
            Ok(s) => s,
            Err(first) => {
                // The session may have ended a moment ago: one fresh attempt.
                debug!(error = %first, "opening a stream failed; trying another session");
                self.forget_tunnel(&claim.tunnel);
                drop(claim);
                claim = self.claim_session().await?;
                claim.tunnel.open_stream().await?
            }
        };
        Ok((claim, stream))
    }

    /// Picks the session for a new connection: the least loaded live one if it is idle
    /// or the pool is full, else a new session (one start at a time). If a new session
    /// cannot start, a busy one still serves.
    async fn claim_session(&self) -> Result<Claim<'_>, ProfileError> {
        if let Some(c) = self.claim_existing(false) {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.claim_existing(false) {
            return Ok(c);
        }
        match self.add_session().await {
            Ok(()) => self.claim_existing(true).ok_or(ProfileError::EndedAtOnce),
            Err(e) => match self.claim_existing(true) {
                Some(c) => {
                    warn!(error = %e, "could not add a session to the pool; sharing a busy one");
                    Ok(c)
                }
                None => Err(e),
            },
        }
    }

    fn claim_existing(&self, any: bool) -> Option<Claim<'_>> {
        let mut inner = self.lock();
        self.prune_ended(&mut inner);
        let full = inner.live.len() >= self.profile.max_sessions;
        let best = inner
            .live
            .iter_mut()
            .min_by_key(|l| l.streams.load(Ordering::Relaxed))?;
        if !(any || full || best.streams.load(Ordering::Relaxed) == 0) {
            return None;
        }
        best.streams.fetch_add(1, Ordering::Relaxed);
        best.last_activity = Instant::now();
        Some(Claim {
            profile: self,
            tunnel: best.tunnel.clone(),
            streams: best.streams.clone(),
        })
    }

    /// Drops sessions that ended, keeping their byte counts and end reason.
    fn prune_ended(&self, inner: &mut Inner) {
        let ended: Vec<Arc<Tunnel>> = inner
            .live
            .iter()
            .filter(|l| l.tunnel.end_reason().is_some())
            .map(|l| l.tunnel.clone())
            .collect();
        for t in ended {
            if let Some(why) = t.end_reason() {
                inner.last_error = Some(why);
            }
            self.forget_tunnel_locked(inner, &t);
        }
        if inner.live.is_empty() && inner.state == ProfileState::Ready {
            inner.state = ProfileState::Listening;
        }
    }

    /// Makes sure at least one session is up (for `open --warm`).
    async fn ensure_tunnel(&self) -> Result<Arc<Tunnel>, ProfileError> {
        let _guard = self.connecting.lock().await;
        {
            let mut inner = self.lock();
            self.prune_ended(&mut inner);
            if let Some(l) = inner.live.first() {
                return Ok(l.tunnel.clone());
            }
        }
        self.add_session().await?;
        self.lock()
            .live
            .last()
            .map(|l| l.tunnel.clone())
            .ok_or(ProfileError::EndedAtOnce)
    }

    /// Starts one more session for the pool. The caller holds `connecting`.
    async fn add_session(&self) -> Result<(), ProfileError> {
        {
            let mut inner = self.lock();
            if inner.live.is_empty() {
                inner.state = ProfileState::Connecting;
            }
        }
        match self.start_tunnel().await {
            Ok(tunnel) => {
                let mut inner = self.lock();
                inner.live.push(Live {
                    tunnel: Arc::new(tunnel),
                    ready_at: Instant::now(),
                    streams: Arc::default(),
                    last_activity: Instant::now(),
                });
                inner.state = ProfileState::Ready;
                inner.last_error = None;
                inner.last_activity = Instant::now();
                Ok(())
            }
            Err(e) => {
                let mut inner = self.lock();
                if inner.live.is_empty() {
                    inner.state = ProfileState::Error;
                }
                inner.last_error = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn forget_tunnel(&self, tunnel: &Arc<Tunnel>) {
        let mut inner = self.lock();
        self.forget_tunnel_locked(&mut inner, tunnel);
    }

    /// The profile's EC2 client, created on first use from the same AWS settings as its
    /// SSM client.
    async fn ec2_api(&self) -> Result<crate::aws::ec2::Ec2Api, ProfileError> {
        let cached = self.tags().ec2.clone();
        if let Some(api) = cached {
            return Ok(api);
        }
        let target = crate::aws::ssm::AwsTarget {
            profile: self.profile.aws_profile.clone(),
            region: self.profile.region.clone(),
            imds: self.profile.imds,
        };
        let config = crate::aws::ssm::load_config(&target).await;
        let api = crate::aws::ec2::Ec2Api::new(&config)
            .map_err(|e| ProfileError::Ec2Lookup(describe_ec2_error(&self.profile, &e)))?;
        self.tags().ec2 = Some(api.clone());
        Ok(api)
    }

    /// `target_tags`: DescribeInstances for the running instances that carry every tag,
    /// then StartSession on the most recently launched one; while Session Manager answers
    /// TargetNotConnected (an instance still booting, or without a working agent), the
    /// next one in launch order is tried, up to [`MAX_TAG_CANDIDATES`].
    async fn start_session_by_tags(
        &self,
        api: &SsmApi,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> Result<crate::aws::ssm::SessionTicket, ProfileError> {
        let wanted = crate::aws::ec2::describe_tags(tags);
        let ec2 = self.ec2_api().await?;
        let found = match ec2.running_instances_with_tags(tags).await {
            Ok(found) => found,
            Err(e) => {
                self.tags().instance = None;
                return Err(ProfileError::Ec2Lookup(describe_ec2_error(
                    &self.profile,
                    &e,
                )));
            }
        };
        if found.is_empty() {
            self.tags().instance = None;
            return Err(ProfileError::NoMatchingInstance(format!(
                "no running instance has tags {wanted} in region {} (target_tags matches \
                     instances in state running that carry every listed tag with exactly that value)",
                ec2.region()
            )));
        }
        if found.len() > 1 {
            let ids: Vec<&str> = found.iter().map(|i| i.id.as_str()).collect();
            info!(profile = %self.profile.name, tags = %wanted, candidates = %ids.join(" "),
                "target_tags matched {} running instances; trying the most recently launched first",
                found.len());
        }
        let mut not_connected = Vec::new();
        for instance in found.iter().take(MAX_TAG_CANDIDATES) {
            match api
                .start_session(&self.start_request(instance.id.clone()))
                .await
            {
                Ok(ticket) => {
                    info!(profile = %self.profile.name, tags = %wanted, instance = %instance.id,
                        launched = %instance.launch_time_text(), "target_tags resolved");
                    self.tags().instance = Some(instance.id.clone());
                    return Ok(ticket);
                }
                Err(AwsError::TargetNotConnected(m)) => {
                    warn!(profile = %self.profile.name, instance = %instance.id, reason = %m,
                        "tag-matched instance not connected to Session Manager; trying the next one");
                    not_connected.push(instance.id.clone());
                }
                Err(e) => {
                    return Err(ProfileError::StartSession(format!(
                        "{} (instance {} chosen by tags {wanted})",
                        describe_aws_error(&self.profile, &e),
                        instance.id
                    )));
                }
            }
        }
        self.tags().instance = None;
        Err(ProfileError::StartSession(format!(
            "no instance with tags {wanted} is connected to Session Manager (tried {}); \
                 is the SSM agent running on them, and can it reach the SSM endpoints?",
            not_connected.join(", ")
        )))
    }

    /// A bastion launched on demand: waits until it is ready (holding the connection),
    /// then starts the session. Session Manager may still answer TargetNotConnected for
    /// a moment after an instance reports Online (or a task's agent starts); that is
    /// retried until `ready_timeout`.
    async fn start_session_on_demand(
        &self,
        api: &SsmApi,
    ) -> Result<crate::aws::ssm::SessionTicket, ProfileError> {
        let Some(bastion) = &self.bastion else {
            return Err(ProfileError::NoStateDir {
                profile: self.profile.name.clone(),
            });
        };
        let ready_timeout = self
            .profile
            .bastion
            .as_ref()
            .map_or(Duration::from_secs(300), |b| b.ready_timeout);
        let deadline = Instant::now() + ready_timeout;
        loop {
            let target = bastion.ensure_ready().await?;
            match api.start_session(&self.start_request(target.clone())).await {
                Ok(ticket) => return Ok(ticket),
                Err(AwsError::TargetNotConnected(m)) if Instant::now() < deadline => {
                    debug!(target = %target, reason = %m, "bastion not reachable yet; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                Err(e) => {
                    return Err(ProfileError::StartSession(format!(
                        "{} (bastion {target})",
                        describe_aws_error(&self.profile, &e)
                    )));
                }
            }
        }
    }

    /// Starts ticking the on-demand bastion's lifecycle (idempotent): reconciles the
    /// registry first, then every second refreshes its use, warns before its max lifetime
    /// and ends it when idle or too old. Runs while the profile exists, open or not.
    pub fn start_bastion(self: &Arc<Self>) {
        let Some(bastion) = self.bastion.clone() else {
            return;
        };
        let mut ticker = self
            .bastion_ticker
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if ticker.is_some() {
            return;
        }
        let me = Arc::downgrade(self);
        let span = info_span!("bastion", profile = %self.profile.name);
        *ticker = Some(tokio::spawn(
            async move {
                if let Err(e) = bastion.reconcile().await {
                    warn!(error = %e, "bastion reconciliation failed");
                }
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(me) = me.upgrade() else { return };
                    let own: Vec<String> = me
                        .lock()
                        .live
                        .iter()
                        .map(|l| l.tunnel.session_id().to_owned())
                        .collect();
                    let open = me.open_connections();
                    let last_connection = me.lock().last_activity;
                    let decision = bastion.tick(open, &own, last_connection).await;
                    if let Decision::Terminate { reason, version } = decision {
                        let ended = match bastion.claim_termination(&reason, version).await {
                            Ok(Some(record)) => {
                                warn!(reason = %reason, "ending the bastion");
                                me.end_all_sessions(&reason).await;
                                bastion.finish_termination(record).await
                            }
                            Ok(None) => Ok(()),
                            Err(e) => Err(e),
                        };
                        if let Err(e) = ended {
                            warn!(error = %e, "cannot end the bastion");
                            me.lock().last_error = Some(e.to_string());
                        }
                    }
                }
            }
            .instrument(span),
        ));
    }

    /// Ends every session of the pool (their connections are cut), keeping the listeners.
    async fn end_all_sessions(&self, reason: &str) {
        let live = std::mem::take(&mut self.lock().live);
        for l in live {
            info!(session_id = %l.tunnel.session_id(), reason, "ending session");
            self.end_session(&l.tunnel).await;
            self.lock().done.absorb(&l.tunnel.stats());
        }
        let mut inner = self.lock();
        if inner.state == ProfileState::Ready {
            inner.state = ProfileState::Listening;
        }
        inner.last_error = Some(format!("sessions ended: {reason}"));
    }

    /// The on-demand bastion's lifecycle events (phases, boot progress, warnings).
    pub fn bastion_events(&self) -> Option<tokio::sync::broadcast::Receiver<Progress>> {
        self.bastion.as_ref().map(|b| b.subscribe())
    }

    fn start_request(&self, target: String) -> StartRequest {
        let mut parameters = HashMap::new();
        parameters.insert(
            "portNumber".to_owned(),
            vec![self.profile.remote_port.to_string()],
        );
        parameters.insert("localPortNumber".to_owned(), vec!["0".to_owned()]);
        if self.profile.document == DOC_REMOTE_HOST
            && let Some(host) = &self.profile.remote_host
        {
            parameters.insert("host".to_owned(), vec![host.clone()]);
        }
        StartRequest {
            target,
            document: self.profile.document.clone(),
            parameters,
            reason: self.profile.reason.clone(),
        }
    }

    async fn start_tunnel(&self) -> Result<Tunnel, ProfileError> {
        let api = (self.api)(&self.profile).await;
        let ticket = match &self.profile.target {
            Target::Instance(t) | Target::Ecs(t) => api
                .start_session(&self.start_request(t.clone()))
                .await
                .map_err(|e| ProfileError::StartSession(describe_aws_error(&self.profile, &e)))?,
            Target::Tags(tags) => self.start_session_by_tags(&api, tags).await?,
            Target::OnDemand(_) => self.start_session_on_demand(&api).await?,
        };
        info!(profile = %self.profile.name, session_id = %ticket.session_id, "session started");
        // In the ledger from the moment it exists: a daemon killed while connecting
        // leaves it for the next run to end.
        if let Some(host) = &self.host {
            host.note_session(&ticket.session_id, &self.profile.name);
        }
        let session_id = ticket.session_id.clone();
        let resume_api = api.clone();
        let profile = Arc::new(self.profile.clone());
        let resumer: Resumer = Arc::new(move || {
            let api = resume_api.clone();
            let id = session_id.clone();
            let profile = profile.clone();
            Box::pin(async move {
                api.resume_session(&id).await.map_err(|e| match e {
                    e if e.is_retryable() => ResumeError::Retry(e.to_string()),
                    e => ResumeError::Fatal(describe_aws_error(&profile, &e)),
                })
            })
        });
        let session_id = ticket.session_id.clone();
        let mut tunnel_config = self.tunnel_config.clone();
        tunnel_config.signer = api.upgrade_signer();
        match Tunnel::connect(ticket, tunnel_config, Some(resumer)).await {
            Ok(t) => {
                self.terminate_when_self_ended(&t, api.clone());
                let agent = t.info().agent_version.clone();
                if self.profile.document == DOC_REMOTE_HOST && !agent_supports_remote_host(&agent) {
                    // It would connect to the port on the instance itself, not remote_host.
                    self.end_session(&t).await;
                    return Err(ProfileError::AgentTooOld {
                        target: self.profile.target.to_string(),
                        agent,
                    });
                }
                Ok(t)
            }
            Err(e) => {
                // Do not leave a half-open session behind.
                if api.terminate_session(&session_id).await.is_ok()
                    && let Some(host) = &self.host
                {
                    host.drop_session(&session_id);
                }
                Err(e.into())
            }
        }
    }

    /// Ends pool sessions that had no connection for `idle_timeout`, and forgets
    /// sessions that ended on their own.
    async fn reap_if_idle(&self) {
        // An on-demand bastion is ended only once no session uses it, anywhere: a pool
        // session that serves nobody here must not keep it (or a colleague's) alive
        // longer than the bastion's own idle timeout.
        let limit = self
            .profile
            .bastion
            .as_ref()
            .map_or(self.profile.idle_timeout, |b| {
                b.idle_timeout.min(self.profile.idle_timeout)
            });
        let idle: Vec<Arc<Tunnel>> = {
            let mut inner = self.lock();
            self.prune_ended(&mut inner);
            inner
                .live
                .iter()
                .filter(|l| {
                    l.streams.load(Ordering::Relaxed) == 0 && l.last_activity.elapsed() >= limit
                })
                .map(|l| l.tunnel.clone())
                .collect()
        };
        for tunnel in idle {
            info!(profile = %self.profile.name, session_id = %tunnel.session_id(), "session idle; terminating");
            self.end_session(&tunnel).await;
            let mut inner = self.lock();
            self.forget_tunnel_locked(&mut inner, &tunnel);
            if inner.live.is_empty() && inner.state == ProfileState::Ready {
                inner.state = ProfileState::Listening;
            }
        }
    }

    /// A session that ends on its own (resend give-up, smux error, resume refused or
    /// failed, liveness) may still be open at the service, where an on-demand bastion's
    /// reaper would count it as someone's Active session. This calls the TerminateSession
    /// API for it, retrying, and keeps it in the ledger until that succeeds, so a daemon
    /// that dies first leaves it for the next run ([`Host::leftover_sessions`]).
    fn terminate_when_self_ended(&self, tunnel: &Tunnel, api: SsmApi) {
        let end = tunnel.end_watch();
        let session_id = tunnel.session_id().to_owned();
        let host = self.host.clone();
        let profile = self.profile.name.clone();
        tokio::spawn(async move {
            let why = end.wait().await;
            if !why.ended_on_its_own() {
                return;
            }
            info!(%profile, %session_id, reason = %why, "session ended on its own; terminating it at the service");
            match api
                .terminate_session_retrying(&session_id, SELF_ENDED_TERMINATE_ATTEMPTS)
                .await
            {
                Ok(()) => {
                    if let Some(host) = &host {
                        host.drop_session(&session_id);
                    }
                }
                Err(e) => warn!(
                    %profile, %session_id, error = %e,
                    "cannot terminate a session that ended on its own; the next start of the daemon tries again"
                ),
            }
        });
    }

    fn forget_tunnel_locked(&self, inner: &mut Inner, tunnel: &Arc<Tunnel>) {
        if let Some(i) = inner
            .live
            .iter()
            .position(|l| Arc::ptr_eq(&l.tunnel, tunnel))
        {
            let old = inner.live.swap_remove(i);
            inner.done.absorb(&old.tunnel.stats());
        }
    }

    /// TerminateSession flag and API ([P] sends the flag; the API call makes sure the
    /// service forgets the session even if the flag is lost).
    async fn end_session(&self, tunnel: &Tunnel) {
        tunnel.terminate().await;
        let api = (self.api)(&self.profile).await;
        match api.terminate_session(tunnel.session_id()).await {
            Ok(()) => {
                if let Some(host) = &self.host {
                    host.drop_session(tunnel.session_id());
                }
            }
            Err(e) => {
                warn!(session_id = %tunnel.session_id(), error = %e, "TerminateSession failed")
            }
        }
    }

    /// Terminates a session a previous run of the daemon left open (it was killed);
    /// true when it is gone.
    pub async fn end_leftover_session(&self, session_id: &str) -> bool {
        let api = (self.api)(&self.profile).await;
        match api.terminate_session(session_id).await {
            Ok(()) => {
                info!(profile = %self.profile.name, session_id, "ended a session left open by a previous run");
                true
            }
            Err(AwsError::DoesNotExist(_)) => true,
            Err(e) => {
                warn!(profile = %self.profile.name, session_id, error = %e, "cannot end a session left by a previous run");
                false
            }
        }
    }

    /// Ends the on-demand bastion in the background (its profile is going away).
    pub fn end_bastion(&self, reason: &'static str) {
        if let Some(b) = self.bastion.clone() {
            let name = self.profile.name.clone();
            tokio::spawn(async move {
                if let Err(e) = b.end_now(reason).await {
                    warn!(profile = %name, error = %e, "cannot end the bastion");
                }
            });
        }
    }

    /// Stops listening, ends the session and returns to Closed. Open connections are
    /// cut.
    pub async fn close(&self) -> ProfileStatus {
        let (listening, live) = {
            let mut inner = self.lock();
            inner.state = ProfileState::Closed;
            inner.listen_desc.clear();
            (inner.listening.take(), std::mem::take(&mut inner.live))
        };
        if let Some(stop) = listening {
            stop.cancel();
        }
        if let Listen::Unix(path) = &self.profile.listen {
            let _ = std::fs::remove_file(path);
        }
        for l in live {
            self.end_session(&l.tunnel).await;
            self.lock().done.absorb(&l.tunnel.stats());
        }
        self.status()
    }

    /// Stops accepting, waits up to `grace` for connections to finish, then closes.
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(stop) = self.lock().listening.take() {
            stop.cancel();
        }
        self.connections.close();
        let _ = tokio::time::timeout(grace, self.connections.wait()).await;
        self.close().await;
    }

    /// What `bastionctl status` shows.
    pub fn status(&self) -> ProfileStatus {
        let mut inner = self.lock();
        self.prune_ended(&mut inner);
        let first = inner.live.first();
        let stats: Vec<TunnelStats> = inner.live.iter().map(|l| l.tunnel.stats()).collect();
        let mut totals = inner.done.clone();
        for s in &stats {
            totals.absorb(s);
        }
        let remote = match &self.profile.remote_host {
            Some(host) => format!("{host}:{}", self.profile.remote_port),
            None => format!("port {} of the target", self.profile.remote_port),
        };
        let resuming = stats.iter().any(|s| s.reconnecting);
        ProfileStatus {
            name: self.profile.name.clone(),
            state: if resuming && inner.state == ProfileState::Ready {
                ProfileState::Resuming
            } else {
                inner.state
            },
            listen: inner.listen_desc.clone(),
            target: self.target_desc(),
            remote,
            session_id: first.map(|l| l.tunnel.session_id().to_owned()),
            sessions: inner
                .live
                .iter()
                .map(|l| l.tunnel.session_id().to_owned())
                .collect(),
            agent_version: first.map(|l| l.tunnel.info().agent_version.clone()),
            mode: first.map(|l| match l.tunnel.info().mode {
                DataMode::Mux => "mux".to_owned(),
                DataMode::Basic => "basic".to_owned(),
                DataMode::StandardStream => "stream".to_owned(),
            }),
            connections: self.open_connections(),
            total_connections: self.total_connections.load(Ordering::Relaxed),
            bytes_up: totals.bytes_up,
            bytes_down: totals.bytes_down,
            uptime_secs: first.map(|l| l.ready_at.elapsed().as_secs()),
            resumes: totals.resumes,
            resume_attempts: totals.resume_attempts,
            last_error: stats
                .iter()
                .find(|s| s.reconnecting)
                .and_then(|s| s.last_error.clone())
                .or_else(|| inner.last_error.clone())
                .or_else(|| stats.iter().find_map(|s| s.last_error.clone())),
            bastion: self.bastion.as_ref().map(|b| b.status()),
        }
    }
}

/// A listener the accept loop serves: TCP or Unix.
trait Accept: Send + Sync + 'static {
    /// The accepted connection.
    type Conn: LocalConnection;
    /// The next connection and a description of its peer.
    fn accept_one(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Conn, String)>> + Send;
}

impl Accept for TcpListener {
    type Conn = TcpStream;
    async fn accept_one(&self) -> std::io::Result<(TcpStream, String)> {
        let (conn, peer) = self.accept().await?;
        // Interactive traffic (a query, its reply): no Nagle delay on the local leg.
        let _ = conn.set_nodelay(true);
        Ok((conn, peer.to_string()))
    }
}

impl Accept for UnixListener {
    type Conn = UnixStream;
    async fn accept_one(&self) -> std::io::Result<(UnixStream, String)> {
        let (conn, _) = self.accept().await?;
        Ok((conn, "unix".to_owned()))
    }
}

fn bind_unix(path: &PathBuf) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if path.exists() {
        // A stale socket from a previous run; a live one would still accept.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process is listening on this socket",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}
