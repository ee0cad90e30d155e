//! Who may open a data channel: the rules the simulator applies to a websocket upgrade
//! before it upgrades, the StreamUrls it hands out, and the ClientVersion floor.
//!
//! * **Signature.** With [`SimConfig::require_signed_upgrades`] (default) an upgrade must
//!   be SigV4-signed as plugins 1.2.764.0 and later sign it (\[P\]
//!   `websocketchannel.go` fn `getV4SignatureHeader`; [`super::sigv4`]) by a key in
//!   [`SimConfig::credentials`]. With [`SimConfig::presigned_stream_urls`] the StreamUrl
//!   carries the simulator's own query signature instead, and the upgrade must present
//!   exactly that (no `Authorization` header on top: \[P\] fn `IsPresignedURL` makes
//!   the plugin skip header signing for such a URL).
//! * **Cell number.** Every StartSession and ResumeSession StreamUrl carries a fresh
//!   `cell-number` (standard base64, always with `+`, `/` and a trailing `=`, so a
//!   client's canonical query is exercised: `+` must canonicalize as `%20`). An upgrade
//!   must name a cell issued for its session; one superseded by a later ResumeSession
//!   is refused while [`SimConfig::expire_superseded_cells`] is on (plugins before
//!   1.2.835.0 re-dial the original StreamUrl, delta sheet §2.4).
//! * **ClientVersion.** Below [`SimConfig::min_client_version`] (default 1.2.764.0,
//!   the minimum AWS supports) in OpenDataChannel or the HandshakeResponse is a
//!   [`ViolationKind::ClientVersionUnsupported`]; the session still runs.
//!
//! Every upgrade of a known session is recorded ([`UpgradeRecord`]); a refusal is a
//! 403 with a one-line text body, a [`ViolationKind::UpgradeRefused`] and counted in
//! [`Counters::upgrades_refused`](super::Counters::upgrades_refused).
//!
//! [`SimConfig::require_signed_upgrades`]: super::SimConfig::require_signed_upgrades
//! [`SimConfig::credentials`]: super::SimConfig::credentials
//! [`SimConfig::presigned_stream_urls`]: super::SimConfig::presigned_stream_urls
//! [`SimConfig::expire_superseded_cells`]: super::SimConfig::expire_superseded_cells
//! [`SimConfig::min_client_version`]: super::SimConfig::min_client_version

use std::cmp::Ordering;

use axum::http::{HeaderMap, header};
use base64::Engine as _;
use serde::Serialize;

use super::report::ViolationKind;
use super::session::SimSession;
use super::sigv4::{self, AuthKind, Credential, Credentials, SigError};
use super::{Shared, clock};
use bastion_proto::version::agent_version_compare;

/// The query parameter that names the cell.
pub const CELL_PARAM: &str = "cell-number";
/// The access key id of the simulator's own presigning key.
pub const PRESIGNER_ACCESS_KEY_ID: &str = "AKIDSIMULATORPRESIGN";

/// A new cell number: 20 bytes in standard base64 (28 characters ending in one `=`).
/// The first two bytes are fixed to `0xFB 0xFF`, which encode as `+/`, so every cell
/// number has a `+`, a `/` and padding.
pub fn new_cell_number() -> String {
    let mut bytes = [0u8; 20];
    bytes[0] = 0xFB;
    bytes[1] = 0xFF;
    fastrand::fill(&mut bytes[2..]);
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The simulator's presigning key (random per simulator; never leaves it).
pub(crate) fn new_presigner() -> Credentials {
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    Credentials::from([(
        PRESIGNER_ACCESS_KEY_ID.to_owned(),
        Credential {
            secret_access_key: secret,
            session_token: None,
        },
    )])
}

/// The host a StreamUrl names: the request's `Host` (so a client behind a relay dials
/// the relay), else the bound address.
fn url_host(shared: &Shared, headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .map(str::to_owned)
        .unwrap_or_else(|| shared.local_addr.to_string())
}

/// Issues a new cell for `session` and returns the StreamUrl that names it
/// (`ws://<host>/v1/data-channel/<id>?role=publish_subscribe&cell-number=<b64>`, raw
/// `+`, `/` and `=` as the service sends them), presigned when configured.
pub(crate) fn issue_stream_url(
    shared: &Shared,
    headers: &HeaderMap,
    session: &SimSession,
) -> String {
    let cell = session.issue_cell();
    let host = url_host(shared, headers);
    let path = format!("/v1/data-channel/{}", session.id);
    let query = format!("role=publish_subscribe&{CELL_PARAM}={cell}");
    if !shared.config.presigned_stream_urls {
        return format!("ws://{host}{path}?{query}");
    }
    let Some(cred) = shared.presign_keys.get(PRESIGNER_ACCESS_KEY_ID) else {
        return format!("ws://{host}{path}?{query}");
    };
    let expires = i64::try_from(shared.config.token_ttl.as_secs()).unwrap_or(i64::MAX);
    sigv4::presign(
        "ws",
        &host,
        &path,
        &query,
        PRESIGNER_ACCESS_KEY_ID,
        cred,
        &shared.config.region,
        clock::unix_secs(),
        expires,
    )
}

/// What kind of refusal, for tests to match.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// No signature where one is required.
    Unsigned,
    /// A signature that does not verify (see the detail).
    BadSignature,
    /// A header signature where the StreamUrl was presigned.
    PresignRequired,
    /// No `cell-number` in the query.
    MissingCellNumber,
    /// A cell number never issued for this session.
    UnknownCellNumber,
    /// A cell number replaced by a later ResumeSession.
    SupersededCellNumber,
}

/// Why an upgrade was refused. The `Display` text is the 403 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The signature check failed.
    #[error("{0}")]
    Signature(#[from] SigError),
    /// The StreamUrl was presigned, the upgrade was not.
    #[error(
        "the StreamUrl is presigned: the upgrade must carry its query signature, not an Authorization header"
    )]
    PresignRequired,
    /// No cell number.
    #[error("the upgrade names no cell-number")]
    MissingCell,
    /// A cell number this session never had.
    #[error("cell-number {0:?} was never issued for this session")]
    UnknownCell(String),
    /// A cell number superseded by ResumeSession.
    #[error("cell-number {0:?} was superseded by a later ResumeSession StreamUrl")]
    SupersededCell(String),
}

impl Refusal {
    /// The kind, for records and tests.
    pub fn kind(&self) -> RefusalKind {
        match self {
            Refusal::Signature(SigError::Unsigned) => RefusalKind::Unsigned,
            Refusal::Signature(_) => RefusalKind::BadSignature,
            Refusal::PresignRequired => RefusalKind::PresignRequired,
            Refusal::MissingCell => RefusalKind::MissingCellNumber,
            Refusal::UnknownCell(_) => RefusalKind::UnknownCellNumber,
            Refusal::SupersededCell(_) => RefusalKind::SupersededCellNumber,
        }
    }
}

/// One websocket upgrade of a session, as introspection shows it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct UpgradeRecord {
    /// When, Unix milliseconds.
    pub at_unix_ms: u64,
    /// The `cell-number` used (percent-decoded; `+` is a `+`).
    pub cell_number: Option<String>,
    /// The access key id that signed (verified), or that the signature claims (refused
    /// or unchecked).
    pub access_key_id: Option<String>,
    /// How the upgrade was signed: `none`, `header` or `query` (presigned).
    pub auth: AuthKind,
    /// True if the signature was checked and verified.
    pub verified: bool,
    /// True if the upgrade went ahead.
    pub accepted: bool,
    /// Why it was refused.
    pub refusal: Option<RefusalKind>,
    /// The 403 body.
    pub detail: Option<String>,
}

/// The access key id a request claims (unverified), from the header or the query.
fn claimed_access_key_id(req: &sigv4::Request<'_>, auth: AuthKind) -> Option<String> {
    let credential = match auth {
        AuthKind::None => return None,
        AuthKind::Header => req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split("Credential=").nth(1))
            .map(str::to_owned),
        AuthKind::Query => sigv4::form_decode(req.query)
            .into_iter()
            .find(|(k, _)| k.as_slice() == b"X-Amz-Credential")
            .map(|(_, v)| String::from_utf8_lossy(&v).into_owned()),
    }?;
    credential
        .split('/')
        .next()
        .filter(|a| !a.is_empty())
        .map(str::to_owned)
}

/// The `cell-number` of a raw query, percent-decoded with `+` kept (the value as the
/// StreamUrl spelled it, whether the client escaped it or not).
pub fn cell_of(raw_query: &str) -> Option<String> {
    raw_query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == CELL_PARAM)
            .then(|| sigv4::percent_decode(v, false))
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    })
}

fn check_signature(
    shared: &Shared,
    req: &sigv4::Request<'_>,
    auth: AuthKind,
    now: i64,
) -> Result<String, Refusal> {
    let region = &shared.config.region;
    if shared.config.presigned_stream_urls {
        if auth == AuthKind::Header {
            return Err(Refusal::PresignRequired);
        }
        return Ok(sigv4::verify_query(req, &shared.presign_keys, region, now)?.access_key_id);
    }
    Ok(sigv4::verify(req, &shared.config.credentials, region, now)?.access_key_id)
}

fn check_cell(shared: &Shared, session: &SimSession, cell: Option<&str>) -> Result<(), Refusal> {
    let cell = cell.ok_or(Refusal::MissingCell)?;
    let inner = session.lock();
    match inner.cells.iter().rposition(|c| c == cell) {
        None => Err(Refusal::UnknownCell(cell.to_owned())),
        Some(i) if i + 1 < inner.cells.len() && shared.config.expire_superseded_cells => {
            Err(Refusal::SupersededCell(cell.to_owned()))
        }
        Some(_) => Ok(()),
    }
}

/// Decides whether `req`, an upgrade to `session`, may go ahead at `now_unix`, and
/// records it.
pub(crate) fn admit(
    shared: &Shared,
    session: &SimSession,
    req: &sigv4::Request<'_>,
    now_unix: i64,
) -> Result<(), Refusal> {
    let auth = if sigv4::is_presigned(req.query) {
        AuthKind::Query
    } else if req.headers.contains_key(header::AUTHORIZATION) {
        AuthKind::Header
    } else {
        AuthKind::None
    };
    let cell = cell_of(req.query);
    let checked = if shared.config.require_signed_upgrades {
        check_signature(shared, req, auth, now_unix).map(Some)
    } else {
        Ok(None)
    };
    let result = checked.and_then(|verified| {
        check_cell(shared, session, cell.as_deref())?;
        Ok(verified)
    });
    let record = UpgradeRecord {
        at_unix_ms: clock::unix_ms(),
        cell_number: cell,
        access_key_id: match &result {
            Ok(Some(akid)) => Some(akid.clone()),
            _ => claimed_access_key_id(req, auth),
        },
        auth,
        verified: matches!(result, Ok(Some(_))),
        accepted: result.is_ok(),
        refusal: result.as_ref().err().map(Refusal::kind),
        detail: result.as_ref().err().map(ToString::to_string),
    };
    session.lock().upgrades.push(record);
    session.report.count(|c| {
        if auth == AuthKind::None {
            c.unsigned_upgrades += 1;
        }
        if result.is_err() {
            c.upgrades_refused += 1;
        }
    });
    match result {
        Ok(_) => Ok(()),
        Err(refusal) => {
            session.report.violation(
                ViolationKind::UpgradeRefused,
                format!("websocket upgrade refused with 403: {refusal}"),
            );
            tracing::info!(session_id = %session.id, reason = %refusal, "data-channel upgrade refused");
            Err(refusal)
        }
    }
}

/// Records a [`ViolationKind::ClientVersionUnsupported`] when `version` (from `what`)
/// is below `min` by the agent's comparison ([A] `versionutil.go` fn `Compare`).
pub(crate) fn check_client_version(
    report: &super::SessionReport,
    min: Option<&str>,
    what: &str,
    version: &str,
) {
    let Some(min) = min else {
        return;
    };
    if !version.is_empty() && agent_version_compare(version, min) == Ordering::Less {
        report.violation(
            ViolationKind::ClientVersionUnsupported,
            format!("{what} ClientVersion {version} is below the minimum supported {min}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_numbers_exercise_canonicalisation() {
        for _ in 0..100 {
            let c = new_cell_number();
            assert!(
                c.contains('+') && c.contains('/') && c.ends_with('='),
                "{c}"
            );
            assert_eq!(c.len(), 28);
        }
        assert_ne!(new_cell_number(), new_cell_number());
    }

    #[test]
    fn cell_is_read_with_plus_kept() {
        assert_eq!(
            cell_of("role=publish_subscribe&cell-number=+/8%3D").as_deref(),
            Some("+/8=")
        );
        assert_eq!(cell_of("role=publish_subscribe"), None);
    }

    #[test]
    fn client_version_floor_uses_the_agent_comparison() {
        let r = super::super::SessionReport::default();
        check_client_version(&r, Some("1.2.764.0"), "OpenDataChannel", "1.2.764.0");
        check_client_version(&r, Some("1.2.764.0"), "OpenDataChannel", "1.2.1000.0");
        check_client_version(&r, None, "OpenDataChannel", "1.0.0.0");
        assert!(r.violations().is_empty());
        check_client_version(&r, Some("1.2.764.0"), "HandshakeResponse", "1.2.677.0");
        let v = r.violations();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, ViolationKind::ClientVersionUnsupported);
        assert!(v[0].detail.contains("1.2.677.0"), "{}", v[0].detail);
    }
}
