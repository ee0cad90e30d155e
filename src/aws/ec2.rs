//! A small client for the EC2 Query API: a generic signed [`Ec2Api::call`] that returns
//! the parsed XML answer, and the typed [`Ec2Api::describe_instances`] on top of it, which
//! resolves a profile's `target_tags` to an instance.
//!
//! It speaks the wire protocol aws-sdk-ec2 speaks, without that crate's build cost: a
//! form-encoded `POST` of `Action=…&Version=2016-11-15&…`, signed with SigV4 (`aws-sigv4`,
//! service `ec2`); XML answers; failures as `<Response><Errors><Error><Code>…`.
//!
//! * Credentials and region: the same [`SdkConfig`] the SSM client uses, so profiles, SSO,
//!   `credential_process` and the environment work alike. Credentials are cached until
//!   five minutes before they expire (15 minutes when they carry no expiry), and dropped
//!   when EC2 rejects them.
//! * Endpoint, as the SDKs choose it: `AWS_ENDPOINT_URL_EC2` (or `endpoint_url` in the
//!   profile's `services` section), else `AWS_ENDPOINT_URL`, else
//!   `https://ec2.{region}.amazonaws.com` (with the FIPS, dual-stack and China variants).
//! * HTTPS: the connector the SSM client uses (rustls with ring and the platform's roots,
//!   and the proxy settings of the environment: `HTTPS_PROXY`, `NO_PROXY`, …).
//! * Limits ([`Ec2Settings`]): connect, read and per-attempt timeouts; up to three
//!   attempts for throttling, 5xx answers and transport failures, with jittered
//!   exponential backoff; answers larger than 32 MiB are refused.
//!
//! On-demand bastions (`launch`): [`Ec2Api::run_instance`] (RunInstances with a
//! `ClientToken`, since `call` retries), [`Ec2Api::terminate_instances`] and
//! [`Ec2Api::instances_with_tags`]. Growing it further: a [`Ec2Api::call`] with the
//! action's parameters and a parser over the returned [`XmlElement`].
//!
//! Nothing here logs credentials, signatures or request bodies.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{SignableBody, SignableRequest, SigningSettings, sign};
use aws_sigv4::sign::v4;
use aws_smithy_async::rt::sleep::TokioSleep;
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::{Connector, tls};
use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::identity::Identity;
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::date_time::{DateTime, Format};
use aws_smithy_types::error::display::DisplayErrorContext;
use aws_types::SdkConfig;
use aws_types::service_config::ServiceConfigKey;
use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST, HeaderName, HeaderValue, USER_AGENT};
use http_body_util::{BodyExt, Limited};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use quick_xml::events::Event;
use thiserror::Error;
use tracing::{Instrument, debug, debug_span};

/// The EC2 API version every request names.
pub const API_VERSION: &str = "2016-11-15";

/// SigV4 signing name of EC2.
const SIGNING_NAME: &str = "ec2";

/// Largest answer accepted (a DescribeInstances page of 1000 instances is a few MiB).
pub const MAX_RESPONSE_BYTES: usize = 32 << 20;

/// Deepest XML nesting accepted (EC2 answers nest about a dozen levels).
pub const MAX_XML_DEPTH: usize = 64;

/// Most DescribeInstances pages followed before giving up.
const MAX_PAGES: usize = 1000;

/// Credentials are refreshed this long before they expire.
const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);

/// Credentials without an expiry are re-read after this long.
const NO_EXPIRY_TTL: Duration = Duration::from_secs(15 * 60);

/// An EC2 call failed; each variant says what the user can do about it.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Ec2Error {
    /// IAM denied the action (`UnauthorizedOperation`, `AccessDenied`): the caller needs
    /// the `ec2:<action>` permission.
    #[error(
        "not authorized to perform ec2:{action} (the caller needs this IAM permission): {message}"
    )]
    AccessDenied {
        /// The API action, e.g. `DescribeInstances`.
        action: String,
        /// EC2's message.
        message: String,
    },
    /// EC2 did not accept the credentials or the signature (`AuthFailure`, an expired
    /// token, `RequestExpired` from a skewed clock).
    #[error("EC2 rejected the credentials ({code}): {message}")]
    AuthFailure {
        /// EC2's error code.
        code: String,
        /// EC2's message.
        message: String,
    },
    /// No credentials could be loaded (none configured, SSO session expired, …).
    #[error("AWS credentials unavailable: {0}")]
    Credentials(String),
    /// EC2 asked us to slow down (`RequestLimitExceeded`); retrying later may succeed.
    #[error("throttled by EC2 ({code}): {message}")]
    Throttled {
        /// EC2's error code.
        code: String,
        /// EC2's message.
        message: String,
    },
    /// Any other error answer.
    #[error("EC2 error {code} (HTTP {status}): {message}")]
    Service {
        /// HTTP status.
        status: u16,
        /// EC2's error code, or `HTTP <status>` when the answer had none.
        code: String,
        /// EC2's message.
        message: String,
    },
    /// EC2 could not be reached, or the connection broke.
    #[error("cannot reach EC2 at {endpoint}: {message}")]
    Transport {
        /// The endpoint URL.
        endpoint: String,
        /// What failed.
        message: String,
    },
    /// No complete answer in time.
    #[error("no answer from EC2 at {endpoint} within {} s", after.as_secs_f64())]
    Timeout {
        /// The endpoint URL.
        endpoint: String,
        /// The time waited.
        after: Duration,
    },
    /// The answer was not the XML the API documents.
    #[error("unexpected answer from EC2: {0}")]
    Malformed(String),
    /// The region or endpoint settings cannot be used.
    #[error("EC2 client not configured: {0}")]
    Config(String),
    /// EC2 has no capacity for the launch right now (`InsufficientInstanceCapacity`,
    /// `InsufficientFreeAddressesInSubnet`, …).
    #[error(
        "EC2 has no capacity for this launch ({code}): {message}; retry later, or pick \
         another instance type or a subnet in another Availability Zone"
    )]
    Capacity {
        /// EC2's error code.
        code: String,
        /// EC2's message.
        message: String,
    },
    /// An account limit was reached (`InstanceLimitExceeded`, `VcpuLimitExceeded`, …).
    #[error(
        "EC2 quota reached ({code}): {message}; raise the EC2 quota (Service Quotas) or \
         pick a smaller instance type"
    )]
    Quota {
        /// EC2's error code.
        code: String,
        /// EC2's message.
        message: String,
    },
    /// A launch setting names something that does not exist or is not valid (subnet,
    /// security group, AMI, launch template, key pair, instance profile, parameter
    /// value).
    #[error(
        "EC2 rejected a launch setting ({code}): {message}; check the profile's subnet, \
         security groups, image, instance type, launch template and instance profile"
    )]
    InvalidParameter {
        /// EC2's error code.
        code: String,
        /// EC2's message.
        message: String,
    },
}

impl Ec2Error {
    /// True when the same call may succeed if retried a little later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Ec2Error::Throttled { .. } | Ec2Error::Transport { .. } | Ec2Error::Timeout { .. } => {
                true
            }
            Ec2Error::Service { status, code, .. } => {
                *status >= 500
                    || matches!(
                        code.as_str(),
                        "InternalError" | "InternalFailure" | "ServiceUnavailable" | "Unavailable"
                    )
            }
            _ => false,
        }
    }

    /// Maps an error answer (`code`, `message`) of `action` to a variant: the single
    /// place where EC2 error codes are interpreted. `InvalidParameter` is only for
    /// RunInstances (elsewhere such a code is a bug of ours, kept as `Service`).
    pub fn from_code(action: &str, status: u16, code: &str, message: &str) -> Ec2Error {
        let (code, message) = (code.to_owned(), message.to_owned());
        match code.as_str() {
            "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => {
                Ec2Error::AccessDenied {
                    action: action.to_owned(),
                    message,
                }
            }
            "AuthFailure"
            | "InvalidClientTokenId"
            | "InvalidAccessKeyId"
            | "SignatureDoesNotMatch"
            | "IncompleteSignature"
            | "MissingAuthenticationToken"
            | "ExpiredToken"
            | "ExpiredTokenException"
            | "UnrecognizedClientException" => Ec2Error::AuthFailure { code, message },
            "RequestExpired" => Ec2Error::AuthFailure {
                code,
                message: format!("{message} (is the system clock correct?)"),
            },
            "RequestLimitExceeded"
            | "Throttling"
            | "ThrottlingException"
            | "RequestThrottled"
            | "RequestThrottledException"
            | "TooManyRequestsException"
            | "EC2ThrottledException"
            | "SlowDown"
            | "PriorRequestNotComplete"
            | "BandwidthLimitExceeded" => Ec2Error::Throttled { code, message },
            c if is_capacity_code(c) => Ec2Error::Capacity { code, message },
            c if is_quota_code(c) => Ec2Error::Quota { code, message },
            c if action == "RunInstances" && is_invalid_parameter_code(c) => {
                Ec2Error::InvalidParameter { code, message }
            }
            _ => Ec2Error::Service {
                status,
                code,
                message,
            },
        }
    }
}

/// EC2 is out of capacity for the request (in that Availability Zone, for now).
fn is_capacity_code(code: &str) -> bool {
    (code.starts_with("Insufficient") && code.ends_with("Capacity"))
        || matches!(
            code,
            "InsufficientFreeAddressesInSubnet" | "InsufficientCapacityOnHost"
        )
}

/// An account limit; request-rate limits are throttling and matched before this.
fn is_quota_code(code: &str) -> bool {
    code.ends_with("LimitExceeded") || code == "MaxSpotInstanceCountExceeded"
}

/// A parameter of the request names nothing that exists, or is malformed.
fn is_invalid_parameter_code(code: &str) -> bool {
    const PREFIXES: &[&str] = &[
        "InvalidSubnetID.",
        "InvalidSubnet.",
        "InvalidGroup.",
        "InvalidGroupId.",
        "InvalidSecurityGroupID.",
        "InvalidAMIID.",
        "InvalidLaunchTemplateName.",
        "InvalidLaunchTemplateId.",
        "InvalidKeyPair.",
        "InvalidUserData.",
        "InvalidBlockDeviceMapping",
        "InvalidInstanceType",
        "InvalidIamInstanceProfile",
    ];
    matches!(
        code,
        "InvalidParameterValue"
            | "InvalidParameterCombination"
            | "InvalidParameter"
            | "MissingParameter"
            | "InvalidSubnet"
            | "Unsupported"
            | "NoSuchEntity"
    ) || PREFIXES.iter().any(|p| code.starts_with(p))
}

// ---------------------------------------------------------------------------------------
// XML

/// One element of a parsed XML document.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XmlElement {
    /// Local name (any namespace prefix dropped).
    pub name: String,
    /// Character data directly inside the element, entities resolved, whitespace kept.
    pub text: String,
    /// Child elements in document order.
    pub children: Vec<XmlElement>,
}

impl XmlElement {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&XmlElement> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a XmlElement> {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The text of the first child named `name`.
    pub fn child_text(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }

    /// The element at `path` of child names below this one.
    pub fn path(&self, path: &[&str]) -> Option<&XmlElement> {
        path.iter().try_fold(self, |el, name| el.child(name))
    }

    /// The `<item>` children of the child list `set`, as EC2 writes lists
    /// (`<tagSet><item>…</item></tagSet>`); empty when `set` is absent.
    pub fn items<'a>(&'a self, set: &str) -> impl Iterator<Item = &'a XmlElement> {
        self.child(set)
            .into_iter()
            .flat_map(|s| s.children_named("item"))
    }

    /// The first element named `name` in this subtree (depth first, this one included).
    pub fn find(&self, name: &str) -> Option<&XmlElement> {
        if self.name == name {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name))
    }
}

fn local_name(name: &str) -> String {
    name.rsplit(':').next().unwrap_or(name).to_owned()
}

/// Parses an XML document into its root element. Checks that tags nest and match, that
/// there is exactly one root, and that entity references are the predefined ones or
/// character references; comments, processing instructions and the declaration are
/// skipped. Never panics.
pub fn parse_xml(text: &str) -> Result<XmlElement, Ec2Error> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().check_end_names = true;
    let mut stack: Vec<XmlElement> = Vec::new();
    let mut root: Option<XmlElement> = None;
    fn attach(
        stack: &mut [XmlElement],
        root: &mut Option<XmlElement>,
        el: XmlElement,
    ) -> Result<(), Ec2Error> {
        match stack.last_mut() {
            Some(parent) => parent.children.push(el),
            None if root.is_none() => *root = Some(el),
            None => return Err(Ec2Error::Malformed("more than one root element".into())),
        }
        Ok(())
    }
    let outside = |what: &str| Ec2Error::Malformed(format!("{what} outside the root element"));
    loop {
        let event = reader.read_event().map_err(|e| {
            Ec2Error::Malformed(format!(
                "XML error at byte {}: {e}",
                reader.error_position()
            ))
        })?;
        match event {
            Event::Start(e) => {
                if root.is_some() {
                    return Err(outside("an element"));
                }
                if stack.len() >= MAX_XML_DEPTH {
                    return Err(Ec2Error::Malformed(format!(
                        "elements nested deeper than {MAX_XML_DEPTH}"
                    )));
                }
                stack.push(XmlElement {
                    name: local_name(e.name().as_ref()),
                    ..XmlElement::default()
                });
            }
            Event::Empty(e) => {
                let el = XmlElement {
                    name: local_name(e.name().as_ref()),
                    ..XmlElement::default()
                };
                attach(&mut stack, &mut root, el)?;
            }
            Event::End(_) => {
                let el = stack
                    .pop()
                    .ok_or_else(|| Ec2Error::Malformed("a closing tag without opening".into()))?;
                attach(&mut stack, &mut root, el)?;
            }
            Event::Text(t) => {
                let content = t.xml10_content();
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&content),
                    None if content.trim().is_empty() => {}
                    None => return Err(outside("text")),
                }
            }
            Event::CData(c) => match stack.last_mut() {
                Some(top) => top.text.push_str(&c.xml10_content()),
                None => return Err(outside("CDATA")),
            },
            Event::GeneralRef(r) => {
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(ch)) => ch.to_string(),
                    Ok(None) => {
                        let name = r.xml10_content();
                        quick_xml::escape::resolve_predefined_entity(&name)
                            .ok_or_else(|| Ec2Error::Malformed(format!("unknown entity &{name};")))?
                            .to_owned()
                    }
                    Err(e) => return Err(Ec2Error::Malformed(format!("bad reference: {e}"))),
                };
                match stack.last_mut() {
                    Some(top) => top.text.push_str(&resolved),
                    None => return Err(outside("a reference")),
                }
            }
            Event::Eof => break,
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
        }
    }
    if let Some(open) = stack.last() {
        return Err(Ec2Error::Malformed(format!(
            "the document ends inside <{}>",
            open.name
        )));
    }
    root.ok_or_else(|| Ec2Error::Malformed("no XML element in the answer".into()))
}

/// Interprets an answer to `action`: the parsed `<{action}Response>` root for a success,
/// the mapped [`Ec2Error`] for an error document (or for a failure status without one).
pub fn interpret_response(action: &str, status: u16, body: &[u8]) -> Result<XmlElement, Ec2Error> {
    let text = std::str::from_utf8(body);
    if !(200..300).contains(&status) {
        let doc = text.ok().and_then(|t| parse_xml(t).ok());
        if let Some(err) = doc.as_ref().and_then(|d| d.find("Error")) {
            let code = err.child_text("Code").map(str::trim).unwrap_or_default();
            if !code.is_empty() {
                let message = err.child_text("Message").map(str::trim).unwrap_or_default();
                return Err(Ec2Error::from_code(action, status, code, message));
            }
        }
        return Err(Ec2Error::Service {
            status,
            code: format!("HTTP {status}"),
            message: summary(body),
        });
    }
    let text = text.map_err(|_| Ec2Error::Malformed("the answer is not UTF-8".into()))?;
    let root = parse_xml(text)?;
    let expected = format!("{action}Response");
    if root.name != expected {
        return Err(Ec2Error::Malformed(format!(
            "expected <{expected}>, got <{}>",
            root.name
        )));
    }
    Ok(root)
}

/// The start of a body for an error message: printable characters only, at most 200.
fn summary(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    if text.chars().count() > 200 {
        out.push('…');
    }
    if out.trim().is_empty() {
        "empty answer".to_owned()
    } else {
        out
    }
}

// ---------------------------------------------------------------------------------------
// Requests

/// The characters the Query protocol leaves unencoded: RFC 3986's unreserved set.
const QUERY_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The form body of a call: `Action`, `Version`, then `params` in order, each name and
/// value percent-encoded.
pub fn encode_form(action: &str, params: &[(String, String)]) -> String {
    let mut out = format!(
        "Action={}&Version={API_VERSION}",
        utf8_percent_encode(action, QUERY_ESCAPE)
    );
    for (name, value) in params {
        out.push('&');
        out.extend(utf8_percent_encode(name, QUERY_ESCAPE));
        out.push('=');
        out.extend(utf8_percent_encode(value, QUERY_ESCAPE));
    }
    out
}

/// A DescribeInstances filter: `name` matches any of `values`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Filter name, e.g. `tag:Name` or `instance-state-name`.
    pub name: String,
    /// Accepted values (EC2 treats `*` and `?` in them as wildcards).
    pub values: Vec<String>,
}

impl Filter {
    /// A filter on `name` with `values`.
    pub fn new(
        name: impl Into<String>,
        values: impl IntoIterator<Item = impl Into<String>>,
    ) -> Filter {
        Filter {
            name: name.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }

    /// Instances whose tag `key` is exactly `value` (wildcard characters escaped).
    pub fn tag_equals(key: &str, value: &str) -> Filter {
        Filter::new(format!("tag:{key}"), [escape_filter_value(value)])
    }
}

/// Escapes EC2's filter wildcards (`*`, `?`) and the escape character itself, so the
/// value matches literally.
pub fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '*' | '?' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `Filter.N.Name` / `Filter.N.Value.M` parameters for `filters`.
pub fn filter_params(filters: &[Filter]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (n, f) in filters.iter().enumerate() {
        let n = n + 1;
        out.push((format!("Filter.{n}.Name"), f.name.clone()));
        for (m, v) in f.values.iter().enumerate() {
            out.push((format!("Filter.{n}.Value.{}", m + 1), v.clone()));
        }
    }
    out
}

/// The filters for running instances that carry every tag in `tags` (exact values).
pub fn running_with_tags_filters(tags: &BTreeMap<String, String>) -> Vec<Filter> {
    tags_and_states_filters(tags, &["running"])
}

/// The filters for instances that carry every tag in `tags` (exact values) and are in
/// one of `states` (no state filter when empty).
pub fn tags_and_states_filters(tags: &BTreeMap<String, String>, states: &[&str]) -> Vec<Filter> {
    let mut filters: Vec<Filter> = tags.iter().map(|(k, v)| Filter::tag_equals(k, v)).collect();
    if !states.is_empty() {
        filters.push(Filter::new("instance-state-name", states.iter().copied()));
    }
    filters
}

/// Signs `request` (whose body is `body`) with SigV4 for `service` in `region` at
/// `time`: adds `x-amz-date`, `Authorization` and, for temporary credentials,
/// `x-amz-security-token`, all marked sensitive. Every header already on the request is
/// signed except `User-Agent`.
pub fn sign_request<B>(
    request: &mut http::Request<B>,
    body: &[u8],
    credentials: &Credentials,
    region: &str,
    service: &str,
    time: SystemTime,
) -> Result<(), Ec2Error> {
    let identity: Identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(service)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| Ec2Error::Config(format!("cannot sign the request: {e}")))?
        .into();
    let mut headers = Vec::with_capacity(request.headers().len());
    for (name, value) in request.headers() {
        let value = value.to_str().map_err(|_| {
            Ec2Error::Config(format!("header {name} is not printable ASCII; cannot sign"))
        })?;
        headers.push((name.as_str(), value));
    }
    let uri = request.uri().to_string();
    let signable = SignableRequest::new(
        request.method().as_str(),
        uri.as_str(),
        headers.into_iter(),
        SignableBody::Bytes(body),
    )
    .map_err(|e| Ec2Error::Config(format!("cannot sign the request: {e}")))?;
    let (instructions, _signature) = sign(signable, &params)
        .map_err(|e| Ec2Error::Config(format!("cannot sign the request: {e}")))?
        .into_parts();
    let added: Vec<(String, String)> = instructions
        .headers()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    for (name, value) in added {
        let name = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| Ec2Error::Config(format!("signer produced a bad header name {name}")))?;
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            Ec2Error::Credentials(format!(
                "the credentials contain characters not allowed in the {name} header"
            ))
        })?;
        value.set_sensitive(true);
        request.headers_mut().insert(name, value);
    }
    Ok(())
}

/// Where requests go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// The URL as configured.
    pub url: String,
    uri: http::Uri,
    host: String,
}

impl Endpoint {
    /// Parses an `http://` or `https://` URL (a path is kept; a query is refused).
    pub fn parse(url: &str) -> Result<Endpoint, Ec2Error> {
        let bad = |why: &str| Ec2Error::Config(format!("EC2 endpoint URL {url:?}: {why}"));
        let uri: http::Uri = url.trim().parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http" | "https") => {}
            _ => return Err(bad("the scheme must be http or https")),
        }
        let host = uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| bad("no host"))?;
        if host.contains('@') {
            return Err(bad("user information is not supported"));
        }
        if uri.query().is_some() {
            return Err(bad("a query string is not supported"));
        }
        Ok(Endpoint {
            url: url.trim().to_owned(),
            uri,
            host,
        })
    }

    /// The request target: the URL with `/` for an empty path.
    fn request_uri(&self) -> String {
        let path = match self.uri.path() {
            "" => "/",
            p => p,
        };
        format!(
            "{}://{}{path}",
            self.uri.scheme_str().unwrap_or("https"),
            self.host
        )
    }
}

/// The EC2 endpoint for `config`, resolved as the AWS SDKs do: an endpoint set in code
/// wins; then `AWS_ENDPOINT_URL_EC2` or the profile's `services` `ec2 = endpoint_url`;
/// then `AWS_ENDPOINT_URL` or the profile's `endpoint_url`; else the public endpoint of
/// `region` (honouring `use_fips` and `use_dual_stack`).
pub fn resolve_endpoint(config: &SdkConfig, region: &str) -> Result<String, Ec2Error> {
    let configured = if config.get_origin("endpoint_url").is_client_config() {
        config.endpoint_url().map(str::to_owned)
    } else {
        let service_specific = ServiceConfigKey::builder()
            .service_id("EC2")
            .env("AWS_ENDPOINT_URL")
            .profile("endpoint_url")
            .build()
            .ok()
            .and_then(|key| config.service_config().and_then(|c| c.load_config(key)));
        service_specific.or_else(|| config.endpoint_url().map(str::to_owned))
    };
    if let Some(url) = configured.filter(|u| !u.trim().is_empty()) {
        return Ok(url);
    }
    Ok(default_endpoint(
        region,
        config.use_fips().unwrap_or(false),
        config.use_dual_stack().unwrap_or(false),
    ))
}

/// `https://ec2[-fips].{region}.{amazonaws.com | api.aws}` (`.com.cn` in China).
pub fn default_endpoint(region: &str, fips: bool, dual_stack: bool) -> String {
    let china = region.starts_with("cn-");
    let suffix = match (dual_stack, china) {
        (false, false) => "amazonaws.com",
        (false, true) => "amazonaws.com.cn",
        (true, false) => "api.aws",
        (true, true) => "api.amazonwebservices.com.cn",
    };
    let service = if fips { "ec2-fips" } else { "ec2" };
    format!("https://{service}.{region}.{suffix}")
}

fn valid_region(region: &str) -> bool {
    !region.is_empty()
        && region.len() <= 64
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

// ---------------------------------------------------------------------------------------
// The client

/// Timeouts and retries of an [`Ec2Api`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Settings {
    /// TCP and TLS connection setup. Default 5 s.
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of an answer. Default 10 s.
    pub read_timeout: Duration,
    /// One attempt, from sending to the whole answer. Default 15 s.
    pub attempt_timeout: Duration,
    /// Loading credentials (SSO refresh, `credential_process`). Default 30 s.
    pub credentials_timeout: Duration,
    /// Attempts per call, the first included. Default 3.
    pub max_attempts: u32,
    /// Backoff before the first retry, doubled for each further one (with jitter, capped
    /// at 5 s). Default 200 ms.
    pub initial_backoff: Duration,
}

impl Default for Ec2Settings {
    fn default() -> Self {
        Ec2Settings {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            attempt_timeout: Duration::from_secs(15),
            credentials_timeout: Duration::from_secs(30),
            max_attempts: 3,
            initial_backoff: Duration::from_millis(200),
        }
    }
}

struct CachedCredentials {
    credentials: Credentials,
    fetched: Instant,
}

impl CachedCredentials {
    fn fresh(&self) -> bool {
        match self.credentials.expiry() {
            Some(expiry) => expiry > SystemTime::now() + REFRESH_BEFORE_EXPIRY,
            None => self.fetched.elapsed() < NO_EXPIRY_TTL,
        }
    }
}

struct ApiInner {
    endpoint: Endpoint,
    region: String,
    provider: SharedCredentialsProvider,
    cached: tokio::sync::Mutex<Option<CachedCredentials>>,
    connector: Connector,
    settings: Ec2Settings,
}

/// The EC2 API of one account and region. Cheap to clone; clones share the connection
/// pool and the credentials cache.
#[derive(Clone)]
pub struct Ec2Api {
    inner: Arc<ApiInner>,
}

impl fmt::Debug for Ec2Api {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ec2Api")
            .field("endpoint", &self.inner.endpoint.url)
            .field("region", &self.inner.region)
            .finish_non_exhaustive()
    }
}

/// A page of DescribeInstances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DescribeInstancesPage {
    /// The instances of every reservation on the page.
    pub instances: Vec<Instance>,
    /// The token for the next page; `None` on the last one.
    pub next_token: Option<String>,
}

/// What DescribeInstances says about one instance (the fields bastion uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    /// `i-…`.
    pub id: String,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down` or `terminated`.
    pub state: String,
    /// `launchTime`, when present and parseable.
    pub launch_time: Option<SystemTime>,
    /// E.g. `t3.micro`.
    pub instance_type: Option<String>,
    /// Primary private IPv4 address.
    pub private_ip: Option<String>,
    /// Availability Zone.
    pub availability_zone: Option<String>,
    /// The instance's tags.
    pub tags: BTreeMap<String, String>,
}

impl Instance {
    /// `launch_time` as ISO 8601, or `unknown`.
    pub fn launch_time_text(&self) -> String {
        self.launch_time
            .and_then(|t| DateTime::from(t).fmt(Format::DateTime).ok())
            .unwrap_or_else(|| "unknown".to_owned())
    }
}

fn parse_instance(item: &XmlElement) -> Result<Instance, Ec2Error> {
    let text = |name: &str| {
        item.child_text(name)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
    };
    let id = text("instanceId").ok_or_else(|| {
        Ec2Error::Malformed("an instance in DescribeInstances has no instanceId".into())
    })?;
    let state = item
        .path(&["instanceState", "name"])
        .map(|n| n.text.trim().to_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| Ec2Error::Malformed(format!("instance {id} has no instanceState")))?;
    let launch_time = text("launchTime")
        .and_then(|t| DateTime::from_str(&t, Format::DateTime).ok())
        .and_then(|t| SystemTime::try_from(t).ok());
    let mut tags = BTreeMap::new();
    for tag in item.items("tagSet") {
        if let Some(key) = tag.child_text("key") {
            tags.insert(
                key.to_owned(),
                tag.child_text("value").unwrap_or_default().to_owned(),
            );
        }
    }
    Ok(Instance {
        id,
        state,
        launch_time,
        instance_type: text("instanceType"),
        private_ip: text("privateIpAddress"),
        availability_zone: item
            .path(&["placement", "availabilityZone"])
            .map(|a| a.text.trim().to_owned())
            .filter(|s| !s.is_empty()),
        tags,
    })
}

/// Reads a `<DescribeInstancesResponse>`: the instances of every
/// `reservationSet/item/instancesSet/item`, and `nextToken`.
pub fn parse_describe_instances(root: &XmlElement) -> Result<DescribeInstancesPage, Ec2Error> {
    if root.name != "DescribeInstancesResponse" {
        return Err(Ec2Error::Malformed(format!(
            "expected <DescribeInstancesResponse>, got <{}>",
            root.name
        )));
    }
    let mut instances = Vec::new();
    for reservation in root.items("reservationSet") {
        for item in reservation.items("instancesSet") {
            instances.push(parse_instance(item)?);
        }
    }
    let next_token = root
        .child_text("nextToken")
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned);
    Ok(DescribeInstancesPage {
        instances,
        next_token,
    })
}

/// Orders tag-matched instances for choosing one: the most recently launched first (a
/// missing launch time counts as oldest), equal times by instance id; duplicates dropped.
pub fn order_candidates(instances: &mut Vec<Instance>) {
    instances.sort_by(|a, b| {
        b.launch_time
            .cmp(&a.launch_time)
            .then_with(|| a.id.cmp(&b.id))
    });
    instances.dedup_by(|a, b| a.id == b.id);
}

impl Ec2Api {
    /// A client for the region, credentials and endpoint settings of `config`, with
    /// [`Ec2Settings::default`].
    pub fn new(config: &SdkConfig) -> Result<Ec2Api, Ec2Error> {
        Ec2Api::with_settings(config, Ec2Settings::default())
    }

    /// [`Ec2Api::new`] with explicit timeouts and retries.
    pub fn with_settings(config: &SdkConfig, settings: Ec2Settings) -> Result<Ec2Api, Ec2Error> {
        let region = config.region().map(|r| r.as_ref().to_owned()).ok_or_else(|| {
            Ec2Error::Config(
                "no AWS region: set `region` in the profile, AWS_REGION, or region in the AWS profile"
                    .into(),
            )
        })?;
        if !valid_region(&region) {
            return Err(Ec2Error::Config(format!("invalid region {region:?}")));
        }
        let provider = config
            .credentials_provider()
            .ok_or_else(|| Ec2Error::Credentials("no credentials provider is configured".into()))?;
        let endpoint = Endpoint::parse(&resolve_endpoint(config, &region)?)?;
        super::install_crypto_provider();
        let connector = Connector::builder()
            .connector_settings(
                HttpConnectorSettings::builder()
                    .connect_timeout(settings.connect_timeout)
                    .read_timeout(settings.read_timeout)
                    .build(),
            )
            .sleep_impl(TokioSleep::new())
            .proxy_config(ProxyConfig::from_env())
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build();
        Ok(Ec2Api {
            inner: Arc::new(ApiInner {
                endpoint,
                region,
                provider,
                cached: tokio::sync::Mutex::new(None),
                connector,
                settings,
            }),
        })
    }

    /// The region calls go to.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// The endpoint URL calls go to.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint.url
    }

    async fn credentials(&self) -> Result<Credentials, Ec2Error> {
        let mut slot = self.inner.cached.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| c.fresh()) {
            return Ok(c.credentials.clone());
        }
        let timeout = self.inner.settings.credentials_timeout;
        let credentials = tokio::time::timeout(timeout, self.inner.provider.provide_credentials())
            .await
            .map_err(|_| {
                Ec2Error::Credentials(format!(
                    "the credentials provider did not answer within {} s",
                    timeout.as_secs()
                ))
            })?
            .map_err(|e| Ec2Error::Credentials(DisplayErrorContext(&e).to_string()))?;
        *slot = Some(CachedCredentials {
            credentials: credentials.clone(),
            fetched: Instant::now(),
        });
        Ok(credentials)
    }

    /// The HTTP request for a form `body`, signed at `time`.
    fn request_at(
        &self,
        body: &str,
        credentials: &Credentials,
        time: SystemTime,
    ) -> Result<http::Request<SdkBody>, Ec2Error> {
        let endpoint = &self.inner.endpoint;
        let mut request = http::Request::builder()
            .method("POST")
            .uri(endpoint.request_uri())
            .header(HOST, endpoint.host.as_str())
            .header(
                CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header(USER_AGENT, concat!("bastion/", env!("CARGO_PKG_VERSION")))
            .body(SdkBody::from(body.to_owned()))
            .map_err(|e| Ec2Error::Config(format!("cannot build the request: {e}")))?;
        sign_request(
            &mut request,
            body.as_bytes(),
            credentials,
            &self.inner.region,
            SIGNING_NAME,
            time,
        )?;
        Ok(request)
    }

    async fn send(&self, request: http::Request<SdkBody>) -> Result<(u16, Bytes), Ec2Error> {
        let endpoint = &self.inner.endpoint.url;
        let request = HttpRequest::try_from(request)
            .map_err(|e| Ec2Error::Config(format!("cannot build the request: {e}")))?;
        let response = self.inner.connector.call(request).await.map_err(|e| {
            if e.is_timeout() {
                Ec2Error::Timeout {
                    endpoint: endpoint.clone(),
                    after: self.inner.settings.read_timeout,
                }
            } else {
                Ec2Error::Transport {
                    endpoint: endpoint.clone(),
                    message: DisplayErrorContext(&e).to_string(),
                }
            }
        })?;
        let status = response.status().as_u16();
        let body = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    Ec2Error::Malformed(format!("answer larger than {MAX_RESPONSE_BYTES} bytes"))
                } else {
                    Ec2Error::Transport {
                        endpoint: endpoint.clone(),
                        message: format!("reading the answer: {e}"),
                    }
                }
            })?
            .to_bytes();
        Ok((status, body))
    }

    async fn attempt(&self, action: &str, body: &str) -> Result<XmlElement, Ec2Error> {
        let credentials = self.credentials().await?;
        let request = self.request_at(body, &credentials, SystemTime::now())?;
        let started = Instant::now();
        let after = self.inner.settings.attempt_timeout;
        let (status, bytes) = tokio::time::timeout(after, self.send(request))
            .await
            .map_err(|_| Ec2Error::Timeout {
                endpoint: self.inner.endpoint.url.clone(),
                after,
            })??;
        debug!(
            status,
            bytes = bytes.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "EC2 answered"
        );
        interpret_response(action, status, &bytes)
    }

    fn backoff(&self, retry: u32) -> Duration {
        let base = self
            .inner
            .settings
            .initial_backoff
            .saturating_mul(1 << retry.min(16))
            .min(Duration::from_secs(5));
        // Jitter in [50 %, 100 %] so that concurrent callers spread out.
        base.mul_f64(0.5 + fastrand::f64() / 2.0)
    }

    /// Calls `action` with `params` (names and values as the API documents them, e.g.
    /// `("Filter.1.Name", "tag:Name")`) and returns the root of the answer,
    /// `<{action}Response>`. Retries throttling, 5xx answers and transport failures.
    pub async fn call(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<XmlElement, Ec2Error> {
        let body = encode_form(action, params);
        let span = debug_span!("ec2", action, endpoint = %self.inner.endpoint.url);
        async {
            let mut attempt = 1;
            loop {
                match self.attempt(action, &body).await {
                    Err(e) if e.is_retryable() && attempt < self.inner.settings.max_attempts => {
                        let delay = self.backoff(attempt - 1);
                        debug!(attempt, error = %e, delay_ms = delay.as_millis() as u64, "retrying");
                        tokio::time::sleep(delay).await;
                        attempt += 1;
                    }
                    Err(e) => {
                        if matches!(e, Ec2Error::AuthFailure { .. }) {
                            // Maybe rotated or revoked: load them afresh next time.
                            *self.inner.cached.lock().await = None;
                        }
                        debug!(attempt, error = %e, "EC2 call failed");
                        return Err(e);
                    }
                    Ok(root) => return Ok(root),
                }
            }
        }
        .instrument(span)
        .await
    }

    /// One page of DescribeInstances with `filters`; `page_size` is `MaxResults`
    /// (5 to 1000; `None` lets EC2 choose).
    pub async fn describe_instances_page(
        &self,
        filters: &[Filter],
        page_size: Option<u32>,
        next_token: Option<&str>,
    ) -> Result<DescribeInstancesPage, Ec2Error> {
        let mut params = filter_params(filters);
        if let Some(n) = page_size {
            params.push(("MaxResults".into(), n.clamp(5, 1000).to_string()));
        }
        if let Some(t) = next_token {
            params.push(("NextToken".into(), t.to_owned()));
        }
        let root = self.call("DescribeInstances", &params).await?;
        parse_describe_instances(&root)
    }

    /// Every instance matching `filters` (AND across filters, OR across one filter's
    /// values), following `nextToken` through all pages.
    pub async fn describe_instances(&self, filters: &[Filter]) -> Result<Vec<Instance>, Ec2Error> {
        self.describe_instances_paged(filters, None).await
    }

    /// [`Ec2Api::describe_instances`] with `MaxResults` = `page_size`.
    pub async fn describe_instances_paged(
        &self,
        filters: &[Filter],
        page_size: Option<u32>,
    ) -> Result<Vec<Instance>, Ec2Error> {
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let page = self
                .describe_instances_page(filters, page_size, token.as_deref())
                .await?;
            all.extend(page.instances);
            match page.next_token {
                None => return Ok(all),
                Some(next) if token.as_deref() == Some(next.as_str()) => {
                    return Err(Ec2Error::Malformed(
                        "DescribeInstances returned the same nextToken twice".into(),
                    ));
                }
                Some(next) => token = Some(next),
            }
        }
        Err(Ec2Error::Malformed(format!(
            "DescribeInstances did not end within {MAX_PAGES} pages"
        )))
    }

    /// The running instances that carry every tag in `tags` with exactly that value,
    /// ordered by [`order_candidates`] (most recently launched first). The match is
    /// re-checked here, so an endpoint that ignored a filter cannot select a wrong host.
    pub async fn running_instances_with_tags(
        &self,
        tags: &BTreeMap<String, String>,
    ) -> Result<Vec<Instance>, Ec2Error> {
        self.instances_with_tags(tags, &["running"]).await
    }

    /// The instances that carry every tag in `tags` with exactly that value and whose
    /// state is one of `states` (any state when empty), across all pages of
    /// DescribeInstances, ordered by [`order_candidates`] (newest first). The match is
    /// re-checked here, so an endpoint that ignored a filter cannot select a wrong one.
    pub async fn instances_with_tags(
        &self,
        tags: &BTreeMap<String, String>,
        states: &[&str],
    ) -> Result<Vec<Instance>, Ec2Error> {
        let mut found = self
            .describe_instances(&tags_and_states_filters(tags, states))
            .await?;
        found.retain(|i| {
            (states.is_empty() || states.contains(&i.state.as_str()))
                && tags.iter().all(|(k, v)| i.tags.get(k) == Some(v))
        });
        order_candidates(&mut found);
        Ok(found)
    }
}

/// `Name=bastion, env=prod`: tags as error messages and logs show them.
pub fn describe_tags(tags: &BTreeMap<String, String>) -> String {
    tags.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

mod launch;

pub use launch::{
    LaunchSpec, LaunchTemplateRef, parse_run_instances, parse_terminate_instances,
    run_instances_params,
};

#[cfg(test)]
mod tests;
