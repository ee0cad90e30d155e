//! `target_tags` end to end. moto_server stands in for EC2 (reached through the standard
//! `AWS_ENDPOINT_URL_EC2`), the simulator for Session Manager (`AWS_ENDPOINT_URL_SSM`; it
//! asks the same moto whether an instance runs), a real `bastiond run` resolves the tags,
//! and a TCP echo server sits behind the tunnel. The instances are created through the
//! product's own EC2 client (RunInstances with TagSpecification), which also gets its
//! own checks against moto: tag and state filtering, wildcard escaping, pagination and a
//! real error document.
//!
//! moto_server comes from a Python venv (`BASTION_TEST_VENV`, default `target/test-venv`;
//! scripts/test.sh creates it), started by [`e2e_util::moto::Moto`].

use crate::e2e_util;
use crate::sim_util;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bastion::aws::ec2::{Ec2Api, Ec2Error, Filter, XmlElement};
use bastion_sim::{Ec2Targets, SimConfig, TargetPolicy};
use e2e_util::moto::Moto;
use e2e_util::{DaemonProcess, free_port};
use tokio::io::AsyncReadExt;

fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn instance_ids(root: &XmlElement) -> Vec<String> {
    root.items("instancesSet")
        .filter_map(|i| i.child_text("instanceId").map(str::to_owned))
        .collect()
}

/// RunInstances of one instance tagged with `tags`; its id.
async fn run_instance(ec2: &Ec2Api, tags: &[(&str, &str)]) -> String {
    let mut p = params(&[
        ("ImageId", "ami-12c6146b"),
        ("MinCount", "1"),
        ("MaxCount", "1"),
        ("InstanceType", "t3.micro"),
    ]);
    if !tags.is_empty() {
        p.push(("TagSpecification.1.ResourceType".into(), "instance".into()));
    }
    for (n, (k, v)) in tags.iter().enumerate() {
        p.push((format!("TagSpecification.1.Tag.{}.Key", n + 1), (*k).into()));
        p.push((
            format!("TagSpecification.1.Tag.{}.Value", n + 1),
            (*v).into(),
        ));
    }
    let root = ec2.call("RunInstances", &p).await.expect("RunInstances");
    let ids = instance_ids(&root);
    assert_eq!(ids.len(), 1, "{root:?}");
    ids[0].clone()
}

async fn stop_instance(ec2: &Ec2Api, id: &str) {
    ec2.call("StopInstances", &params(&[("InstanceId.1", id)]))
        .await
        .expect("StopInstances");
}

fn tags(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ids(list: &[bastion::aws::ec2::Instance]) -> Vec<&str> {
    list.iter().map(|i| i.id.as_str()).collect()
}

/// moto's launchTime has one-second resolution: wait so the next launch is later.
async fn next_second() {
    tokio::time::sleep(Duration::from_millis(1100)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_filters_tags_and_state_pages_and_reads_errors_against_moto() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2();
    let older = run_instance(&ec2, &[("Name", "bastion"), ("env", "prod")]).await;
    next_second().await;
    let newer = run_instance(&ec2, &[("Name", "bastion"), ("env", "prod")]).await;
    let stopped = run_instance(&ec2, &[("Name", "bastion"), ("env", "prod")]).await;
    stop_instance(&ec2, &stopped).await;
    let _dev = run_instance(&ec2, &[("Name", "bastion"), ("env", "dev")]).await;
    let _untagged = run_instance(&ec2, &[]).await;
    let star = run_instance(&ec2, &[("Name", "bastion*"), ("env", "prod")]).await;

    // AND across tags, running only, newest launch first.
    let found = ec2
        .running_instances_with_tags(&tags(&[("Name", "bastion"), ("env", "prod")]))
        .await
        .unwrap();
    assert_eq!(ids(&found), [newer.as_str(), older.as_str()]);
    assert_eq!(found[0].tags["env"], "prod");
    assert!(found[0].launch_time > found[1].launch_time);
    assert!(found[0].private_ip.is_some());

    // `*` in a tag value is a literal character, not a wildcard.
    let found = ec2
        .running_instances_with_tags(&tags(&[("Name", "bastion*")]))
        .await
        .unwrap();
    assert_eq!(ids(&found), [star.as_str()]);

    // No match: an empty list, not an error.
    let found = ec2
        .running_instances_with_tags(&tags(&[("Name", "nothing-here")]))
        .await
        .unwrap();
    assert!(found.is_empty());

    // Pagination: 12 reservations, 5 per page.
    let mut suite = Vec::new();
    for _ in 0..12 {
        suite.push(run_instance(&ec2, &[("suite", "paging")]).await);
    }
    let filter = [Filter::new("tag:suite", ["paging"])];
    let first = ec2
        .describe_instances_page(&filter, Some(5), None)
        .await
        .unwrap();
    assert_eq!(first.instances.len(), 5);
    assert!(first.next_token.is_some(), "moto paginates");
    let mut all: Vec<String> = ec2
        .describe_instances_paged(&filter, Some(5))
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.id)
        .collect();
    all.sort();
    suite.sort();
    assert_eq!(all, suite);

    // A real error document.
    let e = ec2
        .call(
            "DescribeInstances",
            &params(&[("InstanceId.1", "i-0123456789abcdef0")]),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Ec2Error::Service { code, status: 400, .. } if code == "InvalidInstanceID.NotFound"),
        "{e:?}"
    );
}

fn tagged_profile(name: &str, tags: &str, remote_port: u16, local_port: u16) -> String {
    format!(
        "[profiles.{name}]\ntarget_tags = {{ {tags} }}\nremote_host = \"127.0.0.1\"\n\
         remote_port = {remote_port}\nlocal_port = {local_port}\nbind = [\"127.0.0.1\"]\n"
    )
}

fn status(d: &DaemonProcess, name: &str) -> serde_json::Value {
    let (code, out, err) = d.ctl(&["--json", "status", name]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn target_tags_pick_the_tagged_instance_and_bytes_flow() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2();
    let older = run_instance(&ec2, &[("Name", "bastion"), ("env", "prod")]).await;
    next_second().await;
    // The most recently launched match, but its agent is not connected (the simulator
    // accepts only `older`): the daemon must fall back to `older`.
    let newer = run_instance(&ec2, &[("Name", "bastion"), ("env", "prod")]).await;
    let decoy = run_instance(&ec2, &[("Name", "bastion"), ("env", "dev")]).await;
    let sim = sim_util::start(SimConfig {
        ec2: Some(Ec2Targets {
            endpoint: moto.url(),
            boot_delay: Duration::ZERO,
        }),
        targets: TargetPolicy::Only(vec![older.clone(), decoy.clone()]),
        ..SimConfig::default()
    })
    .await;
    let echo = sim_util::echo_server().await;
    let local = free_port();
    let d = DaemonProcess::start_with_env(
        &tagged_profile("tagged", "Name = \"bastion\", env = \"prod\"", echo, local),
        &sim.endpoint_url(),
        &[("AWS_ENDPOINT_URL_EC2", &moto.url())],
    );
    let (code, _, err) = d.ctl(&["open", "tagged", "--warm"]);
    assert_eq!(code, 0, "{err}; log:\n{}", d.log_text());

    // 1 MiB through the tunnel and back.
    e2e_util::echo_roundtrip(local, 1 << 20).await;

    // The simulator's introspection: one session, on the tagged instance that is online.
    let (code, sessions) = sim_util::get_json(sim.local_addr(), "/sim/sessions").await;
    assert_eq!(code, 200);
    let sessions = sessions.as_array().expect("session list").clone();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["target"], older.as_str(), "{sessions:?}");

    let s = status(&d, "tagged");
    assert_eq!(s["state"], "ready", "{s}");
    assert_eq!(
        s["target"],
        format!("tags:Name=bastion,env=prod → {older}"),
        "{s}"
    );
    let log = d.log_text();
    assert!(
        log.contains("target_tags matched 2 running instances"),
        "{log}"
    );
    assert!(
        log.contains(&format!("instance={newer}"))
            && log.contains("not connected to Session Manager; trying the next one"),
        "{log}"
    );
    assert!(
        log.contains("target_tags resolved") && log.contains(&format!("instance={older}")),
        "{log}"
    );
    assert!(!log.contains("secret-test-key"), "a secret reached the log");
    assert!(!log.contains("Signature="), "a signature reached the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_matching_instance_is_a_prompt_clear_error() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2();
    let only = run_instance(&ec2, &[("Name", "bastion"), ("env", "prod")]).await;
    let sim = sim_util::start(SimConfig {
        ec2: Some(Ec2Targets {
            endpoint: moto.url(),
            boot_delay: Duration::ZERO,
        }),
        ..SimConfig::default()
    })
    .await;
    let local = free_port();
    let d = DaemonProcess::start_with_env(
        &tagged_profile("none", "Name = \"bastion\", env = \"staging\"", 5432, local),
        &sim.endpoint_url(),
        &[("AWS_ENDPOINT_URL_EC2", &moto.url())],
    );
    let expected = "no running instance has tags Name=bastion, env=staging in region us-east-1";

    // `open --warm`: the error, at once.
    let started = Instant::now();
    let (code, _, err) = d.ctl(&["open", "none", "--warm"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains(expected), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );

    // The listener stays open: a client on it is closed promptly, and status carries
    // the reason.
    let started = Instant::now();
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local))
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("the client connection is closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "EOF, not data");
    assert!(started.elapsed() < Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = status(&d, "none");
        let failed = s["last_error"]
            .as_str()
            .is_some_and(|e| e.contains(expected));
        if failed && s["state"] == "error" {
            assert_eq!(s["target"], "tags:Name=bastion,env=staging", "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "no error shown: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(sim.sessions().is_empty(), "no session was started");

    // Once an instance carries the tags, the same profile connects.
    ec2.call(
        "CreateTags",
        &params(&[
            ("ResourceId.1", &only),
            ("Tag.1.Key", "env"),
            ("Tag.1.Value", "staging"),
        ]),
    )
    .await
    .expect("CreateTags");
    let (code, _, err) = d.ctl(&["open", "none", "--warm"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        status(&d, "none")["target"],
        format!("tags:Name=bastion,env=staging → {only}")
    );
}
