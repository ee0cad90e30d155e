//! Short sleeps with the precision of Go's `time.Sleep`.
//!
//! The agent's pumps pause 1 ms after every message they send ([A] `port_mux.go` fn
//! `transferDataToMgs`, `port_basic.go` fn `WritePump`: `time.Sleep(time.Millisecond)`).
//! Go sleeps on the kernel's high-resolution timers: on Linux such a pause lasts about
//! 1.0–1.1 ms. Tokio's timer wheel has a 1 ms tick and rounds every deadline up to the
//! next tick, so `tokio::time::sleep(1 ms)` lasts 1–2 ms (about 2 ms under load), which
//! would make the simulated agent up to twice as slow as the real one (0.5 MB/s instead
//! of about 1 MB/s per session, and round trips of 2 ms instead of 1 ms).
//!
//! So a wait shorter than [`PRECISE_BELOW`] is also handed to one timer thread that
//! sleeps on the OS's own timer (`recv_timeout`, a futex wait on Linux, like Go's
//! netpoller sleep), and ends at whichever fires first: that thread in real time, the
//! tokio sleep under a paused test clock (which the thread does not see).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::OnceLock;
use std::sync::mpsc::{RecvTimeoutError, Sender, channel};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::{Instant, sleep_until};

/// Waits shorter than this use the precise timer too.
const PRECISE_BELOW: Duration = Duration::from_millis(5);

/// Sleeps until `deadline`.
pub(super) async fn sleep_precise(deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() || left >= PRECISE_BELOW {
        return sleep_until(deadline).await;
    }
    let (tx, rx) = oneshot::channel();
    let queued =
        timer().is_some_and(|t| t.send(Timer(std::time::Instant::now() + left, tx)).is_ok());
    if !queued {
        return sleep_until(deadline).await;
    }
    tokio::select! {
        () = sleep_until(deadline) => {}
        _ = rx => {}
    }
}

/// A pending wake-up: when, and whom.
struct Timer(std::time::Instant, oneshot::Sender<()>);

impl PartialEq for Timer {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl Eq for Timer {}
impl PartialOrd for Timer {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Timer {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

/// The process's timer thread (started on first use; `None` if it cannot be).
fn timer() -> Option<&'static Sender<Timer>> {
    static TIMER: OnceLock<Option<Sender<Timer>>> = OnceLock::new();
    TIMER
        .get_or_init(|| {
            let (tx, rx) = channel::<Timer>();
            let spawned = std::thread::Builder::new()
                .name("sim-agent-pacer".into())
                .spawn(move || {
                    let mut due: BinaryHeap<Reverse<Timer>> = BinaryHeap::new();
                    loop {
                        let now = std::time::Instant::now();
                        while due.peek().is_some_and(|Reverse(t)| t.0 <= now) {
                            if let Some(Reverse(t)) = due.pop() {
                                let _ = t.1.send(());
                            }
                        }
                        let next = match due.peek() {
                            Some(Reverse(t)) => rx.recv_timeout(t.0 - now),
                            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
                        };
                        match next {
                            Ok(t) => due.push(Reverse(t)),
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => return,
                        }
                    }
                });
            if let Err(e) = &spawned {
                tracing::debug!(error = %e, "no timer thread; agent pacing uses tokio's 1 ms timer");
            }
            spawned.ok().map(|_| tx)
        })
        .as_ref()
}
