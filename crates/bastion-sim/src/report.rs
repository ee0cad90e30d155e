//! What the simulator observed of one session: counters and protocol violations,
//! served as JSON by the introspection endpoint so tests can assert "zero violations".

use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Counters of one session, from the agent's and the service's point of view.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Counters {
    /// Websocket frames received from the client (after fault injection).
    pub frames_from_client: u64,
    /// Websocket frames sent to the client (before fault injection).
    pub frames_to_client: u64,
    /// `input_stream_data` messages received (duplicates included).
    pub data_messages_from_client: u64,
    /// Payload bytes of `input_stream_data` accepted in order.
    pub data_bytes_from_client: u64,
    /// `output_stream_data` messages sent (retransmissions excluded).
    pub data_messages_to_client: u64,
    /// Payload bytes of `output_stream_data` sent (retransmissions excluded).
    pub data_bytes_to_client: u64,
    /// Acknowledgements received from the client.
    pub acks_from_client: u64,
    /// Acknowledgements sent to the client (re-acks included).
    pub acks_to_client: u64,
    /// Agent retransmissions.
    pub retransmissions: u64,
    /// Client messages received again after acceptance.
    pub duplicates_from_client: u64,
    /// Client messages received ahead of the expected sequence number.
    pub out_of_order_from_client: u64,
    /// smux streams opened by the client (mux) or TCP connections made (basic).
    pub streams_opened: u64,
    /// Dials of the remote host that failed.
    pub dials_failed: u64,
    /// Websocket connections accepted for this session (1 + resumes).
    pub connections: u64,
    /// Frames dropped, duplicated or delayed by fault knobs.
    pub faults_injected: u64,
    /// Websocket upgrades refused with 403 (signature or cell-number).
    pub upgrades_refused: u64,
    /// Websocket upgrades that carried no signature at all (accepted or not).
    pub unsigned_upgrades: u64,
    /// Websocket Close frames the client sent. Neither reference sends one when it
    /// reconnects (it drops the TCP connection), so a client that does may read as
    /// "client left".
    pub close_frames_from_client: u64,
}

/// The kind of a protocol violation by the client.
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// A binary frame that is not a valid ClientMessage (any decode error but the digest).
    MalformedFrame,
    /// PayloadDigest does not match the payload.
    BadDigest,
    /// The first websocket message was not a valid OpenDataChannel TEXT message.
    BadOpenDataChannel,
    /// OpenDataChannel carried a wrong or expired token.
    BadToken,
    /// Stream data other than the handshake answers before HandshakeComplete.
    DataBeforeHandshakeComplete,
    /// An acknowledgement for a sequence number the agent never sent.
    AckForUnknownMessage,
    /// An acknowledgement whose MessageId or MessageType does not match what was sent.
    AckMismatch,
    /// A client sequence number skipped (a gap that was never filled).
    SequenceGap,
    /// A HandshakeResponse that fails an action or is malformed.
    BadHandshakeResponse,
    /// Header fields the references always set differently (SchemaVersion, Flags, ...).
    UnexpectedHeader,
    /// A payload that is empty where the references never send one.
    EmptyPayload,
    /// A malformed smux frame from the client.
    SmuxProtocol,
    /// A websocket upgrade refused with 403 (unsigned, bad signature, stale or unknown
    /// cell-number); the detail says which.
    UpgradeRefused,
    /// A ClientVersion below the configured minimum.
    ClientVersionUnsupported,
    /// Anything else; see the detail.
    Other,
}

/// One violation with when it happened and a human-readable detail.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Violation {
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What rule was broken.
    pub kind: ViolationKind,
    /// Details (sequence numbers, expected and actual values).
    pub detail: String,
}

/// Shared, thread-safe record of one session.
#[derive(Debug, Default)]
pub struct SessionReport {
    counters: Mutex<Counters>,
    violations: Mutex<Vec<Violation>>,
}

impl SessionReport {
    /// Updates the counters.
    pub fn count(&self, f: impl FnOnce(&mut Counters)) {
        if let Ok(mut c) = self.counters.lock() {
            f(&mut c);
        }
    }

    /// Records a violation (also logged at WARN).
    pub fn violation(&self, kind: ViolationKind, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::warn!(?kind, %detail, "client protocol violation");
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or_default();
        if let Ok(mut v) = self.violations.lock() {
            v.push(Violation {
                at_unix_ms,
                kind,
                detail,
            });
        }
    }

    /// A copy of the counters.
    pub fn counters(&self) -> Counters {
        self.counters.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// A copy of the violations so far.
    pub fn violations(&self) -> Vec<Violation> {
        self.violations
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_counters_and_violations() {
        let r = SessionReport::default();
        r.count(|c| c.acks_from_client += 2);
        r.violation(ViolationKind::BadDigest, "seq 3");
        assert_eq!(r.counters().acks_from_client, 2);
        let v = r.violations();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].kind, ViolationKind::BadDigest);
        assert_eq!(
            serde_json::to_value(&v[0]).unwrap()["kind"],
            serde_json::json!("bad_digest")
        );
    }
}
