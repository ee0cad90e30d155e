//! moto_server as the AWS control plane of a test (EC2, ECS, DynamoDB, STS, IAM, SSM
//! parameters), launched through `tests/support/moto_server.py` with the Python of a venv
//! (`BASTION_TEST_VENV`, default `target/test-venv`; scripts/test.sh creates it). That
//! launcher adds one test-only fidelity patch: ECS containers of a running task report a
//! `runtimeId`, as the real ECS does.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_credential_types::Credentials;
use aws_credential_types::provider::SharedCredentialsProvider;
use aws_smithy_async::rt::sleep::{SharedAsyncSleep, TokioSleep};
use aws_types::SdkConfig;
use aws_types::region::Region;
use bastion::aws::ec2::Ec2Api;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::free_port;

/// The secret access key of [`Moto::sdk_config`]: tests check it never reaches a log.
pub const TEST_SECRET: &str = "secret-test-key";

/// The region moto is used in.
pub const REGION: &str = "us-east-1";

/// The Python venv that has moto.
pub fn venv() -> PathBuf {
    match std::env::var_os("BASTION_TEST_VENV") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/test-venv"),
    }
}

/// A moto_server child process on a free port of 127.0.0.1, killed on drop.
pub struct Moto {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An SDK configuration for an emulator at `endpoint`: region us-east-1, static test
/// credentials (secret [`TEST_SECRET`]), the endpoint set as `endpoint_url` (what
/// `AWS_ENDPOINT_URL` sets), bastion's HTTP client.
pub fn sdk_config(endpoint: &str) -> SdkConfig {
    SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
            "AKIDTEST",
            TEST_SECRET,
            None,
            None,
            "test",
        )))
        .endpoint_url(endpoint)
        .http_client(bastion::aws::ssm::http_client())
        .sleep_impl(SharedAsyncSleep::new(TokioSleep::new()))
        .build()
}

impl Moto {
    /// Starts moto and waits (up to 60 s) until it answers EC2 calls.
    pub async fn start() -> Moto {
        let python = venv().join("bin/python");
        let moto_server = venv().join("bin/moto_server");
        assert!(
            moto_server.exists(),
            "moto_server not found at {}: install it with \
             `python3 -m venv target/test-venv && target/test-venv/bin/pip install 'moto[server]'` \
             (scripts/test.sh does this), or point BASTION_TEST_VENV at a venv that has it",
            moto_server.display()
        );
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/moto_server.py");
        let port = free_port();
        let child = Command::new(&python)
            .arg(&script)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run {} {}: {e}", python.display(), script.display())
            });
        let mut moto = Moto {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = moto.child.try_wait().expect("moto child status") {
                panic!("moto_server exited before answering: {status}");
            }
            if tokio::net::TcpStream::connect(moto.addr).await.is_ok()
                && moto.ec2().call("DescribeRegions", &[]).await.is_ok()
            {
                return moto;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server did not answer on {} within 60 s",
                moto.addr
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An SDK configuration for moto: region us-east-1, static test credentials, the
    /// endpoint set as `endpoint_url` (what `AWS_ENDPOINT_URL` sets), bastion's HTTP
    /// client.
    pub fn sdk_config(&self) -> SdkConfig {
        sdk_config(&self.url())
    }

    /// The product's EC2 client, pointed at this moto with test credentials.
    pub fn ec2(&self) -> Ec2Api {
        Ec2Api::new(&self.sdk_config()).expect("EC2 client")
    }

    /// Forgets every resource (`POST /moto-api/reset`).
    pub async fn reset(&self) {
        self.post("/moto-api/reset", "").await;
    }

    /// Makes ECS tasks stay in their state: by default moto advances a task's
    /// `lastStatus` one step (RUNNING → DEACTIVATING → … → STOPPED) per DescribeTasks.
    pub async fn set_ecs_manual_transitions(&self) {
        self.post(
            "/moto-api/state-manager/set-transition",
            r#"{"model_name":"ecs::task","transition":{"progression":"manual","times":1000}}"#,
        )
        .await;
    }

    /// The default VPC's first subnet and a security group of it, as moto preloads them.
    pub async fn default_network(&self) -> (String, String) {
        let ec2 = self.ec2();
        let text = |root: &bastion::aws::ec2::XmlElement, name: &str| {
            root.find(name)
                .map(|e| e.text.trim().to_owned())
                .unwrap_or_else(|| panic!("moto answered no {name}"))
        };
        let subnets = ec2
            .call("DescribeSubnets", &[])
            .await
            .expect("DescribeSubnets");
        let groups = ec2
            .call("DescribeSecurityGroups", &[])
            .await
            .expect("DescribeSecurityGroups");
        (text(&subnets, "subnetId"), text(&groups, "groupId"))
    }

    /// An ECS cluster and a Fargate task definition `family` with one container named
    /// like it (moto needs `memory` on each container definition).
    pub async fn ecs_cluster_and_task_definition(&self, cluster: &str, family: &str) {
        use aws_sdk_ecs::types::{Compatibility, ContainerDefinition, NetworkMode};
        let ecs = aws_sdk_ecs::Client::new(&self.sdk_config());
        ecs.create_cluster()
            .cluster_name(cluster)
            .send()
            .await
            .expect("CreateCluster");
        ecs.register_task_definition()
            .family(family)
            .network_mode(NetworkMode::Awsvpc)
            .requires_compatibilities(Compatibility::Fargate)
            .cpu("256")
            .memory("512")
            .container_definitions(
                ContainerDefinition::builder()
                    .name(family)
                    .image("public.ecr.aws/amazonlinux/amazonlinux:2023")
                    .memory(512)
                    .build(),
            )
            .send()
            .await
            .expect("RegisterTaskDefinition");
    }

    /// A Query-protocol call (`Action=…&Version=…` form body) to `service` (`iam`,
    /// `sts`, …): moto routes it by the SigV4 credential scope, which need not be signed.
    /// Returns the status and the XML answer.
    pub async fn query(&self, service: &str, form: &str) -> (u16, String) {
        let auth = format!(
            "Authorization: AWS4-HMAC-SHA256 Credential=AKIDTEST/20260101/{REGION}/{service}/aws4_request, \
             SignedHeaders=host, Signature=0000\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        );
        self.http("/", &auth, form).await
    }

    /// POSTs `body` to moto's own API at `path`; panics unless it answers 2xx.
    async fn post(&self, path: &str, body: &str) {
        let (status, answer) = self
            .http(path, "Content-Type: application/json\r\n", body)
            .await;
        assert!(
            (200..300).contains(&status),
            "moto {path}: {status} {answer}"
        );
    }

    /// One HTTP/1.1 POST with the extra header lines `headers` (each ending in CRLF).
    async fn http(&self, path: &str, headers: &str, body: &str) -> (u16, String) {
        let mut conn = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect to moto");
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        conn.write_all(request.as_bytes())
            .await
            .expect("write to moto");
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).await.expect("read from moto");
        let answer = String::from_utf8_lossy(&answer).into_owned();
        let status = answer
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map_or(String::new(), |(_, b)| b.to_owned());
        (status, body)
    }
}
