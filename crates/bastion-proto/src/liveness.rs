//! Is the websocket under a session still alive? Keepalive pings, the silence after
//! which a websocket counts as dead, and probes when someone is waiting.
//!
//! Neither reference decides this in the protocol: \[P\] pings every 5 minutes and never
//! checks for an answer (`src/communicator/websocketchannel.go` fn `StartPings`,
//! `config.go` `PingTimeInterval`); the agent pings every 54 s. A half-open websocket
//! (laptop sleep, NAT or VPN mapping dropped) then looks alive until a write fails,
//! which may be never for a connection that only waits for replies. bastion keeps the
//! path warm and resumes a websocket that stopped answering; `proto-docs/tunnel.md` §2
//! gives the figures and why.
//!
//! The rules, with the driver's help (it says when frames arrive and when it cannot
//! read or write):
//! * every `ping_interval` a keepalive ping goes out ([`LivenessAction::Ping`]);
//! * silence (no frame read) for longer than `dead_after` while we could read and write
//!   means dead ([`LivenessAction::Dead`]);
//! * a quiet websocket (nothing read for `probe_idle`) is probed when a new connection
//!   arrives or while messages wait for acknowledgement; no frame within
//!   `probe_timeout` means dead. A user who waits learns of a dead path in seconds;
//! * silence proves nothing while reads are paused for backpressure (the answer waits
//!   in the socket) or while our writer is blocked (our ping is queued behind data):
//!   the clock restarts when both flow again.
//!
//! Sans-IO: `now` comes in, actions and deadlines go out.

use std::time::{Duration, Instant};

/// Liveness settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Keepalive ping interval. Keeps NAT and VPN mappings alive (VPNs drop flows idle
    /// for 60 s; the agent pings every 54 s) at the cost of one small frame each way.
    pub ping_interval: Duration,
    /// Silence after which a websocket that could read and write counts as dead: two
    /// keepalives unanswered, plus slack.
    pub dead_after: Duration,
    /// A websocket quiet for longer than this is probed when a connection arrives or
    /// while messages wait for acknowledgement.
    pub probe_idle: Duration,
    /// How long a probe may wait for any frame.
    pub probe_timeout: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            ping_interval: Duration::from_secs(20),
            dead_after: Duration::from_secs(45),
            probe_idle: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(5),
        }
    }
}

/// Why a ping goes out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PingKind {
    /// The periodic keepalive.
    Keepalive,
    /// A probe of a quiet websocket: an answer (any frame) is expected within
    /// [`LivenessConfig::probe_timeout`].
    Probe,
}

/// Why the websocket counts as dead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadReason {
    /// Nothing read for [`LivenessConfig::dead_after`].
    Silent,
    /// A probe got no answer within [`LivenessConfig::probe_timeout`].
    ProbeUnanswered,
}

impl std::fmt::Display for DeadReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeadReason::Silent => "no traffic on the websocket",
            DeadReason::ProbeUnanswered => "no answer to a ping on the websocket",
        })
    }
}

/// What the driver must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessAction {
    /// Send a websocket ping.
    Ping(PingKind),
    /// Drop the websocket and resume the session.
    Dead(DeadReason),
}

/// The liveness state of one websocket (reset by [`Liveness::restart`] on a new one).
#[derive(Clone, Debug)]
pub struct Liveness {
    config: LivenessConfig,
    /// When a frame was last read (or silence last stopped counting).
    last_traffic: Instant,
    /// When the next keepalive is due.
    next_ping: Instant,
    /// When a probe went out, until a frame answers it.
    probe_sent_at: Option<Instant>,
    /// Reads paused or writer blocked: silence does not count.
    stalled: bool,
    /// Messages wait for acknowledgement (a reason to probe a quiet socket).
    waiting: bool,
}

impl Liveness {
    /// Starts the clocks at `now` (a websocket just opened).
    pub fn new(config: LivenessConfig, now: Instant) -> Liveness {
        Liveness {
            config,
            last_traffic: now,
            next_ping: now + config.ping_interval,
            probe_sent_at: None,
            stalled: false,
            waiting: false,
        }
    }

    /// The settings.
    pub fn config(&self) -> &LivenessConfig {
        &self.config
    }

    /// A new websocket replaced the old one.
    pub fn restart(&mut self, now: Instant) {
        *self = Liveness::new(self.config, now);
    }

    /// A frame (any: data, pong, text) was read.
    pub fn on_traffic(&mut self, now: Instant) {
        self.last_traffic = self.last_traffic.max(now);
        self.probe_sent_at = None;
    }

    /// Whether silence can be judged: false while reads are paused for backpressure or
    /// the writer is blocked. While false, the clock keeps restarting.
    pub fn set_stalled(&mut self, now: Instant, stalled: bool) {
        self.stalled = stalled;
        if stalled {
            self.on_traffic(now);
        }
    }

    /// Whether messages wait for acknowledgement (then a quiet socket is probed).
    pub fn set_waiting(&mut self, waiting: bool) {
        self.waiting = waiting;
    }

    /// A connection arrives: after a laptop sleep the websocket may be dead without
    /// knowing it. Returns a probe to send if the socket has been quiet.
    pub fn on_new_connection(&mut self, now: Instant) -> Option<LivenessAction> {
        (now.saturating_duration_since(self.last_traffic) > self.config.probe_idle)
            .then(|| self.probe(now))
            .flatten()
    }

    fn probe(&mut self, now: Instant) -> Option<LivenessAction> {
        if self.probe_sent_at.is_some() || self.stalled {
            return None;
        }
        self.probe_sent_at = Some(now);
        Some(LivenessAction::Ping(PingKind::Probe))
    }

    fn busy_probe_at(&self) -> Option<Instant> {
        (self.waiting && self.probe_sent_at.is_none() && !self.stalled)
            .then(|| self.last_traffic + self.config.probe_idle)
    }

    fn probe_due(&self) -> Option<Instant> {
        self.probe_sent_at.map(|t| t + self.config.probe_timeout)
    }

    /// The next time [`Liveness::handle_timeout`] has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        [Some(self.next_ping), self.busy_probe_at(), self.probe_due()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Runs the timers due at `now`; at most one action per call (call again until
    /// `None`).
    pub fn handle_timeout(&mut self, now: Instant) -> Option<LivenessAction> {
        if self.probe_due().is_some_and(|d| d <= now) {
            self.probe_sent_at = None;
            // Unanswered only counts while we read and write.
            if !self.stalled {
                return Some(LivenessAction::Dead(DeadReason::ProbeUnanswered));
            }
        }
        if self.busy_probe_at().is_some_and(|d| d <= now)
            && let Some(probe) = self.probe(now)
        {
            return Some(probe);
        }
        if self.next_ping <= now {
            self.next_ping = now + self.config.ping_interval;
            if !self.stalled
                && now.saturating_duration_since(self.last_traffic) > self.config.dead_after
            {
                return Some(LivenessAction::Dead(DeadReason::Silent));
            }
            return Some(LivenessAction::Ping(PingKind::Keepalive));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Runs every timer up to `end`, answering nothing; returns (seconds since t0,
    /// action) pairs.
    fn run(l: &mut Liveness, t0: Instant, end: Instant) -> Vec<(u64, LivenessAction)> {
        let mut out = Vec::new();
        while let Some(t) = l.poll_timeout().filter(|&t| t <= end) {
            while let Some(a) = l.handle_timeout(t) {
                out.push((t.duration_since(t0).as_secs(), a));
                if matches!(a, LivenessAction::Dead(_)) {
                    return out;
                }
            }
        }
        out
    }

    #[test]
    fn an_answered_keepalive_every_interval_never_ends() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        for i in 1..=10 {
            let t = t0 + secs(20 * i);
            assert_eq!(l.poll_timeout(), Some(t));
            assert_eq!(
                l.handle_timeout(t),
                Some(LivenessAction::Ping(PingKind::Keepalive))
            );
            l.on_traffic(t + Duration::from_millis(30)); // the pong
        }
    }

    #[test]
    fn silence_past_dead_after_is_dead_at_the_next_keepalive_tick() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        let actions = run(&mut l, t0, t0 + secs(120));
        assert_eq!(
            actions,
            vec![
                (20, LivenessAction::Ping(PingKind::Keepalive)),
                (40, LivenessAction::Ping(PingKind::Keepalive)),
                (60, LivenessAction::Dead(DeadReason::Silent)),
            ]
        );
    }

    #[test]
    fn a_new_connection_on_a_quiet_socket_probes_and_an_unanswered_probe_is_dead() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        // Quiet for 3 s: no probe.
        assert_eq!(l.on_new_connection(t0 + secs(3)), None);
        // Quiet for 6 s (a laptop woke up): probe once, not twice.
        let t = t0 + secs(6);
        assert_eq!(
            l.on_new_connection(t),
            Some(LivenessAction::Ping(PingKind::Probe))
        );
        assert_eq!(l.on_new_connection(t), None);
        assert_eq!(l.poll_timeout(), Some(t + secs(5)));
        assert_eq!(
            l.handle_timeout(t + secs(5)),
            Some(LivenessAction::Dead(DeadReason::ProbeUnanswered))
        );
    }

    #[test]
    fn an_answered_probe_clears() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        let t = t0 + secs(6);
        assert!(l.on_new_connection(t).is_some());
        l.on_traffic(t + Duration::from_millis(40));
        // Only the keepalive remains.
        assert_eq!(l.poll_timeout(), Some(t0 + secs(20)));
        assert_eq!(l.handle_timeout(t + secs(5)), None);
    }

    #[test]
    fn messages_waiting_on_a_quiet_socket_are_probed() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        l.set_waiting(true);
        assert_eq!(l.poll_timeout(), Some(t0 + secs(5)));
        let actions = run(&mut l, t0, t0 + secs(60));
        assert_eq!(
            actions,
            vec![
                (5, LivenessAction::Ping(PingKind::Probe)),
                (10, LivenessAction::Dead(DeadReason::ProbeUnanswered)),
            ]
        );
    }

    #[test]
    fn silence_does_not_count_while_stalled() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        l.set_waiting(true);
        // Reads paused for backpressure for two minutes: keepalives only, no probe, no
        // death; the clock restarts whenever the driver reports the stall.
        let mut t = t0;
        let mut actions = Vec::new();
        while t < t0 + secs(120) {
            t += secs(1);
            l.set_stalled(t, true);
            while let Some(a) = l.handle_timeout(t) {
                actions.push(a);
            }
        }
        assert!(
            actions
                .iter()
                .all(|a| *a == LivenessAction::Ping(PingKind::Keepalive)),
            "{actions:?}"
        );
        assert_eq!(actions.len(), 6);
        // Flowing again: the silence counts from the end of the stall.
        l.set_stalled(t, false);
        assert_eq!(l.poll_timeout(), Some(t + secs(5)));
    }

    #[test]
    fn a_probe_that_times_out_while_stalled_is_not_a_death() {
        let t0 = Instant::now();
        let mut l = Liveness::new(LivenessConfig::default(), t0);
        let t = t0 + secs(6);
        assert!(l.on_new_connection(t).is_some());
        l.stalled = true; // stalled without the clock restart, as between two reports
        assert_eq!(l.handle_timeout(t + secs(5)), None);
    }
}
