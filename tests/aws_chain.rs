//! How bastion reaches AWS: the credential chain leaves IMDS alone unless a profile asks
//! for it, and the SDK's HTTP client honours `HTTP(S)_PROXY` / `NO_PROXY`.
//!
//! One test function on purpose: it changes process environment variables, which must
//! not race with other threads of this test binary.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aws_credential_types::provider::ProvideCredentials;
use bastion::aws::ssm::{AwsTarget, SsmApi, load_config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A listener that counts connections and records what each sent first, then answers
/// `answer` and closes.
async fn recorder(
    answer: &'static [u8],
) -> (u16, Arc<AtomicUsize>, Arc<std::sync::Mutex<Vec<String>>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (c, s) = (count.clone(), seen.clone());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = l.accept().await {
            c.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = tokio::time::timeout(Duration::from_secs(2), conn.read(&mut buf))
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or(0);
                s.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let _ = conn.write_all(answer).await;
            });
        }
    });
    (port, count, seen)
}

fn set(k: &str, v: &str) {
    // SAFETY: this binary's only test sets variables before any SDK call reads them.
    unsafe { std::env::set_var(k, v) }
}

fn unset(k: &str) {
    // SAFETY: as in `set`.
    unsafe { std::env::remove_var(k) }
}

#[tokio::test]
async fn imds_is_off_by_default_and_proxies_are_honoured() {
    for k in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_EC2_METADATA_DISABLED",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "NO_PROXY",
        "no_proxy",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_SSM",
    ] {
        unset(k);
    }
    set("AWS_CONFIG_FILE", "/nonexistent/bastion-test/config");
    set(
        "AWS_SHARED_CREDENTIALS_FILE",
        "/nonexistent/bastion-test/credentials",
    );

    // --- IMDS: a fake metadata endpoint that only counts who knocks.
    let (imds_port, imds_hits, _) =
        recorder(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").await;
    set(
        "AWS_EC2_METADATA_SERVICE_ENDPOINT",
        &format!("http://127.0.0.1:{imds_port}"),
    );
    let laptop = AwsTarget {
        profile: None,
        region: Some("eu-west-1".into()),
        imds: false,
    };
    let config = load_config(&laptop).await;
    let provider = config.credentials_provider().expect("a chain");
    let err = provider
        .provide_credentials()
        .await
        .expect_err("no credentials anywhere");
    assert!(!format!("{err:?}").is_empty());
    assert_eq!(
        imds_hits.load(Ordering::SeqCst),
        0,
        "IMDS was asked although off"
    );

    let on_ec2 = AwsTarget {
        imds: true,
        ..laptop.clone()
    };
    let config = load_config(&on_ec2).await;
    let provider = config.credentials_provider().expect("a chain");
    let _ = provider.provide_credentials().await;
    assert!(
        imds_hits.load(Ordering::SeqCst) > 0,
        "imds = true must consult the metadata service"
    );

    // --- Proxy: the SDK's requests to an endpoint go through HTTP_PROXY, unless NO_PROXY
    // names the host.
    set("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE");
    set(
        "AWS_SECRET_ACCESS_KEY",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    );
    let (proxy_port, proxy_hits, proxy_seen) = recorder(
        b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/x-amz-json-1.1\r\ncontent-length: 60\r\n\r\n{\"__type\":\"InvalidInstanceId\",\"message\":\"through the proxy\"}",
    )
    .await;
    set("HTTP_PROXY", &format!("http://127.0.0.1:{proxy_port}"));
    set("AWS_ENDPOINT_URL_SSM", "http://ssm.bastion-test.invalid");
    let api = SsmApi::new(&load_config(&laptop).await);
    let err = api
        .terminate_session("s-0123")
        .await
        .expect_err("proxy answers 400");
    assert_eq!(proxy_hits.load(Ordering::SeqCst), 1, "{err}");
    let request = proxy_seen.lock().unwrap()[0].clone();
    assert!(
        request.starts_with("POST http://ssm.bastion-test.invalid/ HTTP/1.1"),
        "absolute-form request to the proxy: {request}"
    );
    assert!(err.to_string().contains("through the proxy"), "{err}");

    set("NO_PROXY", "bastion-test.invalid");
    let api = SsmApi::new(&load_config(&laptop).await);
    let err = api
        .terminate_session("s-0123")
        .await
        .expect_err(".invalid does not resolve");
    assert_eq!(
        proxy_hits.load(Ordering::SeqCst),
        1,
        "NO_PROXY bypasses the proxy: {err}"
    );
}
