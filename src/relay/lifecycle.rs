//! When streams end on the relay's own initiative: at their maximum age, so that sidecars spread
//! over replicas after a scale-up or a rollout, and during a shutdown, spread over the drain
//! window so that the sidecars do not all reconnect at once.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::info;

/// Whether the relay serves or drains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Streams live until their maximum age.
    Serving,
    /// Every stream ends before `until`, each at its own moment.
    Draining {
        /// When the last stream must have ended.
        until: Instant,
    },
}

/// Why the relay ended a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The stream reached its maximum age.
    MaxAge,
    /// The relay is shutting down.
    Drain,
}

/// One stream's view of when it should end.
#[derive(Debug)]
pub struct StreamClock {
    lifecycle: watch::Receiver<Lifecycle>,
    close_at: Option<(Instant, CloseReason)>,
    /// This stream's place in any spread, in [0, 1).
    fraction: f64,
    open: bool,
}

impl StreamClock {
    /// The clock of stream `stream_id`, started now.
    pub fn new(
        lifecycle: watch::Receiver<Lifecycle>,
        max_age: Option<Duration>,
        stream_id: u64,
    ) -> Self {
        // A per-process random seed: replicas restarted together still spread differently.
        let fraction = (RandomState::new().hash_one(stream_id) >> 11) as f64 / (1u64 << 53) as f64;
        let close_at = max_age.filter(|age| !age.is_zero()).map(|age| {
            // Ages vary by ±10% so that streams opened together do not end together.
            let jittered = age.mul_f64(0.9 + 0.2 * fraction);
            (Instant::now() + jittered, CloseReason::MaxAge)
        });
        let mut clock = Self {
            lifecycle,
            close_at,
            fraction,
            open: true,
        };
        clock.observe();
        clock
    }

    /// Resolves when the stream should end. Safe to drop and call again.
    pub async fn wait(&mut self) -> CloseReason {
        loop {
            let deadline = self.close_at;
            tokio::select! {
                changed = self.lifecycle.changed(), if self.open => {
                    if changed.is_err() {
                        self.open = false;
                    }
                    self.observe();
                }
                () = sleep_until(deadline) => {
                    let reason = deadline.map_or(CloseReason::Drain, |d| d.1);
                    match reason {
                        CloseReason::MaxAge => info!("ending the stream at its maximum age; the sidecar reconnects"),
                        CloseReason::Drain => info!("ending the stream: the relay is shutting down"),
                    }
                    return reason;
                }
            }
        }
    }

    fn observe(&mut self) {
        if let Lifecycle::Draining { until } = *self.lifecycle.borrow_and_update() {
            let now = Instant::now();
            let at = now + until.saturating_duration_since(now).mul_f64(self.fraction);
            if self.close_at.is_none_or(|(current, _)| at < current) {
                self.close_at = Some((at, CloseReason::Drain));
            }
        }
    }
}

async fn sleep_until(deadline: Option<(Instant, CloseReason)>) {
    match deadline {
        Some((at, _)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn max_age_is_jittered_within_ten_percent() {
        let (_tx, rx) = watch::channel(Lifecycle::Serving);
        let started = Instant::now();
        let mut clock = StreamClock::new(rx, Some(Duration::from_secs(100)), 7);
        assert_eq!(clock.wait().await, CloseReason::MaxAge);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(90) && took <= Duration::from_secs(110),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn drain_spreads_streams_over_the_window() {
        let (tx, _) = watch::channel(Lifecycle::Serving);
        let started = Instant::now();
        let mut ends = Vec::new();
        let mut clocks: Vec<_> = (0..50)
            .map(|id| StreamClock::new(tx.subscribe(), None, id))
            .collect();
        tx.send_replace(Lifecycle::Draining {
            until: started + Duration::from_secs(30),
        });
        // Every stream's task sees the change at once.
        for clock in &mut clocks {
            clock.observe();
        }
        for clock in &mut clocks {
            assert_eq!(clock.wait().await, CloseReason::Drain);
            ends.push(clock.close_at.unwrap().0 - started);
        }
        assert!(ends.iter().all(|e| *e <= Duration::from_secs(30)));
        let first_half = ends
            .iter()
            .filter(|e| **e < Duration::from_secs(15))
            .count();
        assert!((10..=40).contains(&first_half), "not spread: {ends:?}");
    }
}
