//! EC2-backed target status: the simulator asks an EC2 Query endpoint (moto_server in the
//! tests) for an instance's state and reports it Online only once it is `running` and a
//! boot delay has passed since its `launchTime`, as a real instance's SSM agent registers
//! only some time after boot.
//!
//! One `DescribeInstances` call (EC2 Query API, version 2016-11-15) per StartSession,
//! GetConnectionStatus or DescribeInstanceInformation; the XML answer is scanned as plain
//! text. The request carries a dummy SigV4 `Authorization` header (moto does not check
//! it). Any failure to reach or understand the endpoint counts as "not online" and is
//! logged at WARN.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Uri, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::clock::{iso8601, parse_iso8601, unix_ms};

/// Where and how the simulator consults EC2.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Targets {
    /// EC2 Query endpoint, `http://HOST:PORT` (plain HTTP only).
    pub endpoint: String,
    /// Time after `launchTime` before a running instance is reported Online.
    pub boot_delay: Duration,
}

/// What DescribeInstances said about one instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ec2Instance {
    /// `i-...`.
    pub id: String,
    /// `pending`, `running`, `stopping`, `stopped`, `shutting-down`, `terminated`.
    pub state: String,
    /// `launchTime` in Unix ms, if present and parseable.
    pub launch_ms: Option<u64>,
}

impl Ec2Instance {
    /// Running and launched at least `boot_delay` before `now_ms`.
    pub fn online(&self, boot_delay: Duration, now_ms: u64) -> bool {
        self.state == "running"
            && self
                .launch_ms
                .is_some_and(|t| now_ms >= t.saturating_add(boot_delay.as_millis() as u64))
    }
}

/// Total time one DescribeInstances call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

impl Ec2Targets {
    /// DescribeInstances for `ids` (all instances when empty).
    pub async fn describe(&self, ids: &[&str]) -> Result<Vec<Ec2Instance>, String> {
        let mut form = String::from("Action=DescribeInstances&Version=2016-11-15");
        for (i, id) in ids.iter().enumerate() {
            form.push_str(&format!("&InstanceId.{}={}", i + 1, form_escape(id)));
        }
        let xml = tokio::time::timeout(CALL_TIMEOUT, self.post(form))
            .await
            .map_err(|_| format!("no answer from {} within {CALL_TIMEOUT:?}", self.endpoint))??;
        Ok(parse_instances(&xml))
    }

    /// Whether `id` is online now; errors are logged and count as offline.
    pub async fn is_online(&self, id: &str) -> bool {
        match self.describe(&[id]).await {
            Ok(list) => list
                .iter()
                .find(|i| i.id == id)
                .is_some_and(|i| i.online(self.boot_delay, unix_ms())),
            Err(e) => {
                tracing::warn!(endpoint = %self.endpoint, instance = id, error = %e,
                    "EC2 DescribeInstances failed; treating the target as not connected");
                false
            }
        }
    }

    /// Every instance EC2 knows; errors are logged and give an empty list.
    pub async fn all(&self) -> Vec<Ec2Instance> {
        match self.describe(&[]).await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(endpoint = %self.endpoint, error = %e,
                    "EC2 DescribeInstances failed; reporting no EC2 instances");
                Vec::new()
            }
        }
    }

    async fn post(&self, form: String) -> Result<String, String> {
        let uri: Uri = self
            .endpoint
            .parse()
            .map_err(|e| format!("bad EC2 endpoint {:?}: {e}", self.endpoint))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "EC2 endpoint {:?}: only http:// is supported",
                self.endpoint
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("EC2 endpoint {:?} has no host", self.endpoint))?;
        let port = uri.port_u16().unwrap_or(80);
        let authority = uri.authority().map(|a| a.as_str()).unwrap_or(host);
        let stream = TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let now = iso8601(unix_ms());
        // 20240101T000000Z from 2024-01-01T00:00:00.000Z
        let amz_date: String = format!("{}{}Z", &now[..10], &now[11..19])
            .chars()
            .filter(|c| *c != '-' && *c != ':')
            .collect();
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDSIMULATOR/{}/us-east-1/ec2/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, Signature={}",
            &amz_date[..8],
            "0".repeat(64)
        );
        let req = Request::builder()
            .method("POST")
            .uri("/")
            .header(header::HOST, authority)
            .header(
                header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .header("x-amz-date", amz_date)
            .header(header::AUTHORIZATION, auth)
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| e.to_string())?;
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if !status.is_success() {
            let code = tag_text(&text, "Code").unwrap_or("?");
            // An unknown instance id: EC2 answers InvalidInstanceID.NotFound.
            if code.starts_with("InvalidInstanceID") {
                return Ok(String::new());
            }
            return Err(format!(
                "HTTP {status}: {code}: {}",
                tag_text(&text, "Message").unwrap_or("")
            ));
        }
        Ok(text)
    }
}

fn form_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The text of the first `<tag>…</tag>` in `s`.
fn tag_text<'a>(s: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = s.find(&open)? + open.len();
    let len = s[start..].find(&close)?;
    Some(s[start..start + len].trim())
}

/// Instances of a DescribeInstances answer: each `<instanceId>` starts a segment that
/// runs to the next one; a segment with an `<instanceState>` names the state and
/// `<launchTime>`. Later segments for an id already seen (an `instanceId` nested in the
/// same instance) are ignored.
pub fn parse_instances(xml: &str) -> Vec<Ec2Instance> {
    const OPEN: &str = "<instanceId>";
    let starts: Vec<usize> = xml.match_indices(OPEN).map(|(i, _)| i).collect();
    let mut out: Vec<Ec2Instance> = Vec::new();
    for (n, &start) in starts.iter().enumerate() {
        let end = starts.get(n + 1).copied().unwrap_or(xml.len());
        let seg = &xml[start..end];
        let Some(id) = tag_text(seg, "instanceId") else {
            continue;
        };
        if out.iter().any(|i| i.id == id) {
            continue;
        }
        let Some(state) = tag_text(seg, "instanceState").and_then(|s| tag_text(s, "name")) else {
            continue;
        };
        out.push(Ec2Instance {
            id: id.to_owned(),
            state: state.to_owned(),
            launch_ms: tag_text(seg, "launchTime").and_then(parse_iso8601),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_describe_instances() {
        let xml = r#"<DescribeInstancesResponse><reservationSet><item><instancesSet>
            <item><instanceId>i-0123456789abcdef0</instanceId><imageId>ami-1</imageId>
            <instanceState><code>16</code><name>running</name></instanceState>
            <launchTime>2026-11-23T05:00:00.000Z</launchTime>
            <networkInterfaceSet><item><attachment><instanceId>i-0123456789abcdef0</instanceId>
            </attachment></item></networkInterfaceSet></item>
            <item><instanceId>i-0123456789abcdef1</instanceId>
            <instanceState><code>48</code><name>terminated</name></instanceState>
            <launchTime>2026-11-23T05:00:00Z</launchTime></item>
            </instancesSet></item></reservationSet></DescribeInstancesResponse>"#;
        let list = parse_instances(xml);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].id, "i-0123456789abcdef0");
        assert_eq!(list[0].state, "running");
        let t = parse_iso8601("2026-11-23T05:00:00Z").unwrap();
        assert_eq!(list[0].launch_ms, Some(t));
        assert!(!list[0].online(Duration::from_secs(2), t + 1999));
        assert!(list[0].online(Duration::from_secs(2), t + 2000));
        assert_eq!(list[1].state, "terminated");
        assert!(!list[1].online(Duration::ZERO, t + 10_000));
        assert!(parse_instances("").is_empty());
    }
}
