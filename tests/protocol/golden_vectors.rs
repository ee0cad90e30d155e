//! Every vector of `tests/golden/ssm-golden-vectors.json` against our code.
//!
//! The file is a copy of the reference-generated `golden/ssm-golden-vectors.json` of the
//! facts sheet (§0): the ClientMessages were produced by the session-manager-plugin's own
//! serializer ([P] `src/message` at `61cf1288`), the EICE URL comes from the aws-cli test
//! suite. Nothing is skipped: [`every_vector_is_checked`] fails when the file gains or
//! loses a top-level key, each section checks its own key set, and the ClientMessage
//! vectors are dispatched by name with a panic for any name this file does not know.

use std::collections::BTreeSet;

use bastion::aws::eice_presign::{
    self, AmzDateTime, Credentials, OpenTunnelRequest, presign_open_tunnel,
};
use bastion::proto::crypto::{CryptoError, DataKey, Direction, Role, SessionCipher};
use bastion::proto::kind::{Flag, MessageType, PayloadType, header_flags};
use bastion::proto::message::{self, ClientMessage};
use bastion::proto::payload::{
    self, AcknowledgeContent, ActionStatus, ChannelClosed, HandshakeComplete, HandshakeRequest,
    HandshakeResponse, OpenDataChannelInput, SessionTypeRequest, action_type, from_json, to_json,
};
use bastion::proto::smux::{Frame, FrameDecoder, StreamId};
use bytes::Bytes;
use serde_json::{Map, Value};
use uuid::Uuid;

const VECTORS: &str =
    include_str!("../../crates/bastion-proto/tests/golden/ssm-golden-vectors.json");

/// The top-level keys this file checks, one test each.
const SECTIONS: &[&str] = &[
    "aes_gcm",
    "client_messages",
    "eice_presign",
    "generator",
    "open_data_channel_text",
    "sha256_empty",
    "smux_v1_frames",
    "uuid_example",
];

/// The ClientMessage vectors, by name; [`check_payload`] has one arm for each.
const CLIENT_MESSAGES: &[&str] = &[
    "input_output_hello",
    "ack_for_output_seq7",
    "flag_terminate_session",
    "flag_disconnect_to_port",
    "flag_connect_to_port_error",
    "agent_handshake_request",
    "client_handshake_response",
    "agent_handshake_complete",
    "channel_closed_example",
];

fn vectors() -> Map<String, Value> {
    match serde_json::from_str(VECTORS).expect("golden vector file is valid JSON") {
        Value::Object(m) => m,
        other => panic!("golden vector file is not a JSON object: {other}"),
    }
}

/// The top-level section `key`; panics if it is missing.
fn section(key: &str) -> Value {
    vectors()
        .remove(key)
        .unwrap_or_else(|| panic!("golden vector `{key}` is missing"))
}

fn as_obj<'a>(v: &'a Value, ctx: &str) -> &'a Map<String, Value> {
    v.as_object()
        .unwrap_or_else(|| panic!("`{ctx}` is not a JSON object: {v}"))
}

/// Asserts that `map` has exactly the keys `want`.
fn assert_keys(map: &Map<String, Value>, want: &[&str], ctx: &str) {
    let got: BTreeSet<&str> = map.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = want.iter().copied().collect();
    assert_eq!(got, want, "key set of `{ctx}`");
}

fn get<'a>(map: &'a Map<String, Value>, key: &str, ctx: &str) -> &'a Value {
    map.get(key)
        .unwrap_or_else(|| panic!("`{ctx}` has no key `{key}`"))
}

fn get_str<'a>(map: &'a Map<String, Value>, key: &str, ctx: &str) -> &'a str {
    get(map, key, ctx)
        .as_str()
        .unwrap_or_else(|| panic!("`{ctx}.{key}` is not a string"))
}

fn get_u64(map: &Map<String, Value>, key: &str, ctx: &str) -> u64 {
    get(map, key, ctx)
        .as_u64()
        .unwrap_or_else(|| panic!("`{ctx}.{key}` is not an unsigned integer"))
}

fn get_hex(map: &Map<String, Value>, key: &str, ctx: &str) -> Vec<u8> {
    hex::decode(get_str(map, key, ctx)).unwrap_or_else(|e| panic!("`{ctx}.{key}`: bad hex: {e}"))
}

#[test]
fn every_vector_is_checked() {
    assert_keys(&vectors(), SECTIONS, "top level");
}

#[test]
fn generator_names_the_reference_revision() {
    let generator = section("generator");
    let generator = generator.as_str().expect("`generator` is a string");
    assert!(
        generator.contains("session-manager-plugin @61cf1288c7c66b4cbff922b7ed8a6604b3a3c2ea"),
        "{generator}"
    );
}

#[test]
fn client_messages() {
    let list = section("client_messages");
    let list = list.as_array().expect("`client_messages` is an array");
    let names: Vec<&str> = list
        .iter()
        .map(|v| get_str(as_obj(v, "client_messages[]"), "name", "client_messages[]"))
        .collect();
    assert_eq!(
        names.iter().copied().collect::<BTreeSet<_>>(),
        CLIENT_MESSAGES.iter().copied().collect::<BTreeSet<_>>(),
        "client_messages names"
    );
    assert_eq!(names.len(), CLIENT_MESSAGES.len(), "duplicate vector names");
    for v in list {
        check_client_message(as_obj(v, "client_messages[]"));
    }
}

fn check_client_message(v: &Map<String, Value>) {
    let name = get_str(v, "name", "client_messages[]");
    let ctx = format!("client_messages[{name}]");
    assert_keys(
        v,
        &["name", "description", "fields", "payload_utf8", "hex"],
        &ctx,
    );
    let fields = as_obj(get(v, "fields", &ctx), &ctx);
    let fctx = format!("{ctx}.fields");
    assert_keys(
        fields,
        &[
            "MessageType",
            "SchemaVersion",
            "CreatedDate",
            "SequenceNumber",
            "Flags",
            "MessageId",
            "PayloadType",
            "PayloadLength",
        ],
        &fctx,
    );
    let frame = get_hex(v, "hex", &ctx);
    let payload_utf8 = get_str(v, "payload_utf8", &ctx);

    // Decode: every header field as listed, the payload as listed.
    let msg = ClientMessage::decode(Bytes::from(frame.clone()))
        .unwrap_or_else(|e| panic!("{ctx}: decode failed: {e}"));
    let message_type = get_str(fields, "MessageType", &fctx);
    assert_eq!(msg.message_type.as_str(), message_type, "{ctx}");
    assert!(
        !matches!(msg.message_type, MessageType::Other(_)),
        "{ctx}: MessageType {message_type:?} is not a known type"
    );
    assert_eq!(
        u64::from(msg.schema_version),
        get_u64(fields, "SchemaVersion", &fctx),
        "{ctx}"
    );
    assert_eq!(
        msg.created_date,
        get_u64(fields, "CreatedDate", &fctx),
        "{ctx}"
    );
    assert_eq!(
        u64::try_from(msg.sequence_number).ok(),
        Some(get_u64(fields, "SequenceNumber", &fctx)),
        "{ctx}"
    );
    assert_eq!(msg.flags, get_u64(fields, "Flags", &fctx), "{ctx}");
    assert_eq!(
        msg.message_id.hyphenated().to_string(),
        get_str(fields, "MessageId", &fctx),
        "{ctx}"
    );
    assert_eq!(
        u64::from(msg.payload_type.as_u32()),
        get_u64(fields, "PayloadType", &fctx),
        "{ctx}"
    );
    assert_eq!(
        msg.payload.len() as u64,
        get_u64(fields, "PayloadLength", &fctx),
        "{ctx}"
    );
    assert_eq!(&msg.payload[..], payload_utf8.as_bytes(), "{ctx}");

    // Re-encoding the decoded message reproduces the frame byte for byte.
    let reencoded = msg
        .encode()
        .unwrap_or_else(|e| panic!("{ctx}: encode failed: {e}"));
    assert_eq!(
        hex::encode(&reencoded),
        hex::encode(&frame),
        "{ctx}: re-encode"
    );

    // So does a message built from the listed fields alone.
    let built = ClientMessage {
        message_type: MessageType::parse(message_type),
        schema_version: u32::try_from(get_u64(fields, "SchemaVersion", &fctx))
            .expect("SchemaVersion fits u32"),
        created_date: get_u64(fields, "CreatedDate", &fctx),
        sequence_number: i64::try_from(get_u64(fields, "SequenceNumber", &fctx))
            .expect("SequenceNumber fits i64"),
        flags: get_u64(fields, "Flags", &fctx),
        message_id: Uuid::parse_str(get_str(fields, "MessageId", &fctx)).expect("MessageId"),
        payload_type: PayloadType::from_u32(
            u32::try_from(get_u64(fields, "PayloadType", &fctx)).expect("PayloadType fits u32"),
        ),
        payload: Bytes::copy_from_slice(payload_utf8.as_bytes()),
    };
    assert_eq!(built, msg, "{ctx}: built from fields");
    let built_bytes = built.encode().expect("encode built message");
    assert_eq!(
        hex::encode(&built_bytes),
        hex::encode(&frame),
        "{ctx}: built from fields"
    );
    assert_eq!(
        &frame[message::PAYLOAD_LENGTH_OFFSET..message::PAYLOAD_OFFSET],
        &u32::try_from(payload_utf8.len())
            .expect("payload fits u32")
            .to_be_bytes(),
        "{ctx}: PayloadLength field"
    );

    check_payload(name, &msg, payload_utf8);
}

/// The payload of each named vector, parsed with its `payload` type and re-serialized.
fn check_payload(name: &str, msg: &ClientMessage, payload_utf8: &str) {
    let bytes = payload_utf8.as_bytes();
    match name {
        "input_output_hello" => {
            assert_eq!(msg.message_type, MessageType::InputStreamData);
            assert_eq!(msg.payload_type, PayloadType::Output);
            assert_eq!(msg.flags, header_flags::DATA);
            assert_eq!(bytes, b"hello");
        }
        "ack_for_output_seq7" => {
            assert_eq!(msg.message_type, MessageType::Acknowledge);
            assert_eq!(msg.payload_type, PayloadType::Undefined);
            assert_eq!(msg.flags, header_flags::ACK);
            let ack: AcknowledgeContent = from_json("AcknowledgeContent", bytes).expect(name);
            assert_eq!(
                ack,
                AcknowledgeContent {
                    message_type: "output_stream_data".into(),
                    message_id: "dd01e56b-ff48-483e-a508-b5f073f31b16".into(),
                    sequence_number: 7,
                    is_sequential_message: true,
                }
            );
            assert_eq!(String::from_utf8(to_json(&ack)).unwrap(), payload_utf8);
        }
        "flag_terminate_session" | "flag_disconnect_to_port" | "flag_connect_to_port_error" => {
            let (want, message_type) = match name {
                "flag_terminate_session" => (Flag::TerminateSession, MessageType::InputStreamData),
                "flag_disconnect_to_port" => (Flag::DisconnectToPort, MessageType::InputStreamData),
                _ => (Flag::ConnectToPortError, MessageType::OutputStreamData),
            };
            assert_eq!(msg.message_type, message_type, "{name}");
            assert_eq!(msg.payload_type, PayloadType::Flag, "{name}");
            assert_eq!(payload::parse_flag(bytes).expect(name), want, "{name}");
            assert_eq!(want.to_payload().as_slice(), bytes, "{name}");
        }
        "agent_handshake_request" => {
            assert_eq!(msg.message_type, MessageType::OutputStreamData);
            assert_eq!(msg.payload_type, PayloadType::HandshakeRequest);
            assert_eq!(msg.flags, header_flags::SYN);
            let req: HandshakeRequest = from_json("HandshakeRequest", bytes).expect(name);
            assert_eq!(req.agent_version, "3.3.987.0");
            assert_eq!(req.requested_client_actions.len(), 1);
            let action = &req.requested_client_actions[0];
            assert_eq!(action.action_type, action_type::SESSION_TYPE);
            let params: SessionTypeRequest =
                serde_json::from_value(action.action_parameters.clone()).expect(name);
            assert_eq!(params.session_type, "Port");
            let props = params.properties.as_object().expect("Properties object");
            let prop = |k: &str| props.get(k).and_then(Value::as_str);
            assert_eq!(
                prop("host"),
                Some("mydb.cluster-abc.eu-west-1.rds.amazonaws.com")
            );
            assert_eq!(prop("localPortNumber"), Some("0"));
            assert_eq!(prop("portNumber"), Some("5432"));
            assert_eq!(prop("type"), Some("LocalPortForwarding"));
            assert_eq!(props.len(), 4);

            // ActionParameters and Properties are `serde_json::Value`s: without serde_json's
            // `preserve_order` feature their keys re-serialize sorted, so the re-serialized
            // request puts "Properties" before "SessionType" while the agent's Go struct
            // writes "SessionType" first. The whole payload is therefore compared as JSON
            // values, not bytes. The `SessionTypeRequest` struct fixes the field order, and
            // Go writes map keys sorted, so that part is checked byte for byte.
            let reserialized: Value = serde_json::from_slice(&to_json(&req)).expect(name);
            let original: Value = serde_json::from_str(payload_utf8).expect(name);
            assert_eq!(reserialized, original);
            let params_json = String::from_utf8(to_json(&params)).unwrap();
            assert!(
                payload_utf8.contains(&format!(r#""ActionParameters":{params_json}}}"#)),
                "{params_json} is not the ActionParameters of {payload_utf8}"
            );
        }
        "client_handshake_response" => {
            assert_eq!(msg.message_type, MessageType::InputStreamData);
            assert_eq!(msg.payload_type, PayloadType::HandshakeResponse);
            let resp: HandshakeResponse = from_json("HandshakeResponse", bytes).expect(name);
            assert_eq!(resp.client_version, "1.2.650.0");
            assert_eq!(resp.processed_client_actions.len(), 1);
            let action = &resp.processed_client_actions[0];
            assert_eq!(action.action_type, action_type::SESSION_TYPE);
            assert_eq!(action.action_status, ActionStatus::Success);
            assert_eq!(action.action_result, Value::Null);
            assert_eq!(action.error, "");
            assert_eq!(resp.errors, None);
            assert_eq!(String::from_utf8(to_json(&resp)).unwrap(), payload_utf8);
        }
        "agent_handshake_complete" => {
            assert_eq!(msg.message_type, MessageType::OutputStreamData);
            assert_eq!(msg.payload_type, PayloadType::HandshakeComplete);
            let hc: HandshakeComplete = from_json("HandshakeComplete", bytes).expect(name);
            assert_eq!(
                hc,
                HandshakeComplete {
                    handshake_time_to_complete_ns: 1_500_000_000,
                    customer_message: String::new(),
                }
            );
            assert_eq!(String::from_utf8(to_json(&hc)).unwrap(), payload_utf8);
        }
        "channel_closed_example" => {
            assert_eq!(msg.message_type, MessageType::ChannelClosed);
            assert_eq!(msg.payload_type, PayloadType::Undefined);
            let cc: ChannelClosed = from_json("ChannelClosed", bytes).expect(name);
            assert_eq!(
                cc,
                ChannelClosed {
                    message_id: "dd01e56b-ff48-483e-a508-b5f073f31b16".into(),
                    created_date: "2024-01-01T00:00:00.000Z".into(),
                    destination_id: "i-0123456789abcdef0".into(),
                    session_id: "user-0123456789abcdef0".into(),
                    message_type: "channel_closed".into(),
                    schema_version: 1,
                    output: String::new(),
                }
            );
            assert_eq!(String::from_utf8(to_json(&cc)).unwrap(), payload_utf8);
        }
        other => panic!("client message vector `{other}` has no payload check"),
    }
}

#[test]
fn open_data_channel_text() {
    let text = section("open_data_channel_text");
    let text = text.as_str().expect("`open_data_channel_text` is a string");
    let input = OpenDataChannelInput {
        message_schema_version: "1.0".into(),
        request_id: "6e8d0a0e-1f5a-4a3e-9a5e-7a0f3f9f2b11".into(),
        token_value: "TOKEN".into(),
        client_id: "0c2b3d4e-5f60-4718-8a9b-0c1d2e3f4a5b".into(),
        client_version: "1.2.650.0".into(),
    };
    assert_eq!(serde_json::to_string(&input).unwrap(), text);
    let parsed: OpenDataChannelInput = serde_json::from_str(text).unwrap();
    assert_eq!(parsed, input);
}

#[test]
fn uuid_example() {
    let v = section("uuid_example");
    let v = as_obj(&v, "uuid_example");
    assert_keys(
        v,
        &["rfc4122_bytes", "uuid", "wire_bytes_at_offset_64"],
        "uuid_example",
    );
    let id = Uuid::parse_str(get_str(v, "uuid", "uuid_example")).expect("uuid");
    let rfc = get_hex(v, "rfc4122_bytes", "uuid_example");
    let wire: [u8; 16] = get_hex(v, "wire_bytes_at_offset_64", "uuid_example")
        .try_into()
        .expect("16 wire bytes");
    assert_eq!(id.as_bytes().as_slice(), rfc.as_slice());
    assert_eq!(message::uuid_to_wire(&id), wire);
    assert_eq!(message::uuid_from_wire(&wire), id);

    // The same bytes sit at offset 64 of a ClientMessage carrying this MessageId.
    let list = section("client_messages");
    let first = as_obj(&list[0], "client_messages[0]");
    let frame = get_hex(first, "hex", "client_messages[0]");
    assert_eq!(
        get_str(
            as_obj(get(first, "fields", "client_messages[0]"), "fields"),
            "MessageId",
            "client_messages[0].fields"
        ),
        id.to_string()
    );
    assert_eq!(
        &frame[message::MESSAGE_ID_OFFSET..message::MESSAGE_ID_OFFSET + 16],
        wire.as_slice()
    );
}

#[test]
fn sha256_empty() {
    let v = section("sha256_empty");
    let want = v.as_str().expect("`sha256_empty` is a string");
    assert_eq!(hex::encode(message::sha256(b"")), want);
    assert_eq!(eice_presign::EMPTY_PAYLOAD_SHA256, want);
}

#[test]
fn aes_gcm() {
    let v = section("aes_gcm");
    let v = as_obj(&v, "aes_gcm");
    let ctx = "aes_gcm";
    assert_keys(
        v,
        &[
            "client_decrypt_key",
            "client_encrypt_key",
            "data_key_plaintext_64",
            "nonce",
            "note",
            "plaintext_utf8",
            "wire_payload",
        ],
        ctx,
    );
    let note = get_str(v, "note", ctx);
    assert!(note.contains("no AAD"), "{note}");
    let data_key = get_hex(v, "data_key_plaintext_64", ctx);
    let nonce: [u8; 12] = get_hex(v, "nonce", ctx).try_into().expect("12-byte nonce");
    let plaintext = get_str(v, "plaintext_utf8", ctx);
    let wire = get_hex(v, "wire_payload", ctx);

    // The key split: the client decrypts with bytes 0..32 and encrypts with 32..64.
    let key = DataKey::from_plaintext(&data_key).expect("64-byte data key");
    assert_eq!(key.agent_to_client(), get_hex(v, "client_decrypt_key", ctx));
    assert_eq!(key.client_to_agent(), get_hex(v, "client_encrypt_key", ctx));
    assert_eq!(
        key.key_for(Direction::ClientToAgent),
        get_hex(v, "client_encrypt_key", ctx)
    );
    assert_eq!(
        key.key_for(Direction::AgentToClient),
        get_hex(v, "client_decrypt_key", ctx)
    );

    // A client→agent payload: the client seals it, the agent opens it.
    let client = SessionCipher::from_plaintext_key(Role::Client, &data_key).expect("client");
    let agent = SessionCipher::from_plaintext_key(Role::Agent, &data_key).expect("agent");
    let sealed = client
        .encrypt_with_nonce(nonce, plaintext.as_bytes())
        .expect("seal");
    assert_eq!(hex::encode(&sealed), hex::encode(&wire));
    assert_eq!(&wire[..12], nonce.as_slice());
    assert_eq!(wire.len(), 12 + plaintext.len() + 16);
    assert_eq!(
        agent.decrypt(&wire).expect("agent opens"),
        plaintext.as_bytes()
    );
    // The client's receive key is the other half: it cannot open its own payload.
    assert_eq!(client.decrypt(&wire), Err(CryptoError::AuthFailed));
}

#[test]
fn smux_v1_frames() {
    let v = section("smux_v1_frames");
    let v = as_obj(&v, "smux_v1_frames");
    let ctx = "smux_v1_frames";
    let frames = [
        ("syn_sid3", Frame::Syn { sid: StreamId(3) }),
        ("fin_sid3", Frame::Fin { sid: StreamId(3) }),
        (
            "psh_sid3_hello",
            Frame::Psh {
                sid: StreamId(3),
                data: Bytes::from_static(b"hello"),
            },
        ),
        ("nop", Frame::Nop { sid: StreamId(0) }),
    ];
    let mut keys: Vec<&str> = frames.iter().map(|(k, _)| *k).collect();
    keys.push("layout");
    assert_keys(v, &keys, ctx);
    let layout = get_str(v, "layout", ctx);
    assert!(layout.contains("little-endian"), "{layout}");

    let mut stream = Vec::new();
    for (key, frame) in &frames {
        let bytes = get_hex(v, key, ctx);
        assert_eq!(
            hex::encode(frame.to_bytes().expect("encode")),
            hex::encode(&bytes),
            "{key}: encode"
        );
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        assert_eq!(dec.next_frame(), Ok(Some(frame.clone())), "{key}: decode");
        assert_eq!(dec.next_frame(), Ok(None), "{key}: trailing bytes");
        assert_eq!(dec.buffered(), 0, "{key}");
        stream.extend_from_slice(&bytes);
    }

    // All four as one byte stream, fed a byte at a time.
    let mut dec = FrameDecoder::new();
    let mut decoded = Vec::new();
    for b in &stream {
        dec.push(std::slice::from_ref(b));
        while let Some(f) = dec.next_frame().expect("valid stream") {
            decoded.push(f);
        }
    }
    let want: Vec<Frame> = frames.iter().map(|(_, f)| f.clone()).collect();
    assert_eq!(decoded, want);
    assert_eq!(dec.offset(), stream.len() as u64);
}

#[test]
fn eice_presign() {
    let v = section("eice_presign");
    let v = as_obj(&v, "eice_presign");
    let ctx = "eice_presign";
    assert_keys(
        v,
        &[
            "access_key",
            "amz_date",
            "payload_hash",
            "region",
            "secret_key",
            "service",
            "source",
            "url",
        ],
        ctx,
    );
    assert_eq!(get_str(v, "service", ctx), eice_presign::SERVICE);
    assert_eq!(
        get_str(v, "payload_hash", ctx),
        eice_presign::EMPTY_PAYLOAD_SHA256
    );
    assert_eq!(
        get_str(v, "payload_hash", ctx),
        hex::encode(message::sha256(b""))
    );
    assert!(get_str(v, "source", ctx).contains("test_single_connection_mode"));

    // yyyymmddThhmmssZ
    let amz_date = get_str(v, "amz_date", ctx);
    assert_eq!(amz_date.len(), 16, "{amz_date}");
    let num = |r: std::ops::Range<usize>| -> u32 {
        amz_date
            .get(r)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad amz_date {amz_date}"))
    };
    let time = AmzDateTime::new(
        num(0..4),
        num(4..6),
        num(6..8),
        num(9..11),
        num(11..13),
        num(13..15),
    )
    .expect("valid amz_date");
    assert_eq!(time.amz_date(), amz_date);

    // The vector lists the test's other inputs only inside its URL: read them back.
    let url = get_str(v, "url", ctx);
    let rest = url.strip_prefix("wss://").expect("wss URL");
    let (dns_name, query) = rest.split_once("/openTunnel?").expect("openTunnel path");
    let param = |k: &str| -> &str {
        query
            .split('&')
            .find_map(|p| p.strip_prefix(k).and_then(|p| p.strip_prefix('=')))
            .unwrap_or_else(|| panic!("URL has no {k}"))
    };
    assert_eq!(param("instanceConnectEndpointId"), "eice-123");
    assert_eq!(param("remotePort"), "22");
    assert_eq!(param("privateIpAddress"), "10.0.0.0");
    assert_eq!(param("maxTunnelDuration"), "1");

    let req = OpenTunnelRequest {
        credentials: Credentials {
            access_key_id: get_str(v, "access_key", ctx).into(),
            secret_access_key: get_str(v, "secret_key", ctx).into(),
            session_token: None,
        },
        region: get_str(v, "region", ctx).into(),
        dns_name: dns_name.into(),
        endpoint_id: param("instanceConnectEndpointId").into(),
        remote_port: param("remotePort").parse().expect("port"),
        private_ip: param("privateIpAddress").into(),
        max_tunnel_duration: Some(param("maxTunnelDuration").parse().expect("duration")),
        time,
    };
    assert_eq!(presign_open_tunnel(&req).expect("presign"), url);
}

/// Decoder leniency ([P] `messageparser.go` fn `DeserializeClientMessage` / `Validate`, [A]
/// `agentmessage.go` fn `Deserialize` / `Validate`; `proto-docs/wire-format.md` §3): every
/// golden frame still decodes to the same message when it is changed in ways both
/// references accept: NUL instead of space padding of MessageType, PayloadLength 0 or
/// wrong (never used to slice; 0 skips the digest), a zeroed digest with PayloadLength 0,
/// another SchemaVersion, a longer header (payload at HeaderLength + 4). `decode_strict`
/// accepts the unchanged frames only.
#[test]
fn golden_frames_decode_under_reference_leniency() {
    use bastion::proto::message::{
        MESSAGE_TYPE_LEN, MESSAGE_TYPE_OFFSET, PAYLOAD_DIGEST_OFFSET, PAYLOAD_LENGTH_OFFSET,
        PAYLOAD_OFFSET, SCHEMA_VERSION_OFFSET,
    };
    let list = section("client_messages");
    let list = list.as_array().expect("`client_messages` is an array");
    assert_eq!(list.len(), CLIENT_MESSAGES.len());
    for v in list {
        let v = as_obj(v, "client_messages[]");
        let ctx = format!(
            "client_messages[{}]",
            get_str(v, "name", "client_messages[]")
        );
        let frame = get_hex(v, "hex", &ctx);
        let want = ClientMessage::decode(Bytes::from(frame.clone()))
            .unwrap_or_else(|e| panic!("{ctx}: decode failed: {e}"));
        let strict = ClientMessage::decode_strict(Bytes::from(frame.clone()))
            .unwrap_or_else(|e| panic!("{ctx}: decode_strict failed: {e}"));
        assert_eq!(strict, want, "{ctx}: strict");

        let field = MESSAGE_TYPE_OFFSET..MESSAGE_TYPE_OFFSET + MESSAGE_TYPE_LEN;
        let plen = PAYLOAD_LENGTH_OFFSET..PAYLOAD_OFFSET;
        let mut variants: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut f = frame.clone();
        f[field.clone()]
            .iter_mut()
            .filter(|b| **b == b' ')
            .for_each(|b| *b = 0);
        variants.push(("NUL padding", f));
        let mut f = frame.clone();
        f[plen.clone()].fill(0);
        variants.push(("PayloadLength 0", f.clone()));
        f[PAYLOAD_DIGEST_OFFSET..PAYLOAD_DIGEST_OFFSET + 32].fill(0);
        variants.push(("PayloadLength 0, no digest", f));
        let mut f = frame.clone();
        let wrong = u32::from_be_bytes(f[plen.clone()].try_into().unwrap()) + 17;
        f[plen.clone()].copy_from_slice(&wrong.to_be_bytes());
        variants.push(("PayloadLength wrong", f));
        let mut f = frame.clone();
        f[0..4].copy_from_slice(&120u32.to_be_bytes());
        f.splice(PAYLOAD_OFFSET..PAYLOAD_OFFSET, [0xee; 4]);
        variants.push(("HeaderLength 120", f));

        for (what, f) in variants {
            let got = ClientMessage::decode(Bytes::from(f.clone()))
                .unwrap_or_else(|e| panic!("{ctx}, {what}: decode failed: {e}"));
            assert_eq!(got, want, "{ctx}, {what}");
            assert!(
                ClientMessage::decode_strict(Bytes::from(f)).is_err() || what == "NUL padding",
                "{ctx}, {what}: strict accepts"
            );
        }
        let mut f = frame.clone();
        f[SCHEMA_VERSION_OFFSET..SCHEMA_VERSION_OFFSET + 4].copy_from_slice(&7u32.to_be_bytes());
        let got = ClientMessage::decode(Bytes::from(f)).expect("odd SchemaVersion decodes");
        assert_eq!(got.schema_version, 7, "{ctx}");
        assert_eq!(
            ClientMessage {
                schema_version: want.schema_version,
                ..got
            },
            want,
            "{ctx}"
        );
    }
}
