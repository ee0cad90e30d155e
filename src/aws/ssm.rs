//! Thin calls into aws-sdk-ssm: StartSession, ResumeSession and TerminateSession, with
//! AWS errors mapped to the plain reasons a user can act on.
//!
//! Credentials and endpoints come from the standard `aws-config` chain, so
//! `AWS_PROFILE`, SSO, `credential_process`, `AWS_ENDPOINT_URL` and
//! `AWS_ENDPOINT_URL_SSM` all work as with the AWS CLI.

use std::collections::HashMap;
use std::fmt;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ssm::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_http_client::tls;
use thiserror::Error;

use crate::transport::ssm::SessionTicket;

/// Where and as whom to call AWS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct AwsTarget {
    /// Named profile from `~/.aws/config` (`None`: the default chain).
    pub profile: Option<String>,
    /// Region (`None`: from the profile or environment).
    pub region: Option<String>,
}

/// Loads the shared SDK configuration with bastion's HTTPS client (rustls with ring
/// and the platform's root certificates).
pub async fn load_config(target: &AwsTarget) -> SdkConfig {
    load_config_with_endpoint(target, None).await
}

/// [`load_config`] with an explicit endpoint URL (the session-manager-plugin contract
/// passes the SSM endpoint the AWS CLI used); `None` keeps the standard resolution.
pub async fn load_config_with_endpoint(
    target: &AwsTarget,
    endpoint_url: Option<&str>,
) -> SdkConfig {
    crate::transport::websocket::install_crypto_provider();
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(p) = &target.profile {
        loader = loader.profile_name(p);
    }
    if let Some(r) = &target.region {
        loader = loader.region(Region::new(r.clone()));
    }
    if let Some(url) = endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader.load().await
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

fn map_err<E, R>(err: SdkError<E, R>) -> AwsError
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
        SdkError::ConstructionFailure(_) if context.contains("credentials") => {
            AwsError::Credentials(context)
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

/// The Session Manager API of one account and region.
#[derive(Clone, Debug)]
pub struct SsmApi {
    client: aws_sdk_ssm::Client,
}

impl SsmApi {
    /// A client for `config`.
    pub fn new(config: &SdkConfig) -> SsmApi {
        SsmApi {
            client: aws_sdk_ssm::Client::new(config),
        }
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
    pub async fn resume_session(&self, session_id: &str) -> Result<String, AwsError> {
        let out = self
            .client
            .resume_session()
            .session_id(session_id)
            .send()
            .await
            .map_err(map_err)?;
        Ok(out.token_value().unwrap_or_default().to_owned())
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
