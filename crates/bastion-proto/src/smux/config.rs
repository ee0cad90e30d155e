//! Session configuration: the reference `DefaultConfig`, with its single
//! `KeepAliveDisabled` switch split into two independent knobs.

use std::time::Duration;

use thiserror::Error;

use super::frame::MAX_PAYLOAD;

/// Default interval between NOPs ([P] `vendor/src/github.com/xtaci/smux/mux.go` fn
/// `DefaultConfig`: `KeepAliveInterval: 10 * time.Second`).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Default receive-liveness period (`mux.go` fn `DefaultConfig`:
/// `KeepAliveTimeout: 30 * time.Second`).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest PSH body we send (`mux.go` fn `DefaultConfig`: `MaxFrameSize: 32768`).
pub const DEFAULT_MAX_FRAME_SIZE: usize = 32768;
/// Default session-wide receive buffer (`mux.go` fn `DefaultConfig`:
/// `MaxReceiveBuffer: 4194304`).
pub const DEFAULT_MAX_RECEIVE_BUFFER: usize = 4 * 1024 * 1024;

/// Tunables of a [`Session`](super::Session). Protocol version 1 is implied.
///
/// [`Config::default`] equals the reference `DefaultConfig()` (keepalive on in both
/// directions). The reference has one switch, `KeepAliveDisabled`, that turns off both
/// the NOP sender and the receive timeout (`session.go` fn `newSession` starts
/// `keepalive()` only when it is false); here they are separate, because the facts sheet
/// recommends sending NOPs without enforcing the timeout for agents ≤ 3.1.1511.0 (see
/// [`Config::for_ssm`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Largest PSH body this side sends; writes are split into frames of at most this
    /// many bytes (`stream.go` fn `Write`, `s.frameSize`). 1..=65535.
    pub max_frame_size: usize,
    /// Session-wide limit of received-but-unread stream bytes above which the reference
    /// stops reading the connection (`session.go` fn `recvLoop`, `s.bucket`). Here it
    /// only drives [`Session::wants_input`](super::Session::wants_input) and the
    /// keepalive exemption; the session never refuses bytes. Must be > 0.
    pub max_receive_buffer: usize,
    /// Send a NOP every `keepalive_interval` (`session.go` fn `keepalive`, `tickerPing`).
    pub send_keepalive: bool,
    /// Every `keepalive_timeout`, close the session if no frame header arrived since the
    /// previous check (`session.go` fn `keepalive`, `tickerTimeout`).
    pub enforce_keepalive_timeout: bool,
    /// NOP period. Must be > 0 when `send_keepalive`.
    pub keepalive_interval: Duration,
    /// Liveness period. Must be > 0 when `enforce_keepalive_timeout`, and not below
    /// `keepalive_interval` when both knobs are on (`mux.go` fn `VerifyConfig`).
    pub keepalive_timeout: Duration,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            max_frame_size: DEFAULT_MAX_FRAME_SIZE,
            max_receive_buffer: DEFAULT_MAX_RECEIVE_BUFFER,
            send_keepalive: true,
            enforce_keepalive_timeout: true,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
        }
    }
}

/// Why a [`Config`] is rejected (the rules of `mux.go` fn `VerifyConfig` that apply to
/// version 1).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ConfigError {
    /// `max_frame_size` is 0 ("max frame size must be positive").
    #[error("max frame size must be positive")]
    ZeroFrameSize,
    /// `max_frame_size` exceeds 65535 ("max frame size must not be larger than 65535").
    #[error("max frame size {0} is larger than 65535")]
    FrameSizeTooLarge(usize),
    /// `max_receive_buffer` is 0 ("max receive buffer must be positive").
    #[error("max receive buffer must be positive")]
    ZeroReceiveBuffer,
    /// `send_keepalive` with a zero interval ("keep-alive interval must be positive").
    #[error("keep-alive interval must be positive")]
    ZeroKeepaliveInterval,
    /// `enforce_keepalive_timeout` with a zero timeout.
    #[error("keep-alive timeout must be positive")]
    ZeroKeepaliveTimeout,
    /// Both knobs on and timeout < interval ("keep-alive timeout must be larger than
    /// keep-alive interval").
    #[error("keep-alive timeout {timeout:?} is shorter than the interval {interval:?}")]
    TimeoutBelowInterval {
        /// `keepalive_timeout`.
        timeout: Duration,
        /// `keepalive_interval`.
        interval: Duration,
    },
}

impl Config {
    /// The reference `DefaultConfig()` with `KeepAliveDisabled = true`: no NOPs, no
    /// receive timeout.
    pub fn keepalive_disabled() -> Config {
        Config {
            send_keepalive: false,
            enforce_keepalive_timeout: false,
            ..Config::default()
        }
    }

    /// The client configuration for an SSM port session.
    ///
    /// * `agent_disables_keepalive` true (the plugin's rule: agent version strictly
    ///   greater than 3.1.1511.0, [P] `src/version/versionvalidator.go` fn
    ///   `DoesAgentSupportDisableSmuxKeepAlive`, used in [P] `muxportforwarding.go` fn
    ///   `initialize`): keepalive fully off, as the plugin does.
    /// * false: send NOPs, but do not enforce the 30 s receive timeout. The plugin would
    ///   enforce it; agents 3.1.1446.0–3.1.1511.0 disable their keepalive
    ///   unconditionally and would then be killed after 30 s idle (facts sheet §7.2
    ///   RECOMMENDATION).
    pub fn for_ssm(agent_disables_keepalive: bool) -> Config {
        Config {
            send_keepalive: !agent_disables_keepalive,
            enforce_keepalive_timeout: false,
            ..Config::default()
        }
    }

    /// Checks the rules of `mux.go` fn `VerifyConfig`, applied per knob.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.max_frame_size == 0 {
            return Err(ConfigError::ZeroFrameSize);
        }
        if self.max_frame_size > MAX_PAYLOAD {
            return Err(ConfigError::FrameSizeTooLarge(self.max_frame_size));
        }
        if self.max_receive_buffer == 0 {
            return Err(ConfigError::ZeroReceiveBuffer);
        }
        if self.send_keepalive && self.keepalive_interval.is_zero() {
            return Err(ConfigError::ZeroKeepaliveInterval);
        }
        if self.enforce_keepalive_timeout && self.keepalive_timeout.is_zero() {
            return Err(ConfigError::ZeroKeepaliveTimeout);
        }
        if self.send_keepalive
            && self.enforce_keepalive_timeout
            && self.keepalive_timeout < self.keepalive_interval
        {
            return Err(ConfigError::TimeoutBelowInterval {
                timeout: self.keepalive_timeout,
                interval: self.keepalive_interval,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_matches_reference_default_config() {
        let c = Config::default();
        assert_eq!(c.max_frame_size, 32768);
        assert_eq!(c.max_receive_buffer, 4_194_304);
        assert_eq!(c.keepalive_interval, Duration::from_secs(10));
        assert_eq!(c.keepalive_timeout, Duration::from_secs(30));
        assert!(c.send_keepalive && c.enforce_keepalive_timeout);
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn ssm_presets() {
        let off = Config::for_ssm(true);
        assert!(!off.send_keepalive && !off.enforce_keepalive_timeout);
        assert_eq!(off, Config::keepalive_disabled());
        let old = Config::for_ssm(false);
        assert!(old.send_keepalive && !old.enforce_keepalive_timeout);
    }

    #[test]
    fn validation_rules() {
        let bad = |f: fn(&mut Config)| {
            let mut c = Config::default();
            f(&mut c);
            c.validate()
        };
        assert_eq!(
            bad(|c| c.max_frame_size = 0),
            Err(ConfigError::ZeroFrameSize)
        );
        assert_eq!(
            bad(|c| c.max_frame_size = 65536),
            Err(ConfigError::FrameSizeTooLarge(65536))
        );
        assert_eq!(bad(|c| c.max_frame_size = 65535), Ok(()));
        assert_eq!(
            bad(|c| c.max_receive_buffer = 0),
            Err(ConfigError::ZeroReceiveBuffer)
        );
        assert_eq!(
            bad(|c| c.keepalive_interval = Duration::ZERO),
            Err(ConfigError::ZeroKeepaliveInterval)
        );
        assert!(matches!(
            bad(|c| c.keepalive_timeout = Duration::from_secs(5)),
            Err(ConfigError::TimeoutBelowInterval { .. })
        ));
        assert_eq!(
            bad(|c| {
                c.send_keepalive = false;
                c.keepalive_timeout = Duration::ZERO;
            }),
            Err(ConfigError::ZeroKeepaliveTimeout)
        );
        // Knobs that are off do not constrain their durations.
        assert_eq!(
            bad(|c| {
                *c = Config::keepalive_disabled();
                c.keepalive_interval = Duration::ZERO;
                c.keepalive_timeout = Duration::ZERO;
            }),
            Ok(())
        );
    }
}
