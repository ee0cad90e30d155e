//! The real `aws-sdk-ssm` against the simulator: responses parse, errors map to the
//! SDK's typed errors (or carry the code for unmodelled ones), timestamps parse, and the
//! SDK's retry of a throttled call succeeds.

use crate::sim_util;

use aws_sdk_ssm::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_ssm::error::ProvideErrorMetadata;
use aws_sdk_ssm::operation::resume_session::ResumeSessionError;
use aws_sdk_ssm::operation::start_session::StartSessionError;
use aws_sdk_ssm::types::{
    InstanceInformationStringFilter, PingStatus, PlatformType, SessionState, SessionStatus,
};
use aws_smithy_http_client::tls;
use bastion_sim::{Faults, SimHandle};
use sim_util::*;

const TARGET: &str = "i-0123456789abcdef0";

fn client(sim: &SimHandle) -> aws_sdk_ssm::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_ssm::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("eu-west-1"))
        .credentials_provider(Credentials::new("AKIDSDK", "secret", None, None, "test"))
        .endpoint_url(sim.endpoint_url())
        .http_client(http)
        .build();
    aws_sdk_ssm::Client::from_conf(conf)
}

#[tokio::test]
async fn sdk_parses_responses() {
    let sim = start_default().await;
    let ssm = client(&sim);
    let out = ssm
        .start_session()
        .target(TARGET)
        .document_name("AWS-StartPortForwardingSession")
        .parameters("portNumber", vec!["5432".into()])
        .parameters("localPortNumber", vec!["0".into()])
        .reason("sdk test")
        .send()
        .await
        .expect("StartSession");
    let id = out.session_id().unwrap().to_owned();
    assert!(id.starts_with("AKIDSDK-"), "{id}");
    assert!(!out.token_value().unwrap().is_empty());
    let url = out.stream_url().unwrap();
    let prefix = format!(
        "ws://{}/v1/data-channel/{id}?role=publish_subscribe&cell-number=",
        sim.local_addr()
    );
    assert!(url.starts_with(&prefix), "{url}");
    assert_eq!(
        sim.session(&id).unwrap().properties.unwrap()["portNumber"],
        "5432"
    );

    let resumed = ssm.resume_session().session_id(&id).send().await.unwrap();
    assert_ne!(resumed.token_value(), out.token_value());
    // Same session, a fresh cell-number.
    let resumed_url = resumed.stream_url().unwrap();
    assert!(resumed_url.starts_with(&prefix), "{resumed_url}");
    assert_ne!(resumed_url, url);

    let active = ssm
        .describe_sessions()
        .state(SessionState::Active)
        .send()
        .await
        .unwrap();
    let s = &active.sessions()[0];
    assert_eq!(s.session_id(), Some(id.as_str()));
    assert_eq!(s.status(), Some(&SessionStatus::Connecting));
    assert_eq!(s.target(), Some(TARGET));
    assert_eq!(s.reason(), Some("sdk test"));
    let start = s.start_date().unwrap().secs();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((now - start).abs() < 60, "start {start} now {now}");

    let t = ssm
        .terminate_session()
        .session_id(&id)
        .send()
        .await
        .unwrap();
    assert_eq!(t.session_id(), Some(id.as_str()));
    assert!(
        sim.wait_terminated(&id, std::time::Duration::from_secs(5))
            .await
    );
    let history = ssm
        .describe_sessions()
        .state(SessionState::History)
        .send()
        .await
        .unwrap();
    let s = &history.sessions()[0];
    assert_eq!(s.status(), Some(&SessionStatus::Terminated));
    assert!(s.end_date().is_some());

    let info = ssm
        .describe_instance_information()
        .filters(
            InstanceInformationStringFilter::builder()
                .key("InstanceIds")
                .values(TARGET)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let i = &info.instance_information_list()[0];
    assert_eq!(i.instance_id(), Some(TARGET));
    assert_eq!(i.ping_status(), Some(&PingStatus::Online));
    assert_eq!(i.platform_type(), Some(&PlatformType::Linux));
    assert_eq!(i.agent_version(), Some("3.3.987.0"));
    assert!(i.last_ping_date_time().is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn sdk_maps_errors() {
    let sim = start_default().await;
    let ssm = client(&sim);

    let e = ssm
        .start_session()
        .target("not-an-instance")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(
        matches!(e, StartSessionError::TargetNotConnected(_)),
        "{e:?}"
    );
    assert!(e.message().unwrap().contains("not-an-instance"));

    let e = ssm
        .start_session()
        .target(TARGET)
        .document_name("AWS-NoSuchDocument")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(matches!(e, StartSessionError::InvalidDocument(_)), "{e:?}");

    let e = ssm
        .resume_session()
        .session_id("nobody-0123456789abcdef0")
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert!(
        matches!(e, ResumeSessionError::DoesNotExistException(_)),
        "{e:?}"
    );

    sim.set_faults(Faults {
        fail_start_session: Some("AccessDeniedException".into()),
        ..Faults::default()
    })
    .unwrap();
    let e = ssm
        .start_session()
        .target(TARGET)
        .send()
        .await
        .unwrap_err()
        .into_service_error();
    assert_eq!(e.code(), Some("AccessDeniedException"));
    assert!(e.message().is_some());

    // Throttling is retried by the SDK: one throttled attempt, then success.
    sim.set_faults(Faults {
        fail_start_session: Some("ThrottlingException".into()),
        fail_start_session_times: Some(1),
        ..Faults::default()
    })
    .unwrap();
    ssm.start_session()
        .target(TARGET)
        .send()
        .await
        .expect("the SDK retries ThrottlingException");
    assert!(sim.faults().fail_start_session.is_none());
    sim.shutdown().await;
}
