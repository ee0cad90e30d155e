//! Who the caller is: STS GetCallerIdentity through aws-sdk-sts, with errors mapped as
//! for SSM ([`crate::aws::ssm::AwsError`]). On-demand bastions record the caller's ARN
//! as their owner.

use aws_types::SdkConfig;

use super::ssm::{AwsError, map_err};

/// What GetCallerIdentity says about the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallerIdentity {
    /// The 12-digit account id.
    pub account: String,
    /// The caller's ARN, e.g. `arn:aws:sts::123456789012:assumed-role/Dev/alice`.
    pub arn: String,
    /// The unique id of the caller (`AIDA…`, or `AROA…:session` for a role session).
    pub user_id: String,
}

/// GetCallerIdentity with the credentials, region and endpoint settings of `config`
/// (`AWS_ENDPOINT_URL_STS` and `AWS_ENDPOINT_URL` apply).
pub async fn caller_identity(config: &SdkConfig) -> Result<CallerIdentity, AwsError> {
    let out = aws_sdk_sts::Client::new(config)
        .get_caller_identity()
        .send()
        .await
        .map_err(map_err)?;
    let field = |v: Option<&str>, name: &str| {
        v.filter(|s| !s.is_empty())
            .map(str::to_owned)
            .ok_or_else(|| AwsError::Malformed(format!("GetCallerIdentity returned no {name}")))
    };
    Ok(CallerIdentity {
        account: field(out.account(), "Account")?,
        arn: field(out.arn(), "Arn")?,
        user_id: field(out.user_id(), "UserId")?,
    })
}
