//! User data for EC2 bastions: a shell script rendered from a template at launch.
//!
//! Templates use `{{ name }}` placeholders. Every rendered script starts with bastion's
//! own prologue, which schedules the instance's shutdown at the max lifetime: launched
//! with `InstanceInitiatedShutdownBehavior=terminate`, the instance terminates itself
//! even if every daemon that knew about it is gone.
//!
//! Variables: `profile`, `remote_host` (`localhost` without one), `remote_port`,
//! `launch_id`, `owner` (the caller's ARN), `region`, `max_lifetime_minutes`, plus the
//! profile's `user_data_vars`. Values are restricted to characters that need no shell
//! quoting, so a value cannot change the script's meaning.

use std::collections::BTreeMap;
use std::time::Duration;

/// EC2's limit on user data before base64 encoding.
pub const MAX_USER_DATA_BYTES: usize = 16 * 1024;

/// Names of the built-in templates.
pub const BUILTIN_NAMES: &[&str] = &["db-tunnel", "tools"];

const DB_TUNNEL: &str = r#"# bastion built-in template "db-tunnel": a minimal host for database tunnels.
# Session Manager needs only outbound HTTPS; the agent ships with Amazon Linux 2023.
systemctl enable --now amazon-ssm-agent
# Log whether the database answers, for troubleshooting from the instance console.
if timeout 5 bash -c 'exec 3<>/dev/tcp/{{remote_host}}/{{remote_port}}'; then
  echo "bastion: {{remote_host}}:{{remote_port}} is reachable"
else
  echo "bastion: cannot reach {{remote_host}}:{{remote_port}} (security groups, routes, DNS?)"
fi
"#;

const TOOLS: &str = r#"# bastion built-in template "tools": a bastion with git, terraform and database clients.
systemctl enable --now amazon-ssm-agent
dnf install -y git dnf-plugins-core postgresql15 mariadb105
dnf config-manager --add-repo https://rpm.releases.hashicorp.com/AmazonLinux/hashicorp.repo
dnf install -y terraform
"#;

/// The text of a built-in template.
pub fn builtin(name: &str) -> Option<&'static str> {
    match name {
        "db-tunnel" => Some(DB_TUNNEL),
        "tools" => Some(TOOLS),
        _ => None,
    }
}

/// Checks a user variable's name and value.
pub fn check_variable(name: &str, value: &str) -> Result<(), String> {
    let name_ok = name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !name_ok {
        return Err(format!(
            "user_data_vars: {name:?} is not a variable name (a-z, 0-9, _; starting with a letter)"
        ));
    }
    if BUILT_IN_VARIABLES.contains(&name) {
        return Err(format!(
            "user_data_vars: {name:?} is set by bastion and cannot be overridden"
        ));
    }
    check_value(name, value)
}

fn check_value(name: &str, value: &str) -> Result<(), String> {
    if value.len() > 256
        || !value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._:/@+=,-".contains(c))
    {
        return Err(format!(
            "user-data variable {name}: value {value:?} may only use letters, digits and ._:/@+=,- (at most 256)"
        ));
    }
    Ok(())
}

/// Variables bastion sets itself.
pub const BUILT_IN_VARIABLES: &[&str] = &[
    "profile",
    "remote_host",
    "remote_port",
    "launch_id",
    "owner",
    "region",
    "max_lifetime_minutes",
];

/// A user-data template with the profile's fixed values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    /// `none`, a built-in name or `file:<path>` (for messages).
    pub source: String,
    /// The template text (empty: only the prologue).
    pub body: String,
    /// `user_data_vars`.
    pub vars: BTreeMap<String, String>,
    /// The profile's remote host.
    pub remote_host: Option<String>,
    /// The profile's remote port.
    pub remote_port: Option<u16>,
    /// The profile's name.
    pub profile: String,
}

/// The values known only at launch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchValues {
    /// The launch's UUID.
    pub launch_id: String,
    /// The caller's ARN.
    pub owner: String,
    /// The region.
    pub region: String,
    /// The max lifetime.
    pub max_lifetime: Duration,
}

/// One piece of a parsed template.
enum Piece<'a> {
    Text(&'a str),
    Var(&'a str),
}

fn parse(body: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(open) = rest.find("{{") {
        out.push(Piece::Text(&rest[..open]));
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or_else(|| {
            let line = body[..body.len() - rest.len() + open]
                .lines()
                .count()
                .max(1);
            format!("user-data template: unclosed {{{{ on line {line}")
        })?;
        out.push(Piece::Var(after[..close].trim()));
        rest = &after[close + 2..];
    }
    out.push(Piece::Text(rest));
    Ok(out)
}

impl Template {
    /// Checks the template against placeholder launch values of maximal size.
    pub fn check(&self) -> Result<(), String> {
        let widest = LaunchValues {
            launch_id: "00000000-0000-0000-0000-000000000000".into(),
            owner: "x".repeat(256),
            region: "ap-southeast-5x".into(),
            max_lifetime: Duration::from_secs(99_999 * 60),
        };
        let text = self.render(&widest)?;
        if text.len() > MAX_USER_DATA_BYTES {
            return Err(format!(
                "user data from {} renders to {} bytes; EC2 accepts at most {MAX_USER_DATA_BYTES}",
                self.source,
                text.len()
            ));
        }
        Ok(())
    }

    /// The script for one launch.
    pub fn render(&self, launch: &LaunchValues) -> Result<String, String> {
        let minutes = launch.max_lifetime.as_secs().div_ceil(60).max(1);
        let mut values: BTreeMap<&str, String> = BTreeMap::new();
        values.insert("profile", self.profile.clone());
        values.insert(
            "remote_host",
            self.remote_host
                .clone()
                .unwrap_or_else(|| "localhost".into()),
        );
        values.insert(
            "remote_port",
            self.remote_port.map_or(String::new(), |p| p.to_string()),
        );
        values.insert("launch_id", launch.launch_id.clone());
        values.insert("owner", launch.owner.clone());
        values.insert("region", launch.region.clone());
        values.insert("max_lifetime_minutes", minutes.to_string());
        for (k, v) in &self.vars {
            values.insert(k, v.clone());
        }
        for (k, v) in &values {
            check_value(k, v)?;
        }
        let body = match self.body.strip_prefix("#!") {
            Some(rest) => rest.split_once('\n').map_or("", |(_, b)| b),
            None => self.body.as_str(),
        };
        let mut out = format!(
            "#!/bin/bash\n\
             # Written by bastion for profile {profile} (launch {launch_id}).\n\
             # Max lifetime: power off after {minutes} min; launched with\n\
             # InstanceInitiatedShutdownBehavior=terminate, the instance is then terminated.\n\
             shutdown -h +{minutes} \"bastion: max lifetime reached\" 2>/dev/null || {{ sleep {secs}; poweroff; }} &\n",
            profile = self.profile,
            launch_id = launch.launch_id,
            secs = minutes * 60,
        );
        for piece in parse(body)? {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(name) => match values.get(name) {
                    Some(v) => out.push_str(v),
                    None => {
                        let mut known: Vec<&str> = values.keys().copied().collect();
                        known.sort_unstable();
                        return Err(format!(
                            "user-data template {}: unknown variable {{{{{name}}}}} (known: {})",
                            self.source,
                            known.join(", ")
                        ));
                    }
                },
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(body: &str) -> Template {
        Template {
            source: "test".into(),
            body: body.into(),
            vars: BTreeMap::from([("team".to_owned(), "dba".to_owned())]),
            remote_host: Some("db.internal".into()),
            remote_port: Some(5432),
            profile: "pg".into(),
        }
    }

    fn launch() -> LaunchValues {
        LaunchValues {
            launch_id: "6f1c".into(),
            owner: "arn:aws:iam::123456789012:user/dev".into(),
            region: "eu-west-1".into(),
            max_lifetime: Duration::from_secs(90),
        }
    }

    #[test]
    fn renders_prologue_and_variables() {
        let out =
            template("#!/bin/sh\necho {{ remote_host }}:{{remote_port}} {{team}} {{owner}}\n")
                .render(&launch())
                .unwrap();
        assert!(out.starts_with("#!/bin/bash\n"), "{out}");
        assert!(out.contains("shutdown -h +2 "), "{out}");
        assert!(out.contains("sleep 120; poweroff"), "{out}");
        assert!(
            out.ends_with("echo db.internal:5432 dba arn:aws:iam::123456789012:user/dev\n"),
            "{out}"
        );
        assert!(!out.contains("#!/bin/sh"), "{out}");
    }

    #[test]
    fn builtins_render_within_limits() {
        for name in BUILTIN_NAMES {
            let t = template(builtin(name).unwrap());
            t.check().unwrap();
            let out = t.render(&launch()).unwrap();
            assert!(!out.contains("{{"), "{out}");
        }
    }

    #[test]
    fn errors_are_specific() {
        let e = template("echo {{nope}}").render(&launch()).unwrap_err();
        assert!(
            e.contains("unknown variable {{nope}}") && e.contains("remote_host"),
            "{e}"
        );
        let e = template("a\necho {{x").render(&launch()).unwrap_err();
        assert!(e.contains("unclosed {{ on line 2"), "{e}");
        let big = template(&"x".repeat(MAX_USER_DATA_BYTES))
            .check()
            .unwrap_err();
        assert!(big.contains("at most 16384"), "{big}");
        assert!(check_variable("team", "a;rm -rf /").is_err());
        assert!(check_variable("Team", "a").is_err());
        assert!(check_variable("owner", "a").is_err());
        let mut t = template("{{remote_host}}");
        t.remote_host = Some("db$(reboot)".into());
        assert!(t.render(&launch()).is_err());
    }
}
