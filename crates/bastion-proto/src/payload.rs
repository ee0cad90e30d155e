//! JSON (and flag) payloads carried inside ClientMessages, and the OpenDataChannel text
//! message.
//!
//! Field names and order follow the Go structs of the references so that our encoding
//! is byte-identical to theirs: [P] `src/message/clientmessage.go`,
//! [P] `src/message/handshakemessage.go`, [P] `src/service/service.go`, and the agent's
//! [A] `agent/session/contracts/model.go`.
//!
//! Decoding is lenient the way Go's `encoding/json` is: unknown fields are ignored,
//! missing fields and `null` take the zero value. (Go also matches field names without
//! regard to case; we match them exactly, as every reference writer spells them exactly.)

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;
use thiserror::Error;

use super::kind::Flag;

/// Why a payload could not be parsed.
#[derive(Debug, Error)]
pub enum PayloadError {
    /// The JSON is malformed or has a field of the wrong type.
    #[error("malformed {what} payload: {source}")]
    Json {
        /// Which payload was being parsed.
        what: &'static str,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A Flag payload shorter than 4 bytes.
    #[error("flag payload has {0} bytes, needs 4")]
    ShortFlag(usize),
    /// A Flag payload with a value no reference defines.
    #[error("unknown flag value {0}")]
    UnknownFlag(u32),
}

/// Parses a JSON payload, naming it in the error.
pub fn from_json<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, PayloadError> {
    serde_json::from_slice(bytes).map_err(|source| PayloadError::Json { what, source })
}

/// Serializes a payload. Our payload types contain only strings, numbers, booleans and
/// JSON values, for which serde_json cannot fail.
pub fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_default()
}

/// Reads a Flag payload as the references do (`binary.Read(BigEndian)` of the first four
/// bytes: [P] `muxportforwarding.go` fn `WriteStream`, [A] `port_mux.go` fn
/// `HandleStreamMessage`). Trailing bytes are ignored, as there.
pub fn parse_flag(payload: &[u8]) -> Result<Flag, PayloadError> {
    let b: [u8; 4] = payload
        .get(..4)
        .and_then(|s| s.try_into().ok())
        .ok_or(PayloadError::ShortFlag(payload.len()))?;
    let v = u32::from_be_bytes(b);
    Flag::from_u32(v).ok_or(PayloadError::UnknownFlag(v))
}

/// Go-style leniency: `null` (or a missing field, with `#[serde(default)]`) becomes the
/// zero value.
fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Accepts a string, a number or null (service payloads whose format no source pins).
fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        Value::Null => String::new(),
        other => other.to_string(),
    })
}

/// Accepts an integer, a string holding one, or null.
fn number_or_string<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Value::deserialize(d)? {
        Value::Null => Ok(0),
        Value::Number(n) => n
            .as_i64()
            .ok_or_else(|| serde::de::Error::custom("SchemaVersion is not an integer")),
        Value::String(s) => s.trim().parse().map_err(serde::de::Error::custom),
        _ => Err(serde::de::Error::custom("SchemaVersion must be a number")),
    }
}

/// Go encodes `[]byte` as standard base64 with padding, and `nil` as `null`.
mod go_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(Vec::new()),
            Some(s) => B64.decode(s.as_bytes()).map_err(serde::de::Error::custom),
        }
    }
}

/// Like [`go_bytes`] for an optional field that Go writes as `null` when nil.
mod go_opt_bytes {
    use super::*;

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_none(),
            Some(b) => s.serialize_str(&B64.encode(b)),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => B64
                .decode(s.as_bytes())
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// The first (TEXT) websocket message of a data channel ([P] `src/service/service.go`
/// `OpenDataChannelInput`; sent by [P] `streaming.go` fn `FinalizeDataChannelHandshake`).
/// Its `Debug` output redacts the token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct OpenDataChannelInput {
    /// Always `"1.0"`.
    #[serde(rename = "MessageSchemaVersion", deserialize_with = "null_default")]
    pub message_schema_version: String,
    /// A new UUID v4 per (re)connect.
    #[serde(rename = "RequestId", deserialize_with = "null_default")]
    pub request_id: String,
    /// The token from StartSession or ResumeSession. Secret: never log it.
    #[serde(rename = "TokenValue", deserialize_with = "null_default")]
    pub token_value: String,
    /// A UUID v4 fixed for the lifetime of the client process.
    #[serde(rename = "ClientId", deserialize_with = "null_default")]
    pub client_id: String,
    /// The client version string (see [`crate::version`]).
    #[serde(rename = "ClientVersion", deserialize_with = "null_default")]
    pub client_version: String,
}

impl std::fmt::Debug for OpenDataChannelInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenDataChannelInput")
            .field("message_schema_version", &self.message_schema_version)
            .field("request_id", &self.request_id)
            .field("token_value", &"<redacted>")
            .field("client_id", &self.client_id)
            .field("client_version", &self.client_version)
            .finish()
    }
}

/// The payload of an `acknowledge` message ([P] `clientmessage.go` `AcknowledgeContent`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct AcknowledgeContent {
    /// MessageType of the acknowledged message.
    #[serde(rename = "AcknowledgedMessageType", deserialize_with = "null_default")]
    pub message_type: String,
    /// MessageId of the acknowledged message, lowercase hyphenated.
    #[serde(rename = "AcknowledgedMessageId", deserialize_with = "null_default")]
    pub message_id: String,
    /// SequenceNumber of the acknowledged message: the only field receivers use.
    #[serde(
        rename = "AcknowledgedMessageSequenceNumber",
        deserialize_with = "null_default"
    )]
    pub sequence_number: i64,
    /// Always `true` in both references.
    #[serde(rename = "IsSequentialMessage", deserialize_with = "null_default")]
    pub is_sequential_message: bool,
}

/// The one field of an `acknowledge` payload a receiver uses: reading it alone skips
/// the two strings of [`AcknowledgeContent`] without allocating them (one ack arrives
/// per 1 KiB sent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(default)]
pub struct AcknowledgedSequence {
    /// SequenceNumber of the acknowledged message.
    #[serde(
        rename = "AcknowledgedMessageSequenceNumber",
        deserialize_with = "null_default"
    )]
    pub sequence_number: i64,
}

/// The payload of `channel_closed` ([P] `clientmessage.go` `ChannelClosed`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ChannelClosed {
    /// Message id (string).
    #[serde(rename = "MessageId", deserialize_with = "null_default")]
    pub message_id: String,
    /// Creation date as a string (format not confirmed by any source; a JSON number is
    /// accepted and kept as its decimal text).
    #[serde(rename = "CreatedDate", deserialize_with = "string_or_number")]
    pub created_date: String,
    /// The target.
    #[serde(rename = "DestinationId", deserialize_with = "null_default")]
    pub destination_id: String,
    /// The session id.
    #[serde(rename = "SessionId", deserialize_with = "null_default")]
    pub session_id: String,
    /// `"channel_closed"`.
    #[serde(rename = "MessageType", deserialize_with = "null_default")]
    pub message_type: String,
    /// Schema version (a JSON string holding a number is accepted).
    #[serde(rename = "SchemaVersion", deserialize_with = "number_or_string")]
    pub schema_version: i64,
    /// Text for the user; may be empty.
    #[serde(rename = "Output", deserialize_with = "null_default")]
    pub output: String,
}

/// `ActionType` of a requested or processed client action.
pub mod action_type {
    /// The session type action; always the first one.
    pub const SESSION_TYPE: &str = "SessionType";
    /// The KMS encryption action.
    pub const KMS_ENCRYPTION: &str = "KMSEncryption";
}

/// `ActionStatus` values ([P] `handshakemessage.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "i64", into = "i64")]
pub enum ActionStatus {
    /// 1: the client performed the action.
    Success,
    /// 2: the client failed to perform it.
    Failed,
    /// 3: the client does not know the action.
    Unsupported,
    /// Any other value (the agent treats anything but 1 as a failure).
    Other(i64),
}

impl From<i64> for ActionStatus {
    fn from(v: i64) -> Self {
        match v {
            1 => ActionStatus::Success,
            2 => ActionStatus::Failed,
            3 => ActionStatus::Unsupported,
            o => ActionStatus::Other(o),
        }
    }
}

impl From<ActionStatus> for i64 {
    fn from(s: ActionStatus) -> i64 {
        match s {
            ActionStatus::Success => 1,
            ActionStatus::Failed => 2,
            ActionStatus::Unsupported => 3,
            ActionStatus::Other(o) => o,
        }
    }
}

impl Default for ActionStatus {
    fn default() -> Self {
        ActionStatus::Other(0)
    }
}

/// One action the agent asks the client to perform ([A] `model.go` `RequestedClientAction`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct RequestedClientAction {
    /// See [`action_type`].
    #[serde(rename = "ActionType", deserialize_with = "null_default")]
    pub action_type: String,
    /// Action-specific parameters ([`SessionTypeRequest`] or [`KmsEncryptionRequest`]).
    #[serde(rename = "ActionParameters")]
    pub action_parameters: Value,
}

/// PayloadType 5, agent to client ([A] `model.go` `HandshakeRequestPayload`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct HandshakeRequest {
    /// The agent's version, e.g. `3.3.987.0`.
    #[serde(rename = "AgentVersion", deserialize_with = "null_default")]
    pub agent_version: String,
    /// The actions, SessionType first.
    #[serde(rename = "RequestedClientActions", deserialize_with = "null_default")]
    pub requested_client_actions: Vec<RequestedClientAction>,
}

/// `ActionParameters` of a SessionType action ([A] `model.go` `SessionTypeRequest`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SessionTypeRequest {
    /// `Port`, `Standard_Stream`, `InteractiveCommands` or `NonInteractiveCommands`.
    #[serde(rename = "SessionType", deserialize_with = "null_default")]
    pub session_type: String,
    /// The session document's properties after parameter substitution.
    #[serde(rename = "Properties")]
    pub properties: Value,
}

/// `ActionParameters` of a KMSEncryption action ([A] `model.go` `KMSEncryptionRequest`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct KmsEncryptionRequest {
    /// The KMS key to call GenerateDataKey with.
    #[serde(rename = "KMSKeyId", deserialize_with = "null_default")]
    pub kms_key_id: String,
    /// Base64 random challenge of newer agents (empty from older ones).
    #[serde(rename = "Challenge", deserialize_with = "null_default")]
    pub challenge: String,
}

/// `ActionResult` of a KMSEncryption action ([A] `model.go` `KMSEncryptionResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct KmsEncryptionResponse {
    /// The CiphertextBlob returned by GenerateDataKey.
    #[serde(rename = "KMSCipherTextKey", with = "go_bytes")]
    pub kms_cipher_text_key: Vec<u8>,
    /// Always `null` from the plugin.
    #[serde(rename = "KMSCipherTextHash", with = "go_opt_bytes")]
    pub kms_cipher_text_hash: Option<Vec<u8>>,
    /// True when the data key was generated with the `aws:ssm:RandomChallenge` context.
    #[serde(rename = "ChallengeAcknowledgement", deserialize_with = "null_default")]
    pub challenge_acknowledgement: bool,
}

/// One answer to a [`RequestedClientAction`] ([P] `handshakemessage.go`
/// `ProcessedClientAction`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct ProcessedClientAction {
    /// The ActionType being answered.
    #[serde(rename = "ActionType", deserialize_with = "null_default")]
    pub action_type: String,
    /// 1 = success; the agent cancels the session on anything else.
    #[serde(rename = "ActionStatus", deserialize_with = "null_default")]
    pub action_status: ActionStatus,
    /// Action result (`null` for SessionType).
    #[serde(rename = "ActionResult")]
    pub action_result: Value,
    /// Error text, empty on success.
    #[serde(rename = "Error", deserialize_with = "null_default")]
    pub error: String,
}

/// PayloadType 6, client to agent ([P] `handshakemessage.go` `HandshakeResponsePayload`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct HandshakeResponse {
    /// The client version the agent bases its mux and keepalive decisions on.
    #[serde(rename = "ClientVersion", deserialize_with = "null_default")]
    pub client_version: String,
    /// One entry per requested action, in order.
    #[serde(rename = "ProcessedClientActions", deserialize_with = "null_default")]
    pub processed_client_actions: Vec<ProcessedClientAction>,
    /// `null` from the plugin.
    #[serde(rename = "Errors")]
    pub errors: Option<Vec<String>>,
}

/// PayloadType 7, agent to client ([A] `model.go` `HandshakeCompletePayload`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct HandshakeComplete {
    /// Go `time.Duration`: nanoseconds.
    #[serde(rename = "HandshakeTimeToComplete", deserialize_with = "null_default")]
    pub handshake_time_to_complete_ns: i64,
    /// A message for the user (upgrade hint, "This session is encrypted ...").
    #[serde(rename = "CustomerMessage", deserialize_with = "null_default")]
    pub customer_message: String,
}

/// PayloadTypes 8 and 9: the encryption challenge ([A] `model.go`
/// `EncryptionChallengeRequest` / `EncryptionChallengeResponse`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct EncryptionChallenge {
    /// AES-GCM ciphertext (nonce || ciphertext || tag), base64 on the wire.
    #[serde(rename = "Challenge", with = "go_bytes")]
    pub challenge: Vec<u8>,
}

/// PayloadType 3, terminal size ([P] `clientmessage.go` `SizeData`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct SizeData {
    /// Columns.
    #[serde(deserialize_with = "null_default")]
    pub cols: u32,
    /// Rows.
    #[serde(deserialize_with = "null_default")]
    pub rows: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_serializes_with_reference_key_order() {
        let ack = AcknowledgeContent {
            message_type: "output_stream_data".into(),
            message_id: "dd01e56b-ff48-483e-a508-b5f073f31b16".into(),
            sequence_number: 7,
            is_sequential_message: true,
        };
        let json = String::from_utf8(to_json(&ack)).unwrap();
        assert_eq!(
            json,
            r#"{"AcknowledgedMessageType":"output_stream_data","AcknowledgedMessageId":"dd01e56b-ff48-483e-a508-b5f073f31b16","AcknowledgedMessageSequenceNumber":7,"IsSequentialMessage":true}"#
        );
        let back: AcknowledgeContent = from_json("ack", json.as_bytes()).unwrap();
        assert_eq!(back, ack);
    }

    #[test]
    fn handshake_response_matches_plugin_bytes() {
        let r = HandshakeResponse {
            client_version: "1.2.650.0".into(),
            processed_client_actions: vec![ProcessedClientAction {
                action_type: action_type::SESSION_TYPE.into(),
                action_status: ActionStatus::Success,
                action_result: Value::Null,
                error: String::new(),
            }],
            errors: None,
        };
        assert_eq!(
            String::from_utf8(to_json(&r)).unwrap(),
            r#"{"ClientVersion":"1.2.650.0","ProcessedClientActions":[{"ActionType":"SessionType","ActionStatus":1,"ActionResult":null,"Error":""}],"Errors":null}"#
        );
    }

    #[test]
    fn unknown_fields_nulls_and_missing_fields_are_tolerated() {
        let hc: HandshakeComplete =
            from_json("hc", br#"{"CustomerMessage":null,"Extra":[1,2]}"#).unwrap();
        assert_eq!(hc, HandshakeComplete::default());
        let req: HandshakeRequest = from_json("hr", br#"{"RequestedClientActions":null}"#).unwrap();
        assert!(req.requested_client_actions.is_empty());
        let cc: ChannelClosed = from_json("cc", br#"{"Output":"bye","Unknown":1}"#).unwrap();
        assert_eq!(cc.output, "bye");
        let cc: ChannelClosed = from_json(
            "cc",
            br#"{"CreatedDate":1700000000000,"SchemaVersion":"1"}"#,
        )
        .unwrap();
        assert_eq!(cc.created_date, "1700000000000");
        assert_eq!(cc.schema_version, 1);
    }

    #[test]
    fn malformed_json_names_the_payload() {
        let err = from_json::<HandshakeComplete>("HandshakeComplete", b"{\"Handshake")
            .unwrap_err()
            .to_string();
        assert!(err.contains("HandshakeComplete"), "{err}");
        assert!(from_json::<SizeData>("size", br#"{"cols":"x"}"#).is_err());
    }

    #[test]
    fn kms_bytes_are_go_base64() {
        let r = KmsEncryptionResponse {
            kms_cipher_text_key: vec![0xff, 0x00, 0x10],
            kms_cipher_text_hash: None,
            challenge_acknowledgement: true,
        };
        let json = String::from_utf8(to_json(&r)).unwrap();
        assert_eq!(
            json,
            r#"{"KMSCipherTextKey":"/wAQ","KMSCipherTextHash":null,"ChallengeAcknowledgement":true}"#
        );
        let back: KmsEncryptionResponse = from_json("kms", json.as_bytes()).unwrap();
        assert_eq!(back, r);
        assert!(from_json::<EncryptionChallenge>("c", br#"{"Challenge":"!!"}"#).is_err());
    }

    #[test]
    fn flags_parse_like_binary_read() {
        assert_eq!(parse_flag(&[0, 0, 0, 3]).unwrap(), Flag::ConnectToPortError);
        assert_eq!(
            parse_flag(&[0, 0, 0, 2, 9]).unwrap(),
            Flag::TerminateSession
        );
        assert!(matches!(
            parse_flag(&[0, 0, 2]),
            Err(PayloadError::ShortFlag(3))
        ));
        assert!(matches!(
            parse_flag(&[0, 0, 0, 9]),
            Err(PayloadError::UnknownFlag(9))
        ));
    }

    #[test]
    fn open_data_channel_debug_redacts_the_token() {
        let o = OpenDataChannelInput {
            token_value: "SECRET-TOKEN".into(),
            ..OpenDataChannelInput::default()
        };
        let shown = format!("{o:?}");
        assert!(!shown.contains("SECRET-TOKEN"), "{shown}");
        assert!(shown.contains("<redacted>"));
    }

    #[test]
    fn size_uses_lowercase_keys() {
        let s = SizeData { cols: 80, rows: 24 };
        assert_eq!(to_json(&s), br#"{"cols":80,"rows":24}"#);
    }
}
