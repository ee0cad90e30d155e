//! The AWS clients of on-demand bastions against emulators: EC2 RunInstances and
//! TerminateInstances, ECS RunTask/DescribeTasks/StopTask/ListTasks, STS, SSM
//! GetParameter and the DynamoDB registry against moto_server; SSM
//! DescribeInstanceInformation/DescribeSessions (and GetParameter) against the simulator
//! backed by the same moto. Every client reaches its emulator through the standard
//! endpoint setting (`endpoint_url` in the SDK configuration).

use crate::e2e_util;
use crate::sim_util;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType,
};
use bastion::aws::ec2::{Ec2Api, Ec2Error, Instance, LaunchSpec, LaunchTemplateRef, XmlElement};
use bastion::aws::ecs::{EcsApi, TaskSpec};
use bastion::aws::ssm::{AwsError, SsmApi, StartRequest};
use bastion::aws::sts::caller_identity;
use bastion::ondemand::registry::{
    DynamoRegistry, Phase, ProviderKind, Record, Registry, RegistryError,
};
use bastion_sim::{Ec2Targets, SimConfig, TargetPolicy};
use e2e_util::moto::{Moto, sdk_config};

const AL2023_X86: &str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64";
const AL2023_ARM: &str = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64";

fn params(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn tags(list: &[(&str, &str)]) -> BTreeMap<String, String> {
    list.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn ids(list: &[Instance]) -> Vec<&str> {
    list.iter().map(|i| i.id.as_str()).collect()
}

fn token() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The first text of element `name` anywhere in `root`.
fn find_text(root: &XmlElement, name: &str) -> String {
    root.find(name)
        .map(|e| e.text.trim().to_owned())
        .unwrap_or_else(|| panic!("no <{name}> in {root:?}"))
}

/// A DescribeInstanceAttribute value (`userData`, `instanceInitiatedShutdownBehavior`).
async fn attribute(ec2: &Ec2Api, id: &str, name: &str) -> String {
    let root = ec2
        .call(
            "DescribeInstanceAttribute",
            &params(&[("InstanceId", id), ("Attribute", name)]),
        )
        .await
        .expect("DescribeInstanceAttribute");
    root.child(name)
        .and_then(|e| e.child_text("value"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_launches_terminates_and_finds_bastions_in_moto() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2();
    let ssm = SsmApi::new(&moto.sdk_config());
    let ami = ssm.get_parameter(AL2023_X86).await.expect("AL2023 AMI");
    assert!(ami.starts_with("ami-"), "{ami}");
    let (subnet, sg) = moto.default_network().await;
    let bastion_tags = tags(&[("bastion:profile", "prod"), ("bastion:launch-id", "L1")]);

    // Tags, user data, shutdown behaviour, subnet and security group, IMDSv2.
    let spec = LaunchSpec {
        image_id: Some(ami.clone()),
        instance_type: Some("t3.micro".into()),
        subnet_id: Some(subnet.clone()),
        security_group_ids: vec![sg.clone()],
        user_data: Some("#!/bin/sh\necho bastion\n".into()),
        tags: bastion_tags.clone(),
        client_token: token(),
        shutdown_terminates: true,
        ..LaunchSpec::default()
    };
    let first = ec2.run_instance(&spec).await.expect("RunInstances");
    assert!(first.id.starts_with("i-"), "{first:?}");
    assert!(
        matches!(first.state.as_str(), "pending" | "running"),
        "{first:?}"
    );
    assert_eq!(first.tags, bastion_tags);
    assert_eq!(first.instance_type.as_deref(), Some("t3.micro"));
    assert_eq!(
        attribute(&ec2, &first.id, "userData").await,
        "IyEvYmluL3NoCmVjaG8gYmFzdGlvbgo=",
        "user data is sent base64-encoded"
    );
    assert_eq!(
        attribute(&ec2, &first.id, "instanceInitiatedShutdownBehavior").await,
        "terminate"
    );

    // An instance profile by name and by ARN, once it exists in IAM; a missing one is a
    // clear launch-setting error.
    let missing = ec2
        .run_instance(&LaunchSpec {
            image_id: Some(ami.clone()),
            instance_profile: Some("no-such-profile".into()),
            client_token: token(),
            ..LaunchSpec::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&missing, Ec2Error::InvalidParameter { code, .. } if code == "NoSuchEntity"),
        "{missing:?}"
    );
    assert!(
        missing.to_string().contains("instance profile"),
        "{missing}"
    );
    let (status, answer) = moto
        .query(
            "iam",
            "Action=CreateInstanceProfile&Version=2010-05-08&InstanceProfileName=bastion-host",
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for profile in [
        "bastion-host",
        "arn:aws:iam::123456789012:instance-profile/bastion-host",
    ] {
        let i = ec2
            .run_instance(&LaunchSpec {
                image_id: Some(ami.clone()),
                instance_profile: Some(profile.into()),
                tags: tags(&[("suite", "profile")]),
                client_token: token(),
                ..LaunchSpec::default()
            })
            .await
            .unwrap_or_else(|e| panic!("RunInstances with instance profile {profile}: {e}"));
        assert_eq!(i.tags["suite"], "profile");
    }

    // Launch templates, by name and by id; the template's settings apply.
    let root = ec2
        .call(
            "CreateLaunchTemplate",
            &params(&[
                ("LaunchTemplateName", "bastion-lt"),
                ("LaunchTemplateData.ImageId", &ami),
                ("LaunchTemplateData.InstanceType", "t3.nano"),
            ]),
        )
        .await
        .expect("CreateLaunchTemplate");
    let lt_id = find_text(&root, "launchTemplateId");
    assert!(lt_id.starts_with("lt-"), "{lt_id}");
    for (reference, version) in [("bastion-lt", Some("$Latest")), (lt_id.as_str(), None)] {
        let i = ec2
            .run_instance(&LaunchSpec {
                launch_template: Some(LaunchTemplateRef {
                    id_or_name: reference.into(),
                    version: version.map(str::to_owned),
                }),
                tags: tags(&[("suite", "template")]),
                client_token: token(),
                ..LaunchSpec::default()
            })
            .await
            .unwrap_or_else(|e| panic!("RunInstances from launch template {reference}: {e}"));
        assert_eq!(i.instance_type.as_deref(), Some("t3.nano"), "{reference}");
    }

    // Settings that name nothing.
    let e = ec2
        .run_instance(&LaunchSpec {
            launch_template: Some(LaunchTemplateRef {
                id_or_name: "no-such-template".into(),
                version: None,
            }),
            client_token: token(),
            ..LaunchSpec::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Ec2Error::InvalidParameter { code, .. } if code.starts_with("InvalidLaunchTemplateName.")),
        "{e:?}"
    );
    let e = ec2
        .run_instance(&LaunchSpec {
            image_id: Some(ami.clone()),
            subnet_id: Some("subnet-0123456789abcdef0".into()),
            client_token: token(),
            ..LaunchSpec::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Ec2Error::InvalidParameter { code, .. } if code == "InvalidSubnetID.NotFound"),
        "{e:?}"
    );
    let e = ec2
        .run_instance(&LaunchSpec {
            client_token: String::new(),
            ..spec.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(e, Ec2Error::Config(_)), "{e:?}");

    // Finding the bastions again by tags and state, newest first.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = ec2
        .run_instance(&LaunchSpec {
            client_token: token(),
            ..spec.clone()
        })
        .await
        .expect("second launch");
    let live = ec2
        .instances_with_tags(&bastion_tags, &["pending", "running"])
        .await
        .unwrap();
    assert_eq!(ids(&live), [second.id.as_str(), first.id.as_str()]);
    let narrower = tags(&[("bastion:profile", "prod"), ("bastion:launch-id", "other")]);
    assert!(
        ec2.instances_with_tags(&narrower, &[])
            .await
            .unwrap()
            .is_empty()
    );

    // Terminate: unknown ids are left out, not an error.
    let unknown = "i-0123456789abcdef0".to_owned();
    let mut states = ec2
        .terminate_instances(&[first.id.clone(), unknown.clone(), second.id.clone()])
        .await
        .expect("TerminateInstances");
    states.sort();
    let mut want = vec![first.id.clone(), second.id.clone()];
    want.sort();
    assert_eq!(
        states.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
        want
    );
    assert!(
        states
            .iter()
            .all(|(_, s)| s == "shutting-down" || s == "terminated"),
        "{states:?}"
    );
    assert!(
        ec2.terminate_instances(std::slice::from_ref(&unknown))
            .await
            .expect("only unknown ids")
            .is_empty()
    );
    let live = ec2
        .instances_with_tags(&bastion_tags, &["pending", "running"])
        .await
        .unwrap();
    assert!(live.is_empty(), "{live:?}");
    let gone = ec2
        .instances_with_tags(&bastion_tags, &["shutting-down", "terminated"])
        .await
        .unwrap();
    assert_eq!(gone.len(), 2, "{gone:?}");
    let all = ec2.instances_with_tags(&bastion_tags, &[]).await.unwrap();
    assert_eq!(all.len(), 2, "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_and_ssm_parameters_in_moto_and_the_simulator() {
    let moto = Moto::start().await;
    let me = caller_identity(&moto.sdk_config())
        .await
        .expect("GetCallerIdentity");
    assert_eq!(me.account, "123456789012");
    assert!(me.arn.starts_with("arn:aws:"), "{me:?}");
    assert!(!me.user_id.is_empty());

    let sim = sim_util::start(SimConfig::default()).await;
    let ec2 = moto.ec2();
    for ssm in [
        SsmApi::new(&moto.sdk_config()),
        SsmApi::new(&sdk_config(&sim.endpoint_url())),
    ] {
        for name in [AL2023_X86, AL2023_ARM] {
            let ami = ssm.get_parameter(name).await.expect(name);
            // The AMI exists in moto's EC2.
            let images = ec2
                .call("DescribeImages", &params(&[("ImageId.1", &ami)]))
                .await
                .expect("DescribeImages");
            assert_eq!(find_text(&images, "imageId"), ami);
        }
        let e = ssm
            .get_parameter("/aws/service/no/such/parameter")
            .await
            .unwrap_err();
        assert!(
            matches!(&e, AwsError::Other { code, message } if code == "ParameterNotFound"
                && message.contains("/aws/service/no/such/parameter")),
            "{e:?}"
        );
    }
    // Both answer the same AMI ids.
    assert_eq!(
        SsmApi::new(&moto.sdk_config())
            .get_parameter(AL2023_X86)
            .await
            .unwrap(),
        SsmApi::new(&sdk_config(&sim.endpoint_url()))
            .get_parameter(AL2023_X86)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssm_ping_status_and_active_sessions_against_the_simulator() {
    let moto = Moto::start().await;
    let ec2 = moto.ec2();
    let boot = Duration::from_secs(2);
    let sim = sim_util::start(SimConfig {
        ec2: Some(Ec2Targets {
            endpoint: moto.url(),
            boot_delay: boot,
        }),
        targets: TargetPolicy::AnyValid,
        ..SimConfig::default()
    })
    .await;
    let ssm = SsmApi::new(&sdk_config(&sim.endpoint_url()));
    let instance = ec2
        .run_instance(&LaunchSpec {
            image_id: Some("ami-0c230065b91270bc6".into()),
            client_token: token(),
            ..LaunchSpec::default()
        })
        .await
        .expect("RunInstances");

    // Booting: the agent has not registered yet.
    assert_eq!(ssm.ping_status(&instance.id).await.unwrap(), None);
    let deadline = Instant::now() + boot + Duration::from_secs(10);
    loop {
        match ssm.ping_status(&instance.id).await.unwrap().as_deref() {
            Some("Online") => break,
            other => assert!(Instant::now() < deadline, "still {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        ssm.ping_status("i-0123456789abcdef0").await.unwrap(),
        None,
        "an instance nobody launched"
    );

    // Sessions on the instance.
    assert!(ssm.active_sessions(&instance.id).await.unwrap().is_empty());
    let mut started = Vec::new();
    for _ in 0..3 {
        let ticket = ssm
            .start_session(&StartRequest {
                target: instance.id.clone(),
                document: "AWS-StartPortForwardingSession".into(),
                parameters: HashMap::from([("portNumber".to_owned(), vec!["22".to_owned()])]),
                reason: None,
            })
            .await
            .expect("StartSession");
        started.push(ticket.session_id);
    }
    let mut active = ssm.active_sessions(&instance.id).await.unwrap();
    active.sort();
    started.sort();
    assert_eq!(active, started);
    assert!(
        ssm.active_sessions("i-0fedcba9876543210")
            .await
            .unwrap()
            .is_empty()
    );
    ssm.terminate_session(&started[0]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while ssm.active_sessions(&instance.id).await.unwrap().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "the terminated session stays active"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Terminated in EC2: the agent stops pinging.
    ec2.terminate_instances(std::slice::from_ref(&instance.id))
        .await
        .unwrap();
    assert_eq!(
        ssm.ping_status(&instance.id).await.unwrap().as_deref(),
        Some("ConnectionLost")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecs_runs_describes_lists_and_stops_fargate_tasks_in_moto() {
    let moto = Moto::start().await;
    moto.set_ecs_manual_transitions().await;
    let config = moto.sdk_config();
    moto.ecs_cluster_and_task_definition("bastions", "bastion")
        .await;
    let (subnet, sg) = moto.default_network().await;
    let ecs = EcsApi::new(&config);
    let spec = TaskSpec {
        cluster: "bastions".into(),
        task_definition: "bastion".into(),
        subnets: vec![subnet],
        security_groups: vec![sg],
        assign_public_ip: false,
        started_by: "bastion/prod".into(),
        tags: tags(&[("bastion:profile", "prod"), ("bastion:launch-id", "L2")]),
        client_token: token(),
    };

    let task = ecs.run_task(&spec).await.expect("RunTask");
    assert!(task.arn.ends_with(&task.task_id), "{task:?}");
    assert!(task.cluster_arn.ends_with("cluster/bastions"), "{task:?}");
    assert_eq!(task.desired_status, "RUNNING");
    assert_eq!(task.tags, spec.tags);
    assert_eq!(task.containers.len(), 1);
    assert_eq!(task.containers[0].name, "bastion");

    let described = ecs
        .describe_task("bastions", &task.task_id)
        .await
        .expect("DescribeTasks")
        .expect("the task is known");
    assert_eq!(described.arn, task.arn);
    assert_eq!(described.last_status, "RUNNING");
    assert_eq!(described.tags, spec.tags);
    // moto reports no `createdAt`; the real ECS does (Task::created_at).
    let runtime_id = described.containers[0]
        .runtime_id
        .clone()
        .expect("a running container has a runtime id");
    assert!(runtime_id.contains('-'), "{runtime_id}");
    assert_eq!(
        described.ssm_target("bastions", Some("bastion")),
        Some(format!("ecs:bastions_{}_{runtime_id}", task.task_id))
    );
    assert_eq!(
        described.ssm_target(&described.cluster_arn, None),
        described.ssm_target("bastions", Some("bastion"))
    );

    let listed = ecs
        .tasks_started_by("bastions", &spec.started_by)
        .await
        .expect("ListTasks");
    assert_eq!(
        listed.iter().map(|t| t.arn.as_str()).collect::<Vec<_>>(),
        [task.arn.as_str()]
    );
    assert_eq!(listed[0].tags, spec.tags);
    assert!(
        ecs.tasks_started_by("bastions", "someone-else")
            .await
            .unwrap()
            .is_empty()
    );

    ecs.stop_task("bastions", &task.arn, "idle for 30 min")
        .await
        .expect("StopTask");
    let stopped = ecs
        .describe_task("bastions", &task.arn)
        .await
        .unwrap()
        .expect("a stopped task is still known");
    assert_eq!(stopped.last_status, "STOPPED");
    assert_eq!(stopped.desired_status, "STOPPED");
    assert_eq!(stopped.stopped_reason.as_deref(), Some("idle for 30 min"));
    assert_eq!(stopped.ssm_target("bastions", None), None);
    assert!(
        ecs.tasks_started_by("bastions", &spec.started_by)
            .await
            .unwrap()
            .is_empty()
    );

    assert_eq!(
        ecs.describe_task("bastions", "0123456789abcdef0123456789abcdef")
            .await
            .unwrap(),
        None
    );
    let e = ecs
        .run_task(&TaskSpec {
            cluster: "no-such-cluster".into(),
            client_token: token(),
            ..spec.clone()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&e, AwsError::Other { code, message } if code == "ClusterNotFoundException"
            && message.contains("no-such-cluster")),
        "{e:?}"
    );
    let e = ecs
        .run_task(&TaskSpec {
            task_definition: "no-such-definition".into(),
            client_token: token(),
            ..spec.clone()
        })
        .await
        .unwrap_err();
    assert!(matches!(&e, AwsError::Other { .. }), "{e:?}");
}

fn record(key: &str, version: u64, phase: Phase) -> Record {
    Record {
        key: key.into(),
        version,
        launch_id: "0b9e2f7a-1c3d-4e5f-8a9b-0c1d2e3f4a5b".into(),
        provider: ProviderKind::Fargate,
        phase,
        resource: None,
        target: None,
        profile: "prod".into(),
        owner: "arn:aws:iam::123456789012:user/moto".into(),
        holder: "daemon-a".into(),
        lease_until_ms: 1_700_000_060_000,
        created_ms: 1_700_000_000_000,
        expires_ms: 1_700_028_800_000,
        last_used_ms: 1_700_000_000_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamodb_registry_compare_and_swap_in_moto() {
    let moto = Moto::start().await;
    let config = moto.sdk_config();

    // No table yet: unavailable, with the command that creates it.
    let missing = DynamoRegistry::new(&config, "bastion-registry");
    let e = missing.get("prod").await.unwrap_err();
    match &e {
        RegistryError::Unavailable(m) => {
            assert!(
                m.contains("bastion-registry does not exist in us-east-1")
                    && m.contains("aws dynamodb create-table --table-name bastion-registry"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        missing
            .put(&record("prod", 1, Phase::Launching), None)
            .await,
        Err(RegistryError::Unavailable(_))
    ));

    aws_sdk_dynamodb::Client::new(&config)
        .create_table()
        .table_name("bastion-registry")
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("id")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("id")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .billing_mode(BillingMode::PayPerRequest)
        .send()
        .await
        .expect("CreateTable");
    let dynamo = DynamoRegistry::new(&config, "bastion-registry");
    assert_eq!(dynamo.id(), "dynamodb:bastion-registry");
    let registry = Registry::Dynamo(dynamo.clone());
    assert_eq!(registry.id(), "dynamodb:bastion-registry");
    assert_eq!(registry.get("prod").await.unwrap(), None);

    // Two daemons create the same record at once: exactly one wins.
    let mut a = record("prod", 1, Phase::Launching);
    a.holder = "daemon-a".into();
    let mut b = record("prod", 1, Phase::Launching);
    b.holder = "daemon-b".into();
    let (ra, rb) = tokio::join!(dynamo.put(&a, None), dynamo.put(&b, None));
    let winner = match (&ra, &rb) {
        (Ok(()), Err(RegistryError::Conflict(k))) if k == "prod" => &a,
        (Err(RegistryError::Conflict(k)), Ok(())) if k == "prod" => &b,
        other => panic!("expected one Ok and one Conflict: {other:?}"),
    };
    let stored = registry.get("prod").await.unwrap().expect("stored");
    assert_eq!(&stored, winner);

    // Compare and swap on the version.
    let mut next = stored.clone();
    next.version = 2;
    next.phase = Phase::Ready;
    next.resource = Some("arn:aws:ecs:us-east-1:123456789012:task/bastions/abc".into());
    registry.put(&next, Some(1)).await.expect("CAS from 1");
    let mut stale = stored.clone();
    stale.version = 2;
    stale.phase = Phase::Terminating;
    assert_eq!(
        registry.put(&stale, Some(1)).await,
        Err(RegistryError::Conflict("prod".into()))
    );
    assert_eq!(
        registry.put(&stale, None).await,
        Err(RegistryError::Conflict("prod".into()))
    );
    assert_eq!(registry.get("prod").await.unwrap().as_ref(), Some(&next));

    // The console attributes.
    let item = aws_sdk_dynamodb::Client::new(&config)
        .get_item()
        .table_name("bastion-registry")
        .key(
            "id",
            aws_sdk_dynamodb::types::AttributeValue::S("prod".into()),
        )
        .send()
        .await
        .unwrap()
        .item
        .expect("item");
    assert_eq!(item["phase"].as_s().unwrap(), "ready");
    assert_eq!(item["ver"].as_n().unwrap(), "2");
    assert!(item["resource"].as_s().unwrap().contains(":task/"));

    // List, then delete (conditional on the version).
    let other = record("dev@arn:aws:iam::123456789012:user/moto", 1, Phase::Idle);
    registry.put(&other, None).await.unwrap();
    let mut all = registry.list().await.unwrap();
    all.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(all, [other.clone(), next.clone()]);
    assert_eq!(
        registry.delete("prod", 1).await,
        Err(RegistryError::Conflict("prod".into()))
    );
    registry.delete("prod", 2).await.expect("delete");
    assert_eq!(registry.get("prod").await.unwrap(), None);
    assert_eq!(
        registry.delete("prod", 2).await,
        Err(RegistryError::Conflict("prod".into()))
    );
    assert_eq!(registry.list().await.unwrap(), [other]);
}
