//! Profile configuration: a TOML file, overridable per setting by environment variables.
//!
//! ```toml
//! [defaults]
//! region = "eu-west-1"
//! aws_profile = "dev"
//! idle_timeout = "20m"
//!
//! [profiles.postgres-prod]
//! target = "i-0123456789abcdef0"
//! remote_host = "prod-db.xxxx.eu-west-1.rds.amazonaws.com"
//! remote_port = 5432
//! local_port = 5432
//! ```
//!
//! Every error names the file, line and column. Every setting can be overridden by an
//! environment variable: `BASTION_DEFAULT_<KEY>` for `[defaults]` and
//! `BASTION_PROFILE_<NAME>_<KEY>` for a profile, with the name and key upper-cased and
//! `-` written as `_` (`BASTION_PROFILE_POSTGRES_PROD_LOCAL_PORT=15432`).

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub mod bastion;

pub use bastion::OnDemand;

/// Session document for a tunnel to another host through the target.
pub const DOC_REMOTE_HOST: &str = "AWS-StartPortForwardingSessionToRemoteHost";
/// Session document for a tunnel to a port of the target itself.
pub const DOC_LOCAL: &str = "AWS-StartPortForwardingSession";

/// One configuration problem, located in its file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The file (or `<env>` for an environment variable).
    pub file: PathBuf,
    /// 1-based line (0 when unknown).
    pub line: usize,
    /// 1-based column (0 when unknown).
    pub column: usize,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// All problems found in a configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where a profile's sessions go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// An instance or managed node id (`i-…`, `mi-…`).
    Instance(String),
    /// An ECS task: `ecs:<cluster>_<task-id>_<runtime-id>`.
    Ecs(String),
    /// The running instance with these tags (resolved with EC2 DescribeInstances).
    Tags(BTreeMap<String, String>),
    /// A bastion launched on demand (the profile's `bastion` section).
    OnDemand(&'static str),
}

impl Target {
    /// The StartSession `Target` string, when it is known without a lookup.
    pub fn session_target(&self) -> Option<&str> {
        match self {
            Target::Instance(s) | Target::Ecs(s) => Some(s),
            Target::Tags(_) | Target::OnDemand(_) => None,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Instance(s) | Target::Ecs(s) => f.write_str(s),
            Target::Tags(t) => {
                let parts: Vec<String> = t.iter().map(|(k, v)| format!("{k}={v}")).collect();
                write!(f, "tags:{}", parts.join(","))
            }
            Target::OnDemand(kind) => write!(f, "{kind} on demand"),
        }
    }
}

/// Where a profile listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listen {
    /// TCP on these addresses and this port.
    Tcp {
        /// Addresses (default 127.0.0.1 and ::1).
        addrs: Vec<IpAddr>,
        /// Port.
        port: u16,
    },
    /// A Unix socket at this path.
    Unix(PathBuf),
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp { addrs, port } => {
                let parts: Vec<String> = addrs
                    .iter()
                    .map(|a| match a {
                        IpAddr::V4(v4) => format!("{v4}:{port}"),
                        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
                    })
                    .collect();
                f.write_str(&parts.join(" "))
            }
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A validated profile.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    /// Its name (the TOML table key).
    pub name: String,
    /// Local listener.
    pub listen: Listen,
    /// Where sessions go.
    pub target: Target,
    /// The host the agent connects to; `None` means the target itself.
    pub remote_host: Option<String>,
    /// The port the agent connects to.
    pub remote_port: u16,
    /// Session document.
    pub document: String,
    /// AWS region.
    pub region: Option<String>,
    /// AWS named profile.
    pub aws_profile: Option<String>,
    /// Close the session after this long without a connection.
    pub idle_timeout: Duration,
    /// Bound for opening the data channel websocket and for the handshake.
    pub connect_timeout: Duration,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most Session Manager sessions the profile's connections are striped over.
    pub max_sessions: usize,
    /// Start listening when the daemon starts (otherwise on `bastionctl open`).
    pub autostart: bool,
    /// Audit reason passed to StartSession.
    pub reason: Option<String>,
    /// Also use the EC2 instance metadata service for credentials and region (off by
    /// default: it only makes sense when the daemon runs on EC2).
    pub imds: bool,
    /// The on-demand bastion, when the target is launched rather than fixed.
    pub bastion: Option<OnDemand>,
    /// Host names, besides Session Manager's own endpoints, that a StreamUrl may name
    /// (a private endpoint behind a proxy or custom DNS). Upgrades are signed with the
    /// profile's credentials, so nothing else is ever dialled.
    pub stream_url_hosts: Vec<String>,
}

/// Default of `max_sessions`: the agent sends at most about 1 MB/s per session, so a
/// few parallel connections (an IDE's, a dump) each get a session of their own.
pub const DEFAULT_MAX_SESSIONS: usize = 4;

/// The whole configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Profiles by name.
    pub profiles: BTreeMap<String, Profile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    defaults: RawSettings,
    #[serde(default)]
    profiles: BTreeMap<Spanned<String>, Spanned<RawSettings>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    target: Option<Spanned<String>>,
    target_tags: Option<Spanned<BTreeMap<String, String>>>,
    remote_host: Option<Spanned<String>>,
    remote_port: Option<Spanned<i64>>,
    local_port: Option<Spanned<i64>>,
    local_socket: Option<Spanned<String>>,
    bind: Option<Spanned<Vec<Spanned<String>>>>,
    document: Option<Spanned<String>>,
    region: Option<Spanned<String>>,
    aws_profile: Option<Spanned<String>>,
    idle_timeout: Option<Spanned<toml::Value>>,
    connect_timeout: Option<Spanned<toml::Value>>,
    max_connections: Option<Spanned<i64>>,
    max_sessions: Option<Spanned<i64>>,
    autostart: Option<Spanned<bool>>,
    reason: Option<Spanned<String>>,
    imds: Option<Spanned<bool>>,
    bastion: Option<Spanned<bastion::RawBastion>>,
    stream_url_hosts: Option<Spanned<Vec<Spanned<String>>>>,
}

/// Keys a profile (or `[defaults]`) accepts, for environment overrides and docs.
pub const KEYS: &[&str] = &[
    "target",
    "target_tags",
    "remote_host",
    "remote_port",
    "local_port",
    "local_socket",
    "bind",
    "document",
    "region",
    "aws_profile",
    "idle_timeout",
    "connect_timeout",
    "max_connections",
    "max_sessions",
    "autostart",
    "reason",
    "imds",
    "stream_url_hosts",
];

/// Parses a duration: an integer number of seconds, or a string such as `90s`,
/// `20m`, `1h30m`, `2d`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    let mut total = 0u64;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("invalid duration {s:?}: use e.g. 90s, 20m, 1h")),
        };
        let n: u64 = num
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: a number must precede {c:?}"))?;
        total = total.saturating_add(n.saturating_mul(unit));
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("invalid duration {s:?}: missing unit after {num}"));
    }
    Ok(Duration::from_secs(total))
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

/// A positive duration setting: seconds, or a string such as `"20m"`.
fn duration_setting(
    ctx: &mut Ctx<'_>,
    value: Option<Spanned<toml::Value>>,
    key: &str,
    default: Duration,
) -> Duration {
    let Some(v) = value else { return default };
    let parsed = match v.get_ref() {
        toml::Value::Integer(n) if *n >= 0 => Ok(Duration::from_secs(*n as u64)),
        toml::Value::String(s) => parse_duration(s),
        _ => Err(format!("{key} must be seconds or a string such as \"20m\"")),
    };
    match parsed {
        Ok(d) if d.is_zero() => {
            ctx.err(Some(v.span()), format!("{key} must be greater than zero"));
            Duration::ZERO
        }
        Ok(d) => d,
        Err(e) => {
            ctx.err(Some(v.span()), e);
            Duration::ZERO
        }
    }
}

impl Ctx<'_> {
    fn err(&mut self, span: Option<Range<usize>>, message: impl Into<String>) {
        let (line, column) = span.map_or((0, 0), |r| line_col(self.text, r.start));
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            message: message.into(),
        });
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.chars().count(), |i| before[i + 1..].chars().count())
        + 1;
    (line, column)
}

fn merged<T: Clone>(p: &Option<Spanned<T>>, d: &Option<Spanned<T>>) -> Option<Spanned<T>> {
    p.clone().or_else(|| d.clone())
}

fn port(ctx: &mut Ctx, v: &Spanned<i64>, key: &str, allow_zero: bool) -> Option<u16> {
    let n = *v.get_ref();
    let min = if allow_zero { 0 } else { 1 };
    if n < min || n > 65535 {
        ctx.err(
            Some(v.span()),
            format!("{key} must be between {min} and 65535, not {n}"),
        );
        return None;
    }
    Some(n as u16)
}

fn validate(
    ctx: &mut Ctx,
    name: &str,
    p: &RawSettings,
    d: &RawSettings,
    at: Range<usize>,
) -> Option<Profile> {
    let before = ctx.errors.len();
    let on_demand = p.bastion.as_ref().or(d.bastion.as_ref()).map(|section| {
        let empty = bastion::RawBastion::default();
        let own = p.bastion.as_ref().map_or(&empty, |b| b.get_ref());
        let dflt = d.bastion.as_ref().map_or(&empty, |b| b.get_ref());
        (section.span(), own.clone(), dflt.clone())
    });
    let target = match (
        merged(&p.target, &d.target),
        merged(&p.target_tags, &d.target_tags),
    ) {
        (fixed, tags) if on_demand.is_some() && p.bastion.is_some() => {
            // A profile's own target next to its own bastion section is a conflict; a
            // target from [defaults] simply does not apply.
            if let Some(span) = fixed.map(|t| t.span()).or(tags.map(|t| t.span()))
                && (p.target.is_some() || p.target_tags.is_some())
            {
                ctx.err(
                    Some(span),
                    "a profile with a bastion section launches its target; remove target/target_tags",
                );
            }
            None
        }
        (Some(_), Some(tags)) => {
            ctx.err(
                Some(tags.span()),
                "set either target or target_tags, not both",
            );
            None
        }
        (Some(t), None) => {
            let s = t.get_ref().trim().to_owned();
            if let Some(rest) = s.strip_prefix("ecs:") {
                if rest.split('_').count() != 3 || rest.split('_').any(str::is_empty) {
                    ctx.err(
                        Some(t.span()),
                        format!("ECS target {s:?} must look like ecs:<cluster>_<task-id>_<container-runtime-id>"),
                    );
                }
                Some(Target::Ecs(s))
            } else if (s.starts_with("i-") || s.starts_with("mi-"))
                && s.len() <= 400
                && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            {
                Some(Target::Instance(s))
            } else {
                ctx.err(
                    Some(t.span()),
                    format!("target {s:?} is not an instance id (i-…, mi-…) or an ecs: target; use target_tags for a tag filter"),
                );
                None
            }
        }
        (None, Some(tags)) if tags.get_ref().is_empty() => {
            ctx.err(Some(tags.span()), "target_tags must name at least one tag");
            None
        }
        (None, Some(tags)) => Some(Target::Tags(tags.get_ref().clone())),
        (None, None) if d.bastion.is_some() => None,
        (None, None) => {
            ctx.err(
                Some(at.clone()),
                format!(
                    "profile {name:?} needs a target (instance id, ecs: target), target_tags \
                     or a bastion section"
                ),
            );
            None
        }
    };
    let remote_host = merged(&p.remote_host, &d.remote_host).map(|h| {
        let v = h.get_ref().trim().to_owned();
        if v.is_empty() || v.contains(char::is_whitespace) || v.contains('/') {
            ctx.err(
                Some(h.span()),
                format!("remote_host {v:?} is not a host name or address"),
            );
        }
        v
    });
    let remote_port = match merged(&p.remote_port, &d.remote_port) {
        Some(v) => port(ctx, &v, "remote_port", false),
        None => {
            ctx.err(
                Some(at.clone()),
                format!("profile {name:?} needs remote_port"),
            );
            None
        }
    };
    let bind = match merged(&p.bind, &d.bind) {
        None => vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ],
        Some(list) => {
            if list.get_ref().is_empty() {
                ctx.err(Some(list.span()), "bind must list at least one address");
            }
            let mut addrs = Vec::new();
            for a in list.get_ref() {
                let s = a.get_ref().trim();
                let parsed = if s.eq_ignore_ascii_case("localhost") {
                    Ok(IpAddr::V4(Ipv4Addr::LOCALHOST))
                } else {
                    s.parse::<IpAddr>()
                };
                match parsed {
                    Ok(ip) => addrs.push(ip),
                    Err(_) => ctx.err(
                        Some(a.span()),
                        format!("bind address {s:?} is not an IP address"),
                    ),
                }
            }
            addrs
        }
    };
    let listen = match (
        merged(&p.local_port, &d.local_port),
        merged(&p.local_socket, &d.local_socket),
    ) {
        (Some(_), Some(sock)) => {
            ctx.err(
                Some(sock.span()),
                "set either local_port or local_socket, not both",
            );
            None
        }
        (Some(lp), None) => {
            port(ctx, &lp, "local_port", false).map(|port| Listen::Tcp { addrs: bind, port })
        }
        (None, Some(sock)) => {
            let path = PathBuf::from(sock.get_ref());
            if !path.is_absolute() {
                ctx.err(Some(sock.span()), "local_socket must be an absolute path");
            }
            Some(Listen::Unix(path))
        }
        (None, None) => {
            ctx.err(
                Some(at.clone()),
                format!("profile {name:?} needs local_port or local_socket"),
            );
            None
        }
    };
    let document = match merged(&p.document, &d.document) {
        Some(doc) => {
            let v = doc.get_ref().clone();
            let valid = (3..=128).contains(&v.len())
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_-.:/".contains(c));
            if !valid {
                ctx.err(
                    Some(doc.span()),
                    format!("document {v:?} is not a valid SSM document name"),
                );
            }
            if v == DOC_REMOTE_HOST && remote_host.is_none() {
                ctx.err(
                    Some(doc.span()),
                    format!("{DOC_REMOTE_HOST} needs remote_host"),
                );
            }
            v
        }
        None if remote_host.is_some() => DOC_REMOTE_HOST.to_owned(),
        None => DOC_LOCAL.to_owned(),
    };
    let idle_timeout = duration_setting(
        ctx,
        merged(&p.idle_timeout, &d.idle_timeout),
        "idle_timeout",
        Duration::from_secs(20 * 60),
    );
    let connect_timeout = duration_setting(
        ctx,
        merged(&p.connect_timeout, &d.connect_timeout),
        "connect_timeout",
        Duration::from_secs(30),
    );
    let max_connections = match merged(&p.max_connections, &d.max_connections) {
        None => 256,
        Some(v) if *v.get_ref() < 1 || *v.get_ref() > 100_000 => {
            ctx.err(
                Some(v.span()),
                "max_connections must be between 1 and 100000",
            );
            0
        }
        Some(v) => *v.get_ref() as usize,
    };
    let max_sessions = match merged(&p.max_sessions, &d.max_sessions) {
        None => DEFAULT_MAX_SESSIONS,
        Some(v) if *v.get_ref() < 1 || *v.get_ref() > 64 => {
            ctx.err(Some(v.span()), "max_sessions must be between 1 and 64");
            0
        }
        Some(v) => *v.get_ref() as usize,
    };
    // A bastion section in [defaults] applies to profiles without a fixed target.
    let use_bastion = p.bastion.is_some() || (target.is_none() && d.bastion.is_some());
    let bastion = match &on_demand {
        Some((span, own, dflt)) if use_bastion => bastion::validate(
            ctx,
            own,
            dflt,
            span.clone(),
            bastion::RemoteEnd {
                profile: name,
                remote_host: remote_host.as_deref(),
                remote_port,
            },
        ),
        _ => None,
    };
    let target = match (&bastion, target) {
        (Some(b), _) => Some(Target::OnDemand(match b.provider {
            bastion::Provider::Ec2(_) => "ec2",
            bastion::Provider::Fargate(_) => "fargate",
        })),
        (None, t) => t,
    };
    let mut stream_url_hosts = Vec::new();
    for h in merged(&p.stream_url_hosts, &d.stream_url_hosts)
        .map(|l| l.into_inner())
        .unwrap_or_default()
    {
        let v = h.get_ref().trim().to_ascii_lowercase();
        let valid = !v.is_empty()
            && v.len() <= 253
            && v.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if valid {
            stream_url_hosts.push(v);
        } else {
            ctx.err(
                Some(h.span()),
                format!(
                    "stream_url_hosts entry {:?} is not a host name (no scheme, port or path)",
                    h.get_ref()
                ),
            );
        }
    }
    let text = |v: Option<Spanned<String>>| v.map(|s| s.into_inner()).filter(|s| !s.is_empty());
    if ctx.errors.len() > before {
        return None;
    }
    Some(Profile {
        name: name.to_owned(),
        listen: listen?,
        target: target?,
        remote_host,
        remote_port: remote_port?,
        document,
        region: text(merged(&p.region, &d.region)),
        aws_profile: text(merged(&p.aws_profile, &d.aws_profile)),
        idle_timeout,
        connect_timeout,
        max_connections,
        max_sessions,
        autostart: merged(&p.autostart, &d.autostart).is_some_and(|v| *v.get_ref()),
        reason: text(merged(&p.reason, &d.reason)),
        imds: merged(&p.imds, &d.imds).is_some_and(|v| *v.get_ref()),
        bastion,
        stream_url_hosts,
    })
}

fn env_name(prefix: &str, key: &str) -> String {
    format!("{prefix}_{}", key.to_ascii_uppercase().replace('-', "_"))
}

/// Applies `BASTION_DEFAULT_*` and `BASTION_PROFILE_<NAME>_*` overrides to the parsed
/// TOML document before validation.
fn apply_env(
    doc: &mut toml::Table,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<ConfigError>,
) {
    let mut tables: Vec<(String, Vec<String>)> =
        vec![("BASTION_DEFAULT".into(), vec!["defaults".into()])];
    if let Some(toml::Value::Table(profiles)) = doc.get("profiles") {
        for name in profiles.keys() {
            let prefix = format!(
                "BASTION_PROFILE_{}",
                name.to_ascii_uppercase().replace('-', "_")
            );
            tables.push((prefix, vec!["profiles".into(), name.clone()]));
        }
    }
    for (prefix, path) in tables {
        for key in KEYS {
            let var = env_name(&prefix, key);
            let Some(raw) = env(&var) else { continue };
            let value = match raw.parse::<toml::Value>() {
                Ok(v) => v,
                Err(_) => match format!("v = {raw}").parse::<toml::Table>() {
                    Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.clone())),
                    Err(_) => toml::Value::String(raw.clone()),
                },
            };
            let mut table = &mut *doc;
            for part in &path {
                let entry = table
                    .entry(part.clone())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                match entry {
                    toml::Value::Table(t) => table = t,
                    _ => {
                        errors.push(ConfigError {
                            file: PathBuf::from("<env>"),
                            line: 0,
                            column: 0,
                            message: format!("{var}: cannot apply, {part} is not a table"),
                        });
                        return;
                    }
                }
            }
            table.insert((*key).to_owned(), value);
        }
    }
}

impl Config {
    /// Reads and validates a configuration file, with environment overrides.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                message: format!("cannot read the configuration: {e}"),
            }])
        })?;
        Config::parse(&text, path, &|k| std::env::var(k).ok())
    }

    /// Validates configuration text. `env` looks up override variables.
    pub fn parse(
        text: &str,
        file: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut ctx = Ctx {
            file,
            text,
            errors: Vec::new(),
        };
        let mut doc: toml::Table = match text.parse() {
            Ok(d) => d,
            Err(e) => {
                let e: toml::de::Error = e;
                ctx.err(e.span(), e.message().to_owned());
                return Err(ConfigErrors(ctx.errors));
            }
        };
        let mut env_errors = Vec::new();
        apply_env(&mut doc, env, &mut env_errors);
        ctx.errors.extend(env_errors);
        // Environment overrides have no position in the file; re-serialize only when
        // one applied, so that positions stay exact otherwise.
        let overridden = doc != text.parse::<toml::Table>().unwrap_or_default();
        let source = if overridden {
            toml::to_string(&doc).unwrap_or_default()
        } else {
            text.to_owned()
        };
        let ctx_text = if overridden { source.as_str() } else { text };
        let mut ctx = Ctx {
            file: if overridden {
                Path::new("<config with environment overrides>")
            } else {
                file
            },
            text: ctx_text,
            errors: ctx.errors,
        };
        let raw: RawFile = match toml::from_str(ctx_text) {
            Ok(r) => r,
            Err(e) => {
                ctx.err(e.span(), e.message().to_owned());
                return Err(ConfigErrors(ctx.errors));
            }
        };
        let mut config = Config::default();
        for (name, settings) in &raw.profiles {
            let n = name.get_ref();
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                ctx.err(
                    Some(name.span()),
                    format!("profile name {n:?} may only use letters, digits, - and _"),
                );
                continue;
            }
            if let Some(p) = validate(&mut ctx, n, settings.get_ref(), &raw.defaults, name.span()) {
                config.profiles.insert(n.clone(), p);
            }
        }
        // Two profiles on the same TCP port and address cannot both listen.
        let mut seen: BTreeMap<(IpAddr, u16), String> = BTreeMap::new();
        for p in config.profiles.values() {
            if let Listen::Tcp { addrs, port } = &p.listen {
                for a in addrs {
                    if let Some(other) = seen.insert((*a, *port), p.name.clone()) {
                        ctx.err(
                            None,
                            format!(
                                "profiles {other:?} and {:?} both listen on {a} port {port}",
                                p.name
                            ),
                        );
                    }
                }
            }
        }
        if ctx.errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(ctx.errors))
        }
    }
}

/// The default configuration path: `$XDG_CONFIG_HOME/bastion/config.toml` (or
/// `~/.config/bastion/config.toml`).
pub fn default_path() -> Option<PathBuf> {
    std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .map(|base| base.join("bastion").join("config.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse(text, Path::new("c.toml"), &|_| None)
    }

    const GOOD: &str = r#"
[defaults]
region = "eu-west-1"
idle_timeout = "10m"

[profiles.postgres-prod]
target = "i-0123456789abcdef0"
remote_host = "prod-db.abc.eu-west-1.rds.amazonaws.com"
remote_port = 5432
local_port = 5432

[profiles.box]
target_tags = { Name = "bastion" }
remote_port = 22
local_port = 2222
bind = ["127.0.0.1"]
idle_timeout = 90
"#;

    #[test]
    fn parses_profiles_with_defaults() {
        let c = parse(GOOD).unwrap();
        let p = &c.profiles["postgres-prod"];
        assert_eq!(p.document, DOC_REMOTE_HOST);
        assert_eq!(p.region.as_deref(), Some("eu-west-1"));
        assert_eq!(p.idle_timeout, Duration::from_secs(600));
        assert_eq!(
            p.listen,
            Listen::Tcp {
                addrs: vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
                port: 5432
            }
        );
        let b = &c.profiles["box"];
        assert_eq!(b.document, DOC_LOCAL);
        assert_eq!(b.idle_timeout, Duration::from_secs(90));
        assert!(matches!(&b.target, Target::Tags(t) if t["Name"] == "bastion"));
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let e = parse("[profiles.a]\ntarget = \n").unwrap_err();
        assert_eq!(e.0.len(), 1);
        assert_eq!((e.0[0].line, e.0[0].column), (2, 10), "{e}");
        assert!(e.to_string().starts_with("c.toml:2:10: "), "{e}");
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_position() {
        let text = "[profiles.a]\ntarget = \"db-1\"\nremote_port = 70000\nlocal_port = 0\n\n[profiles.b]\nremote_port = 1\n";
        let e = parse(text).unwrap_err();
        let shown = e.to_string();
        assert!(shown.contains("c.toml:2:10: target \"db-1\""), "{shown}");
        assert!(
            shown.contains("c.toml:3:15: remote_port must be between 1 and 65535"),
            "{shown}"
        );
        assert!(shown.contains("c.toml:4:14: local_port"), "{shown}");
        assert!(shown.contains("profile \"b\" needs a target"), "{shown}");
        assert!(shown.contains("profile \"b\" needs local_port"), "{shown}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = parse("[profiles.a]\ntargt = \"i-1\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `targt`"), "{e}");
        assert_eq!(e.0[0].line, 2);
    }

    #[test]
    fn conflicting_listeners_are_reported() {
        let text = "[profiles.a]\ntarget=\"i-1\"\nremote_port=1\nlocal_port=5432\n[profiles.b]\ntarget=\"i-2\"\nremote_port=1\nlocal_port=5432\n";
        let e = parse(text).unwrap_err();
        assert!(
            e.to_string().contains("both listen on 127.0.0.1 port 5432"),
            "{e}"
        );
    }

    #[test]
    fn environment_overrides_settings() {
        let env = |k: &str| match k {
            "BASTION_PROFILE_POSTGRES_PROD_LOCAL_PORT" => Some("15432".to_owned()),
            "BASTION_DEFAULT_REGION" => Some("us-east-1".to_owned()),
            _ => None,
        };
        let c = Config::parse(GOOD, Path::new("c.toml"), &env).unwrap();
        let p = &c.profiles["postgres-prod"];
        assert!(matches!(p.listen, Listen::Tcp { port: 15432, .. }));
        assert_eq!(p.region.as_deref(), Some("us-east-1"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("45"), Ok(Duration::from_secs(45)));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("10").is_ok());
        assert!(parse_duration("10 m").is_err());
    }

    #[test]
    fn ecs_targets_are_checked() {
        let ok = "[profiles.a]\ntarget=\"ecs:c_t_r\"\nremote_port=1\nlocal_port=1\n";
        assert!(matches!(
            parse(ok).unwrap().profiles["a"].target,
            Target::Ecs(_)
        ));
        let bad = "[profiles.a]\ntarget=\"ecs:c_t\"\nremote_port=1\nlocal_port=1\n";
        assert!(
            parse(bad)
                .unwrap_err()
                .to_string()
                .contains("ecs:<cluster>")
        );
    }
}
