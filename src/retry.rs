//! The one place retry decisions are made: every error says whether a retry can help
//! ([`Retryability`]), and [`RetryPolicy`] says how long to wait before the next attempt.

pub use crate::error::Retryability;
use std::time::Duration;

/// Retries logged at debug level before they are worth a warning.
const ROUTINE_RETRIES: u32 = 3;

/// Capped exponential backoff with full jitter.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all (the first included) for a transient or unreachable failure.
    pub max_attempts: u32,
    /// The pause after the first failure, doubled after each further one.
    pub base_delay: Duration,
    /// The longest pause between two attempts.
    pub max_delay: Duration,
}

/// Attempts at a command's first request to an endpoint that does not answer: one
/// retry covers a blip; more only make a wrong endpoint slower to report.
const FIRST_CONTACT_ATTEMPTS: u32 = 2;

/// Throttling waits start this many times longer: quotas refill per second.
const THROTTLE_FACTOR: u32 = 4;
/// Throttled operations get this many times `max_attempts`.
const THROTTLE_PATIENCE: u32 = 4;

impl RetryPolicy {
    /// The pause before attempt `attempt + 1`, after `attempt` failed attempts (≥ 1).
    pub fn delay(&self, attempt: u32, retryability: Retryability) -> Duration {
        let base = match retryability {
            Retryability::Throttled => self.base_delay * THROTTLE_FACTOR,
            _ => self.base_delay,
        };
        let exp = base.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let ceiling = exp.min(self.max_delay);
        // Full jitter spreads retries of many clips that failed together.
        let millis = ceiling.as_millis() as u64;
        let low = millis / 2;
        Duration::from_millis(fastrand::u64(low..=millis.max(low)))
    }

    /// The policy for a command's first request to an endpoint (DescribeStream, the
    /// destination check): an endpoint that does not answer is reported at once, with
    /// its URL and the operating system's error, instead of after the whole backoff.
    /// Other failures keep this policy's patience.
    pub fn first_contact(self) -> FirstContact {
        FirstContact(self)
    }

    /// Whether another attempt is allowed after `attempt` failures. Throttling says
    /// "later", not "broken" (another process may share the stream's quota), so it gets
    /// `THROTTLE_PATIENCE` times the attempts.
    pub fn allows(&self, attempt: u32, retryability: Retryability) -> bool {
        match retryability {
            Retryability::Permanent => false,
            Retryability::Transient | Retryability::Unreachable => attempt < self.max_attempts,
            Retryability::Throttled => {
                attempt < self.max_attempts.saturating_mul(THROTTLE_PATIENCE)
            }
        }
    }
}

/// [`RetryPolicy::first_contact`]: the same policy, but an unreachable endpoint gets
/// [`FIRST_CONTACT_ATTEMPTS`].
#[derive(Debug, Clone, Copy)]
pub struct FirstContact(RetryPolicy);

/// What [`with_retry`] needs of a policy.
pub trait Backoff {
    /// Whether another attempt is allowed after `attempt` failures.
    fn allows(&self, attempt: u32, retryability: Retryability) -> bool;
    /// How long to wait before the next attempt.
    fn delay(&self, attempt: u32, retryability: Retryability) -> Duration;
}

impl Backoff for RetryPolicy {
    fn allows(&self, attempt: u32, retryability: Retryability) -> bool {
        RetryPolicy::allows(self, attempt, retryability)
    }
    fn delay(&self, attempt: u32, retryability: Retryability) -> Duration {
        RetryPolicy::delay(self, attempt, retryability)
    }
}

impl Backoff for FirstContact {
    fn allows(&self, attempt: u32, retryability: Retryability) -> bool {
        match retryability {
            Retryability::Unreachable => attempt < FIRST_CONTACT_ATTEMPTS.min(self.0.max_attempts),
            other => self.0.allows(attempt, other),
        }
    }
    fn delay(&self, attempt: u32, retryability: Retryability) -> Duration {
        self.0.delay(attempt, retryability)
    }
}

/// Runs `op` until it succeeds, fails permanently, or the policy gives up; waits between
/// attempts as the policy says. `what` names the operation in logs.
pub async fn with_retry<T, F, Fut>(
    policy: &impl Backoff,
    what: &str,
    mut op: F,
) -> crate::error::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::error::Result<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match op().await {
            Ok(value) => {
                if attempt > 1 {
                    tracing::info!(
                        what,
                        attempt,
                        "recovered after {} failed attempts",
                        attempt - 1
                    );
                }
                return Ok(value);
            }
            // A forgotten upload is not helped by repeating the request: the chunk's upload
            // starts over (or, for an abort, there is nothing left to abort).
            Err(error @ crate::error::Error::UploadLost { .. }) => return Err(error),
            Err(error) => {
                let retry = error.retryability();
                if !policy.allows(attempt, retry) {
                    return Err(error);
                }
                let delay = policy.delay(attempt, retry);
                crate::metrics::operation_retried(what, retry);
                // A first retry or two is routine (a blip, a throttle): a warning only
                // once it persists; the metric counts every one.
                if attempt >= ROUTINE_RETRIES {
                    tracing::warn!(what, attempt, ?retry, delay_ms = delay.as_millis() as u64, %error, "retrying");
                } else {
                    tracing::debug!(what, attempt, ?retry, delay_ms = delay.as_millis() as u64, %error, "retrying");
                }
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        max_attempts: 5,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(2),
    };

    #[test]
    fn delays_grow_and_are_capped() {
        for _ in 0..50 {
            let first = POLICY.delay(1, Retryability::Transient);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let late = POLICY.delay(12, Retryability::Transient);
            assert!(late <= Duration::from_secs(2) && late >= Duration::from_secs(1));
            let throttled = POLICY.delay(1, Retryability::Throttled);
            assert!(throttled >= Duration::from_millis(200));
        }
    }

    #[test]
    fn permanent_errors_are_never_retried() {
        assert!(!POLICY.allows(1, Retryability::Permanent));
        assert!(POLICY.allows(4, Retryability::Throttled));
        assert!(!POLICY.allows(5, Retryability::Transient));
        assert!(
            POLICY.allows(19, Retryability::Throttled),
            "throttling is waited out longer"
        );
        assert!(!POLICY.allows(20, Retryability::Throttled));
    }

    #[test]
    fn an_unreachable_endpoint_gets_one_retry_at_first_contact_only() {
        let first = POLICY.first_contact();
        assert!(Backoff::allows(&first, 1, Retryability::Unreachable));
        assert!(!Backoff::allows(&first, 2, Retryability::Unreachable));
        assert!(
            Backoff::allows(&first, 4, Retryability::Transient),
            "a 5xx keeps the whole policy"
        );
        assert!(Backoff::allows(&first, 19, Retryability::Throttled));
        assert!(
            POLICY.allows(4, Retryability::Unreachable),
            "mid-run, a lost connection is retried like any transient failure"
        );
    }
}
