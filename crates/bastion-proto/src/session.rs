//! The client end of a Session Manager session: the [`Channel`] plus the handshake,
//! the optional KMS encryption and the payload-type dispatch.
//!
//! Sans-IO like the channel. The KMS GenerateDataKey call is the driver's job: the
//! session asks for it with [`SessionEvent::DataKeyRequired`] and continues when
//! [`ClientSession::provide_data_key`] (or [`ClientSession::fail_data_key`]) is called.
//!
//! Rules (details and sources in `proto-docs/handshake.md`):
//! * Every requested action is answered, in order, in one HandshakeResponse
//!   ([P] `streaming.go` fn `handleHandshakeRequest`).
//! * No stream data is sent before HandshakeComplete: the agent acks and discards it
//!   ([A] `datachannel.go` fn `processStreamDataMessage`). A session without a handshake
//!   (a shell without KMS) becomes ready on its first output ([P] fn
//!   `ProcessFirstMessage`).
//! * With encryption on, outgoing PT 1 and incoming PT 1/11/12 are AES-GCM sealed
//!   ([`crate::crypto::is_encrypted`]).

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::time::Instant;

use bytes::Bytes;
use ring::rand::SystemRandom;
use serde_json::Value;
use thiserror::Error;
use uuid::Uuid;

use super::channel::{
    Channel, ChannelConfig, ChannelEvent, CloseReason, FrameError, Role, SendError,
};
use super::crypto::{self, CryptoError, DataKey, Direction, SessionCipher};
use super::kind::{Flag, PayloadType};
use super::payload::{
    self, ActionStatus, EncryptionChallenge, HandshakeComplete, HandshakeRequest,
    HandshakeResponse, KmsEncryptionRequest, KmsEncryptionResponse, OpenDataChannelInput,
    ProcessedClientAction, SessionTypeRequest, SizeData, action_type,
};
use super::version;

/// Session type names ([A] `agent/appconfig/constants.go` `PluginName*`).
pub mod session_type {
    /// Port forwarding.
    pub const PORT: &str = "Port";
    /// The default shell.
    pub const STANDARD_STREAM: &str = "Standard_Stream";
    /// Interactive commands (treated as a shell).
    pub const INTERACTIVE_COMMANDS: &str = "InteractiveCommands";
    /// Non-interactive commands (treated as a shell).
    pub const NON_INTERACTIVE_COMMANDS: &str = "NonInteractiveCommands";
}

/// Settings of a [`ClientSession`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// The ClientVersion reported in OpenDataChannel and HandshakeResponse.
    pub client_version: String,
    /// The ClientId sent in OpenDataChannel: one UUID per client process.
    pub client_id: String,
    /// The SessionId from StartSession (part of the KMS encryption context).
    pub session_id: String,
    /// The StartSession `Target` (part of the KMS encryption context).
    pub target: String,
    /// Channel limits.
    pub channel: ChannelConfig,
}

impl ClientConfig {
    /// Defaults for a session: [`version::DEFAULT_CLIENT_VERSION`], a fresh ClientId.
    pub fn new(session_id: impl Into<String>, target: impl Into<String>) -> ClientConfig {
        ClientConfig {
            client_version: version::DEFAULT_CLIENT_VERSION.to_owned(),
            client_id: Uuid::new_v4().hyphenated().to_string(),
            session_id: session_id.into(),
            target: target.into(),
            channel: ChannelConfig::default(),
        }
    }
}

/// How the data of a ready session is to be carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataMode {
    /// Port forwarding with smux multiplexing (one smux stream per connection).
    Mux,
    /// Port forwarding of one raw TCP connection at a time (old agents).
    Basic,
    /// stdin/stdout: a shell, or a port session without `type: LocalPortForwarding`.
    StandardStream,
}

/// What the client learned in the handshake.
#[derive(Clone, Debug, PartialEq)]
pub struct SessionInfo {
    /// The agent's version (empty when the session had no handshake).
    pub agent_version: String,
    /// The SessionType the agent announced (`Standard_Stream` without a handshake).
    pub session_type: String,
    /// The session document's properties.
    pub properties: Value,
    /// How to carry data.
    pub mode: DataMode,
    /// True when the agent disables smux keepalive for this client, so that no NOPs
    /// are needed ([P] `muxportforwarding.go` fn `initialize` and [A] `port_mux.go` fn
    /// `initialize`, both rules combined).
    pub agent_disables_smux_keepalive: bool,
    /// True when the agent handles the TerminateSession flag (> 2.3.722.0).
    pub supports_terminate_flag: bool,
    /// True when payloads are KMS-encrypted.
    pub encrypted: bool,
    /// HandshakeComplete's CustomerMessage, to show the user when not empty.
    pub customer_message: String,
}

/// Why a session ended.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionEnd {
    /// The service sent `channel_closed`; `output` is its text for the user.
    ChannelClosed {
        /// The `Output` field.
        output: String,
    },
    /// A message was never acknowledged; the driver should call TerminateSession.
    ResendTimeout {
        /// Its sequence number.
        sequence_number: i64,
    },
    /// The handshake could not be completed.
    HandshakeFailed(String),
    /// An encrypted payload failed to decrypt.
    DecryptFailed(String),
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionEnd::ChannelClosed { output } if output.is_empty() => {
                f.write_str("the service closed the session")
            }
            SessionEnd::ChannelClosed { output } => {
                write!(f, "the service closed the session: {output}")
            }
            SessionEnd::ResendTimeout { sequence_number } => write!(
                f,
                "message {sequence_number} was never acknowledged by the agent"
            ),
            SessionEnd::HandshakeFailed(e) => write!(f, "handshake failed: {e}"),
            SessionEnd::DecryptFailed(e) => write!(f, "decryption failed: {e}"),
        }
    }
}

/// What a [`ClientSession`] reports.
#[derive(Clone, Debug, PartialEq)]
pub enum SessionEvent {
    /// Call KMS GenerateDataKey (64 bytes) with this key and context, then
    /// [`ClientSession::provide_data_key`] or [`ClientSession::fail_data_key`].
    DataKeyRequired {
        /// The KMSKeyId from the agent.
        key_id: String,
        /// The encryption context to pass.
        encryption_context: BTreeMap<String, String>,
    },
    /// HandshakeComplete arrived (or a handshake-less session produced output).
    Ready(SessionInfo),
    /// PT 1 bytes, decrypted.
    Output(Bytes),
    /// PT 11 bytes, decrypted.
    StdErr(Bytes),
    /// PT 12 bytes, decrypted.
    ExitCode(Bytes),
    /// A Flag from the agent (ConnectToPortError in mux mode).
    Flag(Flag),
    /// The service paused publication.
    Paused,
    /// Publication resumed.
    Resumed,
    /// The session ended; no further events follow.
    Closed(SessionEnd),
}

/// Why a send was refused.
#[derive(Debug, Error)]
pub enum SessionSendError {
    /// The handshake has not completed: data would be discarded by the agent.
    #[error("session not ready: the handshake has not completed")]
    NotReady,
    /// The channel refused (window full, closed).
    #[error(transparent)]
    Channel(#[from] SendError),
    /// Encryption failed.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

/// Why a data key could not be installed.
#[derive(Debug, Error)]
pub enum DataKeyError {
    /// No data key was requested.
    #[error("no data key was requested")]
    NotRequested,
    /// The key is not usable.
    #[error(transparent)]
    Crypto(#[from] CryptoError),
    /// The session is gone.
    #[error(transparent)]
    Send(#[from] SendError),
}

#[derive(Debug)]
enum State {
    AwaitingRequest,
    AwaitingDataKey {
        processed: Vec<ProcessedClientAction>,
        kms_index: usize,
        errors: Vec<String>,
    },
    AwaitingComplete,
    Ready,
    Closed,
}

/// The client end of a session. See the module documentation.
pub struct ClientSession {
    config: ClientConfig,
    channel: Channel,
    state: State,
    agent_version: String,
    session_type: Option<SessionTypeRequest>,
    kms_request: Option<KmsEncryptionRequest>,
    cipher: Option<SessionCipher>,
    rng: SystemRandom,
    info: Option<SessionInfo>,
    events: VecDeque<SessionEvent>,
}

impl fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSession")
            .field("session_id", &self.config.session_id)
            .field("state", &self.state)
            .field("agent_version", &self.agent_version)
            .field("encrypted", &self.cipher.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientSession {
    /// A session whose websocket is about to be opened. `now` / `unix_ms` are the same
    /// instant on the monotonic and the wall clock (see
    /// [`ClientSession::set_wall_clock`]).
    pub fn new(config: ClientConfig, now: Instant, unix_ms: u64) -> ClientSession {
        let channel = Channel::new(Role::Client, config.channel.clone(), now, unix_ms);
        ClientSession {
            config,
            channel,
            state: State::AwaitingRequest,
            agent_version: String::new(),
            session_type: None,
            kms_request: None,
            cipher: None,
            rng: SystemRandom::new(),
            info: None,
            events: VecDeque::new(),
        }
    }

    /// Rebases the CreatedDate clock: messages created at `now` are stamped `unix_ms`
    /// (milliseconds since the Unix epoch), later ones `unix_ms` plus the monotonic time
    /// since `now` ([`Channel::set_wall_clock`]).
    ///
    /// Driver duty: call it with both clocks read together at the start of every loop
    /// turn, before that turn's `handle_frame` / `handle_timeout` / `send_*` calls. The
    /// monotonic clock stops during a suspend while the wall clock does not; without
    /// this, CreatedDate would fall behind by every laptop sleep, where [P] stamps
    /// `time.Now()` on each message.
    pub fn set_wall_clock(&mut self, now: Instant, unix_ms: u64) {
        self.channel.set_wall_clock(now, unix_ms);
    }

    /// The TEXT message to send first on every (re)connected websocket, with a new
    /// RequestId each time ([P] `streaming.go` fn `FinalizeDataChannelHandshake`).
    /// It contains the token: never log it.
    pub fn open_data_channel_message(&self, token: &str) -> String {
        let input = OpenDataChannelInput {
            message_schema_version: "1.0".to_owned(),
            request_id: Uuid::new_v4().hyphenated().to_string(),
            token_value: token.to_owned(),
            client_id: self.config.client_id.clone(),
            client_version: self.config.client_version.clone(),
        };
        String::from_utf8(payload::to_json(&input)).unwrap_or_default()
    }

    /// Processes one websocket frame (TEXT or BINARY: [P] parses both).
    pub fn handle_frame(&mut self, frame: Bytes, now: Instant) -> Result<(), FrameError> {
        let result = self.channel.handle_frame(frame, now);
        self.pump_channel(now);
        result
    }

    /// The next frame to send (BINARY).
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.channel.poll_transmit()
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<SessionEvent> {
        self.events.pop_front()
    }

    /// When [`ClientSession::handle_timeout`] must next be called.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        self.channel.poll_timeout()
    }

    /// Runs retransmission timers.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.channel.handle_timeout(now);
        self.pump_channel(now);
    }

    /// The websocket is gone (see [`Channel::on_disconnect`]).
    pub fn on_disconnect(&mut self) {
        self.channel.on_disconnect();
    }

    /// A new websocket is open and OpenDataChannel was sent on it.
    pub fn on_reconnect(&mut self, now: Instant) {
        self.channel.on_reconnect(now);
        self.pump_channel(now);
    }

    /// Receive backpressure (see [`Channel::set_receive_ready`]).
    pub fn set_receive_ready(&mut self, ready: bool) {
        self.channel.set_receive_ready(ready);
    }

    /// The underlying channel (counters, window state).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// What the handshake established, once ready.
    pub fn info(&self) -> Option<&SessionInfo> {
        self.info.as_ref()
    }

    /// True once data may be sent.
    pub fn is_ready(&self) -> bool {
        matches!(self.state, State::Ready)
    }

    /// True if `len` more payload bytes fit the in-flight window now.
    pub fn can_send(&self, len: usize) -> bool {
        self.is_ready() && self.channel.can_send(len)
    }

    /// Sends stream bytes (PT 1), encrypted when encryption is on. Never call with
    /// an empty slice. Unlike [P] `SendInputDataMessage`, a lone `\n` is not rewritten.
    pub fn send_output(&mut self, data: Bytes, now: Instant) -> Result<i64, SessionSendError> {
        if !self.is_ready() {
            return Err(SessionSendError::NotReady);
        }
        let data = match &mut self.cipher {
            Some(c) if crypto::is_encrypted(Direction::ClientToAgent, PayloadType::Output) => {
                Bytes::from(c.encrypt(&data, &self.rng)?)
            }
            _ => data,
        };
        Ok(self.channel.send(PayloadType::Output, data, now)?)
    }

    /// Sends a Flag (PT 10, never encrypted).
    pub fn send_flag(&mut self, flag: Flag, now: Instant) -> Result<i64, SessionSendError> {
        if !self.is_ready() {
            return Err(SessionSendError::NotReady);
        }
        Ok(self.channel.send(
            PayloadType::Flag,
            Bytes::copy_from_slice(&flag.to_payload()),
            now,
        )?)
    }

    /// Sends the terminal size (PT 3, shell sessions).
    pub fn send_size(&mut self, size: SizeData, now: Instant) -> Result<i64, SessionSendError> {
        if !self.is_ready() {
            return Err(SessionSendError::NotReady);
        }
        Ok(self
            .channel
            .send(PayloadType::Size, Bytes::from(payload::to_json(&size)), now)?)
    }

    /// Asks the agent to end the session with the TerminateSession flag when it
    /// supports it. Returns whether the flag was queued; either way the driver should
    /// also call the TerminateSession API ([P] `basicportforwarding.go` fn
    /// `handleControlSignals`; the flag alone is best effort).
    pub fn terminate(&mut self, now: Instant) -> bool {
        let supported = self
            .info
            .as_ref()
            .is_some_and(|i| i.supports_terminate_flag);
        supported
            && self.is_ready()
            && self
                .channel
                .send_past_window(
                    PayloadType::Flag,
                    Bytes::copy_from_slice(&Flag::TerminateSession.to_payload()),
                    now,
                )
                .is_ok()
    }

    /// Installs the 64-byte data key returned by KMS GenerateDataKey (called with the
    /// context of [`SessionEvent::DataKeyRequired`]) and sends the HandshakeResponse.
    /// ChallengeAcknowledgement is set exactly when that context carried
    /// `aws:ssm:RandomChallenge`, since the agent's KMS Decrypt uses the same rule ([A]
    /// `blockcipher.go` fn `UpdateEncryptionKey`).
    pub fn provide_data_key(
        &mut self,
        plaintext: &[u8],
        ciphertext_blob: Vec<u8>,
        now: Instant,
    ) -> Result<(), DataKeyError> {
        let State::AwaitingDataKey { .. } = self.state else {
            return Err(DataKeyError::NotRequested);
        };
        let key = DataKey::from_plaintext(plaintext)?;
        let cipher = SessionCipher::new(crypto::Role::Client, &key)?;
        let challenge_acknowledgement = self
            .kms_request
            .as_ref()
            .is_some_and(|r| !r.challenge.is_empty());
        let result = KmsEncryptionResponse {
            kms_cipher_text_key: ciphertext_blob,
            kms_cipher_text_hash: None,
            challenge_acknowledgement,
        };
        let result = serde_json::to_value(&result).unwrap_or(Value::Null);
        // [P] turns encryption on as soon as it builds the response.
        self.cipher = Some(cipher);
        self.finish_kms_action(ActionStatus::Success, result, String::new(), now)
    }

    /// Reports that the data key could not be obtained: the KMSEncryption action is
    /// answered as Failed, which makes the agent cancel the session.
    pub fn fail_data_key(&mut self, error: &str, now: Instant) -> Result<(), DataKeyError> {
        let State::AwaitingDataKey { .. } = self.state else {
            return Err(DataKeyError::NotRequested);
        };
        self.finish_kms_action(ActionStatus::Failed, Value::Null, error.to_owned(), now)
    }

    fn finish_kms_action(
        &mut self,
        status: ActionStatus,
        result: Value,
        error: String,
        now: Instant,
    ) -> Result<(), DataKeyError> {
        let State::AwaitingDataKey {
            mut processed,
            kms_index,
            mut errors,
        } = std::mem::replace(&mut self.state, State::AwaitingComplete)
        else {
            return Err(DataKeyError::NotRequested);
        };
        if let Some(action) = processed.get_mut(kms_index) {
            action.action_status = status;
            action.action_result = result;
            if !error.is_empty() {
                // [P] fn `handleHandshakeRequest`: the action's Error says which action
                // failed; `Errors` lists the bare errors.
                action.error = format!(
                    "Failed to process action {}: {error}",
                    action_type::KMS_ENCRYPTION
                );
                errors.push(error);
            }
        }
        self.send_handshake_response(processed, errors, now)?;
        Ok(())
    }

    fn pump_channel(&mut self, now: Instant) {
        while let Some(ev) = self.channel.poll_event() {
            match ev {
                ChannelEvent::Data {
                    payload_type,
                    payload,
                    ..
                } => self.on_data(payload_type, payload, now),
                ChannelEvent::Paused => self.events.push_back(SessionEvent::Paused),
                ChannelEvent::Resumed => self.events.push_back(SessionEvent::Resumed),
                ChannelEvent::Closed(reason) => self.end(match reason {
                    CloseReason::ChannelClosed(c) => SessionEnd::ChannelClosed { output: c.output },
                    CloseReason::ResendTimeout { sequence_number } => {
                        SessionEnd::ResendTimeout { sequence_number }
                    }
                }),
            }
        }
    }

    fn end(&mut self, why: SessionEnd) {
        if !matches!(self.state, State::Closed) {
            self.state = State::Closed;
            self.events.push_back(SessionEvent::Closed(why));
        }
    }

    fn on_data(&mut self, payload_type: PayloadType, payload: Bytes, now: Instant) {
        if matches!(self.state, State::Closed) {
            return;
        }
        match payload_type {
            PayloadType::HandshakeRequest => self.on_handshake_request(&payload, now),
            PayloadType::EncChallengeRequest => self.on_challenge(&payload, now),
            PayloadType::HandshakeComplete => self.on_handshake_complete(&payload),
            PayloadType::Output | PayloadType::StdErr | PayloadType::ExitCode => {
                self.on_output(payload_type, payload)
            }
            PayloadType::Flag => {
                if let Ok(flag) = payload::parse_flag(&payload) {
                    self.events.push_back(SessionEvent::Flag(flag));
                }
            }
            // Other payload types are not sent to clients by any reference agent.
            _ => {}
        }
    }

    fn on_handshake_request(&mut self, payload: &[u8], now: Instant) {
        if !matches!(self.state, State::AwaitingRequest) {
            return;
        }
        let request: HandshakeRequest = match payload::from_json("HandshakeRequest", payload) {
            Ok(r) => r,
            Err(e) => return self.end(SessionEnd::HandshakeFailed(e.to_string())),
        };
        self.agent_version = request.agent_version;
        let mut processed = Vec::new();
        let mut errors = Vec::new();
        let mut kms_index = None;
        for action in request.requested_client_actions {
            let mut answer = ProcessedClientAction {
                action_type: action.action_type.clone(),
                ..ProcessedClientAction::default()
            };
            match action.action_type.as_str() {
                action_type::SESSION_TYPE => {
                    let req: SessionTypeRequest =
                        serde_json::from_value(action.action_parameters).unwrap_or_default();
                    match req.session_type.as_str() {
                        session_type::PORT
                        | session_type::STANDARD_STREAM
                        | session_type::INTERACTIVE_COMMANDS
                        | session_type::NON_INTERACTIVE_COMMANDS => {
                            answer.action_status = ActionStatus::Success;
                            self.session_type = Some(req);
                        }
                        other => {
                            let error = format!("Unknown session type {other}");
                            answer.action_status = ActionStatus::Failed;
                            answer.error = format!(
                                "Failed to process action {}: {error}",
                                action_type::SESSION_TYPE
                            );
                            errors.push(error);
                        }
                    }
                }
                action_type::KMS_ENCRYPTION if kms_index.is_none() => {
                    let req: KmsEncryptionRequest =
                        serde_json::from_value(action.action_parameters).unwrap_or_default();
                    kms_index = Some(processed.len());
                    self.kms_request = Some(req);
                }
                other => {
                    // [P] leaves ActionStatus at 0 and puts Unsupported (3) in
                    // ActionResult; the agent treats it as a failure.
                    answer.action_result = Value::from(3);
                    answer.error = format!("Unsupported action {other}");
                    errors.push(answer.error.clone());
                }
            }
            processed.push(answer);
        }
        match (kms_index, &self.kms_request) {
            (Some(kms_index), Some(req)) => {
                let challenge = (!req.challenge.is_empty()).then_some(req.challenge.as_str());
                let encryption_context = crypto::encryption_context(
                    &self.config.session_id,
                    &self.config.target,
                    challenge,
                );
                self.events.push_back(SessionEvent::DataKeyRequired {
                    key_id: req.kms_key_id.clone(),
                    encryption_context,
                });
                self.state = State::AwaitingDataKey {
                    processed,
                    kms_index,
                    errors,
                };
            }
            _ => {
                self.state = State::AwaitingComplete;
                if let Err(e) = self.send_handshake_response(processed, errors, now) {
                    self.end(SessionEnd::HandshakeFailed(e.to_string()));
                }
            }
        }
    }

    fn send_handshake_response(
        &mut self,
        processed: Vec<ProcessedClientAction>,
        errors: Vec<String>,
        now: Instant,
    ) -> Result<i64, SendError> {
        let response = HandshakeResponse {
            client_version: self.config.client_version.clone(),
            processed_client_actions: processed,
            errors: (!errors.is_empty()).then_some(errors),
        };
        self.channel.send(
            PayloadType::HandshakeResponse,
            Bytes::from(payload::to_json(&response)),
            now,
        )
    }

    fn on_challenge(&mut self, payload: &[u8], now: Instant) {
        let request: EncryptionChallenge = match payload::from_json("EncChallengeRequest", payload)
        {
            Ok(r) => r,
            Err(e) => return self.end(SessionEnd::HandshakeFailed(e.to_string())),
        };
        let Some(cipher) = &mut self.cipher else {
            return self.end(SessionEnd::HandshakeFailed(
                "encryption challenge before any data key".into(),
            ));
        };
        let answer = match cipher.answer_challenge(&request.challenge, &self.rng) {
            Ok(a) => a,
            Err(e) => return self.end(SessionEnd::HandshakeFailed(e.to_string())),
        };
        let response = EncryptionChallenge { challenge: answer };
        if let Err(e) = self.channel.send(
            PayloadType::EncChallengeResponse,
            Bytes::from(payload::to_json(&response)),
            now,
        ) {
            self.end(SessionEnd::HandshakeFailed(e.to_string()));
        }
    }

    fn on_handshake_complete(&mut self, payload: &[u8]) {
        if !matches!(self.state, State::AwaitingComplete) {
            return;
        }
        let complete: HandshakeComplete = match payload::from_json("HandshakeComplete", payload) {
            Ok(c) => c,
            Err(e) => return self.end(SessionEnd::HandshakeFailed(e.to_string())),
        };
        let Some(st) = self.session_type.clone() else {
            return self.end(SessionEnd::HandshakeFailed(
                "HandshakeComplete without a session type".into(),
            ));
        };
        self.become_ready(st.session_type, st.properties, complete.customer_message);
    }

    fn become_ready(&mut self, session_type: String, properties: Value, customer_message: String) {
        let agent = &self.agent_version;
        let client = &self.config.client_version;
        let port_forwarding = session_type == session_type::PORT
            && properties.get("type").and_then(Value::as_str) == Some("LocalPortForwarding");
        // Mux only when both sides will choose it: the plugin's rule on the agent's
        // version ([P] `portsession.go` fn `Initialize`) and the agent's rule on ours
        // ([A] `port.go` fn `GetSession`).
        let mode = if !port_forwarding {
            DataMode::StandardStream
        } else if version::agent_supports_tcp_multiplexing(agent)
            && version::agent_uses_mux_for_client(client)
        {
            DataMode::Mux
        } else {
            DataMode::Basic
        };
        let info = SessionInfo {
            agent_version: agent.clone(),
            session_type,
            properties,
            mode,
            agent_disables_smux_keepalive: version::agent_supports_disable_smux_keepalive(agent)
                && version::agent_disables_keepalive_for_client(client),
            supports_terminate_flag: version::agent_supports_terminate_session_flag(agent),
            encrypted: self.cipher.is_some(),
            customer_message,
        };
        self.state = State::Ready;
        self.info = Some(info.clone());
        self.events.push_back(SessionEvent::Ready(info));
    }

    fn on_output(&mut self, payload_type: PayloadType, payload: Bytes) {
        if matches!(self.state, State::AwaitingRequest) {
            // No handshake: a shell session ([P] `streaming.go` fn `ProcessFirstMessage`).
            self.become_ready(
                session_type::STANDARD_STREAM.to_owned(),
                Value::Null,
                String::new(),
            );
        }
        let payload = match &self.cipher {
            Some(c) if crypto::is_encrypted(Direction::AgentToClient, payload_type) => {
                match c.decrypt(&payload) {
                    Ok(p) => Bytes::from(p),
                    Err(e) => return self.end(SessionEnd::DecryptFailed(e.to_string())),
                }
            }
            _ => payload,
        };
        self.events.push_back(match payload_type {
            PayloadType::StdErr => SessionEvent::StdErr(payload),
            PayloadType::ExitCode => SessionEvent::ExitCode(payload),
            _ => SessionEvent::Output(payload),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kind::MessageType;
    use crate::message::ClientMessage;
    use crate::payload::{AcknowledgeContent, RequestedClientAction};
    use serde_json::json;

    /// A minimal agent built from the channel, driving the handshake by hand.
    struct Agent {
        chan: Channel,
    }

    impl Agent {
        fn new(now: Instant) -> Agent {
            Agent {
                chan: Channel::new(Role::Agent, ChannelConfig::default(), now, 1),
            }
        }
        fn send_json(&mut self, pt: PayloadType, v: &Value, now: Instant) {
            self.chan
                .send(pt, Bytes::from(serde_json::to_vec(v).unwrap()), now)
                .unwrap();
        }
        fn received(&mut self) -> Vec<(PayloadType, Bytes)> {
            std::iter::from_fn(|| self.chan.poll_event())
                .filter_map(|e| match e {
                    ChannelEvent::Data {
                        payload_type,
                        payload,
                        ..
                    } => Some((payload_type, payload)),
                    _ => None,
                })
                .collect()
        }
    }

    fn shuttle(client: &mut ClientSession, agent: &mut Agent, now: Instant) {
        for _ in 0..10 {
            let mut moved = false;
            while let Some(f) = agent.chan.poll_transmit() {
                client.handle_frame(f, now).unwrap();
                moved = true;
            }
            while let Some(f) = client.poll_transmit() {
                agent.chan.handle_frame(f, now).unwrap();
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    fn events(c: &mut ClientSession) -> Vec<SessionEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn port_request(agent_version: &str) -> Value {
        json!({"AgentVersion": agent_version, "RequestedClientActions": [
            {"ActionType": "SessionType", "ActionParameters": {"SessionType": "Port",
             "Properties": {"portNumber": "5432", "type": "LocalPortForwarding",
                            "host": "db.example", "localPortNumber": "0"}}}]})
    }

    fn handshake(agent_version: &str) -> (ClientSession, Agent, Instant, SessionInfo) {
        let now = Instant::now();
        let mut c = ClientSession::new(ClientConfig::new("s-1", "i-1"), now, 1);
        let mut a = Agent::new(now);
        a.send_json(
            PayloadType::HandshakeRequest,
            &port_request(agent_version),
            now,
        );
        shuttle(&mut c, &mut a, now);
        let got = a.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, PayloadType::HandshakeResponse);
        let resp: HandshakeResponse = payload::from_json("r", &got[0].1).unwrap();
        assert_eq!(resp.client_version, version::DEFAULT_CLIENT_VERSION);
        assert_eq!(resp.processed_client_actions.len(), 1);
        assert_eq!(
            resp.processed_client_actions[0].action_status,
            ActionStatus::Success
        );
        assert!(!c.is_ready());
        assert!(matches!(
            c.send_output(Bytes::from_static(b"x"), now),
            Err(SessionSendError::NotReady)
        ));
        a.send_json(
            PayloadType::HandshakeComplete,
            &json!({"HandshakeTimeToComplete": 1_000_000, "CustomerMessage": ""}),
            now,
        );
        shuttle(&mut c, &mut a, now);
        let ev = events(&mut c);
        let Some(SessionEvent::Ready(info)) = ev.first().cloned() else {
            panic!("expected Ready, got {ev:?}");
        };
        (c, a, now, info)
    }

    #[test]
    fn port_handshake_with_a_modern_agent_gives_mux_without_keepalive() {
        let (mut c, mut a, now, info) = handshake("3.3.987.0");
        assert_eq!(info.mode, DataMode::Mux);
        assert!(info.agent_disables_smux_keepalive);
        assert!(info.supports_terminate_flag);
        assert_eq!(info.properties["host"], "db.example");
        c.send_output(Bytes::from_static(b"hello"), now).unwrap();
        shuttle(&mut c, &mut a, now);
        assert_eq!(
            a.received(),
            vec![(PayloadType::Output, Bytes::from_static(b"hello"))]
        );
        assert!(c.terminate(now));
        shuttle(&mut c, &mut a, now);
        assert_eq!(
            a.received(),
            vec![(PayloadType::Flag, Bytes::from_static(&[0, 0, 0, 2]))]
        );
    }

    #[test]
    fn version_gates_pick_basic_and_keepalive() {
        assert_eq!(handshake("3.0.196.0").3.mode, DataMode::Basic);
        let info = handshake("3.1.1511.0").3;
        assert_eq!(info.mode, DataMode::Mux);
        assert!(!info.agent_disables_smux_keepalive);
        assert!(!handshake("2.3.722.0").3.supports_terminate_flag);
    }

    #[test]
    fn unknown_session_type_and_action_are_answered_like_the_plugin() {
        let now = Instant::now();
        let mut c = ClientSession::new(ClientConfig::new("s", "t"), now, 1);
        let mut a = Agent::new(now);
        let req = HandshakeRequest {
            agent_version: "3.3.987.0".into(),
            requested_client_actions: vec![
                RequestedClientAction {
                    action_type: "SessionType".into(),
                    action_parameters: json!({"SessionType": "Bogus"}),
                },
                RequestedClientAction {
                    action_type: "Teleport".into(),
                    action_parameters: Value::Null,
                },
            ],
        };
        a.send_json(
            PayloadType::HandshakeRequest,
            &serde_json::to_value(&req).unwrap(),
            now,
        );
        shuttle(&mut c, &mut a, now);
        let got = a.received();
        let resp: HandshakeResponse = payload::from_json("r", &got[0].1).unwrap();
        let acts = &resp.processed_client_actions;
        assert_eq!(acts[0].action_status, ActionStatus::Failed);
        assert_eq!(
            acts[0].error,
            "Failed to process action SessionType: Unknown session type Bogus"
        );
        assert_eq!(acts[1].action_status, ActionStatus::Other(0));
        assert_eq!(acts[1].action_result, json!(3));
        assert_eq!(
            resp.errors,
            Some(vec![
                "Unknown session type Bogus".to_owned(),
                "Unsupported action Teleport".to_owned()
            ])
        );
    }

    #[test]
    fn kms_handshake_round_trip_and_encrypted_data() {
        let now = Instant::now();
        let mut c = ClientSession::new(ClientConfig::new("sess-1", "i-0abc"), now, 1);
        let mut a = Agent::new(now);
        let req = json!({"AgentVersion": "3.3.987.0", "RequestedClientActions": [
            {"ActionType": "SessionType", "ActionParameters": {"SessionType": "Standard_Stream", "Properties": null}},
            {"ActionType": "KMSEncryption", "ActionParameters": {"KMSKeyId": "alias/k", "Challenge": "c2VjcmV0"}}]});
        a.send_json(PayloadType::HandshakeRequest, &req, now);
        shuttle(&mut c, &mut a, now);
        let ev = events(&mut c);
        let SessionEvent::DataKeyRequired {
            key_id,
            encryption_context,
        } = &ev[0]
        else {
            panic!("{ev:?}");
        };
        assert_eq!(key_id, "alias/k");
        assert_eq!(encryption_context["aws:ssm:SessionId"], "sess-1");
        assert_eq!(encryption_context["aws:ssm:TargetId"], "i-0abc");
        assert_eq!(encryption_context["aws:ssm:RandomChallenge"], "c2VjcmV0");
        assert!(a.received().is_empty(), "no response before the data key");

        let key: Vec<u8> = (0u8..64).collect();
        c.provide_data_key(&key, b"blob".to_vec(), now).unwrap();
        shuttle(&mut c, &mut a, now);
        let got = a.received();
        let resp: HandshakeResponse = payload::from_json("r", &got[0].1).unwrap();
        let kms = &resp.processed_client_actions[1];
        assert_eq!(kms.action_status, ActionStatus::Success);
        let result: KmsEncryptionResponse =
            serde_json::from_value(kms.action_result.clone()).unwrap();
        assert_eq!(result.kms_cipher_text_key, b"blob");
        assert!(result.challenge_acknowledgement);

        let mut agent_cipher =
            SessionCipher::from_plaintext_key(crypto::Role::Agent, &key).unwrap();
        let rng = SystemRandom::new();
        let challenge = agent_cipher.make_challenge(&rng).unwrap();
        a.send_json(
            PayloadType::EncChallengeRequest,
            &serde_json::to_value(EncryptionChallenge { challenge }).unwrap(),
            now,
        );
        shuttle(&mut c, &mut a, now);
        let got = a.received();
        assert_eq!(got[0].0, PayloadType::EncChallengeResponse);
        let answer: EncryptionChallenge = payload::from_json("c", &got[0].1).unwrap();
        agent_cipher
            .verify_challenge_response(&answer.challenge)
            .unwrap();

        a.send_json(
            PayloadType::HandshakeComplete,
            &json!({"HandshakeTimeToComplete": 5, "CustomerMessage": "This session is encrypted using AWS KMS."}),
            now,
        );
        let sealed = agent_cipher.encrypt(b"$ ", &rng).unwrap();
        a.chan
            .send(PayloadType::Output, Bytes::from(sealed), now)
            .unwrap();
        shuttle(&mut c, &mut a, now);
        let ev = events(&mut c);
        assert!(
            matches!(&ev[0], SessionEvent::Ready(i) if i.encrypted && i.mode == DataMode::StandardStream)
        );
        assert_eq!(ev[1], SessionEvent::Output(Bytes::from_static(b"$ ")));

        c.send_output(Bytes::from_static(b"ls\n"), now).unwrap();
        shuttle(&mut c, &mut a, now);
        let got = a.received();
        assert_eq!(agent_cipher.decrypt(&got[0].1).unwrap(), b"ls\n");
    }

    #[test]
    fn failed_data_key_is_reported_to_the_agent() {
        let now = Instant::now();
        let mut c = ClientSession::new(ClientConfig::new("s", "t"), now, 1);
        let mut a = Agent::new(now);
        let req = json!({"AgentVersion": "3.3.987.0", "RequestedClientActions": [
            {"ActionType": "SessionType", "ActionParameters": {"SessionType": "Standard_Stream"}},
            {"ActionType": "KMSEncryption", "ActionParameters": {"KMSKeyId": "k"}}]});
        a.send_json(PayloadType::HandshakeRequest, &req, now);
        shuttle(&mut c, &mut a, now);
        let ev = events(&mut c);
        let SessionEvent::DataKeyRequired {
            encryption_context, ..
        } = &ev[0]
        else {
            panic!("{ev:?}");
        };
        assert!(!encryption_context.contains_key("aws:ssm:RandomChallenge"));
        c.fail_data_key("AccessDeniedException", now).unwrap();
        shuttle(&mut c, &mut a, now);
        let resp: HandshakeResponse = payload::from_json("r", &a.received()[0].1).unwrap();
        assert_eq!(
            resp.processed_client_actions[1].action_status,
            ActionStatus::Failed
        );
        let failed = &resp.processed_client_actions[1];
        assert_eq!(
            failed.error,
            "Failed to process action KMSEncryption: AccessDeniedException"
        );
        assert_eq!(resp.errors, Some(vec!["AccessDeniedException".to_owned()]));
        assert!(matches!(
            c.provide_data_key(&[0; 64], vec![], now),
            Err(DataKeyError::NotRequested)
        ));
    }

    #[test]
    fn shell_without_handshake_is_ready_on_first_output() {
        let now = Instant::now();
        let mut c = ClientSession::new(ClientConfig::new("s", "t"), now, 1);
        let mut a = Agent::new(now);
        a.chan
            .send(PayloadType::Output, Bytes::from_static(b"sh-5.2$ "), now)
            .unwrap();
        shuttle(&mut c, &mut a, now);
        let ev = events(&mut c);
        assert!(matches!(&ev[0], SessionEvent::Ready(i) if i.mode == DataMode::StandardStream));
        assert_eq!(ev[1], SessionEvent::Output(Bytes::from_static(b"sh-5.2$ ")));
        c.send_size(SizeData { cols: 80, rows: 24 }, now).unwrap();
        shuttle(&mut c, &mut a, now);
        assert_eq!(
            a.received(),
            vec![(
                PayloadType::Size,
                Bytes::from_static(br#"{"cols":80,"rows":24}"#)
            )]
        );
    }

    #[test]
    fn handshake_is_acked_before_the_response_is_sent() {
        let now = Instant::now();
        let mut c = ClientSession::new(ClientConfig::new("s", "t"), now, 1);
        let mut a = Agent::new(now);
        a.send_json(
            PayloadType::HandshakeRequest,
            &port_request("3.3.987.0"),
            now,
        );
        let f = a.chan.poll_transmit().unwrap();
        c.handle_frame(f, now).unwrap();
        let first = ClientMessage::decode(c.poll_transmit().unwrap()).unwrap();
        assert_eq!(first.message_type, MessageType::Acknowledge);
        let ack: AcknowledgeContent = payload::from_json("a", &first.payload).unwrap();
        assert_eq!(ack.sequence_number, 0);
        let second = ClientMessage::decode(c.poll_transmit().unwrap()).unwrap();
        assert_eq!(second.payload_type, PayloadType::HandshakeResponse);
        assert_eq!(second.sequence_number, 0);
    }

    #[test]
    fn malformed_handshake_ends_the_session_with_a_reason() {
        let now = Instant::now();
        let mut c = ClientSession::new(ClientConfig::new("s", "t"), now, 1);
        let mut a = Agent::new(now);
        a.chan
            .send(
                PayloadType::HandshakeRequest,
                Bytes::from_static(b"{not json"),
                now,
            )
            .unwrap();
        shuttle(&mut c, &mut a, now);
        let ev = events(&mut c);
        assert!(
            matches!(&ev[0], SessionEvent::Closed(SessionEnd::HandshakeFailed(m)) if m.contains("HandshakeRequest"))
        );
    }

    #[test]
    fn connect_to_port_error_flag_is_reported() {
        let (mut c, mut a, now, _) = handshake("3.3.987.0");
        a.chan
            .send(PayloadType::Flag, Bytes::from_static(&[0, 0, 0, 3]), now)
            .unwrap();
        shuttle(&mut c, &mut a, now);
        assert_eq!(
            events(&mut c),
            vec![SessionEvent::Flag(Flag::ConnectToPortError)]
        );
    }

    #[test]
    fn open_data_channel_message_carries_identity_and_a_fresh_request_id() {
        let now = Instant::now();
        let c = ClientSession::new(ClientConfig::new("s", "t"), now, 1);
        let a: OpenDataChannelInput =
            payload::from_json("o", c.open_data_channel_message("TOK").as_bytes()).unwrap();
        let b: OpenDataChannelInput =
            payload::from_json("o", c.open_data_channel_message("TOK").as_bytes()).unwrap();
        assert_eq!(a.message_schema_version, "1.0");
        assert_eq!(a.token_value, "TOK");
        assert_eq!(a.client_version, version::DEFAULT_CLIENT_VERSION);
        assert_eq!(a.client_id, b.client_id);
        assert_ne!(a.request_id, b.request_id);
        assert!(!format!("{c:?}").contains("TOK"));
    }
}
