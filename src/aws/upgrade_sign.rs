//! SigV4 signature of the data-channel websocket upgrade, made exactly as the current
//! plugin makes it (1.2.764.0 and later; delta sheet §2).
//!
//! Sources (\[P\] = `aws/session-manager-plugin`):
//! * \[P\] `src/communicator/websocketchannel.go` fn `Open` (IDX commits `040f79d7`,
//!   `0bf03724`, `29db6846`): every dial — first open, its retries, every resume — signs
//!   with `time.Now()`, unless [`is_presigned`] says the URL already carries query auth.
//! * same file, fn `getV4SignatureHeader`: `http.NewRequest("GET", StreamUrl, nil)`
//!   signed with `SignHTTP(ctx, creds, req, sha256(""), "ssmmessages", region, now)`;
//!   the service name is `config.ServiceName` (`src/config/config.go`), the region is
//!   argv\[2\] (the region of the SSM client, not parsed from the URL host).
//! * `aws-sdk-go-v2` `aws/signer/v4/v4.go` fn `setRequiredSigningFields` and `Build`: the
//!   headers added are `X-Amz-Date`, `X-Amz-Security-Token` (temporary credentials
//!   only) and `Authorization`; never `X-Amz-Content-Sha256`. The signed headers are
//!   `host;x-amz-date[;x-amz-security-token]`. The query is form-decoded (`+` is a
//!   space), sorted and re-encoded with `%20`; the path is the escaped path escaped once
//!   more (`@` → `%40`). The URL on the wire stays byte for byte what the service gave.
//!
//! The signing is done by `aws-sigv4` (the SDK's own signer), whose canonical form for
//! non-S3 services is the same as Go's on every point above; the golden tests pin it
//! with the delta sheet's two vectors (made by the plugin's vendored signer) and a third
//! made by botocore.

use std::fmt;
use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    PayloadChecksumKind, SessionTokenMode, SignableBody, SignableRequest, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_types::error::display::DisplayErrorContext;
use thiserror::Error;

/// The SigV4 service name of the data channel (\[P\] `src/config/config.go`
/// `ServiceName`).
pub const SERVICE: &str = "ssmmessages";

/// The query keys whose presence makes a StreamUrl presigned (\[P\]
/// `websocketchannel.go` fn `IsPresignedURL`: any one of them, exact case).
const PRESIGN_KEYS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// Why an upgrade could not be signed.
#[derive(Debug, Error)]
pub enum SignError {
    /// The credential chain gave nothing (not logged in, expired SSO, no IMDS...).
    #[error("cannot resolve AWS credentials to sign the websocket upgrade: {0}")]
    Credentials(String),
    /// The URL or credentials cannot be put into a signed request.
    #[error("cannot sign the websocket upgrade: {0}")]
    Sign(String),
}

/// Headers to add to one upgrade request. `Debug` hides their values.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct UpgradeHeaders(pub Vec<(String, String)>);

impl fmt::Debug for UpgradeHeaders {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

/// True when `url` carries query-string SigV4 auth, in which case the plugin sends no
/// auth header (and, from 1.2.804.0, does not resume).
pub fn is_presigned(url: &str) -> bool {
    let Some((_, query)) = url.split_once('?') else {
        return false;
    };
    let query = query.split('#').next().unwrap_or_default();
    form_keys(query).any(|k| PRESIGN_KEYS.contains(&k.as_ref()))
}

/// The form-decoded keys of a query string (Go's `url.ParseQuery`).
fn form_keys(query: &str) -> impl Iterator<Item = std::borrow::Cow<'_, str>> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split('=').next().unwrap_or_default())
        .map(|k| {
            let spaced = k.replace('+', " ");
            percent_encoding::percent_decode_str(&spaced)
                .decode_utf8_lossy()
                .into_owned()
                .into()
        })
}

/// Signs the upgrade `GET url` for `region` at `time`: the headers to add. Pure: the
/// same inputs give the same bytes (the golden tests rely on it).
pub fn sign_upgrade(
    url: &str,
    region: &str,
    credentials: &Credentials,
    time: SystemTime,
) -> Result<UpgradeHeaders, SignError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| SignError::Sign(format!("invalid stream URL: {e}")))?;
    let host = uri
        .authority()
        .map(|a| a.as_str().rsplit('@').next().unwrap_or_default().to_owned())
        .filter(|h| !h.is_empty())
        .ok_or_else(|| SignError::Sign("the stream URL has no host".into()))?;
    let identity: Identity = credentials.clone().into();
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = PayloadChecksumKind::NoHeader;
    settings.session_token_mode = SessionTokenMode::Include;
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| SignError::Sign(e.to_string()))?
        .into();
    // Go's request has exactly one header before signing: Host, from the URL.
    let signable = SignableRequest::new(
        "GET",
        url,
        std::iter::once(("host", host.as_str())),
        SignableBody::Bytes(&[]),
    )
    .map_err(|e| SignError::Sign(e.to_string()))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| SignError::Sign(e.to_string()))?
        .into_parts();
    Ok(UpgradeHeaders(
        instructions
            .headers()
            .map(|(k, v)| (canonical_case(k), v.to_owned()))
            .collect(),
    ))
}

/// The header names as Go's `http.Header` writes them (`X-Amz-Date`), which is only
/// cosmetic: HTTP header names are case-insensitive.
fn canonical_case(name: &str) -> String {
    name.split('-')
        .map(|part| {
            let mut c = part.chars();
            match c.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + &c.as_str().to_lowercase(),
                None => String::new(),
            }
        })
        .collect::<Vec<_>>()
        .join("-")
}

/// Signs upgrades with credentials resolved afresh at every dial (so a rotation between
/// two resumes is picked up, as \[P\] 1.2.835.0 re-reads them before each resume).
#[derive(Clone)]
pub struct UpgradeSigner {
    region: String,
    provider: SharedCredentialsProvider,
}

impl fmt::Debug for UpgradeSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpgradeSigner")
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl UpgradeSigner {
    /// A signer for the session's region (the SSM client's region) and credentials.
    pub fn new(region: impl Into<String>, provider: SharedCredentialsProvider) -> Self {
        UpgradeSigner {
            region: region.into(),
            provider,
        }
    }

    /// The signing region.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// The headers for one dial of `url` now; none for a presigned URL.
    pub async fn headers_for(&self, url: &str) -> Result<UpgradeHeaders, SignError> {
        if is_presigned(url) {
            return Ok(UpgradeHeaders::default());
        }
        let credentials = self
            .provider
            .provide_credentials()
            .await
            .map_err(|e| SignError::Credentials(DisplayErrorContext(&e).to_string()))?;
        sign_upgrade(url, &self.region, &credentials, SystemTime::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_urls_are_recognised_by_exact_key() {
        assert!(is_presigned(
            "wss://h/v1/data-channel/s?X-Amz-Signature=ab&role=publish_subscribe"
        ));
        assert!(is_presigned("wss://h/p?a=1&X-Amz-Date=20260101T000000Z"));
        assert!(!is_presigned(
            "wss://h/v1/data-channel/s?role=publish_subscribe&cell-number=AA+/="
        ));
        assert!(!is_presigned("wss://h/p?x-amz-signature=lowercase"));
        assert!(!is_presigned("wss://h/p"));
    }

    #[test]
    fn header_names_in_go_case() {
        assert_eq!(
            canonical_case("x-amz-security-token"),
            "X-Amz-Security-Token"
        );
        assert_eq!(canonical_case("authorization"), "Authorization");
    }
}
