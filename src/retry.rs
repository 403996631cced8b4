//! The wait between attempts at something that fails for a while (a
//! database or broker outage): it doubles after each failure, up to a cap,
//! and starts over after a success.

use std::time::Duration;

/// Capped exponential backoff.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Waits `initial` first, then twice as long each time, never longer
    /// than `max` after the first wait.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max,
            next: initial,
        }
    }

    /// How long to wait after this failure; the next one waits longer.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Logs `failure` (what failed, and the error) with how long it waits,
    /// then waits.
    pub async fn wait_after(&mut self, failure: &str, error: &anyhow::Error) {
        let wait = self.next_delay();
        tracing::warn!(
            error = format!("{error:#}"),
            backoff_ms = wait.as_millis() as u64,
            "{failure}; retrying"
        );
        tokio::time::sleep(wait).await;
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn doubles_up_to_the_cap_and_starts_over_after_a_reset() {
        let mut backoff = Backoff::new(ms(50), ms(300));
        let waits: Vec<Duration> = (0..5).map(|_| backoff.next_delay()).collect();
        assert_eq!(waits, [ms(50), ms(100), ms(200), ms(300), ms(300)]);
        backoff.reset();
        assert_eq!(backoff.next_delay(), ms(50));
    }

    #[test]
    fn a_first_wait_above_the_cap_is_waited_once() {
        let mut backoff = Backoff::new(ms(500), ms(100));
        assert_eq!((backoff.next_delay(), backoff.next_delay()), (ms(500), ms(100)));
    }
}
