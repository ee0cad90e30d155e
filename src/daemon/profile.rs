//! One profile at run time: its listeners, its Session Manager session (started on the
//! first connection), the connections riding on it, and the idle reaper.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tokio::task::JoinHandle;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::api::{ApiError, ProfileState, ProfileStatus, Progress};
use crate::aws::ssm::{AwsError, SsmApi, StartRequest};
use crate::config::{DOC_REMOTE_HOST, Listen, Profile, Target};
use crate::proto::session::DataMode;
use crate::proto::version::{REMOTE_HOST_SUPPORTED_FROM_AGENT_VERSION, agent_supports_remote_host};
use crate::transport::ssm::{ResumeError, Resumer, Tunnel, TunnelConfig};

/// Gives a profile its SSM API client (cached per AWS profile and region).
pub type ApiProvider = Arc<
    dyn Fn(&Profile) -> std::pin::Pin<Box<dyn std::future::Future<Output = SsmApi> + Send>>
        + Send
        + Sync,
>;

struct Live {
    tunnel: Arc<Tunnel>,
    ready_at: Instant,
}

struct Inner {
    state: ProfileState,
    listeners: Vec<JoinHandle<()>>,
    listen_desc: Vec<String>,
    live: Option<Live>,
    last_error: Option<String>,
    last_activity: Instant,
    reaper: Option<JoinHandle<()>>,
    /// Bytes of sessions that already ended.
    bytes_up_done: u64,
    bytes_down_done: u64,
}

/// A profile's run-time state. Cheap to share.
pub struct ProfileRuntime {
    profile: Profile,
    tunnel_config: TunnelConfig,
    api: ApiProvider,
    inner: Mutex<Inner>,
    opening: AsyncMutex<()>,
    connecting: AsyncMutex<()>,
    connections: AtomicUsize,
    total_connections: AtomicU64,
}

fn user_error(code: &str, message: impl Into<String>) -> ApiError {
    ApiError {
        code: code.to_owned(),
        message: message.into(),
    }
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

impl ProfileRuntime {
    /// A closed profile.
    pub fn new(profile: Profile, tunnel_config: TunnelConfig, api: ApiProvider) -> Arc<Self> {
        Arc::new(ProfileRuntime {
            profile,
            tunnel_config,
            api,
            inner: Mutex::new(Inner {
                state: ProfileState::Closed,
                listeners: Vec::new(),
                listen_desc: Vec::new(),
                live: None,
                last_error: None,
                last_activity: Instant::now(),
                reaper: None,
                bytes_up_done: 0,
                bytes_down_done: 0,
            }),
            opening: AsyncMutex::new(()),
            connecting: AsyncMutex::new(()),
            connections: AtomicUsize::new(0),
            total_connections: AtomicU64::new(0),
        })
    }

    /// The profile's settings.
    pub fn profile(&self) -> &Profile {
        &self.profile
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens the listeners (idempotent). With `warm`, also starts the session now,
    /// reporting progress on `progress`.
    pub async fn open(
        self: &Arc<Self>,
        warm: bool,
        progress: Option<mpsc::Sender<Progress>>,
    ) -> Result<ProfileStatus, ApiError> {
        let started = Instant::now();
        let report = |phase: &str, detail: Option<String>| {
            if let Some(p) = &progress {
                let _ = p.try_send(Progress {
                    phase: phase.to_owned(),
                    elapsed_secs: started.elapsed().as_secs_f64(),
                    detail,
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
        if warm {
            report("starting_session", None);
            match self.ensure_tunnel().await {
                Ok(t) => report("ready", Some(t.session_id().to_owned())),
                Err(e) => {
                    report("failed", Some(e.message.clone()));
                    return Err(e);
                }
            }
        }
        Ok(self.status())
    }

    async fn start_listeners(self: &Arc<Self>) -> Result<(), ApiError> {
        let mut handles = Vec::new();
        let mut desc = Vec::new();
        match &self.profile.listen {
            Listen::Tcp { addrs, port } => {
                for ip in addrs {
                    let addr = SocketAddr::new(*ip, *port);
                    let listener = TcpListener::bind(addr).await.map_err(|e| {
                        for h in &handles {
                            JoinHandle::abort(h);
                        }
                        let code = if e.kind() == std::io::ErrorKind::AddrInUse {
                            "port_in_use"
                        } else {
                            "listen_failed"
                        };
                        user_error(
                            code,
                            format!(
                                "profile {}: cannot listen on {addr}: {e}",
                                self.profile.name
                            ),
                        )
                    })?;
                    desc.push(
                        listener
                            .local_addr()
                            .map_or(addr.to_string(), |a| a.to_string()),
                    );
                    let me = self.clone();
                    handles.push(tokio::spawn(async move {
                        loop {
                            match listener.accept().await {
                                Ok((conn, peer)) => {
                                    let _ = conn.set_nodelay(true);
                                    me.clone().spawn_connection(conn, peer.to_string());
                                }
                                Err(e) => {
                                    warn!(error = %e, "accept failed");
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                            }
                        }
                    }));
                }
            }
            Listen::Unix(path) => {
                let listener = bind_unix(path).map_err(|e| {
                    user_error(
                        "listen_failed",
                        format!(
                            "profile {}: cannot listen on {}: {e}",
                            self.profile.name,
                            path.display()
                        ),
                    )
                })?;
                desc.push(format!("unix:{}", path.display()));
                let me = self.clone();
                handles.push(tokio::spawn(async move {
                    loop {
                        match listener.accept().await {
                            Ok((conn, _)) => me.clone().spawn_connection(conn, "unix".into()),
                            Err(e) => {
                                warn!(error = %e, "accept failed");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        }
                    }
                }));
            }
        }
        info!(profile = %self.profile.name, listen = %desc.join(" "), "listening");
        let reaper = {
            let me = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let Some(me) = me.upgrade() else { return };
                    me.reap_if_idle().await;
                }
            })
        };
        let mut inner = self.lock();
        inner.listeners = handles;
        inner.listen_desc = desc;
        inner.state = ProfileState::Listening;
        inner.reaper = Some(reaper);
        inner.last_activity = Instant::now();
        Ok(())
    }

    fn spawn_connection<S>(self: Arc<Self>, conn: S, peer: String)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let open = self.connections.fetch_add(1, Ordering::Relaxed);
        if open >= self.profile.max_connections {
            self.connections.fetch_sub(1, Ordering::Relaxed);
            warn!(profile = %self.profile.name, open, "max_connections reached; refusing a connection");
            self.lock().last_error = Some(format!(
                "refused a connection: max_connections ({}) reached",
                self.profile.max_connections
            ));
            return;
        }
        let id = self.total_connections.fetch_add(1, Ordering::Relaxed) + 1;
        let span = info_span!("connection", profile = %self.profile.name, id, peer = %peer);
        tokio::spawn(
            async move {
                self.lock().last_activity = Instant::now();
                let result = self.serve_connection(conn).await;
                self.connections.fetch_sub(1, Ordering::Relaxed);
                self.lock().last_activity = Instant::now();
                match result {
                    Ok((up, down)) => debug!(up, down, "connection closed"),
                    Err(e) => {
                        warn!(error = %e.message, "connection failed");
                        self.lock().last_error = Some(e.message);
                    }
                }
            }
            .instrument(span),
        );
    }

    async fn serve_connection<S>(&self, mut conn: S) -> Result<(u64, u64), ApiError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tunnel = self.ensure_tunnel().await?;
        let mut stream = match tunnel.open_stream().await {
            Ok(s) => s,
            Err(first) => {
                // The session may have ended a moment ago: one fresh attempt.
                debug!(error = %first, "opening a stream failed; starting a new session");
                self.forget_tunnel(&tunnel);
                let tunnel = self.ensure_tunnel().await?;
                tunnel
                    .open_stream()
                    .await
                    .map_err(|e| user_error("session_failed", e.to_string()))?
            }
        };
        match tokio::io::copy_bidirectional(&mut conn, &mut stream).await {
            Ok(totals) => Ok(totals),
            Err(e) => {
                debug!(error = %e, "connection ended with an error");
                Ok((0, 0))
            }
        }
    }

    /// Returns the live session, starting one if needed (one start at a time).
    async fn ensure_tunnel(&self) -> Result<Arc<Tunnel>, ApiError> {
        let _guard = self.connecting.lock().await;
        if let Some(live) = &self.lock().live
            && live.tunnel.end_reason().is_none()
        {
            return Ok(live.tunnel.clone());
        }
        self.set_state(ProfileState::Connecting);
        match self.start_tunnel().await {
            Ok(tunnel) => {
                let tunnel = Arc::new(tunnel);
                let mut inner = self.lock();
                if let Some(old) = inner.live.as_ref().map(|l| l.tunnel.clone()) {
                    self.forget_tunnel_locked(&mut inner, &old);
                }
                inner.live = Some(Live {
                    tunnel: tunnel.clone(),
                    ready_at: Instant::now(),
                });
                inner.state = ProfileState::Ready;
                inner.last_error = None;
                // A fresh session starts its idle clock now.
                inner.last_activity = Instant::now();
                Ok(tunnel)
            }
            Err(e) => {
                let mut inner = self.lock();
                inner.state = ProfileState::Error;
                inner.last_error = Some(e.message.clone());
                Err(e)
            }
        }
    }

    fn forget_tunnel(&self, tunnel: &Arc<Tunnel>) {
        let mut inner = self.lock();
        self.forget_tunnel_locked(&mut inner, tunnel);
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

    async fn start_tunnel(&self) -> Result<Tunnel, ApiError> {
        let target = match &self.profile.target {
            Target::Instance(t) | Target::Ecs(t) => t.clone(),
            Target::Tags(_) => {
                return Err(user_error(
                    "unsupported",
                    "target_tags needs the EC2 lookup, which this build does not include yet; use an instance id",
                ));
            }
        };
        let api = (self.api)(&self.profile).await;
        let ticket = api
            .start_session(&self.start_request(target))
            .await
            .map_err(|e| {
                user_error(
                    "start_session_failed",
                    describe_aws_error(&self.profile, &e),
                )
            })?;
        info!(profile = %self.profile.name, session_id = %ticket.session_id, "session started");
        let session_id = ticket.session_id.clone();
        let resume_api = api.clone();
        let resumer: Resumer = Arc::new(move || {
            let api = resume_api.clone();
            let id = session_id.clone();
            Box::pin(async move {
                api.resume_session(&id).await.map_err(|e| match e {
                    e if e.is_retryable() => ResumeError::Retry(e.to_string()),
                    e => ResumeError::Fatal(e.to_string()),
                })
            })
        });
        let session_id = ticket.session_id.clone();
        match Tunnel::connect(ticket, self.tunnel_config.clone(), Some(resumer)).await {
            Ok(t) => {
                let agent = t.info().agent_version.clone();
                if self.profile.document == DOC_REMOTE_HOST && !agent_supports_remote_host(&agent) {
                    // It would connect to the port on the instance itself, not remote_host.
                    self.end_session(&t).await;
                    return Err(user_error(
                        "agent_too_old",
                        format!(
                            "the SSM agent on {} is version {agent}, too old for {DOC_REMOTE_HOST} \
                             (needs {REMOTE_HOST_SUPPORTED_FROM_AGENT_VERSION} or newer); update the agent \
                             (AWS-UpdateSSMAgent) or use a bastion with a current agent",
                            self.profile.target,
                        ),
                    ));
                }
                Ok(t)
            }
            Err(e) => {
                // Do not leave a half-open session behind.
                let _ = api.terminate_session(&session_id).await;
                Err(user_error("session_failed", e.to_string()))
            }
        }
    }

    async fn reap_if_idle(&self) {
        let (tunnel, idle) = {
            let inner = self.lock();
            let idle = self.connections.load(Ordering::Relaxed) == 0
                && inner.last_activity.elapsed() >= self.profile.idle_timeout;
            (inner.live.as_ref().map(|l| l.tunnel.clone()), idle)
        };
        let Some(tunnel) = tunnel else { return };
        if tunnel.end_reason().is_some() {
            let mut inner = self.lock();
            if let Some(why) = tunnel.end_reason() {
                inner.last_error = Some(why);
            }
            self.forget_tunnel_locked(&mut inner, &tunnel);
            if inner.state == ProfileState::Ready {
                inner.state = ProfileState::Listening;
            }
            return;
        }
        if idle {
            info!(profile = %self.profile.name, "session idle; terminating");
            self.end_session(&tunnel).await;
            let mut inner = self.lock();
            self.forget_tunnel_locked(&mut inner, &tunnel);
            if inner.state == ProfileState::Ready {
                inner.state = ProfileState::Listening;
            }
        }
    }

    fn forget_tunnel_locked(&self, inner: &mut Inner, tunnel: &Arc<Tunnel>) {
        if inner
            .live
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(&l.tunnel, tunnel))
            && let Some(old) = inner.live.take()
        {
            let s = old.tunnel.stats();
            inner.bytes_up_done += s.bytes_up;
            inner.bytes_down_done += s.bytes_down;
        }
    }

    /// TerminateSession flag and API ([P] sends the flag; the API call makes sure the
    /// service forgets the session even if the flag is lost).
    async fn end_session(&self, tunnel: &Tunnel) {
        tunnel.terminate().await;
        let api = (self.api)(&self.profile).await;
        if let Err(e) = api.terminate_session(tunnel.session_id()).await {
            warn!(session_id = %tunnel.session_id(), error = %e, "TerminateSession failed");
        }
    }

    /// Stops listening, ends the session and returns to Closed. Open connections are
    /// cut.
    pub async fn close(&self) -> ProfileStatus {
        let (handles, reaper, live) = {
            let mut inner = self.lock();
            inner.state = ProfileState::Closed;
            inner.listen_desc.clear();
            (
                std::mem::take(&mut inner.listeners),
                inner.reaper.take(),
                inner.live.take(),
            )
        };
        for h in handles.into_iter().chain(reaper) {
            h.abort();
        }
        if let Listen::Unix(path) = &self.profile.listen {
            let _ = std::fs::remove_file(path);
        }
        if let Some(live) = live {
            self.end_session(&live.tunnel).await;
            let s = live.tunnel.stats();
            let mut inner = self.lock();
            inner.bytes_up_done += s.bytes_up;
            inner.bytes_down_done += s.bytes_down;
        }
        self.status()
    }

    /// Stops accepting, waits up to `grace` for connections to finish, then closes.
    pub async fn shutdown(&self, grace: Duration) {
        for h in std::mem::take(&mut self.lock().listeners) {
            h.abort();
        }
        let deadline = Instant::now() + grace;
        while self.connections.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.close().await;
    }

    fn set_state(&self, state: ProfileState) {
        self.lock().state = state;
    }

    /// What `bastionctl status` shows.
    pub fn status(&self) -> ProfileStatus {
        let inner = self.lock();
        let live = inner.live.as_ref();
        let stats = live.map(|l| l.tunnel.stats()).unwrap_or_default();
        let remote = match &self.profile.remote_host {
            Some(host) => format!("{host}:{}", self.profile.remote_port),
            None => format!("port {} of the target", self.profile.remote_port),
        };
        ProfileStatus {
            name: self.profile.name.clone(),
            state: inner.state,
            listen: inner.listen_desc.clone(),
            target: self.profile.target.to_string(),
            remote,
            session_id: live.map(|l| l.tunnel.session_id().to_owned()),
            agent_version: live.map(|l| l.tunnel.info().agent_version.clone()),
            mode: live.map(|l| match l.tunnel.info().mode {
                DataMode::Mux => "mux".to_owned(),
                DataMode::Basic => "basic".to_owned(),
                DataMode::StandardStream => "stream".to_owned(),
            }),
            connections: self.connections.load(Ordering::Relaxed),
            total_connections: self.total_connections.load(Ordering::Relaxed),
            bytes_up: inner.bytes_up_done + stats.bytes_up,
            bytes_down: inner.bytes_down_done + stats.bytes_down,
            uptime_secs: live.map(|l| l.ready_at.elapsed().as_secs()),
            resumes: stats.resumes,
            last_error: inner.last_error.clone().or(stats.last_error),
        }
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
