//! `status` drawn for a terminal: what the ledger says of each stream and of each process
//! working on it. Pure: the ledger's answers and `now` in, text out.

use crate::domain::{rfc3339, EpochMs};
use crate::ledger::{InstanceView, StreamStatus};
use std::fmt::Write;
use std::time::Duration;

/// What `status` prints, for the streams and instances the ledger reported at `now`.
/// `retention_alarm`: how close to KVS's deletion the oldest unarchived fragment is "at
/// risk"; `lease`: how long since its last heartbeat an instance still counts as alive.
pub fn describe(
    streams: &[StreamStatus],
    instances: &[InstanceView],
    now: EpochMs,
    retention_alarm: Duration,
    lease: Duration,
) -> String {
    let mut text = String::new();
    if streams.is_empty() {
        text.push_str("nothing archived yet\n");
    }
    for stream in streams {
        describe_stream(&mut text, stream, now, retention_alarm);
    }
    if !instances.is_empty() {
        text.push_str("instances:\n");
        for instance in instances {
            describe_instance(&mut text, instance, now, lease);
        }
    }
    text
}

fn describe_stream(text: &mut String, s: &StreamStatus, now: EpochMs, retention_alarm: Duration) {
    // Writing to a String cannot fail.
    let _ = writeln!(
        text,
        "{}: {} chunks archived ({} fragments, {:.1} MB) through {}, {} pending, {} in flight, {} failed, {} expired",
        s.stream,
        s.done,
        s.archived_fragments,
        s.archived_bytes as f64 / 1e6,
        s.archived_through_ms.map(rfc3339).unwrap_or_else(|| "-".into()),
        s.pending,
        s.in_flight,
        s.failed,
        s.expired
    );
    describe_daemon_view(text, s, now, retention_alarm);
    if s.late_fragments > 0 {
        let _ = writeln!(
            text,
            "  {} fragments archived late (listed after their range), {} of them as Matroska",
            s.late_fragments, s.mkv_fragments
        );
    }
    for f in &s.failures {
        let next = f
            .next_attempt_ms
            .map(|t| format!(" (next try {})", rfc3339(t)))
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "  failed {} [{}] after {} attempts: {}{next}",
            f.object_key, f.kind, f.attempts, f.reason
        );
    }
    if let Some(error) = &s.last_run_error {
        let _ = writeln!(text, "  last run error: {error}");
    }
    describe_holders(text, s);
}

/// The daemon's view of a stream: lag, next firing, and how soon KVS deletes the oldest
/// fragment not archived yet.
fn describe_daemon_view(
    text: &mut String,
    s: &StreamStatus,
    now: EpochMs,
    retention_alarm: Duration,
) {
    if let Some(through) = s.archived_through_ms {
        let _ = write!(text, "  lag {:.0} s", (now - through) as f64 / 1000.0);
    }
    if let Some(next) = s.next_run_ms {
        let _ = write!(text, ", next run {}", rfc3339(next));
    }
    if let (Some(oldest), Some(retention)) = (s.oldest_unarchived_ms, s.retention_ms) {
        let left = (oldest + retention - now) as f64 / 1000.0;
        let at_risk = left < retention_alarm.as_secs_f64();
        let _ = write!(
            text,
            ", oldest unarchived expires in {left:.0} s{}",
            if at_risk { " (AT RISK)" } else { "" }
        );
    }
    text.push('\n');
}

/// Who archived a stream's chunks, who works it now, and who holds its chunks in flight.
fn describe_holders(text: &mut String, s: &StreamStatus) {
    if !s.archived_by_instance.is_empty() {
        let by: Vec<String> = s
            .archived_by_instance
            .iter()
            .map(|(instance, n)| format!("{instance} {n}"))
            .collect();
        let _ = writeln!(text, "  chunks archived per instance: {}", by.join(", "));
    }
    if let Some(holder) = &s.held_by {
        let _ = writeln!(
            text,
            "  worked by instance {} ({}, {}) since {}",
            holder.instance,
            holder.role,
            holder.owner,
            rfc3339(holder.acquired_ms)
        );
    }
    for chunk in &s.in_flight_chunks {
        let lease = chunk
            .lease_until_ms
            .map(|t| format!(", lease until {}", rfc3339(t)))
            .unwrap_or_default();
        let _ = writeln!(
            text,
            "  {} {} held by instance {} ({}){lease}",
            chunk.state, chunk.object_key, chunk.instance, chunk.owner
        );
    }
}

fn describe_instance(text: &mut String, i: &InstanceView, now: EpochMs, lease: Duration) {
    let ago = (now - i.last_seen_ms).max(0) as f64 / 1000.0;
    let alive = ago * 1000.0 <= lease.as_millis() as f64;
    let _ = writeln!(
        text,
        "  {} ({}) {} on {} pid {}: last seen {} ({ago:.0} s ago){}",
        i.instance,
        i.role,
        i.owner,
        i.host,
        i.pid,
        rfc3339(i.last_seen_ms),
        if alive { "" } else { ", not alive" }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_at_risk_says_so_and_an_empty_ledger_says_nothing_is_archived() {
        let hour = Duration::from_secs(3600);
        assert_eq!(describe(&[], &[], 0, hour, hour), "nothing archived yet\n");
        let stream = StreamStatus {
            stream: "cam".into(),
            done: 2,
            archived_through_ms: Some(1_000_000),
            oldest_unarchived_ms: Some(0),
            retention_ms: Some(1_800_000),
            ..StreamStatus::default()
        };
        let text = describe(&[stream], &[], 1_060_000, hour, hour);
        assert!(text.starts_with("cam: 2 chunks archived"), "{text}");
        assert!(text.contains("lag 60 s"), "{text}");
        assert!(text.contains("expires in 740 s (AT RISK)"), "{text}");
    }
}
