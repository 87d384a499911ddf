//! One emulated stream: its fragments (materialized as the clock passes them), retention,
//! and the per-stream quota buckets.

use crate::config::{Faults, Mode, StreamSpec};
use crate::media::{gop, FragmentLayout};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

/// Real fragment numbers are 47 decimal digits: a per-stream prefix and an ingest counter.
const FRAGMENT_NUMBER_DIGITS: usize = 47;
const COUNTER_DIGITS: usize = 20;

/// One fragment KVS holds.
#[derive(Debug, Clone)]
pub struct Fragment {
    /// Fragment number: 47 digits, a per-stream prefix and the ingest counter.
    pub number: String,
    /// Server timestamp: when KVS received the fragment's start, epoch ms.
    pub server_ms: i64,
    /// The camera's timestamp of the fragment's start, epoch ms.
    pub producer_ms: i64,
    /// Duration, one of the spec's `fragment_durations_ms`.
    pub duration_ms: u32,
    /// How the fragment's media is laid out; shared by fragments of one duration.
    pub layout: Arc<FragmentLayout>,
    /// Which codec private data the fragment carries; changes at `codec_changes_at`.
    pub codec_generation: u32,
    /// The fragment has no codec private data (`missing_codec_private_data_at`).
    pub missing_codec_private_data: bool,
    /// The fragment holds a frame that does not parse (`invalid_frames_at`).
    pub invalid_frame: bool,
}

/// Which timestamp a selector compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampKind {
    /// When KVS received the fragment.
    Server,
    /// The camera's clock.
    Producer,
}

impl Fragment {
    /// The fragment's start by the `kind` clock.
    pub fn timestamp(&self, kind: TimestampKind) -> i64 {
        match kind {
            TimestampKind::Server => self.server_ms,
            TimestampKind::Producer => self.producer_ms,
        }
    }
}

/// A token bucket holding one second's worth of points, as KVS's per-second quotas do.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    tokens: f64,
    last_ms: i64,
}

impl Bucket {
    /// A full bucket of `rate` points.
    pub fn new(rate: f64, now_ms: i64) -> Self {
        Bucket {
            rate,
            tokens: rate,
            last_ms: now_ms,
        }
    }

    /// Takes `cost` points if they are there; `false` means throttled.
    pub fn try_take(&mut self, cost: f64, rate: f64, now_ms: i64) -> bool {
        self.rate = rate;
        let elapsed = (now_ms - self.last_ms).max(0) as f64 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last_ms = now_ms;
        // A request costing more than a whole second's budget could never pass; KVS lets
        // it through when the bucket is full, and so do we.
        if self.tokens >= cost || (cost > rate && self.tokens >= rate) {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

/// KVS's per-stream quota rates (quotas page, "fragment-based throttling").
pub const MEDIA_POINTS_PER_SEC: f64 = 500.0;
/// Fragment-metadata points per second: ListFragments costs MaxResults, GetClip a point
/// per fragment.
pub const METADATA_POINTS_PER_SEC: f64 = 10_000.0;
/// DescribeStream and GetDataEndpoint calls per second (the control-plane quota).
pub const CONTROL_TPS_PER_STREAM: f64 = 5.0;

/// A stream as the emulator holds it: what it is, its faults, its fragments and its quotas.
pub struct StreamState {
    /// What the stream was created as.
    pub spec: StreamSpec,
    /// The stream's ARN; it ends in the creation time, as KVS's do.
    pub arn: String,
    /// DescribeStream's `Version`, from the name's hash.
    pub version: String,
    /// DescribeStream's `CreationTime`, epoch ms: creation, or the first fragment's start if
    /// the stream's history reaches further back.
    pub created_ms: i64,
    /// The faults now in force; tests and the admin endpoint change them.
    pub faults: Faults,
    start_ms: i64,
    end_ms: Option<i64>,
    number_prefix: String,
    next_start_ms: i64,
    next_index: u64,
    fragments: VecDeque<Fragment>,
    /// Producer timestamp of the last fragment ingested.
    last_producer_ms: Option<i64>,
    layouts: HashMap<u32, Arc<FragmentLayout>>,
    /// Fragment-media points (GetClip).
    pub media_points: Bucket,
    /// Fragment-metadata points (ListFragments, GetClip).
    pub metadata_points: Bucket,
    /// Control-plane calls (DescribeStream, GetDataEndpoint).
    pub control_calls: Bucket,
}

impl StreamState {
    /// A stream from `spec` created at `now_ms`, with no fragments until [`Self::advance`].
    pub fn new(spec: StreamSpec, region: &str, account: &str, now_ms: i64) -> Self {
        let start_ms = spec
            .start
            .map(|t| t.timestamp_millis())
            .unwrap_or(now_ms - spec.backlog.as_millis() as i64);
        let end_ms = match spec.mode {
            Mode::Historical => Some(spec.end.map_or(now_ms, |t| t.timestamp_millis())),
            Mode::Live => None,
        };
        let hash = fnv1a(spec.name.as_bytes());
        let prefix_digits = FRAGMENT_NUMBER_DIGITS - COUNTER_DIGITS;
        // A leading 9 keeps the prefix at full length, as real fragment numbers are.
        let number_prefix = format!(
            "9{:0>width$}",
            hash % 10u64.pow(18),
            width = prefix_digits - 1
        )[..prefix_digits]
            .to_string();
        let faults = spec.faults.clone();
        StreamState {
            arn: format!(
                "arn:aws:kinesisvideo:{region}:{account}:stream/{}/{}",
                spec.name, now_ms
            ),
            version: format!("{:x}", hash & 0xffff_ffff),
            created_ms: start_ms.min(now_ms),
            faults,
            start_ms,
            end_ms,
            number_prefix,
            next_start_ms: start_ms,
            next_index: 0,
            fragments: VecDeque::new(),
            last_producer_ms: None,
            layouts: HashMap::new(),
            media_points: Bucket::new(MEDIA_POINTS_PER_SEC, now_ms),
            metadata_points: Bucket::new(METADATA_POINTS_PER_SEC, now_ms),
            control_calls: Bucket::new(CONTROL_TPS_PER_STREAM, now_ms),
            spec,
        }
    }

    /// Data retention in milliseconds.
    pub fn retention_ms(&self) -> i64 {
        i64::from(self.spec.data_retention_hours) * 3_600_000
    }

    /// Brings the fragment list up to `now_ms`: adds fragments that have ended, drops
    /// those past retention.
    pub fn advance(&mut self, now_ms: i64) {
        let horizon = self.end_ms.map_or(now_ms, |end| end.min(now_ms));
        loop {
            let duration = self.spec.fragment_durations_ms
                [(self.next_index % self.spec.fragment_durations_ms.len() as u64) as usize];
            let mut start = self.next_start_ms;
            for gap in &self.spec.gaps {
                let gap_start = self.start_ms + gap.after.as_millis() as i64;
                let gap_end = gap_start + gap.length.as_millis() as i64;
                if start >= gap_start && start < gap_end {
                    start = gap_end;
                }
            }
            if start + i64::from(duration) > horizon {
                self.next_start_ms = start;
                break;
            }
            let layout = self.layout(duration);
            let codec_generation = self
                .spec
                .codec_changes_at
                .iter()
                .filter(|at| **at <= self.next_index)
                .count() as u32;
            self.fragments.push_back(Fragment {
                number: format!(
                    "{}{:0width$}",
                    self.number_prefix,
                    self.next_index,
                    width = COUNTER_DIGITS
                ),
                server_ms: start,
                producer_ms: self.producer_ms(start),
                duration_ms: duration,
                layout,
                codec_generation,
                missing_codec_private_data: self
                    .spec
                    .missing_codec_private_data_at
                    .contains(&self.next_index),
                invalid_frame: self.spec.invalid_frames_at.contains(&self.next_index),
            });
            self.last_producer_ms = self.fragments.back().map(|f| f.producer_ms);
            self.next_index += 1;
            self.next_start_ms = start + i64::from(duration);
        }
        let oldest_kept = now_ms - self.retention_ms();
        while self
            .fragments
            .front()
            .is_some_and(|f| f.server_ms < oldest_kept)
        {
            self.fragments.pop_front();
        }
    }

    /// The producer timestamp of the fragment ingested at `server_ms` as
    /// `next_index`: the camera's clock, a late delivery, or a repeated timestamp.
    fn producer_ms(&self, server_ms: i64) -> i64 {
        let index = self.next_index;
        if self.spec.duplicate_producer_timestamp_at.contains(&index) {
            if let Some(previous) = self.last_producer_ms {
                return previous;
            }
        }
        let late = if self.spec.late_fragments_at.contains(&index) {
            self.spec.late_by.as_millis() as i64
        } else {
            0
        };
        server_ms - self.spec.producer_offset_ms - late
    }

    fn layout(&mut self, duration_ms: u32) -> Arc<FragmentLayout> {
        let (size, interval) = (self.spec.fragment_size, self.spec.frame_interval_ms);
        self.layouts
            .entry(duration_ms)
            .or_insert_with(|| {
                Arc::new(gop().layout_at(duration_ms, size, FRAGMENT_NUMBER_DIGITS, interval))
            })
            .clone()
    }

    /// The fragment with this number, if KVS still holds it.
    pub fn by_number(&self, number: &str) -> Option<Fragment> {
        self.fragments.iter().find(|f| f.number == number).cloned()
    }

    /// Fragments whose `kind` timestamp lies in `[start_ms, end_ms]`, oldest first.
    pub fn select(&self, kind: TimestampKind, start_ms: i64, end_ms: i64) -> Vec<Fragment> {
        if kind == TimestampKind::Producer && self.producer_out_of_order() {
            // Late fragments break the order by producer time: look at every fragment.
            let mut found: Vec<Fragment> = self
                .fragments
                .iter()
                .filter(|f| f.producer_ms >= start_ms && f.producer_ms <= end_ms)
                .cloned()
                .collect();
            found.sort_by_key(|f| f.producer_ms);
            return found;
        }
        // Both timestamps grow with the ingest order here, so the deque is sorted by either.
        let (a, b) = self.fragments.as_slices();
        let lo = partition(a, b, |f| f.timestamp(kind) < start_ms);
        let hi = partition(a, b, |f| f.timestamp(kind) <= end_ms);
        self.fragments.range(lo..hi.max(lo)).cloned().collect()
    }

    fn producer_out_of_order(&self) -> bool {
        !self.spec.late_fragments_at.is_empty()
    }

    /// Server timestamp of the oldest fragment retention still keeps.
    pub fn oldest_server_ms(&self) -> Option<i64> {
        self.fragments.front().map(|f| f.server_ms)
    }
}

fn partition(a: &[Fragment], b: &[Fragment], pred: impl Fn(&Fragment) -> bool) -> usize {
    let in_a = a.partition_point(&pred);
    if in_a < a.len() {
        in_a
    } else {
        a.len() + b.partition_point(&pred)
    }
}

/// 64-bit FNV-1a: a stable hash for fragment-number prefixes and listing orders.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::GapSpec;
    use std::time::Duration;

    fn stream(spec: StreamSpec) -> StreamState {
        StreamState::new(spec, "us-east-1", "123456789012", 1_800_000_000_000)
    }

    #[test]
    fn fragment_numbers_are_47_digits_and_increase() {
        let mut spec = StreamSpec::live("cam");
        spec.backlog = Duration::from_secs(60);
        let mut s = stream(spec);
        s.advance(1_800_000_000_000);
        let all = s.select(TimestampKind::Server, 0, i64::MAX);
        assert_eq!(all.len(), 30);
        assert!(all.iter().all(|f| f.number.len() == 47));
        assert!(all.windows(2).all(|w| w[0].number < w[1].number));
    }

    #[test]
    fn gaps_leave_no_fragments_and_retention_drops_old_ones() {
        let mut spec = StreamSpec::live("cam");
        spec.backlog = Duration::from_secs(3 * 3600);
        spec.data_retention_hours = 2;
        spec.gaps = vec![GapSpec {
            after: Duration::from_secs(7200),
            length: Duration::from_secs(1200),
        }];
        let now = 1_800_000_000_000;
        let mut s = stream(spec);
        s.advance(now);
        let all = s.select(TimestampKind::Server, 0, i64::MAX);
        assert_eq!(all[0].server_ms, now - 2 * 3_600_000);
        // Two hours of retention minus the 20 minute gap, 2 s each.
        assert_eq!(all.len(), (7200 - 1200) / 2);
    }
}
