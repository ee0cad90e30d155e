//! The SSM service API, AWS JSON 1.1: `POST /` with `X-Amz-Target: AmazonSSM.<Op>`.
//!
//! Shapes follow botocore's `ssm/2014-11-06/service-2.json` (\[C\]). SigV4 on these API
//! calls is accepted and not checked (the data plane checks its upgrades, see
//! [`super::admission`]); the access key id in `Authorization` only names the caller
//! (session ids are `<caller>-<17 hex digits>`, like the service's). Every StartSession
//! and ResumeSession answer has a StreamUrl with a fresh cell-number.
//!
//! Errors use the AWS JSON 1.1 shape the SDKs parse: HTTP 400 (500 for
//! `InternalServerError`) with `X-Amzn-ErrorType: <Code>` and the body
//! `{"__type":"<Code>","message":"..."}`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::clock::{epoch_seconds, parse_iso8601, unix_ms};
use super::ec2::Ec2Instance;
use super::session::SimSession;
use super::{Shared, TargetPolicy, admission, dataplane, is_instance_id};
use bastion_proto::version::agent_version_compare;

/// Content type of AWS JSON 1.1 requests and responses.
pub const CONTENT_TYPE: &str = "application/x-amz-json-1.1";

/// The default shell document.
pub const SHELL_DOCUMENT: &str = "SSM-SessionManagerRunShell";
/// Port forwarding to a port of the target.
pub const PORT_DOCUMENT: &str = "AWS-StartPortForwardingSession";
/// Port forwarding to a host reachable from the target.
pub const REMOTE_HOST_DOCUMENT: &str = "AWS-StartPortForwardingSessionToRemoteHost";

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new().route("/", post(handle)).with_state(shared)
}

/// An API error: code (`__type`), message, HTTP status.
#[derive(Debug)]
pub struct ApiError {
    /// Error code, e.g. `TargetNotConnected`.
    pub code: String,
    /// Human-readable message.
    pub message: String,
}

impl ApiError {
    fn new(code: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new("ValidationException", message)
    }

    fn status(&self) -> StatusCode {
        match self.code.as_str() {
            "InternalServerError" | "InternalFailure" | "ServiceUnavailable" => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

fn request_id_header() -> HeaderValue {
    HeaderValue::from_str(&uuid::Uuid::new_v4().to_string()).unwrap_or(HeaderValue::from_static(
        "00000000-0000-0000-0000-000000000000",
    ))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"__type": self.code, "message": self.message}).to_string();
        let mut resp = (self.status(), body).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        h.insert("x-amzn-RequestId", request_id_header());
        if let Ok(v) = HeaderValue::from_str(&self.code) {
            h.insert("x-amzn-ErrorType", v);
        }
        resp
    }
}

fn ok(value: Value) -> Response {
    let mut resp = (StatusCode::OK, value.to_string()).into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    h.insert("x-amzn-RequestId", request_id_header());
    resp
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        &b"{}"[..]
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            "SerializationException",
            format!("could not parse the request body: {e}"),
        )
    })
}

/// The caller name from a SigV4 `Authorization` header (`Credential=<AKID>/...`),
/// restricted to IAM name characters.
fn caller_name(headers: &HeaderMap) -> String {
    let name = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split("Credential=").nth(1))
        .and_then(|c| c.split('/').next())
        .map(|akid| {
            akid.chars()
                .filter(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(*c))
                .take(64)
                .collect::<String>()
        })
        .unwrap_or_default();
    if name.is_empty() {
        "sim-user".to_owned()
    } else {
        name
    }
}

async fn handle(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let op = target.strip_prefix("AmazonSSM.").unwrap_or("");
    let result = match op {
        "StartSession" => {
            let online = ec2_gate(&shared, &body).await;
            start_session(&shared, &headers, &body, online)
        }
        "ResumeSession" => resume_session(&shared, &headers, &body),
        "TerminateSession" => terminate_session(&shared, &body),
        "DescribeSessions" => describe_sessions(&shared, &body),
        "DescribeInstanceInformation" => {
            let ec2 = match &shared.config.ec2 {
                Some(e) => Some(e.all().await),
                None => None,
            };
            describe_instance_information(&shared, &body, ec2.as_deref())
        }
        "GetConnectionStatus" => {
            let online = ec2_gate(&shared, &body).await;
            get_connection_status(&shared, &body, online)
        }
        "GetParameter" => get_parameter(&body),
        _ => Err(ApiError::new(
            "UnknownOperationException",
            format!("the simulator does not implement operation {target:?}"),
        )),
    };
    match result {
        Ok(v) => ok(v),
        Err(e) => {
            tracing::debug!(op = target, code = %e.code, message = %e.message, "ssm api error");
            e.into_response()
        }
    }
}

// ---------------------------------------------------------------------------------------
// StartSession

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StartSessionRequest {
    target: Option<String>,
    document_name: Option<String>,
    reason: Option<String>,
    parameters: Option<BTreeMap<String, Vec<String>>>,
}

/// The supported documents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Document {
    Shell,
    Port,
    RemoteHost,
}

fn resolve_document(name: Option<&str>) -> Result<(Document, &'static str), ApiError> {
    let Some(name) = name else {
        return Ok((Document::Shell, SHELL_DOCUMENT));
    };
    let valid = (3..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:/".contains(&b));
    if !valid {
        return Err(ApiError::validation(format!(
            "1 validation error detected: Value '{name}' at 'documentName' failed to satisfy \
             constraint: Member must satisfy regular expression pattern: ^[a-zA-Z0-9_\\-.:/]{{3,128}}$"
        )));
    }
    // An ARN such as arn:aws:ssm:us-east-1::document/AWS-StartPortForwardingSession.
    let short = name.rsplit_once("document/").map_or(name, |(_, n)| n);
    match short {
        SHELL_DOCUMENT => Ok((Document::Shell, SHELL_DOCUMENT)),
        PORT_DOCUMENT => Ok((Document::Port, PORT_DOCUMENT)),
        REMOTE_HOST_DOCUMENT => Ok((Document::RemoteHost, REMOTE_HOST_DOCUMENT)),
        _ => Err(ApiError::new(
            "InvalidDocument",
            format!("Document {name} does not exist or is not supported by the simulator"),
        )),
    }
}

/// `^([1-9]|[1-9][0-9]{1,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$`
/// (1–65535 without leading zeros), or with `allow_zero` also `0`.
fn valid_port(v: &str, allow_zero: bool) -> bool {
    if v.is_empty() || v.len() > 5 || !v.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    if v == "0" {
        return allow_zero;
    }
    !v.starts_with('0') && v.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p))
}

/// Applies the document's parameter defaults and checks, and returns the document
/// `properties` with the parameters substituted (what the agent puts in its
/// HandshakeRequest), or `None` for a shell.
fn document_properties(
    doc: Document,
    params: &BTreeMap<String, Vec<String>>,
) -> Result<Option<Value>, ApiError> {
    let allowed: &[&str] = match doc {
        Document::Shell => &[],
        Document::Port => &["portNumber", "localPortNumber"],
        Document::RemoteHost => &["host", "portNumber", "localPortNumber"],
    };
    let mut values: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, list) in params {
        if !allowed.contains(&name.as_str()) {
            return Err(ApiError::new(
                "InvalidParameters",
                format!("Parameter \"{name}\" is not defined in the document."),
            ));
        }
        let [value] = list.as_slice() else {
            return Err(ApiError::new(
                "InvalidParameters",
                format!("Parameter \"{name}\" must have exactly one value."),
            ));
        };
        values.insert(name.as_str(), value.as_str());
    }
    if doc == Document::Shell {
        return Ok(None);
    }
    let port = values.get("portNumber").copied().unwrap_or("80");
    let local = values.get("localPortNumber").copied().unwrap_or("0");
    if !valid_port(port, false) {
        return Err(ApiError::new(
            "InvalidParameters",
            format!(
                "Parameter \"portNumber\" \"{port}\" fails to match the allowed pattern (1-65535)."
            ),
        ));
    }
    if !valid_port(local, true) {
        return Err(ApiError::new(
            "InvalidParameters",
            format!(
                "Parameter \"localPortNumber\" \"{local}\" fails to match the allowed pattern (0-65535)."
            ),
        ));
    }
    let mut props = serde_json::Map::new();
    props.insert("portNumber".into(), Value::from(port));
    props.insert("type".into(), Value::from("LocalPortForwarding"));
    props.insert("localPortNumber".into(), Value::from(local));
    if doc == Document::RemoteHost {
        let host = values.get("host").copied().unwrap_or("");
        let ok = !host.is_empty()
            && host.len() <= 253
            && host.chars().all(|c| !c.is_whitespace() && !c.is_control());
        if !ok {
            return Err(ApiError::new(
                "InvalidParameters",
                "Parameter \"host\" is required and must be a host name or address.",
            ));
        }
        props.insert("host".into(), Value::from(host));
    }
    Ok(Some(Value::Object(props)))
}

fn new_session_id(caller: &str) -> String {
    let mut rng = fastrand::Rng::new();
    let hex: String = (0..17)
        .map(|_| char::from_digit(rng.u32(0..16), 16).unwrap_or('0'))
        .collect();
    format!("{caller}-{hex}")
}

fn injected_start_failure(shared: &Shared, target: &str) -> Option<ApiError> {
    let mut faults = shared.faults_mut();
    let code = faults.fail_start_session.clone()?;
    if let Some(n) = faults.fail_start_session_times {
        if n <= 1 {
            faults.fail_start_session = None;
            faults.fail_start_session_times = None;
        } else {
            faults.fail_start_session_times = Some(n - 1);
        }
    }
    let message = match code.as_str() {
        "TargetNotConnected" => format!("{target} is not connected."),
        "ThrottlingException" => "Rate exceeded".to_owned(),
        "AccessDeniedException" => format!(
            "User is not authorized to perform: ssm:StartSession on resource: {target} (simulated)"
        ),
        _ => format!("simulated {code} (fail_start_session knob)"),
    };
    Some(ApiError::new(&code, message))
}

/// With [`super::SimConfig::ec2`], whether the request's `Target` (an `i-` id) is
/// running in EC2 and past its boot delay; true for other targets or without EC2.
async fn ec2_gate(shared: &Shared, body: &[u8]) -> bool {
    let Some(ec2) = &shared.config.ec2 else {
        return true;
    };
    let Ok(TargetRequest {
        target: Some(target),
    }) = serde_json::from_slice::<TargetRequest>(body)
    else {
        return true;
    };
    if !(target.starts_with("i-") && is_instance_id(&target)) {
        return true;
    }
    let online = ec2.is_online(&target).await;
    if online {
        shared.seen_online().insert(target);
    }
    online
}

fn start_session(
    shared: &Shared,
    headers: &HeaderMap,
    body: &[u8],
    ec2_online: bool,
) -> Result<Value, ApiError> {
    let req: StartSessionRequest = parse(body)?;
    let target = req.target.unwrap_or_default();
    if let Some(e) = injected_start_failure(shared, &target) {
        return Err(e);
    }
    if target.is_empty() || target.chars().count() > 400 {
        return Err(ApiError::validation(
            "1 validation error detected: Value at 'target' failed to satisfy constraint: \
             Member must have length between 1 and 400",
        ));
    }
    if let Some(r) = &req.reason {
        let n = r.chars().count();
        if n == 0 || n > 256 || r.contains(['\n', '\r']) {
            return Err(ApiError::validation(
                "1 validation error detected: Value at 'reason' failed to satisfy constraint: \
                 Member must satisfy regular expression pattern: ^.{1,256}$",
            ));
        }
    }
    let (doc, doc_name) = resolve_document(req.document_name.as_deref())?;
    let properties = document_properties(doc, &req.parameters.unwrap_or_default())?;
    if shared.shutting_down.load(Ordering::SeqCst)
        || !shared.targets().accepts(&target)
        || !ec2_online
    {
        return Err(ApiError::new(
            "TargetNotConnected",
            format!("{target} is not connected."),
        ));
    }
    let caller = caller_name(headers);
    let owner = format!("arn:aws:iam::{}:user/{caller}", shared.config.account_id);
    let session = {
        let mut sessions = shared.sessions();
        let mut id = new_session_id(&caller);
        while sessions.iter().any(|s| s.id == id) {
            id = new_session_id(&caller);
        }
        let s = Arc::new(SimSession::new(
            shared.next_ordinal.fetch_add(1, Ordering::SeqCst),
            id,
            target.clone(),
            doc_name.to_owned(),
            owner,
            req.reason.clone(),
            properties,
        ));
        sessions.push(s.clone());
        s
    };
    let token = session.issue_token(shared.config.token_ttl);
    dataplane::supervise(shared, &session);
    tracing::info!(session_id = %session.id, %target, document = doc_name, "StartSession");
    Ok(json!({
        "SessionId": session.id,
        "TokenValue": token,
        "StreamUrl": admission::issue_stream_url(shared, headers, &session),
    }))
}

// ---------------------------------------------------------------------------------------
// ResumeSession / TerminateSession

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionIdRequest {
    session_id: Option<String>,
}

fn required_session_id(req: SessionIdRequest) -> Result<String, ApiError> {
    match req.session_id {
        Some(id) if !id.is_empty() && id.chars().count() <= 96 => Ok(id),
        _ => Err(ApiError::validation(
            "1 validation error detected: Value at 'sessionId' failed to satisfy constraint: \
             Member must have length between 1 and 96",
        )),
    }
}

fn resume_session(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
    let id = required_session_id(parse(body)?)?;
    if shared.faults_mut().refuse_resume {
        return Err(ApiError::new(
            "AccessDeniedException",
            format!(
                "User is not authorized to perform: ssm:ResumeSession on resource: session/{id} \
                 (simulated: refuse_resume)"
            ),
        ));
    }
    let session = shared
        .session(&id)
        .filter(|s| !matches!(s.status(), super::session::Status::Terminated))
        .filter(|s| !*s.stop.borrow())
        .ok_or_else(|| {
            ApiError::new(
                "DoesNotExistException",
                format!("Session {id} does not exist."),
            )
        })?;
    let token = session.issue_token(shared.config.token_ttl);
    tracing::info!(session_id = %id, "ResumeSession");
    Ok(json!({
        "SessionId": id,
        "TokenValue": token,
        "StreamUrl": admission::issue_stream_url(shared, headers, &session),
    }))
}

fn terminate_session(shared: &Shared, body: &[u8]) -> Result<Value, ApiError> {
    let id = required_session_id(parse(body)?)?;
    {
        let mut faults = shared.faults_mut();
        if let Some(n) = faults.fail_terminate_session_times.filter(|n| *n > 0) {
            faults.fail_terminate_session_times = (n > 1).then(|| n - 1);
            tracing::info!(session_id = %id, "TerminateSession fails (fail_terminate_session_times)");
            return Err(ApiError::new(
                "InternalServerError",
                "simulated InternalServerError (fail_terminate_session_times knob)".to_owned(),
            ));
        }
    }
    match shared.session(&id) {
        Some(s) => {
            tracing::info!(session_id = %id, "TerminateSession");
            dataplane::terminate(&s, None);
        }
        None => tracing::info!(session_id = %id, "TerminateSession of an unknown session"),
    }
    Ok(json!({ "SessionId": id }))
}

// ---------------------------------------------------------------------------------------
// DescribeSessions

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeSessionsRequest {
    state: Option<String>,
    max_results: Option<i64>,
    next_token: Option<String>,
    filters: Option<Vec<SessionFilter>>,
}

#[derive(Debug, Deserialize)]
struct SessionFilter {
    key: String,
    value: String,
}

fn page<T>(
    items: Vec<T>,
    max: usize,
    next_token: Option<&str>,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let start = match next_token {
        None | Some("") => 0,
        Some(t) => t
            .parse::<usize>()
            .ok()
            .filter(|n| *n <= items.len())
            .ok_or_else(|| ApiError::new("InvalidNextToken", "The specified token isn't valid."))?,
    };
    let end = (start + max).min(items.len());
    let next = (end < items.len()).then(|| end.to_string());
    Ok((
        items.into_iter().skip(start).take(end - start).collect(),
        next,
    ))
}

fn session_json(s: &SimSession, shared: &Shared) -> Value {
    let inner = s.lock();
    let mut v = json!({
        "SessionId": s.id,
        "Target": s.target,
        "Status": inner.status.as_str(),
        "StartDate": epoch_seconds(s.start_unix_ms),
        "DocumentName": s.document_name,
        "Owner": s.owner,
        "AccessType": "Standard",
    });
    if let Some(end) = inner.end_unix_ms {
        v["EndDate"] = json!(epoch_seconds(end));
    }
    if let Some(r) = &s.reason {
        v["Reason"] = json!(r);
    }
    if let Some(max) = shared.config.max_session_duration {
        v["MaxSessionDuration"] = json!(max.as_secs().div_ceil(60).clamp(1, 1440).to_string());
    }
    v
}

fn describe_sessions(shared: &Shared, body: &[u8]) -> Result<Value, ApiError> {
    let req: DescribeSessionsRequest = parse(body)?;
    let active = match req.state.as_deref() {
        Some("Active") => true,
        Some("History") => false,
        other => {
            return Err(ApiError::validation(format!(
                "1 validation error detected: Value {other:?} at 'state' failed to satisfy \
                 constraint: Member must satisfy enum value set: [Active, History]"
            )));
        }
    };
    let max = match req.max_results {
        None => 200,
        Some(n @ 1..=200) => n as usize,
        Some(n) => {
            return Err(ApiError::validation(format!(
                "1 validation error detected: Value '{n}' at 'maxResults' failed to satisfy \
                 constraint: Member must have value between 1 and 200"
            )));
        }
    };
    let filters = req.filters.unwrap_or_default();
    if filters.len() > 6 {
        return Err(ApiError::validation("at most 6 filters"));
    }
    let mut sessions: Vec<Arc<SimSession>> = shared
        .all_sessions()
        .into_iter()
        .filter(|s| s.status().is_active() == active)
        .collect();
    for f in &filters {
        let value = f.value.as_str();
        let keep: Box<dyn Fn(&SimSession) -> bool> = match f.key.as_str() {
            "Target" => Box::new(move |s| s.target == value),
            "Owner" => Box::new(move |s| s.owner == value),
            "SessionId" => Box::new(move |s| s.id == value),
            "Status" => Box::new(move |s| s.status().as_str() == value),
            "AccessType" => Box::new(move |_| value == "Standard"),
            "InvokedAfter" | "InvokedBefore" => {
                let at = parse_iso8601(value).ok_or_else(|| {
                    ApiError::validation(format!(
                        "invalid timestamp {value:?} for filter {}",
                        f.key
                    ))
                })?;
                if f.key == "InvokedAfter" {
                    Box::new(move |s| s.start_unix_ms >= at)
                } else {
                    Box::new(move |s| s.start_unix_ms < at)
                }
            }
            _ => {
                return Err(ApiError::new(
                    "InvalidFilterKey",
                    format!("The specified filter key {:?} isn't valid.", f.key),
                ));
            }
        };
        sessions.retain(|s| keep(s));
    }
    sessions.sort_by_key(|s| std::cmp::Reverse(s.ordinal));
    let (sessions, next) = page(sessions, max, req.next_token.as_deref())?;
    let list: Vec<Value> = sessions.iter().map(|s| session_json(s, shared)).collect();
    let mut out = json!({ "Sessions": list });
    if let Some(n) = next {
        out["NextToken"] = json!(n);
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// DescribeInstanceInformation / GetConnectionStatus

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DescribeInstanceInformationRequest {
    instance_information_filter_list: Option<Vec<LegacyFilter>>,
    filters: Option<Vec<StringFilter>>,
    max_results: Option<i64>,
    next_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct LegacyFilter {
    key: String,
    #[serde(rename = "valueSet")]
    value_set: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct StringFilter {
    key: String,
    values: Vec<String>,
}

/// Instances the simulator reports: the configured list, or (accepting any valid id)
/// every instance a session was started on plus the ids asked for by name.
///
/// With EC2 (`ec2` is its DescribeInstances answer), the accepted EC2 instances join the
/// list and each `i-` id is `Online` while running past its boot delay, `ConnectionLost`
/// once it was Online and no longer is, and absent otherwise (an agent that never
/// registered is unknown to SSM). Others are `Online`.
fn known_instances(
    shared: &Shared,
    asked: &[String],
    ec2: Option<&[Ec2Instance]>,
) -> Vec<(String, &'static str)> {
    let mut ids: Vec<String> = match &*shared.targets() {
        TargetPolicy::Only(list) => list.iter().filter(|t| is_instance_id(t)).cloned().collect(),
        TargetPolicy::AnyValid => {
            let mut v: Vec<String> = shared
                .all_sessions()
                .iter()
                .map(|s| s.target.clone())
                .filter(|t| is_instance_id(t))
                .collect();
            v.extend(asked.iter().filter(|t| is_instance_id(t)).cloned());
            v
        }
    };
    let (Some(list), Some(cfg)) = (ec2, &shared.config.ec2) else {
        ids.sort();
        ids.dedup();
        return ids.into_iter().map(|id| (id, "Online")).collect();
    };
    let policy = shared.targets().clone();
    ids.extend(
        list.iter()
            .filter(|i| policy.accepts(&i.id))
            .map(|i| i.id.clone()),
    );
    ids.sort();
    ids.dedup();
    let now = unix_ms();
    let mut seen = shared.seen_online();
    ids.into_iter()
        .filter_map(|id| {
            if !id.starts_with("i-") {
                return Some((id, "Online"));
            }
            let online = list
                .iter()
                .find(|i| i.id == id)
                .is_some_and(|i| i.online(cfg.boot_delay, now));
            if online {
                seen.insert(id.clone());
                Some((id, "Online"))
            } else if seen.contains(&id) {
                Some((id, "ConnectionLost"))
            } else {
                None
            }
        })
        .collect()
}

fn instance_json(shared: &Shared, id: &str, ping: &str, now_ms: u64) -> Value {
    let managed = id.starts_with("mi-");
    let h = bastion_proto::message::sha256(id.as_bytes());
    let ip = format!("10.0.{}.{}", h[0], h[1].max(1));
    let version = &shared.config.agent_version;
    json!({
        "InstanceId": id,
        "PingStatus": ping,
        "LastPingDateTime": epoch_seconds(now_ms),
        "AgentVersion": version,
        "IsLatestVersion":
            agent_version_compare(version, super::DEFAULT_AGENT_VERSION) != std::cmp::Ordering::Less,
        "PlatformType": "Linux",
        "PlatformName": "Amazon Linux",
        "PlatformVersion": "2023",
        "ResourceType": if managed { "ManagedInstance" } else { "EC2Instance" },
        "IPAddress": ip,
        "ComputerName": format!("ip-{}.ec2.internal", ip.replace('.', "-")),
        "AssociationStatus": "Success",
        "SourceId": id,
        "SourceType": if managed { "AWS::SSM::ManagedInstance" } else { "AWS::EC2::Instance" },
    })
}

fn describe_instance_information(
    shared: &Shared,
    body: &[u8],
    ec2: Option<&[Ec2Instance]>,
) -> Result<Value, ApiError> {
    let req: DescribeInstanceInformationRequest = parse(body)?;
    let legacy = req.instance_information_filter_list.unwrap_or_default();
    let modern = req.filters.unwrap_or_default();
    if !legacy.is_empty() && !modern.is_empty() {
        return Err(ApiError::validation(
            "InstanceInformationFilterList and Filters cannot be used in the same request",
        ));
    }
    const LEGACY_KEYS: &[&str] = &[
        "InstanceIds",
        "AgentVersion",
        "PingStatus",
        "PlatformTypes",
        "ActivationIds",
        "IamRole",
        "ResourceType",
        "AssociationStatus",
    ];
    let mut filters: Vec<(String, Vec<String>)> = Vec::new();
    for f in legacy {
        if !LEGACY_KEYS.contains(&f.key.as_str()) {
            return Err(ApiError::new(
                "InvalidFilterKey",
                format!("The specified filter key {:?} isn't valid.", f.key),
            ));
        }
        if f.value_set.is_empty() {
            return Err(ApiError::new(
                "InvalidInstanceInformationFilterValue",
                format!("filter {} needs at least one value", f.key),
            ));
        }
        filters.push((f.key, f.value_set));
    }
    filters.extend(modern.into_iter().map(|f| (f.key, f.values)));
    let max = match req.max_results {
        None => 50,
        Some(n @ 5..=50) => n as usize,
        Some(n) => {
            return Err(ApiError::validation(format!(
                "1 validation error detected: Value '{n}' at 'maxResults' failed to satisfy \
                 constraint: Member must have value between 5 and 50"
            )));
        }
    };
    let asked: Vec<String> = filters
        .iter()
        .filter(|(k, _)| k == "InstanceIds")
        .flat_map(|(_, v)| v.iter().cloned())
        .collect();
    let now = unix_ms();
    let mut list: Vec<Value> = known_instances(shared, &asked, ec2)
        .iter()
        .map(|(id, ping)| instance_json(shared, id, ping, now))
        .collect();
    for (key, values) in &filters {
        let field = match key.as_str() {
            "InstanceIds" => "InstanceId",
            "AgentVersion" => "AgentVersion",
            "PingStatus" => "PingStatus",
            "PlatformTypes" => "PlatformType",
            "ResourceType" => "ResourceType",
            "AssociationStatus" => "AssociationStatus",
            "SourceIds" => "SourceId",
            "SourceTypes" => "SourceType",
            // Tags, activations and roles: the simulated instances have none.
            _ => {
                list.clear();
                continue;
            }
        };
        list.retain(|i| {
            i[field]
                .as_str()
                .is_some_and(|v| values.iter().any(|w| w == v))
        });
    }
    let (list, next) = page(list, max, req.next_token.as_deref())?;
    let mut out = json!({ "InstanceInformationList": list });
    if let Some(n) = next {
        out["NextToken"] = json!(n);
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TargetRequest {
    target: Option<String>,
}

fn get_connection_status(
    shared: &Shared,
    body: &[u8],
    ec2_online: bool,
) -> Result<Value, ApiError> {
    let req: TargetRequest = parse(body)?;
    let target = req
        .target
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ApiError::validation("Target is required"))?;
    let status = if shared.targets().accepts(&target) && ec2_online {
        "connected"
    } else {
        "notconnected"
    };
    Ok(json!({ "Target": target, "Status": status }))
}

// ---------------------------------------------------------------------------------------
// GetParameter

/// The public parameters the simulator knows: the latest Amazon Linux 2023 AMIs, as AMI
/// ids that moto's EC2 lists (moto answers these parameters with the same ids), so an
/// on-demand launch can resolve its image here and run it in moto.
pub const PUBLIC_PARAMETERS: &[(&str, &str)] = &[
    (
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64",
        "ami-0c230065b91270bc6",
    ),
    (
        "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64",
        "ami-0951c836c26e34fc8",
    ),
];

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct GetParameterRequest {
    name: Option<String>,
}

fn get_parameter(body: &[u8]) -> Result<Value, ApiError> {
    let req: GetParameterRequest = parse(body)?;
    let name = req
        .name
        .filter(|n| !n.is_empty() && n.chars().count() <= 2048)
        .ok_or_else(|| {
            ApiError::validation(
                "1 validation error detected: Value at 'name' failed to satisfy constraint: \
                 Member must have length between 1 and 2048",
            )
        })?;
    let (name, value) = PUBLIC_PARAMETERS
        .iter()
        .find(|(n, _)| *n == name)
        .ok_or_else(|| {
            ApiError::new("ParameterNotFound", format!("Parameter {name} not found."))
        })?;
    Ok(json!({
        "Parameter": {
            "Name": name,
            "Type": "String",
            "Value": value,
            "Version": 1,
            "LastModifiedDate": epoch_seconds(1_700_000_000_000),
            "ARN": format!("arn:aws:ssm:us-east-1::parameter{name}"),
            "DataType": "aws:ec2:image",
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, Vec<String>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect()
    }

    #[test]
    fn ports() {
        for ok in ["1", "80", "5432", "65535"] {
            assert!(valid_port(ok, false), "{ok}");
        }
        for bad in ["0", "65536", "080", "", "-1", "12a", "999999"] {
            assert!(!valid_port(bad, false), "{bad}");
        }
        assert!(valid_port("0", true));
        assert!(!valid_port("00", true));
    }

    #[test]
    fn properties_as_documents_substitute() {
        let p = document_properties(Document::Port, &params(&[]))
            .unwrap()
            .unwrap();
        assert_eq!(
            p,
            json!({"portNumber": "80", "type": "LocalPortForwarding", "localPortNumber": "0"})
        );
        let p = document_properties(
            Document::RemoteHost,
            &params(&[
                ("host", "db.example"),
                ("portNumber", "5432"),
                ("localPortNumber", "15432"),
            ]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"host":"db.example","localPortNumber":"15432","portNumber":"5432","type":"LocalPortForwarding"}"#
        );
        assert!(document_properties(Document::RemoteHost, &params(&[])).is_err());
        assert!(document_properties(Document::Port, &params(&[("host", "x")])).is_err());
        assert!(document_properties(Document::Port, &params(&[("portNumber", "0")])).is_err());
        assert!(
            document_properties(Document::Shell, &params(&[]))
                .unwrap()
                .is_none()
        );
        assert!(document_properties(Document::Shell, &params(&[("portNumber", "1")])).is_err());
    }

    #[test]
    fn documents() {
        assert_eq!(resolve_document(None).unwrap().0, Document::Shell);
        assert_eq!(
            resolve_document(Some(
                "arn:aws:ssm:eu-west-1::document/AWS-StartPortForwardingSession"
            ))
            .unwrap()
            .0,
            Document::Port
        );
        assert_eq!(
            resolve_document(Some("AWS-StartSSHSession"))
                .unwrap_err()
                .code,
            "InvalidDocument"
        );
        assert_eq!(
            resolve_document(Some("a b")).unwrap_err().code,
            "ValidationException"
        );
    }

    #[test]
    fn get_parameter_answers_the_al2023_amis_only() {
        let v = get_parameter(
            br#"{"Name":"/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"}"#,
        )
        .unwrap();
        assert_eq!(v["Parameter"]["Value"], "ami-0951c836c26e34fc8");
        assert_eq!(v["Parameter"]["Type"], "String");
        let e = get_parameter(br#"{"Name":"/aws/service/nope"}"#).unwrap_err();
        assert_eq!(e.code, "ParameterNotFound");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            get_parameter(b"{}").unwrap_err().code,
            "ValidationException"
        );
    }

    #[test]
    fn caller_from_sigv4() {
        let mut h = HeaderMap::new();
        assert_eq!(caller_name(&h), "sim-user");
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20240101/us-east-1/ssm/aws4_request, \
                 SignedHeaders=host;x-amz-date, Signature=abc",
            ),
        );
        assert_eq!(caller_name(&h), "AKIDEXAMPLE");
        let id = new_session_id("AKIDEXAMPLE");
        assert!(id.starts_with("AKIDEXAMPLE-") && id.len() == "AKIDEXAMPLE-".len() + 17);
    }
}
