//! The two version-comparison rules that decide port-forwarding behaviour.
//!
//! The plugin and the agent each look at the *other* side's version, with *different*
//! comparison rules, and a session only works when both decisions agree (facts sheet
//! §7.1):
//!
//! * The **plugin rule** ([`plugin_version_compare`]) judges the agent's `AgentVersion`
//!   from the HandshakeRequest: mux or basic port forwarding, whether the agent still
//!   runs smux keepalive, whether it understands the TerminateSession flag.
//! * The **agent rule** ([`agent_version_compare`]) judges the client's `ClientVersion`
//!   from the HandshakeResponse: mux or basic, and whether to disable smux keepalive.
//!
//! A native client mirrors the plugin rule for the agent's version and reports
//! [`DEFAULT_CLIENT_VERSION`] so that the agent picks mux without keepalive.

use std::cmp::Ordering;

/// The `ClientVersion` we report in HandshakeResponse (and OpenDataChannel).
///
/// It is the newest released plugin version at the reference revision ([P]
/// `RELEASENOTES.md`, section `1.2.650.0`; the checked-in [P] `VERSION` file and the
/// generated `src/version/version.go` const `Version` hold the placeholder `1.2.0.0`,
/// which the release build replaces). By the agent rule it is `>= 1.1.70` (so the agent
/// uses mux, [`agent_uses_mux_for_client`]) and `> 1.2.331.0` (so the agent disables smux
/// keepalive, [`agent_disables_keepalive_for_client`]): exactly what a current plugin
/// gets. Note that the placeholder `1.2.0.0` would get mux *with* agent keepalive.
pub const DEFAULT_CLIENT_VERSION: &str = "1.2.896.0";

/// Agents strictly newer than this support TCP multiplexing: [P] `src/config/config.go`
/// const `TCPMultiplexingSupportedAfterThisAgentVersion`.
pub const TCP_MULTIPLEXING_SUPPORTED_AFTER_AGENT_VERSION: &str = "3.0.196.0";
/// Agents strictly newer than this can run smux without keepalive: [P] `config.go` const
/// `TCPMultiplexingWithSmuxKeepAliveDisabledAfterThisAgentVersion`.
pub const SMUX_KEEPALIVE_DISABLED_AFTER_AGENT_VERSION: &str = "3.1.1511.0";
/// Agents strictly newer than this understand the TerminateSession flag: [P] `config.go`
/// const `TerminateSessionFlagSupportedAfterThisAgentVersion`.
pub const TERMINATE_SESSION_FLAG_SUPPORTED_AFTER_AGENT_VERSION: &str = "2.3.722.0";
/// The first agent that forwards to a remote `host` ([A] `RELEASENOTES.md` 3.1.1188.0:
/// "Added support for port forwarding to remote host"). Older agents ignore the `host`
/// parameter and connect to the port on the instance itself. The plugin has no such check;
/// bastion refuses such a session instead of reaching the wrong server.
pub const REMOTE_HOST_SUPPORTED_FROM_AGENT_VERSION: &str = "3.1.1188.0";
/// Clients at or above this get mux from the agent: [A]
/// `agent/session/plugins/port/port.go` const `muxSupportedClientVersion`.
pub const MUX_SUPPORTED_CLIENT_VERSION: &str = "1.1.70";
/// Clients strictly above this get smux without keepalive from the agent: [A] `port.go`
/// const `muxKeepAliveDisabledAfterThisClientVersion` (used in [A] `port_mux.go` fn
/// `initialize`).
pub const MUX_KEEPALIVE_DISABLED_AFTER_CLIENT_VERSION: &str = "1.2.331.0";

/// Go's `strconv.Atoi` on a 64-bit platform: optional `+`/`-`, then ASCII digits only, in
/// the `i64` range. Rust's `i64::from_str` accepts exactly the same strings.
fn go_atoi(s: &str) -> Option<i64> {
    s.parse::<i64>().ok()
}

/// The plugin's comparison, [P] `src/version/versionutil.go` fn `NewVersion` and method
/// `compare`; `None` where the Go code returns an error.
///
/// * An empty string on either side is an error (fn `NewVersion`).
/// * Both are split on `.`; different component counts are an error.
/// * Components are compared left to right, each parsed with `Atoi` only when reached:
///   a non-numeric component is an error, unless an earlier component already decided
///   the order (`"4.x.0.0"` vs `"3.0.196.0"` is `Greater`).
pub fn plugin_version_compare(this: &str, other: &str) -> Option<Ordering> {
    if this.is_empty() || other.is_empty() {
        return None;
    }
    let a: Vec<&str> = this.split('.').collect();
    let b: Vec<&str> = other.split('.').collect();
    if a.len() != b.len() {
        return None;
    }
    for (x, y) in a.iter().zip(&b) {
        let x = go_atoi(x)?;
        let y = go_atoi(y)?;
        match x.cmp(&y) {
            Ordering::Equal => {}
            decided => return Some(decided),
        }
    }
    Some(Ordering::Equal)
}

/// [P] `src/version/versionvalidator.go` fn `isAgentVersionGreaterThanSupportedVersion`:
/// true only when the comparison succeeds and is strictly greater.
fn plugin_agent_newer_than(agent_version: &str, threshold: &str) -> bool {
    plugin_version_compare(agent_version, threshold) == Some(Ordering::Greater)
}

/// Plugin rule: does this agent support TCP multiplexing, i.e. should the client use
/// smux ("MuxPortForwarding") rather than basic port forwarding? True iff
/// `agent_version > 3.0.196.0` by [`plugin_version_compare`]. [P]
/// `versionvalidator.go` fn `DoesAgentSupportTCPMultiplexing`, called from [P]
/// `portsession.go` fn `Initialize`.
pub fn agent_supports_tcp_multiplexing(agent_version: &str) -> bool {
    plugin_agent_newer_than(
        agent_version,
        TCP_MULTIPLEXING_SUPPORTED_AFTER_AGENT_VERSION,
    )
}

/// Plugin rule: does this agent run smux without keepalive, so the client must disable
/// it too? True iff `agent_version > 3.1.1511.0`. [P] `versionvalidator.go` fn
/// `DoesAgentSupportDisableSmuxKeepAlive`.
pub fn agent_supports_disable_smux_keepalive(agent_version: &str) -> bool {
    plugin_agent_newer_than(agent_version, SMUX_KEEPALIVE_DISABLED_AFTER_AGENT_VERSION)
}

/// Plugin rule: does this agent understand the TerminateSession flag (PT 10, value 2)?
/// True iff `agent_version > 2.3.722.0`. [P] `versionvalidator.go` fn
/// `DoesAgentSupportTerminateSessionFlag`.
pub fn agent_supports_terminate_session_flag(agent_version: &str) -> bool {
    plugin_agent_newer_than(
        agent_version,
        TERMINATE_SESSION_FLAG_SUPPORTED_AFTER_AGENT_VERSION,
    )
}

/// A version as `github.com/coreos/go-semver` v0.2.0 (vendored by [A],
/// `vendor/github.com/coreos/go-semver/semver/semver.go`) parses it.
struct GoSemver<'a> {
    core: [i64; 3],
    pre_release: &'a str,
}

impl<'a> GoSemver<'a> {
    /// go-semver method `Set`: cut the metadata at the first `+`, then the pre-release at
    /// the first `-`; what is left must split (at most three ways) on `.` into exactly
    /// three `ParseInt(_, 10, 64)` numbers. So `"1.2.650.0"` is *not* semver (its third
    /// part `"650.0"` fails to parse), leading zeros are accepted, and an empty
    /// pre-release (`"1.2.3-"`) counts as none.
    fn parse(version: &'a str) -> Option<GoSemver<'a>> {
        let version = version.split_once('+').map_or(version, |(v, _)| v);
        let (core, pre_release) = version.split_once('-').unwrap_or((version, ""));
        let mut parts = core.splitn(3, '.');
        let mut next = || parts.next().and_then(go_atoi);
        let core = [next()?, next()?, next()?];
        Some(GoSemver { core, pre_release })
    }

    /// go-semver method `Compare`: numeric major.minor.patch, then fn
    /// `preReleaseCompare`; metadata is ignored.
    fn compare(&self, other: &GoSemver<'_>) -> Ordering {
        self.core
            .cmp(&other.core)
            .then_with(|| pre_release_compare(self.pre_release, other.pre_release))
    }
}

/// go-semver fn `preReleaseCompare` / `recursivePreReleaseCompare`: no pre-release beats
/// any pre-release; otherwise dot-separated identifiers left to right, numerically when
/// both parse with `Atoi` and differ, else as byte strings; more identifiers win a tie.
fn pre_release_compare(a: &str, b: &str) -> Ordering {
    match (a.is_empty(), b.is_empty()) {
        (true, false) => return Ordering::Greater,
        (false, true) => return Ordering::Less,
        _ => {}
    }
    let mut a = a.split('.');
    let mut b = b.split('.');
    loop {
        let (x, y) = match (a.next(), b.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => (x, y),
        };
        if let (Some(m), Some(n)) = (go_atoi(x), go_atoi(y))
            && m != n
        {
            return m.cmp(&n);
        }
        match x.cmp(y) {
            Ordering::Equal => {}
            decided => return decided,
        }
    }
}

/// The agent's comparison, [A] `agent/versionutil/versionutil.go` fn `Compare` with
/// `strictSort = true` (as both port-plugin call sites pass). Never fails.
///
/// 1. If *both* strings parse as semver by go-semver v0.2.0 (exactly three numeric
///    dot-separated parts, optional `-pre-release` and `+metadata`; see
///    `GoSemver::parse`), semver ordering decides.
/// 2. Otherwise both are split on `.` and the shared components are compared left to
///    right: numerically when both parse with `Atoi`, else as byte strings.
/// 3. If all shared components are equal, fewer components is smaller (strict mode does
///    not drop trailing zeros: `1.0.0 < 1.0.0.0`).
pub fn agent_version_compare(this: &str, other: &str) -> Ordering {
    if let (Some(a), Some(b)) = (GoSemver::parse(this), GoSemver::parse(other)) {
        return a.compare(&b);
    }
    let a: Vec<&str> = this.split('.').collect();
    let b: Vec<&str> = other.split('.').collect();
    for (x, y) in a.iter().zip(&b) {
        let order = match (go_atoi(x), go_atoi(y)) {
            (Some(m), Some(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if order != Ordering::Equal {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

/// Does this agent honour the `host` parameter of
/// `AWS-StartPortForwardingSessionToRemoteHost`? True iff `agent_version >= 3.1.1188.0`
/// by [`agent_version_compare`] (the agent's own comparison, as its feature gates use).
pub fn agent_supports_remote_host(agent_version: &str) -> bool {
    agent_version_compare(agent_version, REMOTE_HOST_SUPPORTED_FROM_AGENT_VERSION) != Ordering::Less
}

/// Agent rule: does the agent use smux for a `LocalPortForwarding` session with this
/// client? True iff `client_version >= 1.1.70` by [`agent_version_compare`]. [A]
/// `port.go` fn `GetSession`, const `muxSupportedClientVersion`. An empty or missing
/// version compares lower, so the agent falls back to basic mode.
pub fn agent_uses_mux_for_client(client_version: &str) -> bool {
    agent_version_compare(client_version, MUX_SUPPORTED_CLIENT_VERSION) != Ordering::Less
}

/// Agent rule: does the agent disable smux keepalive for this client? True iff
/// `client_version > 1.2.331.0` by [`agent_version_compare`]. [A] `port_mux.go` fn
/// `initialize`, const `muxKeepAliveDisabledAfterThisClientVersion` (declared in [A]
/// `port.go`).
pub fn agent_disables_keepalive_for_client(client_version: &str) -> bool {
    agent_version_compare(client_version, MUX_KEEPALIVE_DISABLED_AFTER_CLIENT_VERSION)
        == Ordering::Greater
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::{Equal, Greater, Less};

    #[test]
    fn remote_host_threshold() {
        assert!(!agent_supports_remote_host("3.1.1144.0"));
        assert!(!agent_supports_remote_host("3.1.1187.9"));
        assert!(agent_supports_remote_host("3.1.1188.0"));
        assert!(agent_supports_remote_host("3.3.987.0"));
        assert!(!agent_supports_remote_host(""));
    }

    #[test]
    fn plugin_rule_thresholds() {
        // (agent version, tcp mux, disable keepalive, terminate flag)
        let table: &[(&str, bool, bool, bool)] = &[
            ("3.0.196.0", false, false, true),
            ("3.0.196.1", true, false, true),
            ("3.0.197", false, false, false),
            ("3.0.197.0.0", false, false, false),
            ("", false, false, false),
            ("3.x.1.0", false, false, true),
            ("10.0.0.0", true, true, true),
            ("3.3.987.0", true, true, true),
            ("3.1.1511.0", true, false, true),
            ("3.1.1511.1", true, true, true),
            ("3.1.1188.0", true, false, true),
            ("3.0.222.0", true, false, true),
            ("2.3.722.0", false, false, false),
            ("2.3.722.1", false, false, true),
            ("2.3.756.0", false, false, true),
            ("1.0.0.0", false, false, false),
            ("03.0.197.0", true, false, true),
            ("+3.0.197.0", true, false, true),
            (" 3.0.197.0", false, false, false),
            ("3.0.197.0 ", true, false, true),
            ("3.0.197.", true, false, true),
            ("4.x.0.0", true, true, true),
            ("3.0.x.0", false, false, true),
            ("99999999999999999999.0.0.0", false, false, false),
        ];
        for &(v, mux, keepalive, flag) in table {
            assert_eq!(agent_supports_tcp_multiplexing(v), mux, "mux {v:?}");
            assert_eq!(
                agent_supports_disable_smux_keepalive(v),
                keepalive,
                "keepalive {v:?}"
            );
            assert_eq!(agent_supports_terminate_session_flag(v), flag, "flag {v:?}");
        }
    }

    #[test]
    fn plugin_compare_errors_and_orders() {
        let table: &[(&str, &str, Option<Ordering>)] = &[
            ("1.2.3.4", "1.2.3.4", Some(Equal)),
            ("1.2.3.5", "1.2.3.4", Some(Greater)),
            ("1.2.3", "1.2.3.4", None),
            ("", "1", None),
            ("1", "", None),
            ("1.a", "1.b", None),
            ("2.a", "1.b", Some(Greater)),
            ("1.-1", "1.0", Some(Less)),
            ("1..0", "1.0.0", None),
        ];
        for &(a, b, want) in table {
            assert_eq!(plugin_version_compare(a, b), want, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn agent_rule_thresholds() {
        // (client version, mux, keepalive disabled)
        let table: &[(&str, bool, bool)] = &[
            (DEFAULT_CLIENT_VERSION, true, true),
            ("1.2.0.0", true, false),
            ("1.1.70", true, false),
            ("1.1.70.0", true, false),
            ("1.1.69", false, false),
            ("1.1.69.9", false, false),
            ("1.1.70-rc1", false, false),
            ("1.1.70+build5", true, false),
            ("1.1.070", true, false),
            ("1.10.0", true, true),
            ("1.2.331.0", true, false),
            ("1.2.331", true, false),
            ("1.2.331.0.0", true, true),
            ("1.2.331.1", true, true),
            ("1.2.332", true, true),
            ("1.2.295.0", true, false),
            ("", false, false),
            ("1", false, false),
            ("2", true, true),
            ("v1.2.650.0", true, true),
            ("1.x", true, true),
            ("10.0.0.0", true, true),
        ];
        for &(v, mux, keepalive) in table {
            assert_eq!(agent_uses_mux_for_client(v), mux, "mux {v:?}");
            assert_eq!(
                agent_disables_keepalive_for_client(v),
                keepalive,
                "keepalive {v:?}"
            );
        }
    }

    #[test]
    fn agent_compare_semver_and_fallback() {
        let table: &[(&str, &str, Ordering)] = &[
            // semver on both sides
            ("0.0.0", "0.0.0-foo", Greater),
            ("1.2.3", "1.2.3-4", Greater),
            ("1.0.0-rc.10", "1.0.0-rc.9", Greater),
            ("1.0.0-rc.01", "1.0.0-rc.1", Less),
            ("1.0.0-a", "1.0.0-a.b", Less),
            ("3.0.0+foo", "3.0.0+bar", Equal),
            ("01.2.3", "1.2.3", Equal),
            ("1.2.3-", "1.2.3", Equal),
            // fallback: not both semver
            ("1.0.0", "1.0.0.0", Less),
            ("1.0.0.0", "1.0.0", Greater),
            ("1.0.002.0", "1.0.2.0", Equal),
            ("1.0.a", "1.0.0.0", Greater),
            ("1.0.A", "1.0.a.0", Less),
            ("", "1.1.70", Less),
            ("", "", Equal),
            ("1.1.70-rc1.0", "1.1.70", Less),
            ("3.0.0+foo", "3.0.0.1", Greater),
            ("1.10", "1.9.0", Greater),
        ];
        for &(a, b, want) in table {
            assert_eq!(agent_version_compare(a, b), want, "{a:?} vs {b:?}");
            assert_eq!(
                agent_version_compare(b, a),
                want.reverse(),
                "{b:?} vs {a:?}"
            );
        }
    }

    #[test]
    fn default_client_version_gets_mux_without_keepalive() {
        assert!(agent_uses_mux_for_client(DEFAULT_CLIENT_VERSION));
        assert!(agent_disables_keepalive_for_client(DEFAULT_CLIENT_VERSION));
    }
}
