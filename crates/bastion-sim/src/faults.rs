//! Fault knobs of the simulator and the per-direction pipe that applies them.
//!
//! The knobs ([`Faults`]) are global: a default comes from
//! [`SimConfig::faults`](super::SimConfig::faults), and tests change them at runtime through
//! [`SimHandle::set_faults`](super::SimHandle::set_faults) or `POST /sim/faults`. Every
//! session reads the current value for every frame, so a change applies at once.
//!
//! Message faults act on the websocket messages relayed between the client and the agent,
//! after the OpenDataChannel message: [`Faults::to_agent`] on what the client sends,
//! [`Faults::to_client`] on what the agent sends. Messages the service itself makes
//! (`channel_closed`, `pause_publication`, `start_publication`) are never faulted. Each
//! applied fault adds one to the session's `faults_injected` counter.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::report::SessionReport;

/// How long a frame held back by `reorder_pct` waits for a successor before it is
/// released anyway.
pub const REORDER_HOLD_MAX: Duration = Duration::from_millis(100);

/// Message faults of one direction.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DirectionFaults {
    /// Percentage (0–100) of messages dropped.
    pub drop_pct: f64,
    /// Percentage (0–100) of messages delivered twice.
    pub duplicate_pct: f64,
    /// Percentage (0–100) of messages held back and released right after the next one
    /// (or after [`REORDER_HOLD_MAX`] if none follows).
    pub reorder_pct: f64,
    /// Extra latency per message, uniformly drawn from `[min, max]` milliseconds. Order is
    /// kept, as on a TCP connection: a message is never released before the one in
    /// front of it.
    pub delay_ms: Option<(u64, u64)>,
}

impl DirectionFaults {
    /// True when no fault is configured.
    pub fn is_clean(&self) -> bool {
        self.drop_pct <= 0.0
            && self.duplicate_pct <= 0.0
            && self.reorder_pct <= 0.0
            && self.delay_ms.is_none_or(|(_, max)| max == 0)
    }

    fn validate(&self, what: &str) -> Result<(), String> {
        for (name, v) in [
            ("drop_pct", self.drop_pct),
            ("duplicate_pct", self.duplicate_pct),
            ("reorder_pct", self.reorder_pct),
        ] {
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{what}.{name} must be within 0..=100, got {v}"));
            }
        }
        if let Some((min, max)) = self.delay_ms
            && min > max
        {
            return Err(format!("{what}.delay_ms: min {min} > max {max}"));
        }
        Ok(())
    }
}

/// All fault knobs. The JSON form (for `POST /sim/faults`) uses these field names; a
/// missing field takes its default (no fault).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Seed of the random draws; `None` seeds from the OS. With a seed, the fault
    /// decisions of the n-th session created (n counted from 0 since the simulator
    /// started) are the same from run to run for the same traffic.
    pub seed: Option<u64>,
    /// Faults on client → agent messages.
    pub to_agent: DirectionFaults,
    /// Faults on agent → client messages.
    pub to_client: DirectionFaults,
    /// Drop a websocket abruptly (no close frame: the TCP connection is closed) once
    /// this many message payload bytes, both directions together, went through it.
    pub cut_after_bytes: Option<u64>,
    /// Drop a websocket abruptly this many milliseconds after it was attached.
    pub cut_after_ms: Option<u64>,
    /// Cut at most this many websockets per session (`None`: no limit).
    pub max_cuts: Option<u64>,
    /// ResumeSession fails with `AccessDeniedException`.
    pub refuse_resume: bool,
    /// StartSession fails with this error code (e.g. `ThrottlingException`,
    /// `TargetNotConnected`, `AccessDeniedException`, `InternalServerError`).
    pub fail_start_session: Option<String>,
    /// With `fail_start_session`: fail only this many more calls, then clear the knob.
    pub fail_start_session_times: Option<u64>,
    /// TerminateSession fails with `InternalServerError` this many more calls (each
    /// SDK attempt counts), then succeeds again.
    pub fail_terminate_session_times: Option<u64>,
    /// Delay before the agent sends its HandshakeRequest (overrides the simulator's
    /// agent default for sessions whose agent starts while it is set).
    pub handshake_delay_ms: Option<u64>,
    /// A dead path: while set, the data plane neither reads from nor writes to the
    /// websockets attached to sessions (no frame, no pong goes back; what the client
    /// sends waits unread). A new websocket's OpenDataChannel is still read, so a
    /// client that resumes gets through once the knob is cleared.
    pub freeze_websockets: bool,
    /// How long after receiving a client message the agent sends its acknowledgement,
    /// overriding the simulator's agent default. Read for every acknowledgement, so a
    /// change applies at once, to running sessions too.
    pub ack_delay_ms: Option<u64>,
}

impl Faults {
    /// Checks ranges (percentages, delay bounds, a non-empty error code).
    pub fn validate(&self) -> Result<(), String> {
        self.to_agent.validate("to_agent")?;
        self.to_client.validate("to_client")?;
        if let Some(code) = &self.fail_start_session
            && (code.is_empty() || !code.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(format!(
                "fail_start_session must be an error code such as ThrottlingException, got {code:?}"
            ));
        }
        if self.cut_after_bytes == Some(0) {
            return Err("cut_after_bytes must be > 0".into());
        }
        Ok(())
    }
}

/// Which way a [`FaultPipe`] carries messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → agent.
    ToAgent,
    /// Agent → client.
    ToClient,
}

impl Direction {
    fn index(self) -> u64 {
        match self {
            Direction::ToAgent => 0,
            Direction::ToClient => 1,
        }
    }

    /// The knobs of this direction.
    pub fn select(self, faults: &Faults) -> &DirectionFaults {
        match self {
            Direction::ToAgent => &faults.to_agent,
            Direction::ToClient => &faults.to_client,
        }
    }
}

/// Applies [`DirectionFaults`] to a sequence of messages: decides drops, duplicates,
/// reorders and delays, and hands messages out when their time comes.
///
/// Sans-IO: the caller passes `now` and sleeps until [`FaultPipe::next_deadline`].
#[derive(Debug)]
pub struct FaultPipe {
    dir: Direction,
    ordinal: u64,
    seed: Option<u64>,
    rng: fastrand::Rng,
    held: Option<(Instant, Bytes)>,
    queue: VecDeque<(Instant, Bytes)>,
    last_release: Option<Instant>,
}

impl FaultPipe {
    /// A pipe for the `ordinal`-th session, seeded from `seed` (see [`Faults::seed`]).
    pub fn new(dir: Direction, ordinal: u64, seed: Option<u64>) -> FaultPipe {
        FaultPipe {
            dir,
            ordinal,
            seed,
            rng: Self::rng_for(dir, ordinal, seed),
            held: None,
            queue: VecDeque::new(),
            last_release: None,
        }
    }

    fn rng_for(dir: Direction, ordinal: u64, seed: Option<u64>) -> fastrand::Rng {
        match seed {
            Some(s) => fastrand::Rng::with_seed(
                s ^ (ordinal.wrapping_mul(2).wrapping_add(dir.index()))
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15),
            ),
            None => fastrand::Rng::new(),
        }
    }

    fn chance(&mut self, pct: f64) -> bool {
        pct > 0.0 && self.rng.f64() * 100.0 < pct
    }

    fn enqueue(&mut self, at: Instant, frame: Bytes) {
        let at = self.last_release.map_or(at, |l| at.max(l));
        self.last_release = Some(at);
        self.queue.push_back((at, frame));
    }

    /// Feeds a client or agent message through the faults of `faults` (the current
    /// knobs); every fault applied is counted in `report`.
    pub fn push(&mut self, frame: Bytes, faults: &Faults, now: Instant, report: &SessionReport) {
        if faults.seed != self.seed {
            self.seed = faults.seed;
            self.rng = Self::rng_for(self.dir, self.ordinal, self.seed);
        }
        let knobs = self.dir.select(faults).clone();
        if knobs.is_clean() && self.held.is_none() {
            self.enqueue(now, frame);
            return;
        }
        let mut injected = 0u64;
        if self.chance(knobs.drop_pct) {
            report.count(|c| c.faults_injected += 1);
            return;
        }
        let copies = if self.chance(knobs.duplicate_pct) {
            injected += 1;
            2
        } else {
            1
        };
        let delay = match knobs.delay_ms {
            Some((min, max)) if max > 0 => {
                injected += 1;
                Duration::from_millis(self.rng.u64(min..=max))
            }
            _ => Duration::ZERO,
        };
        if self.held.is_none() && self.chance(knobs.reorder_pct) {
            injected += 1;
            self.held = Some((now + delay, frame.clone()));
            if copies == 2 {
                self.enqueue(now + delay, frame);
            }
        } else {
            for _ in 0..copies {
                self.enqueue(now + delay, frame.clone());
            }
            if let Some((at, held)) = self.held.take() {
                self.enqueue(at, held);
            }
        }
        if injected > 0 {
            report.count(|c| c.faults_injected += injected);
        }
    }

    /// Feeds a service message: no fault, but it keeps its place behind earlier
    /// messages.
    pub fn push_clean(&mut self, frame: Bytes, now: Instant) {
        self.enqueue(now, frame);
    }

    /// When the caller must come back to [`FaultPipe::pop_ready`].
    pub fn next_deadline(&self) -> Option<Instant> {
        let front = self.queue.front().map(|(at, _)| *at);
        let held = self.held.as_ref().map(|(at, _)| *at + REORDER_HOLD_MAX);
        match (front, held) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The next message due at `now`, if any.
    pub fn pop_ready(&mut self, now: Instant) -> Option<Bytes> {
        if let Some((at, _)) = &self.held
            && *at + REORDER_HOLD_MAX <= now
            && let Some((at, held)) = self.held.take()
        {
            self.enqueue(at, held);
        }
        if self.queue.front().is_some_and(|(at, _)| *at <= now) {
            return self.queue.pop_front().map(|(_, f)| f);
        }
        None
    }

    /// True when nothing is queued or held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.held.is_none()
    }

    /// Releases a held message at once (used when the stream ends).
    pub fn release_held(&mut self) {
        if let Some((at, held)) = self.held.take() {
            self.enqueue(at, held);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(n: u8) -> Vec<Bytes> {
        (0..n).map(|i| Bytes::from(vec![i])).collect()
    }

    fn drain(p: &mut FaultPipe, now: Instant) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(f) = p.pop_ready(now) {
            out.push(f[0]);
        }
        out
    }

    #[test]
    fn clean_pipe_is_transparent() {
        let report = SessionReport::default();
        let mut p = FaultPipe::new(Direction::ToAgent, 0, Some(1));
        let now = Instant::now();
        for f in frames(5) {
            p.push(f, &Faults::default(), now, &report);
        }
        assert_eq!(drain(&mut p, now), vec![0, 1, 2, 3, 4]);
        assert_eq!(report.counters().faults_injected, 0);
    }

    #[test]
    fn drop_and_duplicate_everything() {
        let report = SessionReport::default();
        let now = Instant::now();
        let mut faults = Faults::default();
        faults.to_client.drop_pct = 100.0;
        let mut p = FaultPipe::new(Direction::ToClient, 0, Some(1));
        for f in frames(3) {
            p.push(f, &faults, now, &report);
        }
        assert!(drain(&mut p, now).is_empty());
        assert_eq!(report.counters().faults_injected, 3);

        faults.to_client.drop_pct = 0.0;
        faults.to_client.duplicate_pct = 100.0;
        for f in frames(2) {
            p.push(f, &faults, now, &report);
        }
        assert_eq!(drain(&mut p, now), vec![0, 0, 1, 1]);
    }

    #[test]
    fn reorder_releases_after_next_or_after_hold() {
        let report = SessionReport::default();
        let now = Instant::now();
        let mut faults = Faults::default();
        faults.to_agent.reorder_pct = 100.0;
        let mut p = FaultPipe::new(Direction::ToAgent, 0, Some(7));
        let f = frames(3);
        p.push(f[0].clone(), &faults, now, &report); // held
        assert!(drain(&mut p, now).is_empty());
        p.push(f[1].clone(), &faults, now, &report); // 1 then 0
        assert_eq!(drain(&mut p, now), vec![1, 0]);
        p.push(f[2].clone(), &faults, now, &report); // held again
        assert!(drain(&mut p, now).is_empty());
        assert_eq!(p.next_deadline(), Some(now + REORDER_HOLD_MAX));
        assert_eq!(drain(&mut p, now + REORDER_HOLD_MAX), vec![2]);
        assert!(p.is_empty());
    }

    #[test]
    fn delay_keeps_order_and_is_seeded() {
        let report = SessionReport::default();
        let now = Instant::now();
        let mut faults = Faults::default();
        faults.to_client.delay_ms = Some((10, 50));
        faults.seed = Some(42);
        let run = || {
            let mut p = FaultPipe::new(Direction::ToClient, 3, Some(42));
            let mut times = Vec::new();
            for f in frames(20) {
                p.push(f, &faults, now, &report);
            }
            let mut t = now;
            let mut out = Vec::new();
            while let Some(d) = p.next_deadline() {
                assert!(d >= t);
                t = d;
                times.push(d - now);
                out.extend(drain(&mut p, t));
            }
            assert_eq!(out, (0..20).collect::<Vec<u8>>());
            times
        };
        let a = run();
        assert_eq!(a, run());
        assert!(a.iter().all(|d| *d >= Duration::from_millis(10)));
    }

    #[test]
    fn validation() {
        let mut f = Faults::default();
        assert!(f.validate().is_ok());
        f.to_agent.drop_pct = 101.0;
        assert!(f.validate().is_err());
        f.to_agent.drop_pct = 1.0;
        f.to_client.delay_ms = Some((5, 1));
        assert!(f.validate().is_err());
        f.to_client.delay_ms = None;
        f.fail_start_session = Some("Bad Code".into());
        assert!(f.validate().is_err());
        let json: Faults = serde_json::from_str(
            r#"{"to_client":{"delay_ms":[1,2]},"refuse_resume":true,"ack_delay_ms":1}"#,
        )
        .unwrap();
        assert_eq!(json.to_client.delay_ms, Some((1, 2)));
        assert!(json.refuse_resume);
        assert_eq!(json.ack_delay_ms, Some(1));
        assert!(serde_json::from_str::<Faults>(r#"{"nope":1}"#).is_err());
    }
}
