//! The daemon: the set of profiles, configuration reloads, shared AWS clients and
//! orderly shutdown. The control API ([`control`]) is a thin layer over [`Daemon`].

pub mod control;
pub mod profile;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Mutex as AsyncMutex, mpsc};
use tracing::info;

use crate::api::{ProfileStatus, Progress, ReloadResult};
use crate::aws::ssm::{AwsTarget, SsmApi, load_config};
use crate::config::{Config, ConfigErrors, Profile};
use crate::ondemand::Host;
use crate::transport::ssm::TunnelConfig;
use profile::{ApiProvider, ProfileError, ProfileRuntime};

/// The running daemon. Share it as `Arc<Daemon>`.
pub struct Daemon {
    config_path: PathBuf,
    profiles: Mutex<BTreeMap<String, Arc<ProfileRuntime>>>,
    tunnel_config: TunnelConfig,
    api: ApiProvider,
    reload_lock: AsyncMutex<()>,
    host: Option<Arc<Host>>,
}

/// Why a request to the daemon failed. The control API ([`control`]) turns it into the
/// wire error (code and HTTP status); everything inside the daemon keeps it typed.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// No profile has that name.
    #[error("no profile named {0:?}; `bastionctl list` shows the configured ones")]
    UnknownProfile(String),
    /// The profile has no `bastion` section, so no lifecycle events.
    #[error("profile {0:?} has no on-demand bastion (no bastion section)")]
    NoBastion(String),
    /// `reload`: the configuration file has errors; nothing changed.
    #[error("configuration not reloaded:\n{0}")]
    BadConfig(ConfigErrors),
    /// The profile could not open or start its session.
    #[error(transparent)]
    Profile(#[from] ProfileError),
}

impl Daemon {
    /// A daemon for `config` (read from `config_path`, which reloads re-read). `host`
    /// (state directory and daemon id) is needed by profiles with on-demand bastions.
    pub fn new(config_path: &Path, config: Config, host: Option<Arc<Host>>) -> Arc<Daemon> {
        let clients: Arc<AsyncMutex<HashMap<AwsTarget, SsmApi>>> = Arc::default();
        let api: ApiProvider = Arc::new(move |p: &Profile| {
            let key = AwsTarget {
                profile: p.aws_profile.clone(),
                region: p.region.clone(),
                imds: p.imds,
            };
            let clients = clients.clone();
            Box::pin(async move {
                let mut map = clients.lock().await;
                if let Some(api) = map.get(&key) {
                    return api.clone();
                }
                let api = SsmApi::new(&load_config(&key).await);
                map.insert(key, api.clone());
                api
            })
        });
        let tunnel_config = TunnelConfig::default();
        let profiles = config
            .profiles
            .into_values()
            .map(|p| {
                (
                    p.name.clone(),
                    ProfileRuntime::new(p, tunnel_config.clone(), api.clone(), host.clone()),
                )
            })
            .collect();
        Arc::new(Daemon {
            config_path: config_path.to_path_buf(),
            profiles: Mutex::new(profiles),
            tunnel_config,
            api,
            reload_lock: AsyncMutex::new(()),
            host,
        })
    }

    fn profiles(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<ProfileRuntime>>> {
        self.profiles.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, name: &str) -> Result<Arc<ProfileRuntime>, DaemonError> {
        self.profiles()
            .get(name)
            .cloned()
            .ok_or_else(|| DaemonError::UnknownProfile(name.to_owned()))
    }

    /// Terminates the sessions a previous run of the daemon left open (it was killed
    /// before it could end them), each through its profile's AWS settings.
    pub async fn end_leftover_sessions(&self) {
        let Some(host) = &self.host else { return };
        let leftovers = host.leftover_sessions();
        let profiles = self.profiles().clone();
        for (session_id, profile) in leftovers {
            match profiles.get(&profile) {
                Some(p) => {
                    if p.end_leftover_session(&session_id).await {
                        host.drop_session(&session_id);
                    }
                }
                None => tracing::warn!(
                    session_id,
                    profile,
                    "a previous run left a session open for a profile that no longer exists; \
                     it ends at the service's idle timeout"
                ),
            }
        }
    }

    /// Starts the lifecycle of every on-demand bastion: each reconciles its registry with
    /// EC2/ECS (finishing what a killed daemon left), then reaps when idle.
    pub fn start_bastions(&self) {
        for p in self.profiles().values() {
            p.start_bastion();
        }
    }

    /// Lifecycle events of a profile's on-demand bastion.
    pub fn bastion_events(
        &self,
        name: &str,
    ) -> Result<tokio::sync::broadcast::Receiver<Progress>, DaemonError> {
        self.get(name)?
            .bastion_events()
            .ok_or_else(|| DaemonError::NoBastion(name.to_owned()))
    }

    /// Opens every profile marked `autostart`. Failures are recorded on the profile.
    pub async fn autostart(&self) {
        let auto: Vec<_> = self
            .profiles()
            .values()
            .filter(|p| p.profile().autostart)
            .cloned()
            .collect();
        for p in auto {
            if let Err(e) = p.open(false, None).await {
                tracing::warn!(profile = %p.profile().name, error = %e, "autostart failed");
            }
        }
    }

    /// `bastionctl open`.
    pub async fn open(
        &self,
        name: &str,
        warm: bool,
        progress: Option<mpsc::Sender<Progress>>,
    ) -> Result<ProfileStatus, DaemonError> {
        Ok(self.get(name)?.open(warm, progress).await?)
    }

    /// `bastionctl close`.
    pub async fn close(&self, name: &str) -> Result<ProfileStatus, DaemonError> {
        Ok(self.get(name)?.close().await)
    }

    /// `bastionctl status NAME`.
    pub fn status(&self, name: &str) -> Result<ProfileStatus, DaemonError> {
        Ok(self.get(name)?.status())
    }

    /// `bastionctl list` / `status`.
    pub fn list(&self) -> Vec<ProfileStatus> {
        self.profiles().values().map(|p| p.status()).collect()
    }

    /// Re-reads the configuration. Unchanged profiles keep their listeners and
    /// sessions; changed ones are closed and, if they were open, reopened.
    pub async fn reload(&self) -> Result<ReloadResult, DaemonError> {
        let _guard = self.reload_lock.lock().await;
        let config = Config::load(&self.config_path).map_err(DaemonError::BadConfig)?;
        let mut result = ReloadResult::default();
        let old: BTreeMap<_, _> = self.profiles().clone();
        let mut next = BTreeMap::new();
        let mut reopen = Vec::new();
        for (name, p) in config.profiles {
            match old.get(&name) {
                Some(rt) if *rt.profile() == p => {
                    result.unchanged.push(name.clone());
                    next.insert(name, rt.clone());
                }
                Some(rt) => {
                    let was_open = rt.status().state != crate::api::ProfileState::Closed;
                    rt.close().await;
                    let fresh = ProfileRuntime::new(
                        p,
                        self.tunnel_config.clone(),
                        self.api.clone(),
                        self.host.clone(),
                    );
                    if was_open || fresh.profile().autostart {
                        reopen.push(fresh.clone());
                    }
                    result.changed.push(name.clone());
                    next.insert(name, fresh);
                }
                None => {
                    let fresh = ProfileRuntime::new(
                        p,
                        self.tunnel_config.clone(),
                        self.api.clone(),
                        self.host.clone(),
                    );
                    if fresh.profile().autostart {
                        reopen.push(fresh.clone());
                    }
                    result.added.push(name.clone());
                    next.insert(name, fresh);
                }
            }
        }
        for (name, rt) in &old {
            if !next.contains_key(name) {
                rt.close().await;
                result.removed.push(name.clone());
            }
        }
        // A bastion whose profile is gone, or now keyed differently (another registry,
        // shared or not, other AWS settings), would have nobody to reap it: end it.
        for (name, rt) in &old {
            let carried = next.get(name).is_some_and(|n| Arc::ptr_eq(n, rt));
            let same_scope = next
                .get(name)
                .is_some_and(|n| crate::ondemand::manager::same_scope(rt.profile(), n.profile()));
            if !carried && !same_scope {
                rt.end_bastion("its profile was removed or re-scoped by a reload");
            }
        }
        *self.profiles() = next;
        self.start_bastions();
        for rt in reopen {
            if let Err(e) = rt.open(false, None).await {
                tracing::warn!(profile = %rt.profile().name, error = %e, "reopen after reload failed");
                result.failed.push(format!("{}: {e}", rt.profile().name));
            }
        }
        info!(?result, "configuration reloaded");
        Ok(result)
    }

    /// Stops accepting everywhere, lets connections finish for up to `grace`, then
    /// terminates every session.
    pub async fn shutdown(&self, grace: Duration) {
        let all: Vec<_> = self.profiles().values().cloned().collect();
        let tasks: Vec<_> = all
            .into_iter()
            .map(|p| tokio::spawn(async move { p.shutdown(grace).await }))
            .collect();
        for t in tasks {
            let _ = t.await;
        }
    }
}
