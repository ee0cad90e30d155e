//! Every payload parser of `proto::payload` and `SessionCipher::decrypt` on arbitrary
//! bytes: no panic. Parsed values of the plain (no `serde_json::Value`) payload types
//! must also survive `to_json` → `from_json` unchanged; the others must at least
//! re-parse. Decryption is checked on the raw input (always fails authentication, but
//! exercises the length handling) and as a round trip through the peer's cipher.
#![no_main]

use std::fmt::Debug;
use std::sync::LazyLock;

use bastion_proto::crypto::{NONCE_LEN, Role, SessionCipher};
use bastion_proto::payload::{
    AcknowledgeContent, ChannelClosed, EncryptionChallenge, HandshakeComplete, HandshakeRequest,
    HandshakeResponse, KmsEncryptionRequest, KmsEncryptionResponse, OpenDataChannelInput,
    ProcessedClientAction, RequestedClientAction, SessionTypeRequest, SizeData, from_json,
    parse_flag, to_json,
};
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The golden-vector data key (bytes 0x00..=0x3f).
fn key() -> Vec<u8> {
    (0u8..64).collect()
}

static CLIENT: LazyLock<SessionCipher> =
    LazyLock::new(|| SessionCipher::from_plaintext_key(Role::Client, &key()).unwrap());
static AGENT: LazyLock<SessionCipher> =
    LazyLock::new(|| SessionCipher::from_plaintext_key(Role::Agent, &key()).unwrap());

/// Parses; on success the value must round-trip exactly.
fn exact<T: DeserializeOwned + Serialize + PartialEq + Debug>(what: &'static str, data: &[u8]) {
    if let Ok(v) = from_json::<T>(what, data) {
        let json = to_json(&v);
        let back: T = from_json(what, &json)
            .unwrap_or_else(|e| panic!("{what}: re-parse of our own JSON failed: {e}"));
        assert_eq!(back, v, "{what}: JSON round trip changed the value");
    }
}

/// Parses; on success our serialization must parse again (the value may hold
/// arbitrary JSON numbers, whose float round trip is serde_json's business).
fn reparses<T: DeserializeOwned + Serialize>(what: &'static str, data: &[u8]) {
    if let Ok(v) = from_json::<T>(what, data) {
        let json = to_json(&v);
        assert!(!json.is_empty(), "{what}: to_json produced nothing");
        if let Err(e) = from_json::<T>(what, &json) {
            panic!("{what}: re-parse of our own JSON failed: {e}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    exact::<OpenDataChannelInput>("open_data_channel", data);
    exact::<AcknowledgeContent>("acknowledge", data);
    exact::<ChannelClosed>("channel_closed", data);
    exact::<KmsEncryptionRequest>("kms_encryption_request", data);
    exact::<KmsEncryptionResponse>("kms_encryption_response", data);
    exact::<HandshakeComplete>("handshake_complete", data);
    exact::<EncryptionChallenge>("encryption_challenge", data);
    exact::<SizeData>("size", data);
    reparses::<RequestedClientAction>("requested_client_action", data);
    reparses::<HandshakeRequest>("handshake_request", data);
    reparses::<SessionTypeRequest>("session_type_request", data);
    reparses::<ProcessedClientAction>("processed_client_action", data);
    reparses::<HandshakeResponse>("handshake_response", data);

    if let Ok(flag) = parse_flag(data) {
        assert_eq!(flag.to_payload()[..], data[..4]);
    }

    // Arbitrary wire payloads: never authentic, must fail cleanly.
    let _ = CLIENT.decrypt(data);
    let _ = AGENT.decrypt(data);

    // Round trip: first bytes as the nonce, the rest as plaintext.
    if data.len() >= NONCE_LEN {
        let (nonce, plain) = data.split_at(NONCE_LEN);
        let nonce: [u8; NONCE_LEN] = nonce.try_into().unwrap();
        let wire = CLIENT.encrypt_with_nonce(nonce, plain).expect("seal");
        assert_eq!(
            AGENT.decrypt(&wire).expect("agent opens client data"),
            plain
        );
        assert!(
            CLIENT.decrypt(&wire).is_err(),
            "client opened its own direction"
        );
        let wire = AGENT.encrypt_with_nonce(nonce, plain).expect("seal");
        assert_eq!(
            CLIENT.decrypt(&wire).expect("client opens agent data"),
            plain
        );
        assert!(
            AGENT.decrypt(&wire).is_err(),
            "agent opened its own direction"
        );
    }
});
