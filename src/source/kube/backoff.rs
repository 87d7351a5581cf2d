//! Exponential backoff with jitter between retries against the Kubernetes API, so that a
//! struggling or absent API server is not hammered and several replicas do not retry in step.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// The delays between retries: doubling from `initial` up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first delay after a failure.
    pub initial: Duration,
    /// The longest delay.
    pub max: Duration,
}

impl Default for BackoffPolicy {
    /// client-go's reflector values: 800 ms doubling up to 30 s.
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(800),
            max: Duration::from_secs(30),
        }
    }
}

/// The state of one retry loop.
#[derive(Debug, Clone)]
pub(super) struct Backoff {
    policy: BackoffPolicy,
    next: Duration,
}

impl Backoff {
    pub(super) fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy,
            next: policy.initial,
        }
    }

    /// The delay before the next retry: the current step with up to 25% taken off at random,
    /// then the step doubles.
    pub(super) fn next_delay(&mut self) -> Duration {
        let step = self.next.min(self.policy.max);
        self.next = (step * 2).min(self.policy.max);
        let jitter = step.mul_f64(random_fraction() * 0.25);
        step.saturating_sub(jitter)
    }

    /// After a success: the next failure waits the initial delay again.
    pub(super) fn reset(&mut self) {
        self.next = self.policy.initial;
    }
}

/// A number in [0, 1) that differs between calls and processes; good enough for jitter.
fn random_fraction() -> f64 {
    let bits = RandomState::new().build_hasher().finish() >> 11;
    bits as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_max_and_resets() {
        let policy = BackoffPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        let mut backoff = Backoff::new(policy);
        let delays: Vec<Duration> = (0..4).map(|_| backoff.next_delay()).collect();
        let steps = [100, 200, 350, 350].map(Duration::from_millis);
        for (delay, step) in delays.iter().zip(steps) {
            assert!(
                *delay <= step && *delay >= step.mul_f64(0.75),
                "{delay:?} for {step:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
