//! The presigned websocket URL of an EC2 Instance Connect Endpoint (EICE) `openTunnel`
//! call, built exactly as aws-cli v2 builds it, as a pure function: credentials, names
//! and the signing time go in, the URL comes out. Nothing here performs IO or reads a
//! clock.
//!
//! Sources, all in `aws/aws-cli` (branch `v2`, revision
//! `73fb33bb171ace3e9eaa03308f76e5de50c21393`; facts sheet §9, "\[C\]"):
//!
//! * `awscli/customizations/ec2instanceconnect/eicesigner.py`, class
//!   `InstanceConnectEndpointRequestSigner`, fn `get_presigned_url`: the URL
//!   `wss://<dns name>/openTunnel?instanceConnectEndpointId=…&remotePort=…&privateIpAddress=…`
//!   plus `maxTunnelDuration` when it is set, method `GET`, the single header
//!   `host: <dns name>`, operation `openTunnel`, `expires_in=60`.
//! * `awscli/customizations/ec2instanceconnect/opentunnel.py`, class `OpenTunnelCommand`,
//!   fn `_validate_parsed_args`: `--max-tunnel-duration` must lie in `1..=3600`; fn
//!   `_run_main`: the private address is the instance's `PrivateIpAddress`, or its
//!   `Ipv6Address` when it has no private IPv4.
//! * `awscli/botocore/signers.py`, class `RequestSigner`, fn `generate_presigned_url`
//!   (signature version `v4` presigned becomes `v4-query`).
//! * `awscli/botocore/auth.py`, class `SigV4QueryAuth`:
//!   * fn `_modify_request_before_signing`: the operation parameters, re-encoded with
//!     `botocore.utils.percent_encode_sequence`, then `&`, then the auth parameters in
//!     the order `X-Amz-Algorithm`, `X-Amz-Credential`, `X-Amz-Date`, `X-Amz-Expires`,
//!     `X-Amz-SignedHeaders` and, when the credentials carry a token (`is not None`),
//!     `X-Amz-Security-Token`;
//!   * fn `_inject_signature_to_request`: `&X-Amz-Signature=<hex>` appended last.
//! * `awscli/botocore/auth.py`, class `SigV4Auth`:
//!   * fn `canonical_request`: `GET`, the path, the canonical query, the canonical
//!     headers, a blank line, the signed headers, the payload hash;
//!   * fn `_canonical_query_string_url`: the already-encoded `key=value` pairs of the
//!     URL query, sorted by (encoded key, encoded value): the `X-Amz-*` keys (uppercase
//!     `X`) sort before the operation's lowercase keys, and `X-Amz-Security-Token` before
//!     `X-Amz-SignedHeaders`;
//!   * fn `headers_to_sign`, `canonical_headers`, `signed_headers`: only `host`, whose
//!     value is the DNS name as given (no port);
//!   * fn `payload` and fn `_should_sha256_sign_payload`: the URL does not start with
//!     `https`, so the payload is hashed: SHA-256 of the empty body (module constant
//!     `EMPTY_SHA256_HASH`), not `UNSIGNED-PAYLOAD`;
//!   * fn `scope`, `credential_scope`, `string_to_sign`, `signature`: the usual SigV4
//!     key derivation `AWS4<secret>` → date → region → service → `aws4_request`, and the
//!     lowercase hex HMAC-SHA256 of the string to sign.
//! * `awscli/botocore/utils.py`, fn `percent_encode` (`SAFE_CHARS = '-_.~'`): every byte
//!   outside the RFC 3986 unreserved set is written `%XX` with uppercase hex, so `/` in
//!   the credential is `%2F`, `:` of an IPv6 address is `%3A`, and a space is `%20`.
//!   (`eicesigner.py` first writes the query with `urllib.parse.urlencode`, but
//!   `SigV4QueryAuth` parses it back with `parse_qs` and re-encodes it with
//!   `percent_encode_sequence`, so only the latter shows.)
//!
//! The service (signing) name `ec2-instance-connect` comes from
//! `awscli/botocore/data/ec2-instance-connect/2018-04-02/service-2.json`
//! (`signingName` / `endpointPrefix`).
//!
//! Test vector: \[C\] `tests/functional/ec2instanceconnect/test_opentunnel.py` fn
//! `test_single_connection_mode`, also golden `eice_presign`. The other vectors in the
//! tests below were produced by running `eicesigner.py` against botocore's
//! `SigV4QueryAuth` with the clock fixed at 2020-01-01T01:01:01Z.

use std::fmt;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::hmac;
use sha2::{Digest, Sha256};
use thiserror::Error;

/// The SigV4 service (signing) name of EICE.
pub const SERVICE: &str = "ec2-instance-connect";
/// The SigV4 algorithm name (`X-Amz-Algorithm`).
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// The path of the websocket URL.
pub const OPEN_TUNNEL_PATH: &str = "/openTunnel";
/// `X-Amz-Expires`: the websocket must be opened within this many seconds of the
/// signing time (`eicesigner.py` fn `get_presigned_url`, `expires_in=60`).
pub const EXPIRES_SECS: u32 = 60;
/// The smallest `maxTunnelDuration` the CLI accepts, in seconds.
pub const MIN_TUNNEL_DURATION_SECS: u32 = 1;
/// The largest `maxTunnelDuration` the CLI accepts, in seconds (also the service's
/// default when the parameter is absent, per the CLI help text).
pub const MAX_TUNNEL_DURATION_SECS: u32 = 3600;
/// The payload hash of the canonical request: lowercase hex SHA-256 of the empty string.
pub const EMPTY_PAYLOAD_SHA256: &str =
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Why a presigned URL cannot be built.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum PresignError {
    /// A required input is the empty string.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// A session token was given but is empty (pass `None` for long-term credentials).
    #[error("the session token is present but empty")]
    EmptySessionToken,
    /// The region is not lowercase letters, digits and `-`.
    #[error("invalid region {0:?}")]
    InvalidRegion(String),
    /// The DNS name is not ASCII letters, digits, `-` and `.` (it must not carry a
    /// scheme, port or path).
    #[error("invalid EICE DNS name {0:?}")]
    InvalidDnsName(String),
    /// The private address is not an IPv4 or IPv6 address.
    #[error("invalid private IP address {0:?}")]
    InvalidPrivateIp(String),
    /// Remote port 0.
    #[error("remote port must not be 0")]
    ZeroRemotePort,
    /// `maxTunnelDuration` outside `1..=3600` (`opentunnel.py` fn `_validate_parsed_args`).
    #[error(
        "max tunnel duration {0} s is outside {MIN_TUNNEL_DURATION_SECS}..={MAX_TUNNEL_DURATION_SECS}"
    )]
    MaxTunnelDurationOutOfRange(u32),
    /// A calendar field is out of range (or the year does not have four digits).
    #[error(
        "invalid UTC date-time {year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}"
    )]
    InvalidDateTime {
        /// Year.
        year: u32,
        /// Month.
        month: u32,
        /// Day of the month.
        day: u32,
        /// Hour.
        hour: u32,
        /// Minute.
        minute: u32,
        /// Second.
        second: u32,
    },
    /// The time is before 1970-01-01 or after 9999-12-31T23:59:59Z.
    #[error("time is outside 1970-01-01T00:00:00Z..=9999-12-31T23:59:59Z")]
    TimeOutOfRange,
}

/// AWS credentials. `Debug` shows the access key id only: the secret key and the session
/// token are redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id (`AKIA…` / `ASIA…`); it is public and appears in the URL.
    pub access_key_id: String,
    /// The secret access key. Secret: it never leaves this module.
    pub secret_access_key: String,
    /// The session token of temporary credentials, sent as `X-Amz-Security-Token`.
    /// Secret: it appears in the URL, so the URL must not be logged.
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// A UTC time with second precision, the form SigV4 signs (`X-Amz-Date`,
/// `yyyymmddThhmmssZ`; botocore `SIGV4_TIMESTAMP = '%Y%m%dT%H%M%SZ'`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AmzDateTime {
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
}

fn is_leap(year: u32) -> bool {
    (year.is_multiple_of(4) && !year.is_multiple_of(100)) || year.is_multiple_of(400)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(year) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day): the
/// `civil_from_days` algorithm of Howard Hinnant, "chrono-Compatible Low-Level Date
/// Algorithms", restricted to days ≥ 0.
fn civil_from_days(days: u64) -> (u64, u32, u32) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March-based
    // Both casts are of values bounded above by 31 and 12.
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

impl AmzDateTime {
    /// A UTC date-time from its calendar fields. The year must have four digits
    /// (`0..=9999`), the other fields their usual ranges (no leap second).
    pub fn new(
        year: u32,
        month: u32,
        day: u32,
        hour: u32,
        minute: u32,
        second: u32,
    ) -> Result<AmzDateTime, PresignError> {
        let valid = year <= 9999
            && (1..=12).contains(&month)
            && (1..=days_in_month(year, month)).contains(&day)
            && hour < 24
            && minute < 60
            && second < 60;
        if !valid {
            return Err(PresignError::InvalidDateTime {
                year,
                month,
                day,
                hour,
                minute,
                second,
            });
        }
        Ok(AmzDateTime {
            year,
            month,
            day,
            hour,
            minute,
            second,
        })
    }

    /// The UTC date-time of `t`, truncated to the second (as `strftime` does).
    ///
    /// Fails for times before the Unix epoch or after year 9999.
    pub fn from_system_time(t: SystemTime) -> Result<AmzDateTime, PresignError> {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .map_err(|_| PresignError::TimeOutOfRange)?
            .as_secs();
        let (year, month, day) = civil_from_days(secs / 86_400);
        let year = u32::try_from(year)
            .ok()
            .filter(|y| *y <= 9999)
            .ok_or(PresignError::TimeOutOfRange)?;
        let tod = secs % 86_400;
        // Each value is below 86400, so the casts cannot truncate.
        AmzDateTime::new(
            year,
            month,
            day,
            (tod / 3600) as u32,
            (tod / 60 % 60) as u32,
            (tod % 60) as u32,
        )
    }

    /// `yyyymmddThhmmssZ`, the `X-Amz-Date` value.
    pub fn amz_date(&self) -> String {
        format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }

    /// `yyyymmdd`, the date of the credential scope.
    pub fn date_stamp(&self) -> String {
        format!("{:04}{:02}{:02}", self.year, self.month, self.day)
    }
}

impl fmt::Display for AmzDateTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.amz_date())
    }
}

/// Formats `t` as a SigV4 `X-Amz-Date` (`yyyymmddThhmmssZ`, UTC, truncated to the
/// second). Shorthand for [`AmzDateTime::from_system_time`] then
/// [`AmzDateTime::amz_date`].
pub fn format_amz_date(t: SystemTime) -> Result<String, PresignError> {
    AmzDateTime::from_system_time(t).map(|d| d.amz_date())
}

/// Everything an `openTunnel` presigned URL depends on.
///
/// `Debug` is safe to log: [`Credentials`] redacts its secrets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenTunnelRequest {
    /// The credentials to sign with.
    pub credentials: Credentials,
    /// The region to sign for, e.g. `us-west-2`.
    pub region: String,
    /// The endpoint's `DnsName` (or `FipsDnsName`) from
    /// `ec2:DescribeInstanceConnectEndpoints`: the URL host and the signed `host` header.
    pub dns_name: String,
    /// The endpoint id, e.g. `eice-0123456789abcdef0` (`instanceConnectEndpointId`).
    pub endpoint_id: String,
    /// The TCP port to reach on the target (`remotePort`; the CLI defaults to 22).
    pub remote_port: u16,
    /// The target's private IPv4, or IPv6, address as text (`privateIpAddress`). Sent as
    /// given, percent-encoded.
    pub private_ip: String,
    /// `maxTunnelDuration` in seconds, `1..=3600`; `None` omits the parameter.
    pub max_tunnel_duration: Option<u32>,
    /// The signing time (`X-Amz-Date`); the URL is valid for [`EXPIRES_SECS`] after it.
    pub time: AmzDateTime,
}

/// Appends `s` percent-encoded as botocore `percent_encode` does: the RFC 3986
/// unreserved characters `A-Z a-z 0-9 - _ . ~` as they are, every other UTF-8 byte as
/// `%XX` with uppercase hex.
fn percent_encode_into(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
}

/// Lowercase hex of `bytes`.
fn hex_lower(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0f)]));
    }
    s
}

fn hmac_sha256(key: &[u8], msg: &str) -> hmac::Tag {
    hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), msg.as_bytes())
}

fn non_empty(value: &str, what: &'static str) -> Result<(), PresignError> {
    if value.is_empty() {
        Err(PresignError::Empty(what))
    } else {
        Ok(())
    }
}

fn validate(req: &OpenTunnelRequest) -> Result<(), PresignError> {
    non_empty(&req.credentials.access_key_id, "access key id")?;
    non_empty(&req.credentials.secret_access_key, "secret access key")?;
    if req.credentials.session_token.as_deref() == Some("") {
        return Err(PresignError::EmptySessionToken);
    }
    non_empty(&req.region, "region")?;
    if !req
        .region
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(PresignError::InvalidRegion(req.region.clone()));
    }
    non_empty(&req.dns_name, "EICE DNS name")?;
    if !req
        .dns_name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(PresignError::InvalidDnsName(req.dns_name.clone()));
    }
    non_empty(&req.endpoint_id, "EICE endpoint id")?;
    non_empty(&req.private_ip, "private IP address")?;
    if req.private_ip.parse::<IpAddr>().is_err() {
        return Err(PresignError::InvalidPrivateIp(req.private_ip.clone()));
    }
    if req.remote_port == 0 {
        return Err(PresignError::ZeroRemotePort);
    }
    if let Some(d) = req.max_tunnel_duration
        && !(MIN_TUNNEL_DURATION_SECS..=MAX_TUNNEL_DURATION_SECS).contains(&d)
    {
        return Err(PresignError::MaxTunnelDurationOutOfRange(d));
    }
    Ok(())
}

/// The query parameters in URL order, each already percent-encoded: the operation's
/// (`eicesigner.py`), then the auth parameters (`SigV4QueryAuth`), without the signature.
fn encoded_query_pairs(req: &OpenTunnelRequest, scope: &str) -> Vec<(String, String)> {
    let port = req.remote_port.to_string();
    let duration = req.max_tunnel_duration.map(|d| d.to_string());
    let credential = format!("{}/{scope}", req.credentials.access_key_id);
    let amz_date = req.time.amz_date();
    let expires = EXPIRES_SECS.to_string();

    let mut raw: Vec<(&str, &str)> = vec![
        ("instanceConnectEndpointId", &req.endpoint_id),
        ("remotePort", &port),
        ("privateIpAddress", &req.private_ip),
    ];
    if let Some(d) = &duration {
        raw.push(("maxTunnelDuration", d));
    }
    raw.extend([
        ("X-Amz-Algorithm", ALGORITHM),
        ("X-Amz-Credential", &credential),
        ("X-Amz-Date", &amz_date),
        ("X-Amz-Expires", &expires),
        ("X-Amz-SignedHeaders", "host"),
    ]);
    if let Some(token) = &req.credentials.session_token {
        raw.push(("X-Amz-Security-Token", token));
    }
    raw.into_iter()
        .map(|(k, v)| {
            let (mut ek, mut ev) = (String::new(), String::new());
            percent_encode_into(&mut ek, k);
            percent_encode_into(&mut ev, v);
            (ek, ev)
        })
        .collect()
}

fn join_pairs<'a>(pairs: impl IntoIterator<Item = &'a (String, String)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The SigV4 canonical request (`SigV4Auth.canonical_request`).
fn canonical_request(dns_name: &str, pairs: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = pairs.iter().collect();
    sorted.sort();
    format!(
        "GET\n{OPEN_TUNNEL_PATH}\n{}\nhost:{dns_name}\n\nhost\n{EMPTY_PAYLOAD_SHA256}",
        join_pairs(sorted)
    )
}

/// Builds the presigned `wss://<dns name>/openTunnel?…` URL that aws-cli's
/// `ec2-instance-connect open-tunnel` opens, byte for byte (see the module docs for
/// every rule and its source).
///
/// The result embeds the session token, if any, and grants access for
/// [`EXPIRES_SECS`] seconds: treat it as a secret and never log it.
pub fn presign_open_tunnel(req: &OpenTunnelRequest) -> Result<String, PresignError> {
    validate(req)?;
    let date = req.time.date_stamp();
    let scope = format!("{date}/{}/{SERVICE}/aws4_request", req.region);
    let pairs = encoded_query_pairs(req, &scope);

    let canonical = canonical_request(&req.dns_name, &pairs);
    let string_to_sign = format!(
        "{ALGORITHM}\n{}\n{scope}\n{}",
        req.time.amz_date(),
        hex_lower(&Sha256::digest(canonical.as_bytes()))
    );

    let secret = format!("AWS4{}", req.credentials.secret_access_key);
    let k_date = hmac_sha256(secret.as_bytes(), &date);
    let k_region = hmac_sha256(k_date.as_ref(), &req.region);
    let k_service = hmac_sha256(k_region.as_ref(), SERVICE);
    let k_signing = hmac_sha256(k_service.as_ref(), "aws4_request");
    let signature = hex_lower(hmac_sha256(k_signing.as_ref(), &string_to_sign).as_ref());

    Ok(format!(
        "wss://{}{OPEN_TUNNEL_PATH}?{}&X-Amz-Signature={signature}",
        req.dns_name,
        join_pairs(&pairs)
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const DNS: &str = "eice-123.ec2-instance-connect-endpoint.us-west-2.amazonaws.com";

    /// The inputs of [C] `test_opentunnel.py` fn `test_single_connection_mode`.
    fn golden() -> OpenTunnelRequest {
        OpenTunnelRequest {
            credentials: Credentials {
                access_key_id: "access_key".into(),
                secret_access_key: "secret_key".into(),
                session_token: None,
            },
            region: "us-west-2".into(),
            dns_name: DNS.into(),
            endpoint_id: "eice-123".into(),
            remote_port: 22,
            private_ip: "10.0.0.0".into(),
            max_tunnel_duration: Some(1),
            time: AmzDateTime::new(2020, 1, 1, 1, 1, 1).unwrap(),
        }
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn aws_cli_functional_test_vector() {
        assert_eq!(
            presign_open_tunnel(&golden()).unwrap(),
            "wss://eice-123.ec2-instance-connect-endpoint.us-west-2.amazonaws.com/openTunnel?\
             instanceConnectEndpointId=eice-123&remotePort=22&privateIpAddress=10.0.0.0&\
             maxTunnelDuration=1&X-Amz-Algorithm=AWS4-HMAC-SHA256&\
             X-Amz-Credential=access_key%2F20200101%2Fus-west-2%2Fec2-instance-connect%2Faws4_request&\
             X-Amz-Date=20200101T010101Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&\
             X-Amz-Signature=3a56740422a5b9aebd22d860b7a30c729e459a6f71a83bc0de3a2b44b7353f28"
        );
    }

    #[test]
    fn session_token_goes_last_in_the_url_but_sorts_before_signed_headers() {
        // Reference output of eicesigner.py + botocore SigV4QueryAuth for this token.
        let mut req = golden();
        req.credentials.session_token = Some("tok/en+=x y".into());
        let url = presign_open_tunnel(&req).unwrap();
        assert_eq!(
            url,
            "wss://eice-123.ec2-instance-connect-endpoint.us-west-2.amazonaws.com/openTunnel?\
             instanceConnectEndpointId=eice-123&remotePort=22&privateIpAddress=10.0.0.0&\
             maxTunnelDuration=1&X-Amz-Algorithm=AWS4-HMAC-SHA256&\
             X-Amz-Credential=access_key%2F20200101%2Fus-west-2%2Fec2-instance-connect%2Faws4_request&\
             X-Amz-Date=20200101T010101Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&\
             X-Amz-Security-Token=tok%2Fen%2B%3Dx%20y&\
             X-Amz-Signature=dfd4b5b873bba2201e35dde32e6b93843016f4adad2095b881432648d2125cf0"
        );

        // botocore's CanonicalRequest debug log for the same inputs.
        let scope = "20200101/us-west-2/ec2-instance-connect/aws4_request";
        let canonical = canonical_request(DNS, &encoded_query_pairs(&req, scope));
        assert_eq!(
            canonical,
            "GET\n/openTunnel\n\
             X-Amz-Algorithm=AWS4-HMAC-SHA256&\
             X-Amz-Credential=access_key%2F20200101%2Fus-west-2%2Fec2-instance-connect%2Faws4_request&\
             X-Amz-Date=20200101T010101Z&X-Amz-Expires=60&X-Amz-Security-Token=tok%2Fen%2B%3Dx%20y&\
             X-Amz-SignedHeaders=host&instanceConnectEndpointId=eice-123&maxTunnelDuration=1&\
             privateIpAddress=10.0.0.0&remotePort=22\n\
             host:eice-123.ec2-instance-connect-endpoint.us-west-2.amazonaws.com\n\n\
             host\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex_lower(&Sha256::digest(canonical.as_bytes())),
            "1084ef2aca1490c6686ae8f2ab1af9a8c2b1503d1711ad06f82a5c5f1f5998bf"
        );
    }

    #[test]
    fn realistic_sts_token_and_other_region() {
        // Reference output of eicesigner.py + botocore SigV4QueryAuth.
        let req = OpenTunnelRequest {
            credentials: Credentials {
                access_key_id: "access_key".into(),
                secret_access_key: "secret_key".into(),
                session_token: Some("FwoGZXIvYXdzEJr//////////wEaDH7Q==".into()),
            },
            region: "eu-west-1".into(),
            dns_name: "eice-0abc.ec2-instance-connect-endpoint.eu-west-1.amazonaws.com".into(),
            endpoint_id: "eice-0abc".into(),
            remote_port: 3306,
            private_ip: "10.1.2.3".into(),
            max_tunnel_duration: Some(3600),
            time: AmzDateTime::from_system_time(at(1_577_840_461)).unwrap(),
        };
        assert_eq!(
            presign_open_tunnel(&req).unwrap(),
            "wss://eice-0abc.ec2-instance-connect-endpoint.eu-west-1.amazonaws.com/openTunnel?\
             instanceConnectEndpointId=eice-0abc&remotePort=3306&privateIpAddress=10.1.2.3&\
             maxTunnelDuration=3600&X-Amz-Algorithm=AWS4-HMAC-SHA256&\
             X-Amz-Credential=access_key%2F20200101%2Feu-west-1%2Fec2-instance-connect%2Faws4_request&\
             X-Amz-Date=20200101T010101Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&\
             X-Amz-Security-Token=FwoGZXIvYXdzEJr%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FwEaDH7Q%3D%3D&\
             X-Amz-Signature=23bdd92b2147dbc61a4d7dba9d8bc7e9a83526e6d16e95ac1b03b66309eaa966"
        );
    }

    #[test]
    fn ipv6_colons_are_percent_encoded_and_duration_can_be_omitted() {
        // Reference output of eicesigner.py + botocore SigV4QueryAuth.
        let mut req = golden();
        req.credentials.access_key_id = "AKIDEXAMPLE".into();
        req.remote_port = 5432;
        req.private_ip = "2600:1f10:4f8e:db01:73f5:6b9d:c0da:1c27".into();
        req.max_tunnel_duration = None;
        assert_eq!(
            presign_open_tunnel(&req).unwrap(),
            "wss://eice-123.ec2-instance-connect-endpoint.us-west-2.amazonaws.com/openTunnel?\
             instanceConnectEndpointId=eice-123&remotePort=5432&\
             privateIpAddress=2600%3A1f10%3A4f8e%3Adb01%3A73f5%3A6b9d%3Ac0da%3A1c27&\
             X-Amz-Algorithm=AWS4-HMAC-SHA256&\
             X-Amz-Credential=AKIDEXAMPLE%2F20200101%2Fus-west-2%2Fec2-instance-connect%2Faws4_request&\
             X-Amz-Date=20200101T010101Z&X-Amz-Expires=60&X-Amz-SignedHeaders=host&\
             X-Amz-Signature=5851fbf4080798862e343cdbccd457e612c97dc73024d872311e36a39e4f3490"
        );
    }

    #[test]
    fn debug_output_redacts_secret_and_token() {
        let mut req = golden();
        req.credentials.secret_access_key = "SUPERSECRETKEY".into();
        req.credentials.session_token = Some("SESSIONTOKENVALUE".into());
        for dbg in [format!("{req:?}"), format!("{:#?}", req.credentials)] {
            assert!(!dbg.contains("SUPERSECRETKEY"), "{dbg}");
            assert!(!dbg.contains("SESSIONTOKENVALUE"), "{dbg}");
            assert!(dbg.contains("access_key"), "{dbg}");
            assert!(dbg.contains("<redacted>"), "{dbg}");
        }
        req.credentials.session_token = None;
        assert!(format!("{:?}", req.credentials).contains("session_token: None"));
    }

    #[test]
    fn inputs_are_validated() {
        let check = |f: fn(&mut OpenTunnelRequest), want: PresignError| {
            let mut req = golden();
            f(&mut req);
            assert_eq!(presign_open_tunnel(&req), Err(want));
        };
        check(
            |r| r.max_tunnel_duration = Some(0),
            PresignError::MaxTunnelDurationOutOfRange(0),
        );
        check(
            |r| r.max_tunnel_duration = Some(3601),
            PresignError::MaxTunnelDurationOutOfRange(3601),
        );
        check(
            |r| r.credentials.access_key_id.clear(),
            PresignError::Empty("access key id"),
        );
        check(
            |r| r.credentials.secret_access_key.clear(),
            PresignError::Empty("secret access key"),
        );
        check(
            |r| r.credentials.session_token = Some(String::new()),
            PresignError::EmptySessionToken,
        );
        check(|r| r.region.clear(), PresignError::Empty("region"));
        check(
            |r| r.region = "us/west".into(),
            PresignError::InvalidRegion("us/west".into()),
        );
        check(|r| r.dns_name.clear(), PresignError::Empty("EICE DNS name"));
        check(
            |r| r.dns_name = "host:443".into(),
            PresignError::InvalidDnsName("host:443".into()),
        );
        check(
            |r| r.endpoint_id.clear(),
            PresignError::Empty("EICE endpoint id"),
        );
        check(
            |r| r.private_ip.clear(),
            PresignError::Empty("private IP address"),
        );
        check(
            |r| r.private_ip = "10.0.0".into(),
            PresignError::InvalidPrivateIp("10.0.0".into()),
        );
        check(|r| r.remote_port = 0, PresignError::ZeroRemotePort);

        let mut req = golden();
        req.max_tunnel_duration = Some(3600);
        assert!(presign_open_tunnel(&req).is_ok());
    }

    #[test]
    fn the_signature_depends_on_every_input() {
        let base = presign_open_tunnel(&golden()).unwrap();
        let sig = |u: &str| u.rsplit_once("X-Amz-Signature=").unwrap().1.to_owned();
        let base_sig = sig(&base);
        let mut variants: Vec<OpenTunnelRequest> = Vec::new();
        let mut r = golden();
        r.credentials.secret_access_key = "secret_kez".into();
        variants.push(r);
        let mut r = golden();
        r.dns_name = DNS.replace("eice-123", "eice-124");
        variants.push(r);
        let mut r = golden();
        r.time = AmzDateTime::new(2020, 1, 1, 1, 1, 2).unwrap();
        variants.push(r);
        let mut r = golden();
        r.remote_port = 23;
        variants.push(r);
        for v in variants {
            assert_ne!(sig(&presign_open_tunnel(&v).unwrap()), base_sig, "{v:?}");
        }
    }

    #[test]
    fn percent_encoding_matches_botocore() {
        let mut s = String::new();
        percent_encode_into(&mut s, "AZaz09-_.~ /:+=%é");
        assert_eq!(s, "AZaz09-_.~%20%2F%3A%2B%3D%25%C3%A9");
        assert_eq!(hex_lower(&[0x00, 0xab, 0xff]), "00abff");
        assert_eq!(hex_lower(&Sha256::digest(b"")), EMPTY_PAYLOAD_SHA256);
    }

    #[test]
    fn amz_date_formats_known_instants() {
        for (secs, want) in [
            (0, "19700101T000000Z"),
            (1_577_840_461, "20200101T010101Z"),
            (951_782_400, "20000229T000000Z"), // leap day of a 400-year century
            (4_107_542_400, "21000301T000000Z"), // 2100 is not a leap year
            (4_107_542_399, "21000228T235959Z"),
            (1_709_251_199, "20240229T235959Z"),
            (253_402_300_799, "99991231T235959Z"),
        ] {
            assert_eq!(format_amz_date(at(secs)).unwrap(), want, "{secs}");
        }
        let t = at(1_577_840_461) + Duration::from_millis(999);
        assert_eq!(format_amz_date(t).unwrap(), "20200101T010101Z");
        let d = AmzDateTime::from_system_time(at(1_577_840_461)).unwrap();
        assert_eq!(d, AmzDateTime::new(2020, 1, 1, 1, 1, 1).unwrap());
        assert_eq!(d.date_stamp(), "20200101");
        assert_eq!(d.to_string(), "20200101T010101Z");
    }

    #[test]
    fn amz_date_rejects_out_of_range_times() {
        assert_eq!(
            format_amz_date(at(253_402_300_800)),
            Err(PresignError::TimeOutOfRange)
        );
        assert_eq!(
            format_amz_date(UNIX_EPOCH - Duration::from_secs(1)),
            Err(PresignError::TimeOutOfRange)
        );
        for (y, mo, d, h, mi, s) in [
            (2021, 2, 29, 0, 0, 0),
            (2100, 2, 29, 0, 0, 0),
            (2020, 13, 1, 0, 0, 0),
            (2020, 0, 1, 0, 0, 0),
            (2020, 4, 31, 0, 0, 0),
            (2020, 1, 0, 0, 0, 0),
            (2020, 1, 1, 24, 0, 0),
            (2020, 1, 1, 0, 60, 0),
            (2020, 1, 1, 0, 0, 60),
            (10_000, 1, 1, 0, 0, 0),
        ] {
            assert!(
                AmzDateTime::new(y, mo, d, h, mi, s).is_err(),
                "{y}-{mo}-{d}"
            );
        }
        assert!(AmzDateTime::new(2000, 2, 29, 23, 59, 59).is_ok());
    }

    #[test]
    fn civil_from_days_agrees_with_a_day_by_day_calendar() {
        let (mut y, mut m, mut d) = (1970u64, 1u32, 1u32);
        for days in 0..800_000u64 {
            assert_eq!(civil_from_days(days), (y, m, d), "day {days}");
            d += 1;
            // y stays below 4200 here, so the cast is exact.
            if d > days_in_month(y as u32, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }
}
