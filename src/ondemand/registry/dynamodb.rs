//! The shared registry: a DynamoDB table, one item per record, every write conditional
//! on the stored version.
//!
//! Table schema: partition key `id` (string) = [`Record::key`]; `ver` (number) =
//! [`Record::version`], the compare-and-swap token; `body` (string) = the record as JSON,
//! what is read back. `phase`, `resource`, `holder`, `lease_until` and `expires` (Unix ms)
//! are copies for people looking at the table in the console; nothing reads them.
//!
//! Create the table with
//! `aws dynamodb create-table --table-name NAME --attribute-definitions AttributeName=id,AttributeType=S --key-schema AttributeName=id,KeyType=HASH --billing-mode PAY_PER_REQUEST`.
//! The daemon needs `dynamodb:GetItem`, `PutItem`, `DeleteItem` and `Scan` on it.
//!
//! Errors: a failed condition is [`RegistryError::Conflict`]; a missing table, denied
//! access or unusable credentials are [`RegistryError::Unavailable`] (with the fix);
//! throttling, 5xx answers and transport failures are [`RegistryError::Io`], worth a
//! retry.

use std::collections::HashMap;
use std::sync::Arc;

use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_types::SdkConfig;
use tracing::debug;

use super::{Record, RegistryError};
use crate::aws::ssm::{AwsError, map_err};

/// Most Scan pages followed before giving up.
const MAX_PAGES: usize = 10_000;

/// A registry in a DynamoDB table.
#[derive(Clone, Debug)]
pub struct DynamoRegistry {
    client: aws_sdk_dynamodb::Client,
    table: Arc<str>,
    region: Arc<str>,
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// The item stored for `record`.
fn to_item(record: &Record) -> Result<HashMap<String, AttributeValue>, RegistryError> {
    let body = serde_json::to_string(record)
        .map_err(|e| RegistryError::Corrupt(format!("cannot encode record {}: {e}", record.key)))?;
    let mut item = HashMap::from([
        ("id".to_owned(), s(&record.key)),
        ("ver".to_owned(), n(record.version)),
        ("body".to_owned(), s(&body)),
        ("phase".to_owned(), s(record.phase.as_str())),
        ("holder".to_owned(), s(&record.holder)),
        ("lease_until".to_owned(), n(record.lease_until_ms)),
        ("expires".to_owned(), n(record.expires_ms)),
    ]);
    if let Some(r) = &record.resource {
        item.insert("resource".to_owned(), s(r));
    }
    Ok(item)
}

/// The record stored in `item` (its `body`), checked against `id` and `ver`.
fn from_item(item: &HashMap<String, AttributeValue>) -> Result<Record, RegistryError> {
    let id = item
        .get("id")
        .and_then(|v| v.as_s().ok())
        .map(String::as_str);
    let what = id.map_or_else(
        || "an item without id".to_owned(),
        |k| format!("item {k:?}"),
    );
    let body = item
        .get("body")
        .and_then(|v| v.as_s().ok())
        .ok_or_else(|| RegistryError::Corrupt(format!("{what} has no string attribute body")))?;
    let record: Record = serde_json::from_str(body)
        .map_err(|e| RegistryError::Corrupt(format!("{what}: body is not a record: {e}")))?;
    let ver = item
        .get("ver")
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if id != Some(record.key.as_str()) || ver != Some(record.version) {
        return Err(RegistryError::Corrupt(format!(
            "{what}: id/ver ({id:?}, {ver:?}) disagree with its body ({:?}, {})",
            record.key, record.version
        )));
    }
    Ok(record)
}

impl DynamoRegistry {
    /// The registry in table `table`, reached with the credentials, region and endpoint
    /// settings of `config` (`AWS_ENDPOINT_URL_DYNAMODB` and `AWS_ENDPOINT_URL` apply).
    pub fn new(config: &SdkConfig, table: &str) -> DynamoRegistry {
        DynamoRegistry {
            client: aws_sdk_dynamodb::Client::new(config),
            table: table.into(),
            region: config
                .region()
                .map_or_else(|| "the configured region".to_owned(), |r| r.to_string())
                .into(),
        }
    }

    /// `dynamodb:<table>`.
    pub fn id(&self) -> String {
        format!("dynamodb:{}", self.table)
    }

    /// The record under `key` (a consistent read).
    pub async fn get(&self, key: &str) -> Result<Option<Record>, RegistryError> {
        let out = self
            .client
            .get_item()
            .table_name(&*self.table)
            .key("id", s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.error("GetItem", key, e))?;
        out.item().map(from_item).transpose()
    }

    /// Writes `record` if the stored version is `expect` (`None`: no record may exist
    /// under its key); [`RegistryError::Conflict`] otherwise.
    pub async fn put(&self, record: &Record, expect: Option<u64>) -> Result<(), RegistryError> {
        let req = self
            .client
            .put_item()
            .table_name(&*self.table)
            .set_item(Some(to_item(record)?));
        let req = match expect {
            None => req
                .condition_expression("attribute_not_exists(#id)")
                .expression_attribute_names("#id", "id"),
            Some(v) => req
                .condition_expression("#ver = :ver")
                .expression_attribute_names("#ver", "ver")
                .expression_attribute_values(":ver", n(v)),
        };
        req.send()
            .await
            .map_err(|e| self.error("PutItem", &record.key, e))?;
        debug!(key = %record.key, version = record.version, "registry record written");
        Ok(())
    }

    /// Deletes the record under `key` if its stored version is `expect`.
    pub async fn delete(&self, key: &str, expect: u64) -> Result<(), RegistryError> {
        self.client
            .delete_item()
            .table_name(&*self.table)
            .key("id", s(key))
            .condition_expression("#ver = :ver")
            .expression_attribute_names("#ver", "ver")
            .expression_attribute_values(":ver", n(expect))
            .send()
            .await
            .map_err(|e| self.error("DeleteItem", key, e))?;
        debug!(key, "registry record deleted");
        Ok(())
    }

    /// Every record (a consistent Scan, all pages).
    pub async fn list(&self) -> Result<Vec<Record>, RegistryError> {
        let mut records = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        for _ in 0..MAX_PAGES {
            let out = self
                .client
                .scan()
                .table_name(&*self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| self.error("Scan", "", e))?;
            for item in out.items() {
                records.push(from_item(item)?);
            }
            match out.last_evaluated_key() {
                Some(k) if !k.is_empty() => start = Some(k.clone()),
                _ => return Ok(records),
            }
        }
        Err(RegistryError::Io(format!(
            "Scan of {} did not end within {MAX_PAGES} pages",
            self.table
        )))
    }

    /// Maps a failed `action` on `key` to a registry error with the fix.
    fn error<E>(&self, action: &str, key: &str, err: SdkError<E, HttpResponse>) -> RegistryError
    where
        E: aws_sdk_dynamodb::error::ProvideErrorMetadata + std::error::Error + 'static,
    {
        let server_error = err
            .raw_response()
            .is_some_and(|r| r.status().is_server_error());
        let table = &self.table;
        match map_err(err) {
            AwsError::Other { code, .. } if code == "ConditionalCheckFailedException" => {
                RegistryError::Conflict(key.to_owned())
            }
            AwsError::Other { code, .. } if code == "ResourceNotFoundException" => {
                RegistryError::Unavailable(format!(
                    "DynamoDB table {table} does not exist in {}: create it with `aws dynamodb \
                     create-table --table-name {table} --attribute-definitions \
                     AttributeName=id,AttributeType=S --key-schema AttributeName=id,KeyType=HASH \
                     --billing-mode PAY_PER_REQUEST`",
                    self.region
                ))
            }
            AwsError::AccessDenied(m) => RegistryError::Unavailable(format!(
                "not authorized to perform dynamodb:{action} on table {table} (the caller needs \
                 this IAM permission): {m}"
            )),
            AwsError::Credentials(m) => {
                RegistryError::Unavailable(format!("AWS credentials unavailable or expired: {m}"))
            }
            AwsError::Other { code, message } if code == "ValidationException" => {
                RegistryError::Unavailable(format!(
                    "DynamoDB refused {action} on table {table}: {message} (the table's \
                     partition key must be `id` of type string)"
                ))
            }
            e @ (AwsError::Throttled(_) | AwsError::Malformed(_)) => {
                RegistryError::Io(format!("DynamoDB {action} on {table}: {e}"))
            }
            e if server_error || e.is_retryable() => {
                RegistryError::Io(format!("DynamoDB {action} on {table}: {e}"))
            }
            AwsError::Other { code, message }
                if matches!(
                    code.as_str(),
                    "ProvisionedThroughputExceededException"
                        | "RequestLimitExceeded"
                        | "InternalServerError"
                        | "TransactionConflictException"
                ) =>
            {
                RegistryError::Io(format!("DynamoDB {action} on {table}: {code}: {message}"))
            }
            e => RegistryError::Unavailable(format!("DynamoDB {action} on {table} failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ondemand::registry::{Phase, ProviderKind};

    fn record() -> Record {
        Record {
            key: "prod@arn:aws:iam::123456789012:user/alice".into(),
            version: 3,
            launch_id: "5b1c7d2e-0000-4000-8000-000000000001".into(),
            provider: ProviderKind::Ec2,
            phase: Phase::Ready,
            resource: Some("i-0123456789abcdef0".into()),
            target: Some("i-0123456789abcdef0".into()),
            profile: "prod".into(),
            owner: "arn:aws:iam::123456789012:user/alice".into(),
            holder: "daemon-1".into(),
            lease_until_ms: 1_700_000_060_000,
            created_ms: 1_700_000_000_000,
            expires_ms: 1_700_028_800_000,
            last_used_ms: 1_700_000_030_000,
        }
    }

    #[test]
    fn items_round_trip_and_carry_the_console_attributes() {
        let r = record();
        let item = to_item(&r).unwrap();
        assert_eq!(item["id"], s(&r.key));
        assert_eq!(item["ver"], n(3));
        assert_eq!(item["phase"], s("ready"));
        assert_eq!(item["resource"], s("i-0123456789abcdef0"));
        assert_eq!(item["holder"], s("daemon-1"));
        assert_eq!(item["lease_until"], n(1_700_000_060_000));
        assert_eq!(item["expires"], n(1_700_028_800_000));
        assert_eq!(from_item(&item).unwrap(), r);

        let mut no_resource = r.clone();
        no_resource.resource = None;
        assert!(!to_item(&no_resource).unwrap().contains_key("resource"));
    }

    #[test]
    fn inconsistent_items_are_corrupt() {
        let mut item = to_item(&record()).unwrap();
        item.insert("ver".into(), n(4));
        assert!(matches!(from_item(&item), Err(RegistryError::Corrupt(_))));
        item.remove("body");
        assert!(matches!(from_item(&item), Err(RegistryError::Corrupt(_))));
    }
}
