//! The websocket upgrade's SigV4 signature, pinned by vectors made by independent signers:
//! A and B by the plugin's own vendored signer (`aws-sdk-go` 1.54.10, as
//! `getV4SignatureHeader` calls it; `plugin-delta-1.2.896.md` §2.5), C by botocore's
//! `SigV4Auth` (awscli 1.46's botocore), for a `cell-number` with `+`, `/` and `=`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_credential_types::Credentials;
use bastion::aws::upgrade_sign::sign_upgrade;

const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

/// 2026-01-02T03:04:05Z.
fn vector_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_767_323_045)
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn vector_a_temporary_credentials_sso_session_id_and_base64_cell() {
    let creds = Credentials::new(
        AKID,
        SECRET,
        Some("FQoGZXIvYXdzEXAMPLETOKEN".into()),
        None,
        "test",
    );
    let url = "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/alice@example.com-0a1b2c3d4e5f67890?role=publish_subscribe&cell-number=AAEAAf+ab/cd=";
    let h = sign_upgrade(url, "us-east-1", &creds, vector_time())
        .unwrap()
        .0;
    assert_eq!(header(&h, "x-amz-date"), Some("20260102T030405Z"));
    assert_eq!(
        header(&h, "x-amz-security-token"),
        Some("FQoGZXIvYXdzEXAMPLETOKEN")
    );
    assert_eq!(
        header(&h, "authorization"),
        Some(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/us-east-1/ssmmessages/aws4_request, \
             SignedHeaders=host;x-amz-date;x-amz-security-token, \
             Signature=ca71a9f177e472d0f1656f8325f17f19b79f61b08de95bffc46451312a2fcbe5"
        )
    );
    assert_eq!(header(&h, "x-amz-content-sha256"), None);
    assert_eq!(h.len(), 3, "{h:?}");
}

#[test]
fn vector_b_long_term_keys() {
    let creds = Credentials::new(AKID, SECRET, None, None, "test");
    let url = "wss://ssmmessages.us-east-1.amazonaws.com/v1/data-channel/test-0a1b2c3d4e5f67890?role=publish_subscribe";
    let h = sign_upgrade(url, "us-east-1", &creds, vector_time())
        .unwrap()
        .0;
    assert_eq!(
        header(&h, "authorization"),
        Some(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/us-east-1/ssmmessages/aws4_request, \
             SignedHeaders=host;x-amz-date, \
             Signature=e60327640c396474a8e9e64abf2bf356efcaa208a5f24b71dafd7797c900c718"
        )
    );
    assert_eq!(header(&h, "x-amz-security-token"), None);
    assert_eq!(h.len(), 2, "{h:?}");
}

/// Vector C, made by botocore 1.44.8 `SigV4Auth.add_auth` (service `ssmmessages`,
/// region `eu-west-1`, time fixed at 2026-12-02T19:00:00Z). botocore signs the query
/// pairs as they appear in its URL, so it was given the query in the Go form that the
/// plugin signs (`+` read as a space, then `%20`; `/` → `%2F`, `=` → `%3D`): the
/// canonical request, and so the signature, is the one the plugin makes for the raw
/// URL below. The path (`+` and `@` in an SSO user's session id) is escaped by
/// botocore itself.
#[test]
fn vector_c_botocore_plus_slash_equals_cell_number() {
    let creds = Credentials::new(
        AKID,
        SECRET,
        Some("IQoJb3JpZ2luX2VjEXAMPLE/+token=".into()),
        None,
        "test",
    );
    let url = "wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/bob+ops@corp.example-07f3e9a1b2c4d5e6f?role=publish_subscribe&cell-number=Ab+/Cd+ef/gh==";
    let time = UNIX_EPOCH + Duration::from_secs(1_796_238_000);
    let h = sign_upgrade(url, "eu-west-1", &creds, time).unwrap().0;
    assert_eq!(header(&h, "x-amz-date"), Some("20261202T190000Z"));
    assert_eq!(
        header(&h, "authorization"),
        Some(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20261202/eu-west-1/ssmmessages/aws4_request, \
             SignedHeaders=host;x-amz-date;x-amz-security-token, \
             Signature=c37b68608438ffec60f287fd38b39423327bacede43040f72074c2e267813d8e"
        )
    );
}
