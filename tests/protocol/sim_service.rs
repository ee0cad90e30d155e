//! The simulator's SSM service API (AWS JSON 1.1) and its introspection endpoints,
//! driven over HTTP/1.1 by a hand-written client.

use crate::sim_util;

use bastion_sim::{Faults, SimConfig, TargetPolicy};
use serde_json::json;
use sim_util::*;

const TARGET: &str = "i-0123456789abcdef0";

#[tokio::test]
async fn start_session_port_document() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let r = ssm(
        addr,
        "StartSession",
        json!({
            "Target": TARGET,
            "DocumentName": "AWS-StartPortForwardingSession",
            "Reason": "testing",
            "Parameters": {"portNumber": ["5432"], "localPortNumber": ["15432"]},
        }),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/x-amz-json-1.1"));
    assert!(r.header("x-amzn-RequestId").is_some());
    let v = r.json();
    let id = v["SessionId"].as_str().unwrap();
    let (name, hex) = id.rsplit_once('-').unwrap();
    assert_eq!(name, "AKIDTEST");
    assert_eq!(hex.len(), 17);
    assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    let token = v["TokenValue"].as_str().unwrap();
    assert!(!token.is_empty() && token.len() <= 300);
    let url = v["StreamUrl"].as_str().unwrap();
    let prefix = format!("ws://{addr}/v1/data-channel/{id}?role=publish_subscribe&cell-number=");
    let cell = url.strip_prefix(&prefix).unwrap_or_else(|| panic!("{url}"));
    assert_cell_number(cell);

    let s = session_json(addr, id).await;
    assert_eq!(s["target"], TARGET);
    assert_eq!(s["document"], "AWS-StartPortForwardingSession");
    assert_eq!(s["status"], "Connecting");
    assert_eq!(
        s["properties"],
        json!({"portNumber": "5432", "type": "LocalPortForwarding", "localPortNumber": "15432"})
    );
    assert_eq!(s["owner"], "arn:aws:iam::123456789012:user/AKIDTEST");
    sim.shutdown().await;
}

#[tokio::test]
async fn start_session_documents_and_defaults() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    // Defaults: portNumber 80, localPortNumber 0.
    let (id, _, _) = start_session(
        addr,
        json!({"Target": TARGET, "DocumentName": "AWS-StartPortForwardingSession"}),
    )
    .await;
    assert_eq!(
        session_json(addr, &id).await["properties"],
        json!({"portNumber": "80", "type": "LocalPortForwarding", "localPortNumber": "0"})
    );
    // Remote host, by ARN.
    let (id, _, _) = start_session(
        addr,
        json!({
            "Target": "mi-0123456789abcdef0",
            "DocumentName": "arn:aws:ssm:eu-west-1::document/AWS-StartPortForwardingSessionToRemoteHost",
            "Parameters": {"host": ["db.cluster-x.eu-west-1.rds.amazonaws.com"], "portNumber": ["5432"]},
        }),
    )
    .await;
    let s = session_json(addr, &id).await;
    assert_eq!(s["document"], "AWS-StartPortForwardingSessionToRemoteHost");
    assert_eq!(
        s["properties"],
        json!({"host": "db.cluster-x.eu-west-1.rds.amazonaws.com", "portNumber": "5432",
               "type": "LocalPortForwarding", "localPortNumber": "0"})
    );
    // No document: shell. ECS targets are accepted.
    let (id, _, _) = start_session(addr, json!({"Target": "ecs:cluster_task_runtime"})).await;
    let s = session_json(addr, &id).await;
    assert_eq!(s["document"], "SSM-SessionManagerRunShell");
    assert!(s["properties"].is_null());
    sim.shutdown().await;
}

#[tokio::test]
async fn start_session_errors() {
    let sim = start(SimConfig {
        targets: TargetPolicy::Only(vec![TARGET.into()]),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let cases = [
        (
            json!({"Target": TARGET, "DocumentName": "AWS-StartSSHSession"}),
            "InvalidDocument",
        ),
        (
            json!({"Target": "i-0123456789abcdef1", "DocumentName": "AWS-StartPortForwardingSession"}),
            "TargetNotConnected",
        ),
        (
            json!({"DocumentName": "AWS-StartPortForwardingSession"}),
            "ValidationException",
        ),
        (
            json!({"Target": TARGET, "DocumentName": "bad name!"}),
            "ValidationException",
        ),
        (
            json!({"Target": TARGET, "DocumentName": "AWS-StartPortForwardingSession",
                   "Parameters": {"portNumber": ["65536"]}}),
            "InvalidParameters",
        ),
        (
            json!({"Target": TARGET, "DocumentName": "AWS-StartPortForwardingSession",
                   "Parameters": {"localPortNumber": ["-1"]}}),
            "InvalidParameters",
        ),
        (
            json!({"Target": TARGET, "DocumentName": "AWS-StartPortForwardingSessionToRemoteHost",
                   "Parameters": {"portNumber": ["5432"]}}),
            "InvalidParameters",
        ),
        (
            json!({"Target": TARGET, "DocumentName": "AWS-StartPortForwardingSession",
                   "Parameters": {"bogus": ["1"]}}),
            "InvalidParameters",
        ),
        (
            json!({"Target": TARGET, "Parameters": {"portNumber": "80"}}),
            "SerializationException",
        ),
    ];
    for (body, code) in cases {
        let r = ssm(addr, "StartSession", body.clone()).await;
        assert_eq!(r.status, 400, "{body}");
        assert_eq!(r.error_code(), code, "{body}");
    }
    let r = ssm(
        addr,
        "StartSession",
        json!({"Target": "i-0123456789abcdef1"}),
    )
    .await;
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("i-0123456789abcdef1")
    );
    // Nothing was created.
    assert!(sim.sessions().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_start_session_knob() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let body = json!({"Target": TARGET});
    // Over HTTP: fail exactly twice.
    let (status, v) = post_json(
        addr,
        "/sim/faults",
        json!({"fail_start_session": "ThrottlingException", "fail_start_session_times": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for _ in 0..2 {
        let r = ssm(addr, "StartSession", body.clone()).await;
        assert_eq!(r.error_code(), "ThrottlingException");
    }
    start_session(addr, body.clone()).await;
    let (_, v) = get_json(addr, "/sim/faults").await;
    assert!(v["fail_start_session"].is_null());

    // Through the handle, until cleared.
    sim.set_faults(Faults {
        fail_start_session: Some("AccessDeniedException".into()),
        ..Faults::default()
    })
    .unwrap();
    for _ in 0..3 {
        let r = ssm(addr, "StartSession", body.clone()).await;
        assert_eq!(r.error_code(), "AccessDeniedException");
    }
    sim.update_faults(|f| f.fail_start_session = Some("InternalServerError".into()))
        .unwrap();
    let r = ssm(addr, "StartSession", body.clone()).await;
    assert_eq!(r.status, 500);
    assert_eq!(r.error_code(), "InternalServerError");
    sim.set_faults(Faults::default()).unwrap();
    start_session(addr, body).await;

    // Invalid knobs are refused.
    let (status, _) = post_json(addr, "/sim/faults", json!({"to_agent": {"drop_pct": 200}})).await;
    assert_eq!(status, 400);
    let (status, _) = post_json(addr, "/sim/faults", json!({"no_such_knob": true})).await;
    assert_eq!(status, 400);
    sim.shutdown().await;
}

/// Standard base64 with a `+`, a `/` and padding, raw in the URL (as the service's),
/// so that a client's canonical query is exercised.
fn assert_cell_number(cell: &str) {
    assert!(
        cell.contains('+') && cell.contains('/') && cell.ends_with('='),
        "{cell}"
    );
    use base64::Engine as _;
    assert!(
        base64::engine::general_purpose::STANDARD
            .decode(cell)
            .is_ok(),
        "{cell}"
    );
}

#[tokio::test]
async fn presigned_stream_urls_carry_the_simulators_query_signature() {
    let sim = start(SimConfig {
        presigned_stream_urls: true,
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let (id, _, url) = start_session(addr, json!({"Target": TARGET})).await;
    let query = url.split_once('?').unwrap().1;
    let names: Vec<&str> = query
        .split('&')
        .map(|p| p.split_once('=').map_or(p, |(k, _)| k))
        .collect();
    assert_eq!(
        names,
        [
            "role",
            "cell-number",
            "X-Amz-Algorithm",
            "X-Amz-Credential",
            "X-Amz-Date",
            "X-Amz-Expires",
            "X-Amz-SignedHeaders",
            "X-Amz-Signature"
        ]
    );
    assert!(
        query.contains("X-Amz-Algorithm=AWS4-HMAC-SHA256&"),
        "{query}"
    );
    assert!(query.contains("X-Amz-SignedHeaders=host&"), "{query}");
    assert!(
        query.contains("%2Fus-east-1%2Fssmmessages%2Faws4_request&"),
        "{query}"
    );
    let (_, url2) = sim_util::resume_session(addr, &id).await;
    assert!(url2.contains("X-Amz-Signature="), "{url2}");
    assert_ne!(url2, url);
    sim.shutdown().await;
}

#[tokio::test]
async fn resume_session() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let (id, token, url) = start_session(addr, json!({"Target": TARGET})).await;
    let r = ssm(addr, "ResumeSession", json!({"SessionId": id})).await;
    assert_eq!(r.status, 200);
    let v = r.json();
    assert_eq!(v["SessionId"], id);
    // Same endpoint and session, a fresh cell.
    let url2 = v["StreamUrl"].as_str().unwrap();
    let (base, cell) = url.split_once("&cell-number=").unwrap();
    let (base2, cell2) = url2.split_once("&cell-number=").unwrap();
    assert_eq!(base2, base);
    assert_cell_number(cell2);
    assert_ne!(cell2, cell);
    assert_eq!(session_json(addr, &id).await["cell_number"], cell2);
    let token2 = v["TokenValue"].as_str().unwrap();
    assert!(!token2.is_empty());
    assert_ne!(token2, token);

    sim.update_faults(|f| f.refuse_resume = true).unwrap();
    let r = ssm(addr, "ResumeSession", json!({"SessionId": id})).await;
    assert_eq!(r.error_code(), "AccessDeniedException");
    sim.update_faults(|f| f.refuse_resume = false).unwrap();

    let r = ssm(
        addr,
        "ResumeSession",
        json!({"SessionId": "nobody-0123456789abcdef0"}),
    )
    .await;
    assert_eq!(r.error_code(), "DoesNotExistException");
    let r = ssm(addr, "ResumeSession", json!({})).await;
    assert_eq!(r.error_code(), "ValidationException");
    sim.shutdown().await;
}

#[tokio::test]
async fn terminate_and_describe_sessions() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let (a, _, _) = start_session(addr, json!({"Target": TARGET, "Reason": "first"})).await;
    let (b, _, _) = start_session(
        addr,
        json!({"Target": "i-0fedcba9876543210", "DocumentName": "AWS-StartPortForwardingSession"}),
    )
    .await;

    let r = ssm(addr, "TerminateSession", json!({"SessionId": a})).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), json!({"SessionId": a}));
    assert!(
        sim.wait_terminated(&a, std::time::Duration::from_secs(5))
            .await
    );
    // Terminating again is harmless.
    let r = ssm(addr, "TerminateSession", json!({"SessionId": a})).await;
    assert_eq!(r.status, 200);

    let r = ssm(addr, "DescribeSessions", json!({"State": "Active"})).await;
    assert_eq!(r.status, 200);
    let active = r.json()["Sessions"].as_array().unwrap().clone();
    assert_eq!(active.len(), 1);
    assert_eq!(active[0]["SessionId"], b);
    assert_eq!(active[0]["Target"], "i-0fedcba9876543210");
    assert_eq!(active[0]["Status"], "Connecting");
    assert_eq!(active[0]["DocumentName"], "AWS-StartPortForwardingSession");
    assert!(active[0]["StartDate"].as_f64().unwrap() > 1.6e9);
    assert!(active[0].get("EndDate").is_none());
    assert_eq!(
        active[0]["Owner"],
        "arn:aws:iam::123456789012:user/AKIDTEST"
    );

    let r = ssm(addr, "DescribeSessions", json!({"State": "History"})).await;
    let history = r.json()["Sessions"].as_array().unwrap().clone();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["SessionId"], a);
    assert_eq!(history[0]["Status"], "Terminated");
    assert_eq!(history[0]["Reason"], "first");
    assert_eq!(history[0]["DocumentName"], "SSM-SessionManagerRunShell");
    assert!(history[0]["EndDate"].as_f64().unwrap() >= history[0]["StartDate"].as_f64().unwrap());

    // A terminated session cannot be resumed.
    let r = ssm(addr, "ResumeSession", json!({"SessionId": a})).await;
    assert_eq!(r.error_code(), "DoesNotExistException");

    // Filters and paging.
    let r = ssm(
        addr,
        "DescribeSessions",
        json!({"State": "Active", "Filters": [{"key": "Target", "value": TARGET}]}),
    )
    .await;
    assert!(r.json()["Sessions"].as_array().unwrap().is_empty());
    let r = ssm(
        addr,
        "DescribeSessions",
        json!({"State": "History", "Filters": [{"key": "InvokedAfter", "value": "2020-01-01T00:00:00Z"}]}),
    )
    .await;
    assert_eq!(r.json()["Sessions"].as_array().unwrap().len(), 1);
    let r = ssm(
        addr,
        "DescribeSessions",
        json!({"State": "Active", "Filters": [{"key": "Color", "value": "x"}]}),
    )
    .await;
    assert_eq!(r.error_code(), "InvalidFilterKey");
    let r = ssm(addr, "DescribeSessions", json!({"State": "Everything"})).await;
    assert_eq!(r.error_code(), "ValidationException");
    for _ in 0..3 {
        start_session(addr, json!({"Target": TARGET})).await;
    }
    let r = ssm(
        addr,
        "DescribeSessions",
        json!({"State": "Active", "MaxResults": 3}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["Sessions"].as_array().unwrap().len(), 3);
    let next = v["NextToken"].as_str().unwrap().to_owned();
    let r = ssm(
        addr,
        "DescribeSessions",
        json!({"State": "Active", "MaxResults": 3, "NextToken": next}),
    )
    .await;
    let v = r.json();
    assert_eq!(v["Sessions"].as_array().unwrap().len(), 1);
    assert!(v.get("NextToken").is_none());
    let r = ssm(
        addr,
        "DescribeSessions",
        json!({"State": "Active", "NextToken": "garbage"}),
    )
    .await;
    assert_eq!(r.error_code(), "InvalidNextToken");
    sim.shutdown().await;
}

#[tokio::test]
async fn describe_instance_information() {
    let other = "i-0fedcba9876543210";
    let sim = start(SimConfig {
        targets: TargetPolicy::Only(vec![TARGET.into(), other.into()]),
        agent_version: "3.2.582.0".into(),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();
    let r = ssm(addr, "DescribeInstanceInformation", json!({})).await;
    assert_eq!(r.status, 200);
    let list = r.json()["InstanceInformationList"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(list.len(), 2);
    for i in &list {
        assert_eq!(i["PingStatus"], "Online");
        assert_eq!(i["AgentVersion"], "3.2.582.0");
        assert_eq!(i["IsLatestVersion"], false);
        assert_eq!(i["PlatformType"], "Linux");
        assert!(i["LastPingDateTime"].as_f64().is_some());
    }
    for body in [
        json!({"InstanceInformationFilterList": [{"key": "InstanceIds", "valueSet": [TARGET]}]}),
        json!({"Filters": [{"Key": "InstanceIds", "Values": [TARGET, "i-00000000000000000"]}]}),
    ] {
        let r = ssm(addr, "DescribeInstanceInformation", body).await;
        let list = r.json()["InstanceInformationList"]
            .as_array()
            .unwrap()
            .clone();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["InstanceId"], TARGET);
    }
    let r = ssm(
        addr,
        "DescribeInstanceInformation",
        json!({"Filters": [{"Key": "PingStatus", "Values": ["ConnectionLost"]}]}),
    )
    .await;
    assert!(
        r.json()["InstanceInformationList"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    let r = ssm(
        addr,
        "DescribeInstanceInformation",
        json!({
            "InstanceInformationFilterList": [{"key": "InstanceIds", "valueSet": [TARGET]}],
            "Filters": [{"Key": "InstanceIds", "Values": [TARGET]}],
        }),
    )
    .await;
    assert_eq!(r.error_code(), "ValidationException");
    let r = ssm(
        addr,
        "DescribeInstanceInformation",
        json!({"InstanceInformationFilterList": [{"key": "Nope", "valueSet": ["x"]}]}),
    )
    .await;
    assert_eq!(r.error_code(), "InvalidFilterKey");
    sim.shutdown().await;

    // Accepting any valid id: an instance asked for by id is Online.
    let sim = start_default().await;
    let r = ssm(
        sim.local_addr(),
        "DescribeInstanceInformation",
        json!({"Filters": [{"Key": "InstanceIds", "Values": [TARGET]}]}),
    )
    .await;
    let list = r.json()["InstanceInformationList"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["IsLatestVersion"], true);
    sim.shutdown().await;
}

#[tokio::test]
async fn protocol_errors_and_introspection() {
    let sim = start_default().await;
    let addr = sim.local_addr();
    let r = ssm(addr, "SendCommand", json!({})).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.error_code(), "UnknownOperationException");
    let r = http(
        addr,
        "POST",
        "/",
        &[("Content-Type", "application/x-amz-json-1.1")],
        b"{}",
    )
    .await;
    assert_eq!(r.error_code(), "UnknownOperationException");
    let r = http(
        addr,
        "POST",
        "/",
        &[("X-Amz-Target", "AmazonSSM.StartSession")],
        b"{not json",
    )
    .await;
    assert_eq!(r.error_code(), "SerializationException");

    let (status, v) = get_json(addr, "/sim/health").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["sessions"], 0);
    let (status, _) = get_json(addr, "/sim/sessions/nobody-0").await;
    assert_eq!(status, 404);
    let (status, v) = get_json(addr, "/sim/sessions").await;
    assert_eq!(status, 200);
    assert_eq!(v, json!([]));

    let (status, v) = post_json(addr, "/sim/targets", json!({"only": [TARGET]})).await;
    assert_eq!(status, 200, "{v}");
    let r = ssm(
        addr,
        "StartSession",
        json!({"Target": "i-0fedcba9876543210"}),
    )
    .await;
    assert_eq!(r.error_code(), "TargetNotConnected");
    let (status, _) = post_json(addr, "/sim/targets", json!("any_valid")).await;
    assert_eq!(status, 200);
    start_session(addr, json!({"Target": "i-0fedcba9876543210"})).await;
    assert_no_violations(addr).await;
    sim.shutdown().await;
}
