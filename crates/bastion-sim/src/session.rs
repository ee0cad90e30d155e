//! The simulator's record of one Session Manager session: what StartSession created,
//! its token, its state, and the handles of the tasks that run it.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::admission::{self, UpgradeRecord};
use super::clock;
use super::report::{Counters, SessionReport, Violation};
use bastion_proto::message::sha256;

/// The `Status` of a session as DescribeSessions reports it (botocore `SessionStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Status {
    /// Started; no websocket has opened the data channel yet.
    Connecting,
    /// A client websocket is attached.
    Connected,
    /// The client websocket went away; the session can be resumed.
    Disconnected,
    /// Termination requested; the agent is stopping.
    Terminating,
    /// Ended.
    Terminated,
}

impl Status {
    /// The API spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Connecting => "Connecting",
            Status::Connected => "Connected",
            Status::Disconnected => "Disconnected",
            Status::Terminating => "Terminating",
            Status::Terminated => "Terminated",
        }
    }

    /// True for every status but `Terminated` (DescribeSessions `State: Active`).
    pub fn is_active(self) -> bool {
        self != Status::Terminated
    }
}

/// A command to the task that owns one client websocket.
#[derive(Debug)]
pub(crate) enum WsCommand {
    /// Send one binary message.
    Frame(Bytes),
    /// Send a close frame with this code and reason, then end.
    Close(u16, &'static str),
}

/// Something for the agent's input: a client message (faults apply) or a message the
/// service makes (no faults).
#[derive(Debug)]
pub(crate) enum ToAgent {
    Client(Bytes),
    Service(Bytes),
}

/// The websocket currently attached to a session.
#[derive(Debug)]
pub(crate) struct Attachment {
    pub conn_id: u64,
    pub tx: mpsc::Sender<WsCommand>,
    /// Notified when another websocket replaces this one: drop it at once.
    pub kill: Arc<tokio::sync::Notify>,
}

#[derive(Debug)]
pub(crate) struct Token {
    pub value: String,
    pub expires: Instant,
}

/// Why a token was refused (never contains the token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TokenError {
    Expired,
    AlreadyUsed,
    Unknown,
}

impl TokenError {
    pub fn detail(&self) -> &'static str {
        match self {
            TokenError::Expired => "token expired",
            TokenError::AlreadyUsed => "token already used (tokens are single-use)",
            TokenError::Unknown => "token is not the session's current token",
        }
    }
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub status: Status,
    pub end_unix_ms: Option<u64>,
    pub token: Option<Token>,
    pub used_tokens: Vec<[u8; 32]>,
    pub request_ids: HashSet<String>,
    pub client_version: Option<String>,
    pub client_id: Option<String>,
    pub attached: Option<Attachment>,
    pub to_agent: Option<mpsc::Sender<ToAgent>>,
    /// The service's own messages to the agent (pause/start publication), forwarded
    /// into `to_agent` in order by one task, so a full pipe never reorders them.
    pub to_agent_service: Option<mpsc::UnboundedSender<Bytes>>,
    pub agent_started: bool,
    pub paused: bool,
    /// Output for `channel_closed` chosen by the service (idle timeout, ...).
    pub termination_output: Option<String>,
    /// Output actually sent in `channel_closed`.
    pub final_output: Option<String>,
    pub exit_reason: Option<String>,
    pub cuts: u64,
    /// Cell numbers issued (StartSession, then each ResumeSession); the last is current.
    pub cells: Vec<String>,
    /// Every websocket upgrade of this session.
    pub upgrades: Vec<UpgradeRecord>,
}

/// One session.
#[derive(Debug)]
pub(crate) struct SimSession {
    /// Creation order since the simulator started (seeds the fault pipes).
    pub ordinal: u64,
    pub id: String,
    pub target: String,
    pub document_name: String,
    pub owner: String,
    pub reason: Option<String>,
    /// Document properties for a Port session; `None` for a shell.
    pub properties: Option<Value>,
    pub start_unix_ms: u64,
    pub started_at: Instant,
    pub report: Arc<SessionReport>,
    pub inner: Mutex<Inner>,
    pub last_activity: Mutex<Instant>,
    /// Becomes true when termination is requested.
    pub stop: watch::Sender<bool>,
    /// Becomes true when the session is Terminated.
    pub done: watch::Sender<bool>,
}

/// A copy of what the simulator knows about a session, served by `GET /sim/sessions`.
#[derive(Clone, Debug, Serialize)]
pub struct SessionSnapshot {
    /// Session id.
    pub session_id: String,
    /// StartSession `Target`.
    pub target: String,
    /// Document name (as resolved: an ARN is reduced to the name).
    pub document: String,
    /// `Connecting`, `Connected`, `Disconnected`, `Terminating` or `Terminated`.
    pub status: String,
    /// `ClientVersion` of the last OpenDataChannel.
    pub client_version: Option<String>,
    /// `ClientId` of the last OpenDataChannel.
    pub client_id: Option<String>,
    /// Owner ARN.
    pub owner: String,
    /// Port-session properties handed to the agent (`null` for a shell).
    pub properties: Option<Value>,
    /// Start, Unix milliseconds.
    pub start_unix_ms: u64,
    /// End, Unix milliseconds.
    pub end_unix_ms: Option<u64>,
    /// True while a client websocket is attached.
    pub attached: bool,
    /// `Output` of the `channel_closed` sent at the end.
    pub output: Option<String>,
    /// Why the agent ended (`AgentExit::reason`).
    pub exit_reason: Option<String>,
    /// Counters.
    pub counters: Counters,
    /// Protocol violations detected, in order.
    pub violations: Vec<Violation>,
    /// The cell-number of the newest StreamUrl.
    pub cell_number: Option<String>,
    /// Every websocket upgrade, in order: cell-number, access key id, auth, outcome.
    pub upgrades: Vec<UpgradeRecord>,
}

impl SimSession {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ordinal: u64,
        id: String,
        target: String,
        document_name: String,
        owner: String,
        reason: Option<String>,
        properties: Option<Value>,
    ) -> SimSession {
        let now = Instant::now();
        SimSession {
            ordinal,
            id,
            target,
            document_name,
            owner,
            reason,
            properties,
            start_unix_ms: clock::unix_ms(),
            started_at: now,
            report: Arc::new(SessionReport::default()),
            inner: Mutex::new(Inner {
                status: Status::Connecting,
                end_unix_ms: None,
                token: None,
                used_tokens: Vec::new(),
                request_ids: HashSet::new(),
                client_version: None,
                client_id: None,
                attached: None,
                to_agent: None,
                to_agent_service: None,
                agent_started: false,
                paused: false,
                termination_output: None,
                final_output: None,
                exit_reason: None,
                cuts: 0,
                cells: Vec::new(),
                upgrades: Vec::new(),
            }),
            last_activity: Mutex::new(now),
            stop: watch::channel(false).0,
            done: watch::channel(false).0,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn status(&self) -> Status {
        self.lock().status
    }

    /// Records stream activity (for the idle timeout).
    pub fn touch(&self) {
        if let Ok(mut t) = self.last_activity.lock() {
            *t = Instant::now();
        }
    }

    pub fn last_activity(&self) -> Instant {
        self.last_activity
            .lock()
            .map(|t| *t)
            .unwrap_or(self.started_at)
    }

    /// Issues a new token valid for `ttl`, replacing any unused one.
    pub fn issue_token(&self, ttl: Duration) -> String {
        let value = format!(
            "AAEAA{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let mut inner = self.lock();
        if let Some(old) = inner.token.take() {
            inner.used_tokens.push(sha256(old.value.as_bytes()));
        }
        inner.token = Some(Token {
            value: value.clone(),
            expires: Instant::now() + ttl,
        });
        value
    }

    /// Issues a new cell number; earlier ones are superseded.
    pub fn issue_cell(&self) -> String {
        let cell = admission::new_cell_number();
        self.lock().cells.push(cell.clone());
        cell
    }

    /// Checks a token from OpenDataChannel and consumes it on success.
    pub fn consume_token(&self, value: &str) -> Result<(), TokenError> {
        let mut inner = self.lock();
        let digest = sha256(value.as_bytes());
        match &inner.token {
            Some(t) if t.value.as_bytes() == value.as_bytes() => {
                if Instant::now() > t.expires {
                    return Err(TokenError::Expired);
                }
                inner.token = None;
                inner.used_tokens.push(digest);
                Ok(())
            }
            _ if inner.used_tokens.contains(&digest) => Err(TokenError::AlreadyUsed),
            _ => Err(TokenError::Unknown),
        }
    }

    pub fn snapshot(&self) -> SessionSnapshot {
        let inner = self.lock();
        SessionSnapshot {
            session_id: self.id.clone(),
            target: self.target.clone(),
            document: self.document_name.clone(),
            status: inner.status.as_str().to_owned(),
            client_version: inner.client_version.clone(),
            client_id: inner.client_id.clone(),
            owner: self.owner.clone(),
            properties: self.properties.clone(),
            start_unix_ms: self.start_unix_ms,
            end_unix_ms: inner.end_unix_ms,
            attached: inner.attached.is_some(),
            output: inner.final_output.clone(),
            exit_reason: inner.exit_reason.clone(),
            counters: self.report.counters(),
            violations: self.report.violations(),
            cell_number: inner.cells.last().cloned(),
            upgrades: inner.upgrades.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session() -> SimSession {
        SimSession::new(
            0,
            "u-0123456789abcdef0".into(),
            "i-0123456789abcdef0".into(),
            "SSM-SessionManagerRunShell".into(),
            "arn:aws:iam::123456789012:user/u".into(),
            None,
            None,
        )
    }

    #[tokio::test]
    async fn tokens_are_single_use_and_replaced_by_resume() {
        let s = session();
        let t1 = s.issue_token(Duration::from_secs(60));
        assert_eq!(s.consume_token("nope"), Err(TokenError::Unknown));
        assert_eq!(s.consume_token(&t1), Ok(()));
        assert_eq!(s.consume_token(&t1), Err(TokenError::AlreadyUsed));
        let t2 = s.issue_token(Duration::from_secs(60));
        let t3 = s.issue_token(Duration::from_secs(60));
        assert_eq!(s.consume_token(&t2), Err(TokenError::AlreadyUsed));
        assert_eq!(s.consume_token(&t3), Ok(()));
        let t4 = s.issue_token(Duration::ZERO);
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(s.consume_token(&t4), Err(TokenError::Expired));
        assert!(t4.len() <= 300);
    }
}
