//! SigV4 verification of data-channel websocket upgrades, written from AWS's
//! specification ("Create a signed AWS API request", "Elements of an AWS API request
//! signature", "Authenticating requests: using query parameters"), not from any
//! client's signer, so that the simulator checks what a client sends instead of agreeing
//! with it by construction.
//!
//! What current plugins send ([P] `src/communicator/websocketchannel.go` fn
//! `getV4SignatureHeader`, 1.2.764.0 and later; delta sheet §2.1):
//!
//! * `X-Amz-Date`, `X-Amz-Security-Token` (temporary credentials only) and
//!   `Authorization: AWS4-HMAC-SHA256 Credential=<AKID>/<yyyymmdd>/<region>/ssmmessages/aws4_request,
//!   SignedHeaders=host;x-amz-date[;x-amz-security-token], Signature=<hex>`;
//! * the payload hash is the SHA-256 of the empty string; no `X-Amz-Content-Sha256`.
//!
//! How the canonical request is rebuilt from the request *as received*:
//!
//! * canonical URI: the raw path from the request line, URI-encoded once more
//!   (unreserved bytes and `/` kept, so `@` becomes `%40` and `%40` becomes `%2540`),
//!   as Go's `rest.EscapePath(u.EscapedPath(), false)` does;
//! * canonical query: the raw query form-decoded as Go's `url.ParseQuery` does (`+` is a
//!   space; a pair that does not decode is dropped), sorted by name then value,
//!   re-encoded RFC 3986 style with a space as `%20`;
//! * canonical headers: the signed headers, lowercase, values trimmed with inner runs
//!   of spaces collapsed, repeated headers joined with `,`.
//!
//! Presigned URLs (query-string auth) are verified the same way with the `X-Amz-*`
//! parameters in the query; `X-Amz-Signature` is left out of the canonical query.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use ring::hmac;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::clock;

/// The only algorithm SigV4 defines.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The signing name of the data-channel endpoint ([P] `src/config/config.go`
/// `ServiceName`).
pub const SERVICE: &str = "ssmmessages";
/// The credential scope terminator.
pub const TERMINATOR: &str = "aws4_request";
/// SHA-256 of the empty payload: an upgrade GET has no body.
pub const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// How far `X-Amz-Date` may be from the verifier's clock, as AWS services allow.
pub const MAX_SKEW_SECS: i64 = 15 * 60;
/// The longest `X-Amz-Expires` SigV4 allows (7 days).
pub const MAX_EXPIRES_SECS: i64 = 7 * 24 * 3600;

/// The query parameter names that make a URL presigned ([P] `websocketchannel.go` fn
/// `IsPresignedURL`).
pub const PRESIGN_PARAMS: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// A secret the simulator knows for one access key id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Credential {
    /// The secret access key.
    pub secret_access_key: String,
    /// For temporary credentials: the session token the request must carry in
    /// `X-Amz-Security-Token` (and sign). `None`: long-term keys, no token expected.
    pub session_token: Option<String>,
}

/// Access key id -> secret.
pub type Credentials = BTreeMap<String, Credential>;

/// Where a verified signature was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthKind {
    /// No signature at all.
    None,
    /// The `Authorization` header.
    Header,
    /// Presigned URL (query-string parameters).
    Query,
}

/// What exactly is wrong with a signature. The `Display` text is the 403 body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SigError {
    /// No `Authorization` header (and no presigned query).
    #[error("the upgrade is not signed (no Authorization header)")]
    Unsigned,
    /// The `Authorization` header does not have the SigV4 shape.
    #[error("malformed Authorization header: {0}")]
    MalformedAuthorization(String),
    /// An algorithm other than `AWS4-HMAC-SHA256`.
    #[error("unsupported signing algorithm {0:?} (expected {ALGORITHM})")]
    UnsupportedAlgorithm(String),
    /// No `X-Amz-Date`.
    #[error("X-Amz-Date is missing")]
    MissingDate,
    /// `X-Amz-Date` is not `YYYYMMDD'T'HHMMSS'Z'`.
    #[error("X-Amz-Date {0:?} is not of the form YYYYMMDDTHHMMSSZ")]
    MalformedDate(String),
    /// `X-Amz-Date` too far from now.
    #[error(
        "X-Amz-Date {amz_date} is {skew_secs} s away from the simulator's clock (at most {MAX_SKEW_SECS} s allowed)"
    )]
    DateSkew {
        /// The header value.
        amz_date: String,
        /// Signed difference, request minus now.
        skew_secs: i64,
    },
    /// The credential scope's date is not `X-Amz-Date`'s date.
    #[error("credential scope date {scope_date} differs from the date of X-Amz-Date {amz_date}")]
    ScopeDateMismatch {
        /// `<yyyymmdd>` of the scope.
        scope_date: String,
        /// The `X-Amz-Date` value.
        amz_date: String,
    },
    /// The credential scope names another region.
    #[error("credential scope region {got:?} is not this endpoint's region {expected:?}")]
    WrongRegion {
        /// The scope's region.
        got: String,
        /// The simulator's region.
        expected: String,
    },
    /// The credential scope names another service.
    #[error("credential scope service {0:?} is not {SERVICE:?}")]
    WrongService(String),
    /// The credential scope does not end with `aws4_request`.
    #[error("credential scope terminator {0:?} is not {TERMINATOR:?}")]
    WrongTerminator(String),
    /// A header that must be signed is not in SignedHeaders.
    #[error("header {0} is not signed (SignedHeaders must include it)")]
    HeaderNotSigned(&'static str),
    /// SignedHeaders names a header the request does not carry.
    #[error("signed header {0} is not in the request")]
    SignedHeaderAbsent(String),
    /// The access key id is not in the simulator's credential table.
    #[error("unknown access key id {0}")]
    UnknownAccessKey(String),
    /// The credential is temporary and the request carries no session token.
    #[error("X-Amz-Security-Token is missing (the credential of {0} is temporary)")]
    MissingSessionToken(String),
    /// The session token is not the one registered for the access key id.
    #[error("X-Amz-Security-Token does not match the session token of {0}")]
    SessionTokenMismatch(String),
    /// The signature does not match the request.
    #[error(
        "signature mismatch for {0} (the request was changed after signing, or a wrong secret or canonical form was used)"
    )]
    SignatureMismatch(String),
    /// A presigned URL without one of its required parameters.
    #[error("presigned URL without {0}")]
    MissingQueryParameter(&'static str),
    /// `X-Amz-Expires` is not a number of seconds in 1..=604800.
    #[error("X-Amz-Expires {0:?} is not a number of seconds between 1 and {MAX_EXPIRES_SECS}")]
    MalformedExpires(String),
    /// The presigned URL has expired.
    #[error("presigned URL expired {0} s ago")]
    Expired(i64),
    /// Both a presigned URL and an `Authorization` header.
    #[error("the upgrade carries both a presigned URL and an Authorization header")]
    HeaderAndQueryAuth,
}

/// The parts of an HTTP request that SigV4 covers, exactly as received.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// `GET`.
    pub method: &'a str,
    /// The raw path of the request line (still percent-encoded as sent).
    pub path: &'a str,
    /// The raw query, without `?` (empty when none).
    pub query: &'a str,
    /// The request headers, `Host` included.
    pub headers: &'a HeaderMap,
}

/// A signature that verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The access key id that signed.
    pub access_key_id: String,
    /// Header or query auth.
    pub auth: AuthKind,
}

/// The parsed `Authorization` header or presigned parameters.
#[derive(Debug)]
struct Auth<'a> {
    access_key_id: &'a str,
    scope_date: &'a str,
    region: &'a str,
    service: &'a str,
    terminator: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn split_credential(credential: &str) -> Option<[&str; 5]> {
    let mut parts = credential.rsplitn(5, '/');
    let terminator = parts.next()?;
    let service = parts.next()?;
    let region = parts.next()?;
    let date = parts.next()?;
    let akid = parts.next()?;
    (!akid.is_empty()).then_some([akid, date, region, service, terminator])
}

fn parse_auth<'a>(
    credential: &'a str,
    signed_headers: &'a str,
    signature: &'a str,
) -> Result<Auth<'a>, SigError> {
    let [access_key_id, scope_date, region, service, terminator] = split_credential(credential)
        .ok_or_else(|| {
            SigError::MalformedAuthorization(format!(
                "Credential {credential:?} is not <AKID>/<date>/<region>/<service>/aws4_request"
            ))
        })?;
    let signed: Vec<&str> = signed_headers.split(';').collect();
    if signed
        .iter()
        .any(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_uppercase()))
    {
        return Err(SigError::MalformedAuthorization(format!(
            "SignedHeaders {signed_headers:?} must be lowercase names separated by ';'"
        )));
    }
    if signed.windows(2).any(|w| w[0] >= w[1]) {
        return Err(SigError::MalformedAuthorization(format!(
            "SignedHeaders {signed_headers:?} is not sorted"
        )));
    }
    if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SigError::MalformedAuthorization(
            "Signature is not 64 hex digits".to_owned(),
        ));
    }
    Ok(Auth {
        access_key_id,
        scope_date,
        region,
        service,
        terminator,
        signed_headers: signed,
        signature,
    })
}

/// Parses `AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`.
fn parse_authorization(value: &str) -> Result<Auth<'_>, SigError> {
    let (algorithm, rest) = value
        .trim()
        .split_once(' ')
        .ok_or_else(|| SigError::MalformedAuthorization("no algorithm".to_owned()))?;
    if algorithm != ALGORITHM {
        return Err(SigError::UnsupportedAlgorithm(algorithm.to_owned()));
    }
    let (mut credential, mut signed, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=').ok_or_else(|| {
            SigError::MalformedAuthorization(format!("component {:?} has no '='", part.trim()))
        })?;
        let slot = match k {
            "Credential" => &mut credential,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut signature,
            other => {
                return Err(SigError::MalformedAuthorization(format!(
                    "unknown component {other:?}"
                )));
            }
        };
        if slot.replace(v).is_some() {
            return Err(SigError::MalformedAuthorization(format!("{k} given twice")));
        }
    }
    let missing = |what: &str| SigError::MalformedAuthorization(format!("no {what}"));
    parse_auth(
        credential.ok_or_else(|| missing("Credential"))?,
        signed.ok_or_else(|| missing("SignedHeaders"))?,
        signature.ok_or_else(|| missing("Signature"))?,
    )
}

/// `YYYYMMDD'T'HHMMSS'Z'` to Unix seconds.
pub fn parse_amz_date(value: &str) -> Option<i64> {
    let b = value.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' || !digits(0..8) || !digits(9..15) {
        return None;
    }
    let iso = format!(
        "{}-{}-{}T{}:{}:{}Z",
        &value[0..4],
        &value[4..6],
        &value[6..8],
        &value[9..11],
        &value[11..13],
        &value[13..15]
    );
    let ms = clock::parse_iso8601(&iso)?;
    i64::try_from(ms / 1000).ok()
}

/// Unix seconds to `YYYYMMDD'T'HHMMSS'Z'`.
pub fn format_amz_date(unix_secs: i64) -> String {
    let iso = clock::iso8601(u64::try_from(unix_secs).unwrap_or_default() * 1000);
    // 2026-01-02T03:04:05.000Z
    let digits: String = iso[..19].chars().filter(char::is_ascii_digit).collect();
    format!("{}T{}Z", &digits[..8], &digits[8..])
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// RFC 3986 percent-encoding of everything but the unreserved bytes (and `/` when
/// `keep_slash`), uppercase hex: SigV4's `UriEncode`.
pub fn uri_encode(s: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s {
        if is_unreserved(b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The canonical URI of a raw request path: encoded once more, separators kept; an
/// empty path is `/`.
pub fn canonical_uri(raw_path: &str) -> String {
    if raw_path.is_empty() {
        return "/".to_owned();
    }
    uri_encode(raw_path.as_bytes(), true)
}

/// Lowercase hex (SigV4 digests and signatures).
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex (either case) to bytes; `None` if not an even number of hex digits.
fn from_hex(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks(2)
        .map(|p| Some(hex_value(p[0])? << 4 | hex_value(p[1])?))
        .collect()
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decoding; `plus_is_space` for form decoding. `None` on a bad escape.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hi = hex_value(*b.get(i + 1)?)?;
                let lo = hex_value(*b.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(out)
}

/// Form-decodes a raw query as Go's `url.ParseQuery` does: pairs split on `&`, a pair
/// containing `;` or a bad escape is dropped, `+` is a space, a name without `=` has
/// an empty value. Order is kept.
pub fn form_decode(raw_query: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    raw_query
        .split('&')
        .filter(|p| !p.is_empty() && !p.contains(';'))
        .filter_map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Some((percent_decode(k, true)?, percent_decode(v, true)?))
        })
        .collect()
}

/// The canonical query string of a raw query, leaving out the parameter `exclude`.
pub fn canonical_query(raw_query: &str, exclude: Option<&str>) -> String {
    let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = form_decode(raw_query)
        .into_iter()
        .filter(|(k, _)| exclude.is_none_or(|x| k.as_slice() != x.as_bytes()))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", uri_encode(k, false), uri_encode(v, false)))
        .collect::<Vec<_>>()
        .join("&")
}

/// The value of one query parameter (form-decoded), if present once or more (the first).
fn query_param(raw_query: &str, name: &str) -> Option<String> {
    form_decode(raw_query)
        .into_iter()
        .find(|(k, _)| k.as_slice() == name.as_bytes())
        .map(|(_, v)| String::from_utf8_lossy(&v).into_owned())
}

/// True if the query has any of [`PRESIGN_PARAMS`] (the plugin's `IsPresignedURL`).
pub fn is_presigned(raw_query: &str) -> bool {
    form_decode(raw_query)
        .iter()
        .any(|(k, _)| PRESIGN_PARAMS.iter().any(|p| k.as_slice() == p.as_bytes()))
}

/// A header's canonical value: all its values, trimmed, inner runs of spaces collapsed,
/// joined with `,`. `None` if absent.
fn canonical_header_value(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(name)
        .iter()
        .map(|v| {
            String::from_utf8_lossy(v.as_bytes())
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    (!values.is_empty()).then(|| values.join(","))
}

/// The canonical request (the six lines of the specification, joined with `\n`).
pub fn canonical_request(
    req: &Request<'_>,
    signed_headers: &[&str],
    exclude_query: Option<&str>,
) -> Result<String, SigError> {
    let mut headers = String::new();
    for name in signed_headers {
        let value = canonical_header_value(req.headers, name)
            .ok_or_else(|| SigError::SignedHeaderAbsent((*name).to_owned()))?;
        headers.push_str(&format!("{name}:{value}\n"));
    }
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method,
        canonical_uri(req.path),
        canonical_query(req.query, exclude_query),
        headers,
        signed_headers.join(";"),
        EMPTY_PAYLOAD_SHA256
    ))
}

/// `AWS4-HMAC-SHA256\n<amz-date>\n<scope>\n<hex sha256(canonical request)>`.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical_request: &str) -> String {
    let digest = to_hex(&Sha256::digest(canonical_request.as_bytes()));
    format!("{ALGORITHM}\n{amz_date}\n{scope}\n{digest}")
}

/// The signing key: HMAC chain over date, region, service and `aws4_request`.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> hmac::Key {
    let step = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let k_date = step(format!("AWS4{secret}").as_bytes(), date);
    let k_region = step(k_date.as_ref(), region);
    let k_service = step(k_region.as_ref(), service);
    let k_signing = step(k_service.as_ref(), TERMINATOR);
    hmac::Key::new(hmac::HMAC_SHA256, k_signing.as_ref())
}

/// The hex signature of a string to sign.
pub fn sign(key: &hmac::Key, string_to_sign: &str) -> String {
    to_hex(hmac::sign(key, string_to_sign.as_bytes()).as_ref())
}

/// What both forms of auth check once parsed.
struct Check<'a> {
    auth: Auth<'a>,
    amz_date: &'a str,
    /// The session token the request carries, if any.
    token: Option<String>,
    /// Query auth: the token is a query parameter, not a header to be signed.
    kind: AuthKind,
}

fn verify_parsed(
    req: &Request<'_>,
    check: Check<'_>,
    credentials: &Credentials,
    region: &str,
) -> Result<Verified, SigError> {
    let Check {
        auth,
        amz_date,
        token,
        kind,
    } = check;
    if auth.service != SERVICE {
        return Err(SigError::WrongService(auth.service.to_owned()));
    }
    if auth.region != region {
        return Err(SigError::WrongRegion {
            got: auth.region.to_owned(),
            expected: region.to_owned(),
        });
    }
    if auth.terminator != TERMINATOR {
        return Err(SigError::WrongTerminator(auth.terminator.to_owned()));
    }
    if amz_date.get(..8) != Some(auth.scope_date) {
        return Err(SigError::ScopeDateMismatch {
            scope_date: auth.scope_date.to_owned(),
            amz_date: amz_date.to_owned(),
        });
    }
    let signed = |h: &str| auth.signed_headers.contains(&h);
    if !signed("host") {
        return Err(SigError::HeaderNotSigned("host"));
    }
    if kind == AuthKind::Header {
        if !signed("x-amz-date") {
            return Err(SigError::HeaderNotSigned("x-amz-date"));
        }
        if token.is_some() && !signed("x-amz-security-token") {
            return Err(SigError::HeaderNotSigned("x-amz-security-token"));
        }
    }
    let akid = auth.access_key_id;
    let cred = credentials
        .get(akid)
        .ok_or_else(|| SigError::UnknownAccessKey(akid.to_owned()))?;
    match (&cred.session_token, &token) {
        (Some(_), None) => return Err(SigError::MissingSessionToken(akid.to_owned())),
        (Some(want), Some(got)) if want != got => {
            return Err(SigError::SessionTokenMismatch(akid.to_owned()));
        }
        (None, Some(_)) => return Err(SigError::SessionTokenMismatch(akid.to_owned())),
        _ => {}
    }
    let exclude = (kind == AuthKind::Query).then_some("X-Amz-Signature");
    let creq = canonical_request(req, &auth.signed_headers, exclude)?;
    let scope = format!(
        "{}/{}/{}/{}",
        auth.scope_date, auth.region, auth.service, auth.terminator
    );
    let sts = string_to_sign(amz_date, &scope, &creq);
    let key = signing_key(&cred.secret_access_key, auth.scope_date, region, SERVICE);
    let tag = from_hex(auth.signature)
        .ok_or_else(|| SigError::MalformedAuthorization("Signature is not hex".to_owned()))?;
    // ring compares in constant time.
    hmac::verify(&key, sts.as_bytes(), &tag)
        .map_err(|_| SigError::SignatureMismatch(akid.to_owned()))?;
    Ok(Verified {
        access_key_id: akid.to_owned(),
        auth: kind,
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Verifies `Authorization`-header auth at `now_unix` (seconds) for `region`.
pub fn verify_header(
    req: &Request<'_>,
    credentials: &Credentials,
    region: &str,
    now_unix: i64,
) -> Result<Verified, SigError> {
    let authorization = header_str(req.headers, "authorization").ok_or(SigError::Unsigned)?;
    let auth = parse_authorization(authorization)?;
    let amz_date = header_str(req.headers, "x-amz-date").ok_or(SigError::MissingDate)?;
    let at =
        parse_amz_date(amz_date).ok_or_else(|| SigError::MalformedDate(amz_date.to_owned()))?;
    if (at - now_unix).abs() > MAX_SKEW_SECS {
        return Err(SigError::DateSkew {
            amz_date: amz_date.to_owned(),
            skew_secs: at - now_unix,
        });
    }
    let token = header_str(req.headers, "x-amz-security-token").map(str::to_owned);
    let check = Check {
        auth,
        amz_date,
        token,
        kind: AuthKind::Header,
    };
    verify_parsed(req, check, credentials, region)
}

/// Verifies a presigned URL (query-string auth) at `now_unix` for `region`. Refuses a
/// request that also carries `Authorization`.
pub fn verify_query(
    req: &Request<'_>,
    credentials: &Credentials,
    region: &str,
    now_unix: i64,
) -> Result<Verified, SigError> {
    if req.headers.contains_key("authorization") {
        return Err(SigError::HeaderAndQueryAuth);
    }
    let param = |name: &'static str| {
        query_param(req.query, name).ok_or(SigError::MissingQueryParameter(name))
    };
    let algorithm = param("X-Amz-Algorithm")?;
    if algorithm != ALGORITHM {
        return Err(SigError::UnsupportedAlgorithm(algorithm));
    }
    let credential = param("X-Amz-Credential")?;
    let amz_date = param("X-Amz-Date")?;
    let expires = param("X-Amz-Expires")?;
    let signed_headers = param("X-Amz-SignedHeaders")?;
    let signature = param("X-Amz-Signature")?;
    let at = parse_amz_date(&amz_date).ok_or_else(|| SigError::MalformedDate(amz_date.clone()))?;
    let expires_secs = expires
        .parse::<i64>()
        .ok()
        .filter(|e| (1..=MAX_EXPIRES_SECS).contains(e))
        .ok_or_else(|| SigError::MalformedExpires(expires.clone()))?;
    if at - now_unix > MAX_SKEW_SECS {
        return Err(SigError::DateSkew {
            amz_date: amz_date.clone(),
            skew_secs: at - now_unix,
        });
    }
    if now_unix > at + expires_secs {
        return Err(SigError::Expired(now_unix - at - expires_secs));
    }
    let auth = parse_auth(&credential, &signed_headers, &signature)?;
    let check = Check {
        auth,
        amz_date: &amz_date,
        token: query_param(req.query, "X-Amz-Security-Token"),
        kind: AuthKind::Query,
    };
    verify_parsed(req, check, credentials, region)
}

/// Verifies whichever auth the request carries: the presigned query when the query has
/// any presign parameter, else the `Authorization` header.
pub fn verify(
    req: &Request<'_>,
    credentials: &Credentials,
    region: &str,
    now_unix: i64,
) -> Result<Verified, SigError> {
    if is_presigned(req.query) {
        verify_query(req, credentials, region, now_unix)
    } else {
        verify_header(req, credentials, region, now_unix)
    }
}

/// Presigns `ws[s]://<host><path>?<query>` for `host` (the Host header the client will
/// send): appends the `X-Amz-*` parameters and the signature. `query` is raw and must
/// not already carry presign parameters.
#[allow(clippy::too_many_arguments)]
pub fn presign(
    scheme: &str,
    host: &str,
    path: &str,
    query: &str,
    access_key_id: &str,
    credential: &Credential,
    region: &str,
    now_unix: i64,
    expires_secs: i64,
) -> String {
    let amz_date = format_amz_date(now_unix);
    let date = &amz_date[..8];
    let scope = format!("{date}/{region}/{SERVICE}/{TERMINATOR}");
    let enc = |s: &str| uri_encode(s.as_bytes(), false);
    let mut full_query = format!(
        "{query}{}X-Amz-Algorithm={ALGORITHM}&X-Amz-Credential={}&X-Amz-Date={amz_date}\
         &X-Amz-Expires={}&X-Amz-SignedHeaders=host",
        if query.is_empty() { "" } else { "&" },
        enc(&format!("{access_key_id}/{scope}")),
        expires_secs.clamp(1, MAX_EXPIRES_SECS),
    );
    if let Some(token) = &credential.session_token {
        full_query.push_str(&format!("&X-Amz-Security-Token={}", enc(token)));
    }
    let mut headers = HeaderMap::new();
    if let Ok(v) = host.parse() {
        headers.insert("host", v);
    }
    let req = Request {
        method: "GET",
        path,
        query: &full_query,
        headers: &headers,
    };
    // Only `host` is signed and it is set just above, so this cannot fail.
    let creq = canonical_request(&req, &["host"], None).unwrap_or_default();
    let key = signing_key(&credential.secret_access_key, date, region, SERVICE);
    let signature = sign(&key, &string_to_sign(&amz_date, &scope, &creq));
    format!("{scheme}://{host}{path}?{full_query}&X-Amz-Signature={signature}")
}

#[cfg(test)]
mod tests;
