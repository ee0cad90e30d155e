//! The enumerations carried in a ClientMessage header: message types, payload types and
//! the flag values of `Flag` payloads.
//!
//! Sources: [P] `src/message/clientmessage.go` (consts), [A]
//! `agent/session/contracts/model.go` (consts).

use std::fmt;

/// The `MessageType` header field (32 bytes of ASCII on the wire, space padded).
///
/// Unknown strings are kept verbatim in [`MessageType::Other`]: both reference
/// implementations log and ignore message types they do not know, and so do we.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum MessageType {
    /// `input_stream_data`: client to agent stream data (sequenced).
    InputStreamData,
    /// `output_stream_data`: agent to client stream data (sequenced).
    OutputStreamData,
    /// `acknowledge`: acknowledgement of one stream data message (not sequenced).
    Acknowledge,
    /// `channel_closed`: the service ended the data channel.
    ChannelClosed,
    /// `start_publication`: the service asks the sender to resume.
    StartPublication,
    /// `pause_publication`: the service asks the sender to pause.
    PausePublication,
    /// `agent_session_state`: agent to service session state.
    AgentSessionState,
    /// Any other string (already trimmed as the reference's `getString` does).
    Other(String),
}

impl MessageType {
    /// The wire spelling of this message type.
    pub fn as_str(&self) -> &str {
        match self {
            MessageType::InputStreamData => "input_stream_data",
            MessageType::OutputStreamData => "output_stream_data",
            MessageType::Acknowledge => "acknowledge",
            MessageType::ChannelClosed => "channel_closed",
            MessageType::StartPublication => "start_publication",
            MessageType::PausePublication => "pause_publication",
            MessageType::AgentSessionState => "agent_session_state",
            MessageType::Other(s) => s,
        }
    }

    /// Parses the (already trimmed) wire spelling. Never fails: unknown names become
    /// [`MessageType::Other`].
    pub fn parse(s: &str) -> MessageType {
        match s {
            "input_stream_data" => MessageType::InputStreamData,
            "output_stream_data" => MessageType::OutputStreamData,
            "acknowledge" => MessageType::Acknowledge,
            "channel_closed" => MessageType::ChannelClosed,
            "start_publication" => MessageType::StartPublication,
            "pause_publication" => MessageType::PausePublication,
            "agent_session_state" => MessageType::AgentSessionState,
            other => MessageType::Other(other.to_owned()),
        }
    }

    /// True for the two sequenced stream-data types.
    pub fn is_stream_data(&self) -> bool {
        matches!(
            self,
            MessageType::InputStreamData | MessageType::OutputStreamData
        )
    }

    /// True for `start_publication` / `pause_publication`, which [P] `Validate` accepts
    /// without any check.
    pub fn is_publication(&self) -> bool {
        matches!(
            self,
            MessageType::StartPublication | MessageType::PausePublication
        )
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `PayloadType` header field (u32, big-endian).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PayloadType {
    /// 0: not set; acknowledgements and service messages carry it.
    Undefined,
    /// 1: stream bytes, both directions.
    Output,
    /// 2: defined, never sent by either reference.
    Error,
    /// 3: terminal size JSON, client to agent (shell sessions).
    Size,
    /// 4: defined, unused.
    Parameter,
    /// 5: HandshakeRequest, agent to client.
    HandshakeRequest,
    /// 6: HandshakeResponse, client to agent.
    HandshakeResponse,
    /// 7: HandshakeComplete, agent to client.
    HandshakeComplete,
    /// 8: EncChallengeRequest, agent to client.
    EncChallengeRequest,
    /// 9: EncChallengeResponse, client to agent.
    EncChallengeResponse,
    /// 10: a 4-byte big-endian [`Flag`].
    Flag,
    /// 11: standard error bytes, agent to client.
    StdErr,
    /// 12: exit code, agent to client.
    ExitCode,
    /// Any other value, kept so it can be re-encoded unchanged.
    Unknown(u32),
}

impl PayloadType {
    /// Maps the wire value to the enum. Never fails.
    pub fn from_u32(v: u32) -> PayloadType {
        match v {
            0 => PayloadType::Undefined,
            1 => PayloadType::Output,
            2 => PayloadType::Error,
            3 => PayloadType::Size,
            4 => PayloadType::Parameter,
            5 => PayloadType::HandshakeRequest,
            6 => PayloadType::HandshakeResponse,
            7 => PayloadType::HandshakeComplete,
            8 => PayloadType::EncChallengeRequest,
            9 => PayloadType::EncChallengeResponse,
            10 => PayloadType::Flag,
            11 => PayloadType::StdErr,
            12 => PayloadType::ExitCode,
            other => PayloadType::Unknown(other),
        }
    }

    /// The wire value.
    pub fn as_u32(self) -> u32 {
        match self {
            PayloadType::Undefined => 0,
            PayloadType::Output => 1,
            PayloadType::Error => 2,
            PayloadType::Size => 3,
            PayloadType::Parameter => 4,
            PayloadType::HandshakeRequest => 5,
            PayloadType::HandshakeResponse => 6,
            PayloadType::HandshakeComplete => 7,
            PayloadType::EncChallengeRequest => 8,
            PayloadType::EncChallengeResponse => 9,
            PayloadType::Flag => 10,
            PayloadType::StdErr => 11,
            PayloadType::ExitCode => 12,
            PayloadType::Unknown(v) => v,
        }
    }
}

/// The value of a `Flag` payload (PayloadType 10): a u32, big-endian, 4 bytes.
///
/// Source: [P] `clientmessage.go` `PayloadTypeFlag`; [P] `streaming.go` fn `SendFlag`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flag {
    /// 1: client to agent, basic mode: the local connection closed.
    DisconnectToPort,
    /// 2: client to agent: end the session.
    TerminateSession,
    /// 3: agent to client, mux mode: the dial of the remote host failed.
    ConnectToPortError,
}

impl Flag {
    /// The wire value.
    pub fn as_u32(self) -> u32 {
        match self {
            Flag::DisconnectToPort => 1,
            Flag::TerminateSession => 2,
            Flag::ConnectToPortError => 3,
        }
    }

    /// Maps a wire value; `None` for values no reference defines.
    pub fn from_u32(v: u32) -> Option<Flag> {
        match v {
            1 => Some(Flag::DisconnectToPort),
            2 => Some(Flag::TerminateSession),
            3 => Some(Flag::ConnectToPortError),
            _ => None,
        }
    }

    /// The 4-byte big-endian payload of a Flag message.
    pub fn to_payload(self) -> [u8; 4] {
        self.as_u32().to_be_bytes()
    }
}

/// Values of the `Flags` header field as the references send them (section 4.3 of
/// `proto-docs/wire-format.md`). No receiver reads the field.
pub mod header_flags {
    /// Plugin stream data, agent stream data after seq 0.
    pub const DATA: u64 = 0;
    /// Agent stream data with sequence number 0 ("SYN").
    pub const SYN: u64 = 1;
    /// Acknowledgements and agent control messages ("SYN|FIN").
    pub const ACK: u64 = 3;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_type_round_trips_every_known_name() {
        for name in [
            "input_stream_data",
            "output_stream_data",
            "acknowledge",
            "channel_closed",
            "start_publication",
            "pause_publication",
            "agent_session_state",
        ] {
            let t = MessageType::parse(name);
            assert!(!matches!(t, MessageType::Other(_)), "{name}");
            assert_eq!(t.as_str(), name);
        }
        assert_eq!(
            MessageType::parse("agent_job"),
            MessageType::Other("agent_job".into())
        );
    }

    #[test]
    fn payload_type_round_trips_all_values() {
        for v in 0..=20u32 {
            assert_eq!(PayloadType::from_u32(v).as_u32(), v);
        }
        assert_eq!(PayloadType::from_u32(10), PayloadType::Flag);
        assert_eq!(PayloadType::from_u32(13), PayloadType::Unknown(13));
    }

    #[test]
    fn flags_encode_big_endian() {
        assert_eq!(Flag::TerminateSession.to_payload(), [0, 0, 0, 2]);
        assert_eq!(Flag::from_u32(3), Some(Flag::ConnectToPortError));
        assert_eq!(Flag::from_u32(4), None);
    }
}
