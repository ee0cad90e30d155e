//! The verifier against the plugin's own vectors (delta sheet §2.5: produced by the
//! plugin's vendored signer, `aws-sdk-go` 1.54.10, as `getV4SignatureHeader` calls it)
//! and against each way a signature can be wrong.

use super::*;

const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const TOKEN: &str = "FQoGZXIvYXdzEXAMPLETOKEN";
const HOST: &str = "ssmmessages.us-east-1.amazonaws.com";
const DATE: &str = "20260102T030405Z";
const REGION: &str = "us-east-1";

const A_PATH: &str = "/v1/data-channel/alice@example.com-0a1b2c3d4e5f67890";
const A_QUERY: &str = "role=publish_subscribe&cell-number=AAEAAf+ab/cd=";
const A_SIGNATURE: &str = "ca71a9f177e472d0f1656f8325f17f19b79f61b08de95bffc46451312a2fcbe5";
const B_PATH: &str = "/v1/data-channel/test-0a1b2c3d4e5f67890";
const B_QUERY: &str = "role=publish_subscribe";
const B_SIGNATURE: &str = "e60327640c396474a8e9e64abf2bf356efcaa208a5f24b71dafd7797c900c718";

fn now() -> i64 {
    parse_amz_date(DATE).unwrap()
}

fn temporary() -> Credentials {
    Credentials::from([(
        AKID.to_owned(),
        Credential {
            secret_access_key: SECRET.to_owned(),
            session_token: Some(TOKEN.to_owned()),
        },
    )])
}

fn long_term() -> Credentials {
    Credentials::from([(
        AKID.to_owned(),
        Credential {
            secret_access_key: SECRET.to_owned(),
            session_token: None,
        },
    )])
}

fn authorization(region: &str, service: &str, signed: &str, signature: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential={AKID}/20260102/{region}/{service}/aws4_request, \
         SignedHeaders={signed}, Signature={signature}"
    )
}

/// The headers the plugin sends for vector A (plus gorilla's and net/http's unsigned
/// ones).
fn headers_a(authorization: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("host", HOST.parse().unwrap());
    h.insert("x-amz-date", DATE.parse().unwrap());
    h.insert("x-amz-security-token", TOKEN.parse().unwrap());
    h.insert("authorization", authorization.parse().unwrap());
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert("connection", "Upgrade".parse().unwrap());
    h.insert("sec-websocket-version", "13".parse().unwrap());
    h.insert("user-agent", "Go-http-client/1.1".parse().unwrap());
    h
}

fn auth_a() -> String {
    authorization(
        REGION,
        SERVICE,
        "host;x-amz-date;x-amz-security-token",
        A_SIGNATURE,
    )
}

fn req<'a>(path: &'a str, query: &'a str, headers: &'a HeaderMap) -> Request<'a> {
    Request {
        method: "GET",
        path,
        query,
        headers,
    }
}

#[test]
fn vector_a_canonical_request_is_the_plugins() {
    let h = headers_a(&auth_a());
    let creq = canonical_request(
        &req(A_PATH, A_QUERY, &h),
        &["host", "x-amz-date", "x-amz-security-token"],
        None,
    )
    .unwrap();
    let expected = [
        "GET",
        "/v1/data-channel/alice%40example.com-0a1b2c3d4e5f67890",
        "cell-number=AAEAAf%20ab%2Fcd%3D&role=publish_subscribe",
        "host:ssmmessages.us-east-1.amazonaws.com",
        "x-amz-date:20260102T030405Z",
        "x-amz-security-token:FQoGZXIvYXdzEXAMPLETOKEN",
        "",
        "host;x-amz-date;x-amz-security-token",
        EMPTY_PAYLOAD_SHA256,
    ]
    .join("\n");
    assert_eq!(creq, expected);
    assert_eq!(
        hex::encode(Sha256::digest(creq.as_bytes())),
        "0d62b1589b5c2d29c6c28a32130a09d77054897796e7c75aff51281e74174fe4"
    );
}

#[test]
fn vector_a_temporary_credentials_verify() {
    let h = headers_a(&auth_a());
    let v = verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()).unwrap();
    assert_eq!(v.access_key_id, AKID);
    assert_eq!(v.auth, AuthKind::Header);
}

#[test]
fn vector_b_long_term_keys_verify() {
    let mut h = HeaderMap::new();
    h.insert("host", HOST.parse().unwrap());
    h.insert("x-amz-date", DATE.parse().unwrap());
    let auth = authorization(REGION, SERVICE, "host;x-amz-date", B_SIGNATURE);
    h.insert("authorization", auth.parse().unwrap());
    let r = req(B_PATH, B_QUERY, &h);
    let creq = canonical_request(&r, &["host", "x-amz-date"], None).unwrap();
    assert_eq!(
        hex::encode(Sha256::digest(creq.as_bytes())),
        "69e355524b5e58130c1d72e9b992abeaf6a1a9a648f253c3f5b0c2ea999cc547"
    );
    assert_eq!(
        verify(&r, &long_term(), REGION, now())
            .unwrap()
            .access_key_id,
        AKID
    );
    // Long-term keys registered, but the request claims a token: refused.
    let mut with_token = h.clone();
    with_token.insert("x-amz-security-token", TOKEN.parse().unwrap());
    assert_eq!(
        verify(
            &req(B_PATH, B_QUERY, &with_token),
            &long_term(),
            REGION,
            now()
        ),
        Err(SigError::HeaderNotSigned("x-amz-security-token"))
    );
}

#[test]
fn a_flipped_signature_byte_fails() {
    let mut sig = A_SIGNATURE.to_owned();
    sig.replace_range(0..1, "d");
    let h = headers_a(&authorization(
        REGION,
        SERVICE,
        "host;x-amz-date;x-amz-security-token",
        &sig,
    ));
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::SignatureMismatch(AKID.to_owned()))
    );
}

#[test]
fn scope_must_name_this_region_and_ssmmessages() {
    let h = headers_a(&authorization(
        "eu-west-1",
        SERVICE,
        "host;x-amz-date;x-amz-security-token",
        A_SIGNATURE,
    ));
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::WrongRegion {
            got: "eu-west-1".into(),
            expected: REGION.into()
        })
    );
    // The simulator's own region differs from the one the client signed for.
    let h = headers_a(&auth_a());
    assert!(matches!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), "eu-west-1", now()),
        Err(SigError::WrongRegion { .. })
    ));
    let h = headers_a(&authorization(
        REGION,
        "ssm",
        "host;x-amz-date;x-amz-security-token",
        A_SIGNATURE,
    ));
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::WrongService("ssm".into()))
    );
}

#[test]
fn required_headers_must_be_signed() {
    let h = headers_a(&authorization(
        REGION,
        SERVICE,
        "host;x-amz-date",
        A_SIGNATURE,
    ));
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::HeaderNotSigned("x-amz-security-token"))
    );
    let h = headers_a(&authorization(
        REGION,
        SERVICE,
        "x-amz-date;x-amz-security-token",
        A_SIGNATURE,
    ));
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::HeaderNotSigned("host"))
    );
    let h = headers_a(&authorization(
        REGION,
        SERVICE,
        "host;x-amz-security-token",
        A_SIGNATURE,
    ));
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::HeaderNotSigned("x-amz-date"))
    );
    // Signed but not sent.
    let mut h = headers_a(&auth_a());
    h.remove("x-amz-security-token");
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::MissingSessionToken(AKID.into()))
    );
}

#[test]
fn an_old_or_future_date_fails() {
    let h = headers_a(&auth_a());
    let r = req(A_PATH, A_QUERY, &h);
    assert!(verify(&r, &temporary(), REGION, now() + MAX_SKEW_SECS).is_ok());
    assert_eq!(
        verify(&r, &temporary(), REGION, now() + MAX_SKEW_SECS + 1),
        Err(SigError::DateSkew {
            amz_date: DATE.into(),
            skew_secs: -MAX_SKEW_SECS - 1
        })
    );
    assert!(matches!(
        verify(&r, &temporary(), REGION, now() - 3600),
        Err(SigError::DateSkew {
            skew_secs: 3600,
            ..
        })
    ));
    // Scope date of another day than X-Amz-Date.
    let mut h = headers_a(&auth_a().replace("/20260102/", "/20260101/"));
    h.insert("x-amz-date", DATE.parse().unwrap());
    assert!(matches!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::ScopeDateMismatch { .. })
    ));
}

#[test]
fn unknown_key_and_wrong_token_fail() {
    let h = headers_a(&auth_a());
    let r = req(A_PATH, A_QUERY, &h);
    assert_eq!(
        verify(&r, &Credentials::new(), REGION, now()),
        Err(SigError::UnknownAccessKey(AKID.into()))
    );
    let mut other_token = temporary();
    other_token.get_mut(AKID).unwrap().session_token = Some("another".into());
    assert_eq!(
        verify(&r, &other_token, REGION, now()),
        Err(SigError::SessionTokenMismatch(AKID.into()))
    );
    let mut other_secret = temporary();
    other_secret.get_mut(AKID).unwrap().secret_access_key = "wrong".into();
    assert_eq!(
        verify(&r, &other_secret, REGION, now()),
        Err(SigError::SignatureMismatch(AKID.into()))
    );
}

#[test]
fn tampering_after_signing_fails() {
    // A signed header changed.
    let mut h = headers_a(&auth_a());
    h.insert(
        "host",
        "ssmmessages.us-east-2.amazonaws.com".parse().unwrap(),
    );
    assert_eq!(
        verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::SignatureMismatch(AKID.into()))
    );
    let h = headers_a(&auth_a());
    // The cell-number changed, or `+` sent escaped (`%2B` is a `+`, not the space the
    // plugin signed).
    for query in [
        "role=publish_subscribe&cell-number=AAEAAf+ab/cE=",
        "role=publish_subscribe&cell-number=AAEAAf%2Bab/cd=",
    ] {
        assert_eq!(
            verify(&req(A_PATH, query, &h), &temporary(), REGION, now()),
            Err(SigError::SignatureMismatch(AKID.into())),
            "{query}"
        );
    }
    // The path sent escaped: `%40` on the wire canonicalizes as `%2540`.
    let escaped = "/v1/data-channel/alice%40example.com-0a1b2c3d4e5f67890";
    assert_eq!(
        canonical_uri(escaped),
        "/v1/data-channel/alice%2540example.com-0a1b2c3d4e5f67890"
    );
    assert_eq!(
        verify(&req(escaped, A_QUERY, &h), &temporary(), REGION, now()),
        Err(SigError::SignatureMismatch(AKID.into()))
    );
    // An unsigned header may change.
    let mut h = headers_a(&auth_a());
    h.insert("user-agent", "other".parse().unwrap());
    assert!(verify(&req(A_PATH, A_QUERY, &h), &temporary(), REGION, now()).is_ok());
}

#[test]
fn unsigned_and_malformed_headers_say_so() {
    let mut h = HeaderMap::new();
    h.insert("host", HOST.parse().unwrap());
    assert_eq!(
        verify(&req(B_PATH, B_QUERY, &h), &long_term(), REGION, now()),
        Err(SigError::Unsigned)
    );
    for (auth, want) in [
        ("AWS4-HMAC-SHA1 Credential=x", "UnsupportedAlgorithm"),
        ("AWS4-HMAC-SHA256 Credential=a/b", "MalformedAuthorization"),
        (
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20260102/us-east-1/ssmmessages/aws4_request, SignedHeaders=x-amz-date;host, Signature=00",
            "MalformedAuthorization",
        ),
    ] {
        let mut h = headers_a(auth);
        h.insert("x-amz-date", DATE.parse().unwrap());
        let got = verify(&req(B_PATH, B_QUERY, &h), &long_term(), REGION, now()).unwrap_err();
        assert!(format!("{got:?}").starts_with(want), "{auth}: {got:?}");
    }
}

#[test]
fn canonical_query_follows_go_form_decoding() {
    assert_eq!(
        canonical_query("b=2&a=1&a=0&c&bad=%zz&x;y=1&sp=a+b%20c", None),
        "a=0&a=1&b=2&c=&sp=a%20b%20c"
    );
    assert_eq!(
        canonical_query("X-Amz-Signature=ab&role=r", Some("X-Amz-Signature")),
        "role=r"
    );
    assert_eq!(format_amz_date(now()), DATE);
    assert_eq!(parse_amz_date("2026-01-02T03:04:05Z"), None);
}

#[test]
fn presigned_urls_verify_and_refuse_tampering_expiry_and_header_auth() {
    let cred = temporary().remove(AKID).unwrap();
    let url = presign(
        "ws",
        "127.0.0.1:8080",
        "/v1/data-channel/s-1",
        "role=publish_subscribe&cell-number=+/8=",
        AKID,
        &cred,
        REGION,
        now(),
        60,
    );
    let rest = url.strip_prefix("ws://127.0.0.1:8080").unwrap();
    let (path, query) = rest.split_once('?').unwrap();
    assert!(is_presigned(query));
    assert!(query.contains("X-Amz-Security-Token="));
    let mut h = HeaderMap::new();
    h.insert("host", "127.0.0.1:8080".parse().unwrap());
    let ok = verify(&req(path, query, &h), &temporary(), REGION, now() + 60).unwrap();
    assert_eq!(ok.auth, AuthKind::Query);
    assert_eq!(
        verify(&req(path, query, &h), &temporary(), REGION, now() + 61),
        Err(SigError::Expired(1))
    );
    let tampered = query.replace("cell-number=+/8=", "cell-number=+/9=");
    assert_eq!(
        verify(&req(path, &tampered, &h), &temporary(), REGION, now()),
        Err(SigError::SignatureMismatch(AKID.into()))
    );
    let mut both = h.clone();
    both.insert("authorization", auth_a().parse().unwrap());
    assert_eq!(
        verify(&req(path, query, &both), &temporary(), REGION, now()),
        Err(SigError::HeaderAndQueryAuth)
    );
    let no_expires: String = query
        .split('&')
        .filter(|p| !p.starts_with("X-Amz-Expires="))
        .collect::<Vec<_>>()
        .join("&");
    assert_eq!(
        verify(&req(path, &no_expires, &h), &temporary(), REGION, now()),
        Err(SigError::MissingQueryParameter("X-Amz-Expires"))
    );
}
