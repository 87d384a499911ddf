//! Client-side pacing under KVS's per-stream quotas, so throttling is the exception, not
//! the way we find the limit. KVS counts "points" per stream per second: GetClip costs
//! its fragment count in both fragment-media (500/s) and fragment-metadata (10,000/s)
//! points; ListFragments costs its MaxResults in metadata points.

use std::time::Duration;
use tokio::sync::Mutex;
use tokio::time::Instant;

/// A bucket holding at most one second of points, refilled continuously.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket refilled at `rate_per_sec` points per second (at least 0.001).
    pub fn new(rate_per_sec: f64) -> Self {
        TokenBucket {
            rate: rate_per_sec.max(0.001),
            state: Mutex::new((rate_per_sec.max(0.001), Instant::now())),
        }
    }

    /// An empty bucket refilled at `rate_per_sec`: for a quota other processes share (a
    /// `plan` just before, a backfill beside the daemon, another instance), whose last
    /// second this process cannot know. Starting full would spend a second's points at
    /// once on top of theirs, and KVS would throttle the difference.
    pub fn starting_empty(rate_per_sec: f64) -> Self {
        TokenBucket {
            rate: rate_per_sec.max(0.001),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    /// Waits until `cost` points are available and takes them. A cost above one second's
    /// budget passes when the bucket is full and leaves it in debt, as KVS does.
    pub async fn acquire(&self, cost: f64) {
        loop {
            let wait = {
                let mut state = self.state.lock().await;
                let now = Instant::now();
                let elapsed = now.duration_since(state.1).as_secs_f64();
                state.0 = (state.0 + elapsed * self.rate).min(self.rate);
                state.1 = now;
                let needed = cost.min(self.rate);
                if state.0 >= needed {
                    state.0 -= cost;
                    return;
                }
                Duration::from_secs_f64((needed - state.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_paces_to_its_rate() {
        let bucket = TokenBucket::new(500.0);
        let start = Instant::now();
        // Ten 190-fragment clips: 1,900 points at 500/s after the first full second.
        for _ in 0..10 {
            bucket.acquire(190.0).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((2.7..=3.2).contains(&elapsed), "took {elapsed} s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_bucket_starting_empty_waits_for_its_first_points() {
        let bucket = TokenBucket::starting_empty(500.0);
        let start = Instant::now();
        bucket.acquire(250.0).await;
        let first = start.elapsed().as_secs_f64();
        assert!(
            (0.49..=0.52).contains(&first),
            "first 250 points after {first} s"
        );
        // Then the rate, as for a full one: 1,000 points in two more seconds.
        for _ in 0..4 {
            bucket.acquire(250.0).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        assert!((2.49..=2.6).contains(&elapsed), "took {elapsed} s");
    }

    #[tokio::test(start_paused = true)]
    async fn a_cost_above_the_rate_passes_when_full() {
        let bucket = TokenBucket::new(100.0);
        let start = Instant::now();
        bucket.acquire(1000.0).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        bucket.acquire(1.0).await;
        assert!(start.elapsed() >= Duration::from_secs(9));
    }
}
