//! Thin calls into aws-sdk-ssm: StartSession, ResumeSession and TerminateSession; for
//! on-demand bastions GetParameter (the latest AMI), DescribeInstanceInformation (is the
//! agent online?) and DescribeSessions (is the bastion in use?). AWS errors are mapped to
//! the plain reasons a user can act on.
//!
//! Credentials and endpoints come from the standard `aws-config` chain, so
//! `AWS_PROFILE`, SSO, `credential_process`, `AWS_ENDPOINT_URL` and
//! `AWS_ENDPOINT_URL_SSM` all work as with the AWS CLI.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use aws_config::ecs::EcsCredentialsProvider;
use aws_config::environment::{
    EnvironmentVariableCredentialsProvider, EnvironmentVariableRegionProvider,
};
use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_config::imds::region::ImdsRegionProvider;
use aws_config::meta::credentials::CredentialsProviderChain;
use aws_config::meta::region::RegionProviderChain;
use aws_config::profile::{ProfileFileCredentialsProvider, ProfileFileRegionProvider};
use aws_config::provider_config::ProviderConfig;
use aws_config::web_identity_token::WebIdentityTokenCredentialsProvider;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ssm::config::SharedHttpClient;
use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_ssm::types::{
    InstanceInformationStringFilter, SessionFilter, SessionFilterKey, SessionState,
};
use aws_smithy_http_client::Connector;
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls;
use thiserror::Error;

use super::upgrade_sign::UpgradeSigner;

/// Most pages of a listing followed before giving up.
const MAX_PAGES: usize = 1000;

/// Where and as whom to call AWS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AwsTarget {
    /// Named profile from `~/.aws/config` (`None`: the default chain).
    pub profile: Option<String>,
    /// Region (`None`: from the profile or environment).
    pub region: Option<String>,
    /// Also ask the EC2 instance metadata service (IMDS) for credentials and region.
    /// Off by default: on a laptop, IMDS only adds a timeout before "no credentials".
    pub imds: bool,
}

/// bastion's HTTPS client for every AWS API call: rustls with ring and the platform's
/// root certificates, and the proxy settings of the environment (`HTTPS_PROXY`,
/// `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`, upper or lower case), as the websocket uses them.
pub fn http_client() -> SharedHttpClient {
    super::install_crypto_provider();
    let proxy = ProxyConfig::from_env();
    // The public `build_https` has no proxy setting; this builds the same connector
    // (connector settings and sleep from the runtime) with one.
    aws_smithy_http_client::Builder::new().build_with_connector_fn(move |settings, components| {
        let mut b = Connector::builder();
        b.set_connector_settings(settings.cloned());
        if let Some(c) = components {
            b.set_sleep_impl(c.sleep_impl());
        }
        b.proxy_config(proxy.clone())
            .tls_provider(tls::Provider::Rustls(
                tls::rustls_provider::CryptoMode::Ring,
            ))
            .build()
    })
}

/// Loads the shared SDK configuration with bastion's HTTPS client ([`http_client`]).
pub async fn load_config(target: &AwsTarget) -> SdkConfig {
    load_config_with_endpoint(target, None).await
}

/// [`load_config`] with an explicit endpoint URL (the session-manager-plugin contract
/// passes the SSM endpoint the AWS CLI used); `None` keeps the standard resolution.
///
/// Credentials come from the standard chain in its standard order (environment,
/// profile files with SSO, `credential_process` and role assumption, web identity,
/// ECS container credentials), with IMDS last and only when [`AwsTarget::imds`] is set;
/// an explicit [`AwsTarget::profile`] skips the environment's keys, as the AWS CLI does.
/// The region: [`AwsTarget::region`], else `AWS_REGION`, else the profile's, else IMDS
/// (when enabled).
pub async fn load_config_with_endpoint(
    target: &AwsTarget,
    endpoint_url: Option<&str>,
) -> SdkConfig {
    let http = http_client();
    let base = ProviderConfig::default().with_http_client(http.clone());
    let region = match &target.region {
        Some(r) => Some(Region::new(r.clone())),
        None => region_chain(target, &base).region().await,
    };
    let conf = base.with_region(region.clone());
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(http)
        .region(region)
        .credentials_provider(credentials_chain(target, &conf));
    if let Some(p) = &target.profile {
        loader = loader.profile_name(p);
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
}

fn region_chain(target: &AwsTarget, conf: &ProviderConfig) -> RegionProviderChain {
    let mut profile = ProfileFileRegionProvider::builder().configure(conf);
    if let Some(p) = &target.profile {
        profile = profile.profile_name(p);
    }
    let chain = RegionProviderChain::first_try(EnvironmentVariableRegionProvider::new())
        .or_else(profile.build());
    if target.imds {
        chain.or_else(ImdsRegionProvider::builder().configure(conf).build())
    } else {
        chain
    }
}

fn credentials_chain(target: &AwsTarget, conf: &ProviderConfig) -> CredentialsProviderChain {
    let mut profile = ProfileFileCredentialsProvider::builder().configure(conf);
    if let Some(p) = &target.profile {
        profile = profile.profile_name(p);
    }
    // An explicitly named profile negates the environment's keys, as in botocore
    // (`credentials.py` fn `create_credential_resolver`) and aws-sdk-go-v2
    // (`config/resolve_credentials.go` fn `resolveCredentialChain`: a profile set in code
    // is checked before env credentials), which the plugin uses from 1.2.804.0 with
    // its PROFILE argument: `aws_profile = "prod"` must not sign with a developer's
    // leftover `AWS_ACCESS_KEY_ID`.
    let chain = match &target.profile {
        Some(_) => CredentialsProviderChain::first_try("Profile", profile.build()),
        None => CredentialsProviderChain::first_try(
            "Environment",
            EnvironmentVariableCredentialsProvider::new(),
        )
        .or_else("Profile", profile.build()),
    };
    let chain = chain
        .or_else(
            "WebIdentityToken",
            WebIdentityTokenCredentialsProvider::builder()
                .configure(conf)
                .build(),
        )
        .or_else(
            "EcsContainer",
            EcsCredentialsProvider::builder().configure(conf).build(),
        );
    if target.imds {
        chain.or_else(
            "Ec2InstanceMetadata",
            ImdsCredentialsProvider::builder().configure(conf).build(),
        )
    } else {
        chain
    }
}

/// An AWS call failed; each variant says what the user can do.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AwsError {
    /// IAM denied the call.
    #[error("access denied: {0}")]
    AccessDenied(String),
    /// The instance is not connected to Session Manager (agent stopped, no route to
    /// the SSM endpoints, missing instance profile).
    #[error("target not connected to Session Manager: {0}")]
    TargetNotConnected(String),
    /// The document or its parameters were rejected.
    #[error("invalid document or parameters: {0}")]
    InvalidDocument(String),
    /// The session does not exist (any more).
    #[error("session does not exist: {0}")]
    DoesNotExist(String),
    /// AWS asked us to slow down.
    #[error("throttled by AWS: {0}")]
    Throttled(String),
    /// Credentials are missing or expired (for SSO: run `aws sso login`).
    #[error("AWS credentials unavailable or expired: {0}")]
    Credentials(String),
    /// The response lacked a field the API always returns.
    #[error("unexpected response: {0}")]
    Malformed(String),
    /// Anything else, with the AWS error code when there is one.
    #[error("{code}: {message}")]
    Other {
        /// AWS error code, or the kind of failure.
        code: String,
        /// Details.
        message: String,
    },
}

impl AwsError {
    /// True when retrying later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, AwsError::Throttled(_))
            || matches!(self, AwsError::Other { code, .. } if code == "dispatch" || code == "InternalServerError")
    }
}

/// Maps an SDK error of any AWS service to an [`AwsError`].
pub(crate) fn map_err<E, R>(err: SdkError<E, R>) -> AwsError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    let context = DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::ServiceError(se) => {
            let e = se.err();
            let code = e.code().unwrap_or("Unknown").to_owned();
            let message = e.message().unwrap_or_default().to_owned();
            match code.as_str() {
                "AccessDeniedException" | "AccessDenied" | "UnauthorizedOperation" => {
                    AwsError::AccessDenied(message)
                }
                "TargetNotConnected" => AwsError::TargetNotConnected(message),
                "InvalidDocument" | "InvalidParameters" | "InvalidDocumentVersion" => {
                    AwsError::InvalidDocument(message)
                }
                "DoesNotExistException" => AwsError::DoesNotExist(message),
                "ThrottlingException" | "TooManyRequestsException" => AwsError::Throttled(message),
                "ExpiredTokenException"
                | "UnrecognizedClientException"
                | "InvalidSignatureException" => AwsError::Credentials(message),
                _ => AwsError::Other { code, message },
            }
        }
        SdkError::ConstructionFailure(_) | SdkError::DispatchFailure(_)
            if context.contains("credentials") =>
        {
            AwsError::Credentials(credentials_reason(&context))
        }
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) => AwsError::Other {
            code: "dispatch".into(),
            message: context,
        },
        _ if context.to_ascii_lowercase().contains("credential") => AwsError::Credentials(context),
        _ => AwsError::Other {
            code: "request".into(),
            message: context,
        },
    }
}

/// The innermost reason of a credential-chain failure, without the SDK's repetitions
/// ("an error occurred while loading credentials: " per layer) and its Debug tail.
fn credentials_reason(context: &str) -> String {
    let head = context.split(" (").next().unwrap_or(context);
    head.rsplit("loading credentials: ")
        .next()
        .unwrap_or(head)
        .trim()
        .to_owned()
}

/// What to start a session with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StartRequest {
    /// Instance id, managed node id or `ecs:` target.
    pub target: String,
    /// Session document, e.g. `AWS-StartPortForwardingSessionToRemoteHost`.
    pub document: String,
    /// Document parameters; every value is a list, as the API wants.
    pub parameters: HashMap<String, Vec<String>>,
    /// Audit reason shown in Session Manager history.
    pub reason: Option<String>,
}

/// What StartSession (or ECS ExecuteCommand) returned: what the data channel is dialed
/// with. `Debug` redacts the token.
#[derive(Clone)]
pub struct SessionTicket {
    /// The SessionId.
    pub session_id: String,
    /// The StreamUrl, used unmodified.
    pub stream_url: String,
    /// The TokenValue: a secret, valid briefly.
    pub token_value: String,
    /// The StartSession Target.
    pub target: String,
}

impl fmt::Debug for SessionTicket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionTicket")
            .field("session_id", &self.session_id)
            .field("stream_url", &self.stream_url)
            .field("token_value", &"<redacted>")
            .field("target", &self.target)
            .finish()
    }
}

/// What ResumeSession returned. `Debug` redacts the token.
#[derive(Clone, Default)]
pub struct Resumed {
    /// The new TokenValue; empty when the session timed out.
    pub token_value: String,
    /// The new StreamUrl, when the service returned one: \[P\] 1.2.835.0 dials it
    /// instead of the first (whose `cell-number` may have expired), IDX `29db6846`
    /// `sessionhandler.go` fn `ResumeSessionHandler` / `websocketchannel.go` fn
    /// `SetStreamUrl`.
    pub stream_url: Option<String>,
}

impl fmt::Debug for Resumed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Resumed")
            .field("token_value", &"<redacted>")
            .field("stream_url", &self.stream_url)
            .finish()
    }
}

/// The Session Manager API of one account and region.
#[derive(Clone, Debug)]
pub struct SsmApi {
    client: aws_sdk_ssm::Client,
    /// Signs the data-channel upgrades with the same region and credential chain.
    signer: Option<UpgradeSigner>,
}

impl SsmApi {
    /// A client for `config`.
    pub fn new(config: &SdkConfig) -> SsmApi {
        let signer = match (config.region(), config.credentials_provider()) {
            (Some(region), Some(provider)) => {
                Some(UpgradeSigner::new(region.to_string(), provider))
            }
            _ => None,
        };
        SsmApi {
            client: aws_sdk_ssm::Client::new(config),
            signer,
        }
    }

    /// The signer of the data-channel upgrades of this client's sessions: its region
    /// and its credential chain, resolved afresh at every dial.
    pub fn upgrade_signer(&self) -> Option<UpgradeSigner> {
        self.signer.clone()
    }

    /// StartSession.
    pub async fn start_session(&self, req: &StartRequest) -> Result<SessionTicket, AwsError> {
        let out = self
            .client
            .start_session()
            .target(&req.target)
            .document_name(&req.document)
            .set_parameters(Some(req.parameters.clone()))
            .set_reason(req.reason.clone())
            .send()
            .await
            .map_err(map_err)?;
        let field = |v: Option<&str>, name: &str| {
            v.filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| AwsError::Malformed(format!("StartSession returned no {name}")))
        };
        Ok(SessionTicket {
            session_id: field(out.session_id(), "SessionId")?,
            stream_url: field(out.stream_url(), "StreamUrl")?,
            token_value: field(out.token_value(), "TokenValue")?,
            target: req.target.clone(),
        })
    }

    /// ResumeSession: returns the new TokenValue (empty when the session timed out, as
    /// [P] `sessionhandler.go` fn `ResumeSessionHandler` treats it).
    pub async fn resume_session(&self, session_id: &str) -> Result<Resumed, AwsError> {
        let out = self
            .client
            .resume_session()
            .session_id(session_id)
            .send()
            .await
            .map_err(map_err)?;
        Ok(Resumed {
            token_value: out.token_value().unwrap_or_default().to_owned(),
            stream_url: out
                .stream_url()
                .filter(|u| !u.is_empty())
                .map(str::to_owned),
        })
    }

    /// GetParameter (e.g. `/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64`,
    /// the latest Amazon Linux 2023 AMI id): the value. A parameter that does not exist
    /// is `AwsError::Other { code: "ParameterNotFound", .. }` naming it.
    pub async fn get_parameter(&self, name: &str) -> Result<String, AwsError> {
        let out = self
            .client
            .get_parameter()
            .name(name)
            .send()
            .await
            .map_err(|e| match map_err(e) {
                AwsError::Other { code, message } if code == "ParameterNotFound" => {
                    AwsError::Other {
                        message: format!(
                            "SSM parameter {name} does not exist in this region{}{message}",
                            if message.is_empty() { "" } else { ": " }
                        ),
                        code,
                    }
                }
                other => other,
            })?;
        out.parameter()
            .and_then(|p| p.value())
            .map(str::to_owned)
            .ok_or_else(|| AwsError::Malformed(format!("GetParameter {name} returned no value")))
    }

    /// DescribeInstanceInformation filtered to `instance_id`: its `PingStatus`
    /// (`Online`, `ConnectionLost`, `Inactive`), `None` while its agent has not
    /// registered with Session Manager.
    pub async fn ping_status(&self, instance_id: &str) -> Result<Option<String>, AwsError> {
        let filter = InstanceInformationStringFilter::builder()
            .key("InstanceIds")
            .values(instance_id)
            .build()
            .map_err(|e| AwsError::Other {
                code: "request".into(),
                message: e.to_string(),
            })?;
        let out = self
            .client
            .describe_instance_information()
            .filters(filter)
            .send()
            .await
            .map_err(map_err)?;
        Ok(out
            .instance_information_list()
            .iter()
            .find(|i| i.instance_id() == Some(instance_id))
            .and_then(|i| i.ping_status())
            .map(|p| p.as_str().to_owned()))
    }

    /// DescribeSessions `State=Active` with the filter `Target=target`, all pages: the
    /// ids of the sessions open on `target`.
    pub async fn active_sessions(&self, target: &str) -> Result<Vec<String>, AwsError> {
        let filter = SessionFilter::builder()
            .key(SessionFilterKey::TargetId)
            .value(target)
            .build()
            .map_err(|e| AwsError::Other {
                code: "request".into(),
                message: e.to_string(),
            })?;
        let mut ids = Vec::new();
        let mut token: Option<String> = None;
        for _ in 0..MAX_PAGES {
            let out = self
                .client
                .describe_sessions()
                .state(SessionState::Active)
                .filters(filter.clone())
                .set_next_token(token.clone())
                .send()
                .await
                .map_err(map_err)?;
            ids.extend(
                out.sessions()
                    .iter()
                    .filter_map(|s| s.session_id())
                    .map(str::to_owned),
            );
            match out.next_token().filter(|t| !t.is_empty()) {
                None => return Ok(ids),
                Some(next) if token.as_deref() == Some(next) => {
                    return Err(AwsError::Malformed(
                        "DescribeSessions returned the same NextToken twice".into(),
                    ));
                }
                Some(next) => token = Some(next.to_owned()),
            }
        }
        Err(AwsError::Malformed(format!(
            "DescribeSessions did not end within {MAX_PAGES} pages"
        )))
    }

    /// TerminateSession until the service confirms the session is gone, with capped
    /// exponential backoff (1 s doubling to 60 s) for at most `attempts` calls. A
    /// session the service no longer knows counts as ended. Stops at the first error
    /// that retrying cannot fix (access denied) and returns it; the caller keeps the
    /// session in its ledger then, so a later run tries again.
    pub async fn terminate_session_retrying(
        &self,
        session_id: &str,
        attempts: u32,
    ) -> Result<(), AwsError> {
        let mut delay = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            match self.terminate_session(session_id).await {
                Ok(()) | Err(AwsError::DoesNotExist(_)) => return Ok(()),
                Err(e) if e.is_retryable() && attempt < attempts => {
                    tracing::warn!(session_id, attempt, error = %e, "TerminateSession failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(60));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// TerminateSession.
    pub async fn terminate_session(&self, session_id: &str) -> Result<(), AwsError> {
        self.client
            .terminate_session()
            .session_id(session_id)
            .send()
            .await
            .map_err(map_err)?;
        Ok(())
    }
}
