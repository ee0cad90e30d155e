//! Round-trip time and retransmission timeout estimation.
//!
//! Identical in both references: [P] `src/datachannel/streaming.go` fn
//! `CalculateRetransmissionTimeout`, [A] `agent/session/datachannel/datachannel.go` fn
//! `calculateRetransmissionTimeout`, constants in each `config.go`.
//!
//! ```text
//! RTTVAR = (1 - 1/4) * RTTVAR + 1/4 * |SRTT - R|     (old SRTT)
//! SRTT   = (1 - 1/8) * SRTT   + 1/8 * R
//! RTO    = min(SRTT + max(10 ms, 4 * RTTVAR), 1 s)
//! ```

use std::time::Duration;

/// Initial smoothed RTT (`DefaultRoundTripTime`).
pub const INITIAL_SRTT: Duration = Duration::from_millis(100);
/// Initial RTO (`DefaultTransmissionTimeout`).
pub const INITIAL_RTO: Duration = Duration::from_millis(200);
/// RTO floor term (`ClockGranularity`).
pub const CLOCK_GRANULARITY: Duration = Duration::from_millis(10);
/// RTO cap (`MaxTransmissionTimeout`).
pub const MAX_RTO: Duration = Duration::from_secs(1);
const RTT_CONSTANT: f64 = 1.0 / 8.0;
const RTTV_CONSTANT: f64 = 1.0 / 4.0;

/// The estimator state. Values are kept as f64 nanoseconds, as Go does.
#[derive(Clone, Debug)]
pub struct RttEstimator {
    srtt_ns: f64,
    rttvar_ns: f64,
    rto: Duration,
}

impl Default for RttEstimator {
    fn default() -> Self {
        RttEstimator {
            srtt_ns: INITIAL_SRTT.as_nanos() as f64,
            rttvar_ns: 0.0,
            rto: INITIAL_RTO,
        }
    }
}

impl RttEstimator {
    /// Feeds one round-trip sample.
    pub fn on_sample(&mut self, rtt: Duration) {
        let r = rtt.as_nanos() as f64;
        self.rttvar_ns =
            (1.0 - RTTV_CONSTANT) * self.rttvar_ns + RTTV_CONSTANT * (self.srtt_ns - r).abs();
        self.srtt_ns = (1.0 - RTT_CONSTANT) * self.srtt_ns + RTT_CONSTANT * r;
        let var_term = (4.0 * self.rttvar_ns).max(CLOCK_GRANULARITY.as_nanos() as f64);
        let rto_ns = (self.srtt_ns + var_term).min(MAX_RTO.as_nanos() as f64);
        self.rto = Duration::from_nanos(rto_ns as u64);
    }

    /// The current retransmission timeout.
    pub fn rto(&self) -> Duration {
        self.rto
    }

    /// The current smoothed round-trip time.
    pub fn srtt(&self) -> Duration {
        Duration::from_nanos(self.srtt_ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_with_reference_defaults() {
        let e = RttEstimator::default();
        assert_eq!(e.rto(), Duration::from_millis(200));
        assert_eq!(e.srtt(), Duration::from_millis(100));
    }

    #[test]
    fn follows_the_reference_formula() {
        let mut e = RttEstimator::default();
        e.on_sample(Duration::from_millis(20));
        // RTTVAR = 0.25 * 80 ms = 20 ms; SRTT = 87.5 + 2.5 = 90 ms; RTO = 90 + 80 = 170 ms.
        assert_eq!(e.srtt(), Duration::from_millis(90));
        assert_eq!(e.rto(), Duration::from_millis(170));
        for _ in 0..200 {
            e.on_sample(Duration::from_micros(500));
        }
        // Converges to SRTT ~0.5 ms and the 10 ms floor.
        assert!(e.rto() < Duration::from_micros(10_600), "{:?}", e.rto());
        assert!(e.rto() >= Duration::from_millis(10));
    }

    #[test]
    fn is_capped_at_one_second() {
        let mut e = RttEstimator::default();
        e.on_sample(Duration::from_secs(30));
        assert_eq!(e.rto(), MAX_RTO);
    }
}
