//! EC2-backed target status: the simulator consults a real moto_server (from a Python venv,
//! `BASTION_TEST_VENV`, default `target/test-venv`; scripts/test.sh creates it) and
//! reports an instance Online only once it runs there and the boot delay has passed.

use crate::e2e_util;
use crate::sim_util;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bastion_sim::clock::parse_iso8601;
use bastion_sim::{Ec2Targets, SimConfig};
use e2e_util::moto::Moto;
use serde_json::json;
use sim_util::*;

const EC2_AUTH: &str = "AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/us-east-1/ec2/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=0000";
const BOOT_DELAY: Duration = Duration::from_secs(2);

async fn ec2(addr: SocketAddr, form: &str) -> HttpResponse {
    http(
        addr,
        "POST",
        "/",
        &[
            (
                "Content-Type",
                "application/x-www-form-urlencoded; charset=utf-8",
            ),
            ("X-Amz-Date", "20260101T000000Z"),
            ("Authorization", EC2_AUTH),
        ],
        form.as_bytes(),
    )
    .await
}

fn tag<'a>(xml: &'a str, name: &str) -> &'a str {
    let open = format!("<{name}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
        + open.len();
    let end = xml[start..].find(&format!("</{name}>")).unwrap() + start;
    &xml[start..end]
}

async fn start_code(addr: SocketAddr, target: &str) -> Result<String, String> {
    let r = ssm(
        addr,
        "StartSession",
        json!({ "Target": target, "DocumentName": "AWS-StartPortForwardingSession",
                "Parameters": { "portNumber": ["5432"] } }),
    )
    .await;
    if r.status == 200 {
        Ok(r.json()["SessionId"].as_str().unwrap().to_owned())
    } else {
        Err(r.error_code())
    }
}

/// PingStatus of `id` in DescribeInstanceInformation, `None` when it is not listed.
async fn ping_status(addr: SocketAddr, id: &str) -> Option<String> {
    let r = ssm(
        addr,
        "DescribeInstanceInformation",
        json!({ "Filters": [{ "Key": "InstanceIds", "Values": [id] }] }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    v["InstanceInformationList"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["InstanceId"] == id)
        .map(|i| i["PingStatus"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn instance_online_only_when_running_after_boot_delay() {
    let moto = Moto::start().await;
    let r = ec2(
        moto.addr(),
        "Action=RunInstances&Version=2016-11-15&ImageId=ami-12c6146b&MinCount=1&MaxCount=1&InstanceType=t3.micro",
    )
    .await;
    let launched = Instant::now();
    let xml = String::from_utf8_lossy(&r.body).into_owned();
    assert_eq!(r.status, 200, "RunInstances: {xml}");
    let id = tag(&xml, "instanceId").to_owned();
    let launch_ms = parse_iso8601(tag(&xml, "launchTime")).expect("launchTime");

    let sim = start(SimConfig {
        ec2: Some(Ec2Targets {
            endpoint: format!("http://{}", moto.addr()),
            boot_delay: BOOT_DELAY,
        }),
        ..SimConfig::default()
    })
    .await;
    let addr = sim.local_addr();

    // Before the boot delay: not connected, not listed.
    assert_eq!(
        start_code(addr, &id).await,
        Err("TargetNotConnected".to_owned())
    );
    assert_eq!(ping_status(addr, &id).await, None);
    assert!(
        launched.elapsed() < Duration::from_secs(1),
        "the pre-delay checks took {:?}: too slow to prove the boot delay",
        launched.elapsed()
    );

    // After it: StartSession succeeds, Online.
    let deadline = Instant::now() + Duration::from_secs(20);
    let session = loop {
        match start_code(addr, &id).await {
            Ok(s) => break s,
            Err(code) => assert_eq!(code, "TargetNotConnected"),
        }
        assert!(Instant::now() < deadline, "{id} never came online");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        now_ms() >= launch_ms + BOOT_DELAY.as_millis() as u64,
        "online before launchTime + boot delay"
    );
    assert!(!session.is_empty());
    assert_eq!(ping_status(addr, &id).await.as_deref(), Some("Online"));
    let r = ssm(addr, "GetConnectionStatus", json!({ "Target": id })).await;
    assert_eq!(r.json()["Status"], "connected");

    // Terminated: not connected; the once-Online instance shows ConnectionLost.
    let r = ec2(
        moto.addr(),
        &format!("Action=TerminateInstances&Version=2016-11-15&InstanceId.1={id}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match start_code(addr, &id).await {
            Err(code) => {
                assert_eq!(code, "TargetNotConnected");
                break;
            }
            Ok(_) => assert!(
                Instant::now() < deadline,
                "{id} stays online after terminate"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        ping_status(addr, &id).await.as_deref(),
        Some("ConnectionLost")
    );
    let r = ssm(addr, "GetConnectionStatus", json!({ "Target": id })).await;
    assert_eq!(r.json()["Status"], "notconnected");

    // An id EC2 does not know, and an unreachable endpoint: not connected.
    assert_eq!(
        start_code(addr, "i-0123456789abcdef0").await,
        Err("TargetNotConnected".to_owned())
    );
    sim.shutdown().await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let sim = start(SimConfig {
        ec2: Some(Ec2Targets {
            endpoint: format!("http://{dead}"),
            boot_delay: Duration::ZERO,
        }),
        ..SimConfig::default()
    })
    .await;
    assert_eq!(
        start_code(sim.local_addr(), &id).await,
        Err("TargetNotConnected".to_owned())
    );
    sim.shutdown().await;
    drop(moto);
}
