//! A profile's `bastion` section: where its bastion comes from when none runs all the
//! time.
//!
//! ```toml
//! [profiles.postgres-prod.bastion]
//! provider = "ec2"                 # or "fargate"; without the section: `target`
//! instance_type = "t4g.nano"
//! subnet = "subnet-0abc…"
//! security_groups = ["sg-0abc…"]
//! instance_profile = "bastion-ssm"
//! user_data = "db-tunnel"          # or "tools", or "file:/path/to/template.sh"
//! idle_timeout = "15m"
//! max_lifetime = "8h"
//! registry = "dynamodb:bastion-registry"   # default "local"
//! shared = true
//! ```
//!
//! Every key may also be set in `[defaults.bastion]`; a profile's value wins key by key.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::{Ctx, duration_setting, merged};
use crate::ondemand::userdata::{self, Template};

/// Which kind of bastion.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Provider {
    /// An EC2 instance launched on demand.
    Ec2(Ec2Bastion),
    /// A Fargate task run on demand.
    Fargate(FargateBastion),
}

/// CPU architecture of an EC2 bastion (picks the default AMI).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// x86_64.
    X86_64,
    /// arm64 (Graviton).
    Arm64,
}

impl Arch {
    /// The name AWS uses in AMI parameters.
    pub fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Arm64 => "arm64",
        }
    }

    /// The architecture of an instance type: Graviton families carry a `g` after the
    /// generation digit (`t4g`, `m7g`, `c6gn`, `r8gd`).
    pub fn of_instance_type(instance_type: &str) -> Arch {
        let family = instance_type.split('.').next().unwrap_or_default();
        match family.find(|c: char| c.is_ascii_digit()) {
            Some(i)
                if family[i..]
                    .trim_start_matches(|c: char| c.is_ascii_digit())
                    .starts_with('g') =>
            {
                Arch::Arm64
            }
            _ => Arch::X86_64,
        }
    }
}

/// The SSM public parameter of the latest Amazon Linux 2023 AMI for `arch`.
pub fn default_ami_parameter(arch: Arch) -> String {
    format!(
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{}",
        arch.as_str()
    )
}

/// Where an EC2 bastion's AMI comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ami {
    /// An AMI id.
    Id(String),
    /// An SSM parameter holding the AMI id, read at launch.
    Parameter(String),
    /// The launch template's AMI.
    FromTemplate,
}

/// `provider = "ec2"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Bastion {
    /// Launch template id (`lt-…`) or name, and version.
    pub launch_template: Option<(String, Option<String>)>,
    /// The AMI.
    pub ami: Ami,
    /// Instance type; `None` leaves it to the launch template.
    pub instance_type: Option<String>,
    /// Subnet; `None`: the default VPC's (or the launch template's).
    pub subnet: Option<String>,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Instance profile name or ARN (needs AmazonSSMManagedInstanceCore).
    pub instance_profile: Option<String>,
    /// User-data template, rendered at launch.
    pub user_data: Template,
}

/// `provider = "fargate"`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FargateBastion {
    /// Cluster name or ARN.
    pub cluster: String,
    /// Task definition (`family[:revision]` or ARN); its task role must allow ECS exec.
    pub task_definition: String,
    /// Subnets (awsvpc).
    pub subnets: Vec<String>,
    /// Security groups.
    pub security_groups: Vec<String>,
    /// Give the task a public IP (a public subnet without NAT needs it).
    pub assign_public_ip: bool,
    /// The container to target; default: the first with a runtime id.
    pub container: Option<String>,
}

/// Where the bastion registry lives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryLocation {
    /// A file in the daemon's state directory.
    Local,
    /// A DynamoDB table, for a team.
    DynamoDb(String),
}

/// A validated `bastion` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnDemand {
    /// EC2 or Fargate.
    pub provider: Provider,
    /// One bastion for everyone using the profile (else one per caller).
    pub shared: bool,
    /// Terminate after this long without a connection and without an Active session.
    pub idle_timeout: Duration,
    /// Terminate this long after launch, even while in use.
    pub max_lifetime: Duration,
    /// Warn this long before the max lifetime ends.
    pub lifetime_warning: Duration,
    /// How long a connection waits for a bastion to come online.
    pub ready_timeout: Duration,
    /// The registry.
    pub registry: RegistryLocation,
    /// Extra tags for the instance or task.
    pub tags: BTreeMap<String, String>,
}

/// The raw section, as written.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBastion {
    provider: Option<Spanned<String>>,
    launch_template: Option<Spanned<String>>,
    launch_template_version: Option<Spanned<String>>,
    ami: Option<Spanned<String>>,
    architecture: Option<Spanned<String>>,
    instance_type: Option<Spanned<String>>,
    subnet: Option<Spanned<String>>,
    subnets: Option<Spanned<Vec<String>>>,
    security_groups: Option<Spanned<Vec<String>>>,
    instance_profile: Option<Spanned<String>>,
    user_data: Option<Spanned<String>>,
    user_data_vars: Option<Spanned<BTreeMap<String, String>>>,
    cluster: Option<Spanned<String>>,
    task_definition: Option<Spanned<String>>,
    assign_public_ip: Option<Spanned<bool>>,
    container: Option<Spanned<String>>,
    shared: Option<Spanned<bool>>,
    idle_timeout: Option<Spanned<toml::Value>>,
    max_lifetime: Option<Spanned<toml::Value>>,
    lifetime_warning: Option<Spanned<toml::Value>>,
    ready_timeout: Option<Spanned<toml::Value>>,
    registry: Option<Spanned<String>>,
    tags: Option<Spanned<BTreeMap<String, String>>>,
}

/// Default instance type: the smallest current Graviton.
pub const DEFAULT_INSTANCE_TYPE: &str = "t4g.nano";

/// What the profile says about its remote end, for user-data variables.
pub(super) struct RemoteEnd<'a> {
    pub profile: &'a str,
    pub remote_host: Option<&'a str>,
    pub remote_port: Option<u16>,
}

fn id_like(ctx: &mut Ctx, v: &Spanned<String>, key: &str, prefix: &str) -> Option<String> {
    let s = v.get_ref().trim();
    let ok = s.starts_with(prefix)
        && s.len() > prefix.len()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if ok {
        Some(s.to_owned())
    } else {
        ctx.err(Some(v.span()), format!("{key} {s:?} is not a {prefix}… id"));
        None
    }
}

fn id_list(ctx: &mut Ctx, v: &Spanned<Vec<String>>, key: &str, prefix: &str) -> Vec<String> {
    v.get_ref()
        .iter()
        .filter_map(|s| id_like(ctx, &Spanned::new(v.span(), s.clone()), key, prefix))
        .collect()
}

/// Validates the merged section of a profile.
pub(super) fn validate(
    ctx: &mut Ctx,
    p: &RawBastion,
    d: &RawBastion,
    at: std::ops::Range<usize>,
    remote: RemoteEnd<'_>,
) -> Option<OnDemand> {
    let before = ctx.errors.len();
    let m = |f: fn(&RawBastion) -> &Option<Spanned<String>>| merged(f(p), f(d));
    let provider_name = m(|r| &r.provider);
    let shared = merged(&p.shared, &d.shared).is_some_and(|v| *v.get_ref());
    let idle_timeout = duration_setting(
        ctx,
        merged(&p.idle_timeout, &d.idle_timeout),
        "bastion.idle_timeout",
        Duration::from_secs(15 * 60),
    );
    let max_lifetime = duration_setting(
        ctx,
        merged(&p.max_lifetime, &d.max_lifetime),
        "bastion.max_lifetime",
        Duration::from_secs(8 * 3600),
    );
    let lifetime_warning = duration_setting(
        ctx,
        merged(&p.lifetime_warning, &d.lifetime_warning),
        "bastion.lifetime_warning",
        Duration::from_secs(5 * 60).min(max_lifetime / 2),
    );
    let ready_timeout = duration_setting(
        ctx,
        merged(&p.ready_timeout, &d.ready_timeout),
        "bastion.ready_timeout",
        Duration::from_secs(5 * 60),
    );
    let registry = match m(|r| &r.registry) {
        None => RegistryLocation::Local,
        Some(v) => {
            let s = v.get_ref().trim();
            if s == "local" {
                RegistryLocation::Local
            } else if let Some(table) = s.strip_prefix("dynamodb:") {
                let ok = (3..=255).contains(&table.len())
                    && table
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c));
                if !ok {
                    ctx.err(
                        Some(v.span()),
                        format!(
                            "{table:?} is not a DynamoDB table name (3-255 of a-z A-Z 0-9 _ - .)"
                        ),
                    );
                }
                RegistryLocation::DynamoDb(table.to_owned())
            } else {
                ctx.err(
                    Some(v.span()),
                    format!("registry {s:?}: use \"local\" or \"dynamodb:<table>\""),
                );
                RegistryLocation::Local
            }
        }
    };
    let tags = merged(&p.tags, &d.tags)
        .map(|t| {
            for k in t.get_ref().keys() {
                if k.starts_with("bastion:") || k.starts_with("aws:") || k.is_empty() || k.len() > 128 {
                    ctx.err(
                        Some(t.span()),
                        format!("tag key {k:?} is reserved or invalid (bastion:* and aws:* are set by bastion)"),
                    );
                }
            }
            t.into_inner()
        })
        .unwrap_or_default();
    let security_groups = merged(&p.security_groups, &d.security_groups)
        .map(|v| id_list(ctx, &v, "security group", "sg-"))
        .unwrap_or_default();
    let provider = match provider_name.as_ref().map(|v| v.get_ref().trim()) {
        Some("ec2") => {
            let launch_template = m(|r| &r.launch_template).map(|lt| {
                (
                    lt.get_ref().trim().to_owned(),
                    m(|r| &r.launch_template_version).map(|v| v.into_inner()),
                )
            });
            let instance_type = m(|r| &r.instance_type).map(|v| v.get_ref().trim().to_owned());
            if let Some(t) = &instance_type
                && !(t.contains('.')
                    && t.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
            {
                ctx.err(
                    m(|r| &r.instance_type).map(|v| v.span()),
                    format!("instance_type {t:?} is not an EC2 instance type such as t4g.nano"),
                );
            }
            let instance_type = match (&launch_template, instance_type) {
                (None, None) => Some(DEFAULT_INSTANCE_TYPE.to_owned()),
                (_, t) => t,
            };
            let arch = match m(|r| &r.architecture) {
                Some(a) => match a.get_ref().as_str() {
                    "x86_64" => Arch::X86_64,
                    "arm64" => Arch::Arm64,
                    other => {
                        ctx.err(
                            Some(a.span()),
                            format!("architecture {other:?}: use \"x86_64\" or \"arm64\""),
                        );
                        Arch::X86_64
                    }
                },
                None => Arch::of_instance_type(
                    instance_type.as_deref().unwrap_or(DEFAULT_INSTANCE_TYPE),
                ),
            };
            let ami = match m(|r| &r.ami) {
                Some(a) => {
                    let s = a.get_ref().trim();
                    if let Some(param) = s.strip_prefix("resolve:ssm:") {
                        Ami::Parameter(param.to_owned())
                    } else if s.starts_with("ami-") {
                        id_like(ctx, &a, "ami", "ami-").map_or(Ami::FromTemplate, Ami::Id)
                    } else {
                        ctx.err(
                            Some(a.span()),
                            format!("ami {s:?}: use an ami-… id or resolve:ssm:<parameter>"),
                        );
                        Ami::FromTemplate
                    }
                }
                None if launch_template.is_some() => Ami::FromTemplate,
                None => Ami::Parameter(default_ami_parameter(arch)),
            };
            let subnet = m(|r| &r.subnet).and_then(|s| id_like(ctx, &s, "subnet", "subnet-"));
            let user_data = user_data_template(
                ctx,
                m(|r| &r.user_data),
                merged(&p.user_data_vars, &d.user_data_vars),
                &remote,
                at.clone(),
            );
            for (key, set) in [
                ("cluster", p.cluster.is_some() || d.cluster.is_some()),
                (
                    "task_definition",
                    p.task_definition.is_some() || d.task_definition.is_some(),
                ),
                ("subnets", p.subnets.is_some()),
                ("container", p.container.is_some() || d.container.is_some()),
            ] {
                if set {
                    ctx.err(
                        Some(at.clone()),
                        format!(
                            "bastion.{key} is a fargate setting; this profile's provider is ec2"
                        ),
                    );
                }
            }
            Some(Provider::Ec2(Ec2Bastion {
                launch_template,
                ami,
                instance_type,
                subnet,
                security_groups,
                instance_profile: m(|r| &r.instance_profile).map(|v| v.get_ref().trim().to_owned()),
                user_data,
            }))
        }
        Some("fargate") => {
            let cluster = m(|r| &r.cluster).map(|v| v.get_ref().trim().to_owned());
            let task_definition = m(|r| &r.task_definition).map(|v| v.get_ref().trim().to_owned());
            let subnets = merged(&p.subnets, &d.subnets)
                .map(|v| id_list(ctx, &v, "subnet", "subnet-"))
                .unwrap_or_default();
            if cluster.is_none() || task_definition.is_none() || subnets.is_empty() {
                ctx.err(
                    Some(at.clone()),
                    "provider \"fargate\" needs cluster, task_definition and subnets",
                );
            }
            for (key, set) in [
                ("launch_template", p.launch_template.is_some()),
                ("ami", p.ami.is_some()),
                ("instance_type", p.instance_type.is_some()),
                ("subnet", p.subnet.is_some()),
                ("instance_profile", p.instance_profile.is_some()),
                ("user_data", p.user_data.is_some()),
            ] {
                if set {
                    ctx.err(
                        Some(at.clone()),
                        format!(
                            "bastion.{key} is an ec2 setting; this profile's provider is fargate"
                        ),
                    );
                }
            }
            Some(Provider::Fargate(FargateBastion {
                cluster: cluster.unwrap_or_default(),
                task_definition: task_definition.unwrap_or_default(),
                subnets,
                security_groups,
                assign_public_ip: merged(&p.assign_public_ip, &d.assign_public_ip)
                    .is_some_and(|v| *v.get_ref()),
                container: m(|r| &r.container).map(|v| v.into_inner()),
            }))
        }
        Some(other) => {
            ctx.err(
                provider_name.as_ref().map(|v| v.span()),
                format!("bastion provider {other:?}: use \"ec2\" or \"fargate\" (a fixed instance is `target`, outside this section)"),
            );
            None
        }
        None => {
            ctx.err(
                Some(at),
                "the bastion section needs provider = \"ec2\" or \"fargate\"",
            );
            None
        }
    };
    if ctx.errors.len() > before {
        return None;
    }
    Some(OnDemand {
        provider: provider?,
        shared,
        idle_timeout,
        max_lifetime,
        lifetime_warning,
        ready_timeout,
        registry,
        tags,
    })
}

/// Reads and checks the user-data template: a built-in name or `file:<path>`, its
/// variables known, its rendering within EC2's 16 KB.
fn user_data_template(
    ctx: &mut Ctx,
    value: Option<Spanned<String>>,
    vars: Option<Spanned<BTreeMap<String, String>>>,
    remote: &RemoteEnd<'_>,
    at: std::ops::Range<usize>,
) -> Template {
    let span = value.as_ref().map_or(at, |v| v.span());
    let (source, body) = match value.as_ref().map(|v| v.get_ref().trim()) {
        None | Some("none") => (String::from("none"), String::new()),
        Some(v) => match v.strip_prefix("file:") {
            Some(path) => {
                let path = PathBuf::from(path);
                match std::fs::read_to_string(&path) {
                    Ok(text) => (format!("file:{}", path.display()), text),
                    Err(e) => {
                        ctx.err(
                            Some(span.clone()),
                            format!("cannot read user_data template {}: {e}", path.display()),
                        );
                        (String::new(), String::new())
                    }
                }
            }
            None => match userdata::builtin(v) {
                Some(text) => (v.to_owned(), text.to_owned()),
                None => {
                    ctx.err(
                        Some(span.clone()),
                        format!(
                            "user_data {v:?}: use a built-in template ({}), \"file:<path>\" or \"none\"",
                            userdata::BUILTIN_NAMES.join(", ")
                        ),
                    );
                    (String::new(), String::new())
                }
            },
        },
    };
    let mut user_vars = BTreeMap::new();
    if let Some(v) = &vars {
        for (k, val) in v.get_ref() {
            if let Err(e) = userdata::check_variable(k, val) {
                ctx.err(Some(v.span()), e);
            }
            user_vars.insert(k.clone(), val.clone());
        }
    }
    let template = Template {
        source,
        body,
        vars: user_vars,
        remote_host: remote.remote_host.map(str::to_owned),
        remote_port: remote.remote_port,
        profile: remote.profile.to_owned(),
    };
    if let Err(e) = template.check() {
        ctx.err(Some(span), e);
    }
    template
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Target};
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, String> {
        Config::parse(text, Path::new("c.toml"), &|_| None).map_err(|e| e.to_string())
    }

    const BASE: &str =
        "[profiles.pg]\nremote_host = \"db\"\nremote_port = 5432\nlocal_port = 5432\n";

    #[test]
    fn ec2_defaults() {
        let c = parse(&format!(
            "{BASE}[profiles.pg.bastion]\nprovider = \"ec2\"\n"
        ))
        .unwrap();
        let p = &c.profiles["pg"];
        assert_eq!(p.target, Target::OnDemand("ec2"));
        let b = p.bastion.as_ref().unwrap();
        assert_eq!(b.idle_timeout, Duration::from_secs(900));
        assert_eq!(b.max_lifetime, Duration::from_secs(8 * 3600));
        assert_eq!(b.lifetime_warning, Duration::from_secs(300));
        assert_eq!(b.registry, RegistryLocation::Local);
        let Provider::Ec2(e) = &b.provider else {
            panic!("{b:?}")
        };
        assert_eq!(e.instance_type.as_deref(), Some("t4g.nano"));
        assert_eq!(
            e.ami,
            Ami::Parameter(
                "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64".into()
            )
        );
        assert_eq!(e.user_data.source, "none");
    }

    #[test]
    fn defaults_merge_key_by_key() {
        let text = format!(
            "[defaults.bastion]\nprovider = \"ec2\"\nsubnet = \"subnet-0abc\"\nregistry = \"dynamodb:team\"\n\
             {BASE}[profiles.pg.bastion]\ninstance_type = \"t3.small\"\nshared = true\n\
             [profiles.fixed]\ntarget = \"i-0123456789abcdef0\"\nremote_port = 22\nlocal_port = 2222\n"
        );
        let c = parse(&text).unwrap();
        let b = c.profiles["pg"].bastion.as_ref().unwrap();
        let Provider::Ec2(e) = &b.provider else {
            panic!("{b:?}")
        };
        assert_eq!(e.subnet.as_deref(), Some("subnet-0abc"));
        assert_eq!(e.instance_type.as_deref(), Some("t3.small"));
        assert!(matches!(&e.ami, Ami::Parameter(p) if p.ends_with("x86_64")));
        assert_eq!(b.registry, RegistryLocation::DynamoDb("team".into()));
        assert!(b.shared);
        // A profile with its own target keeps it.
        assert!(c.profiles["fixed"].bastion.is_none());
        assert_eq!(
            c.profiles["fixed"].target,
            Target::Instance("i-0123456789abcdef0".into())
        );
    }

    #[test]
    fn fargate_settings() {
        let c = parse(&format!(
            "{BASE}[profiles.pg.bastion]\nprovider = \"fargate\"\ncluster = \"c\"\n\
             task_definition = \"bastion:3\"\nsubnets = [\"subnet-1\"]\nsecurity_groups = [\"sg-1\"]\n"
        ))
        .unwrap();
        let b = c.profiles["pg"].bastion.as_ref().unwrap();
        assert_eq!(c.profiles["pg"].target, Target::OnDemand("fargate"));
        assert!(
            matches!(&b.provider, Provider::Fargate(f) if f.subnets == ["subnet-1"] && f.task_definition == "bastion:3")
        );
    }

    #[test]
    fn errors_are_named_with_positions() {
        let cases = [
            (
                "target = \"i-0123456789abcdef0\"\n[profiles.pg.bastion]\nprovider = \"ec2\"\n",
                "launches its target",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"lambda\"\n",
                "use \"ec2\" or \"fargate\"",
            ),
            (
                "[profiles.pg.bastion]\ninstance_type = \"t3.micro\"\n",
                "needs provider",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"fargate\"\ncluster = \"c\"\n",
                "needs cluster, task_definition and subnets",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"fargate\"\ncluster = \"c\"\ntask_definition = \"t\"\nsubnets = [\"subnet-1\"]\nami = \"ami-1\"\n",
                "bastion.ami is an ec2 setting",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"ec2\"\nsubnet = \"vpc-1\"\n",
                "is not a subnet-… id",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"ec2\"\nuser_data = \"web\"\n",
                "use a built-in template (db-tunnel, tools)",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"ec2\"\nregistry = \"s3:x\"\n",
                "use \"local\" or \"dynamodb:<table>\"",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"ec2\"\nmax_lifetime = \"0s\"\n",
                "greater than zero",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"ec2\"\ntags = { \"bastion:x\" = \"1\" }\n",
                "reserved",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"ec2\"\nuser_data_vars = { team = \"a b\" }\n",
                "may only use",
            ),
            (
                "[profiles.pg.bastion]\nprovider = \"ec2\"\nflavour = 1\n",
                "unknown field",
            ),
        ];
        for (section, wanted) in cases {
            let e = parse(&format!("{BASE}{section}")).unwrap_err();
            assert!(e.contains(wanted), "{section:?}: {e}");
            assert!(e.contains("c.toml:"), "{e}");
        }
    }

    #[test]
    fn file_templates_are_checked_when_loading() {
        let dir = std::env::temp_dir().join(format!("bastion-ud-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.sh");
        std::fs::write(&good, "#!/bin/sh\necho {{team}} {{remote_port}}\n").unwrap();
        let bad = dir.join("bad.sh");
        std::fs::write(&bad, "echo {{nope}}\n").unwrap();
        let ok = parse(&format!(
            "{BASE}[profiles.pg.bastion]\nprovider = \"ec2\"\nuser_data = \"file:{}\"\nuser_data_vars = {{ team = \"dba\" }}\n",
            good.display()
        ))
        .unwrap();
        let Some(Provider::Ec2(e)) = ok.profiles["pg"].bastion.as_ref().map(|b| &b.provider) else {
            panic!()
        };
        assert!(e.user_data.body.contains("{{team}}"));
        let e = parse(&format!(
            "{BASE}[profiles.pg.bastion]\nprovider = \"ec2\"\nuser_data = \"file:{}\"\n",
            bad.display()
        ))
        .unwrap_err();
        assert!(e.contains("unknown variable {{nope}}"), "{e}");
        let e = parse(&format!(
            "{BASE}[profiles.pg.bastion]\nprovider = \"ec2\"\nuser_data = \"file:{}/missing.sh\"\n",
            dir.display()
        ))
        .unwrap_err();
        assert!(e.contains("cannot read user_data template"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn architecture_from_instance_type() {
        for (t, a) in [
            ("t4g.nano", Arch::Arm64),
            ("m7g.large", Arch::Arm64),
            ("c6gn.xlarge", Arch::Arm64),
            ("r8gd.2xlarge", Arch::Arm64),
            ("t3.micro", Arch::X86_64),
            ("g5.xlarge", Arch::X86_64),
            ("g5g.xlarge", Arch::Arm64),
            ("m5.large", Arch::X86_64),
        ] {
            assert_eq!(Arch::of_instance_type(t), a, "{t}");
        }
    }
}
