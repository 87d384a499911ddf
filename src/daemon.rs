//! `kvs-archiver run`: keeps every configured stream archived up to its lag.
//!
//! Cron firings ([`crate::schedule`]) queue a stream's name; [`run_queue`] runs one pass
//! per stream at a time (a firing for a busy stream is coalesced) under the global limit
//! of clips in flight. A pass ([`archive_stream`]) plans the closed clip windows since the
//! last pass, fetches every chunk still pending, and checks how close the oldest
//! unarchived fragment is to KVS's retention edge.

use crate::config::StreamConfig;
use crate::domain::EpochMs;
use crate::error::{Error, Result};
use crate::ledger::{RangeSummary, StreamProgress};
use crate::schedule::{Scheduler, Zone};
use crate::shutdown::Shutdown;
use crate::telemetry::Progress;
use crate::worker::{now_ms, Archiver};
use futures_util::future::BoxFuture;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

/// How often the next firings are looked at for `status`.
const FIRINGS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// Runs the daemon on a built archiver: checks the destination, takes back what a dead
/// process left, queues a first pass of every stream, then (unless `once`) follows the
/// schedules until `shutdown`. Returns whether every pass archived everything it had to
/// (a daemon stopped by a signal has done its job; `--once` reports its passes).
pub async fn run(
    archiver: Arc<Archiver>,
    once: bool,
    zone: Zone,
    shutdown: Shutdown,
) -> Result<bool> {
    archiver
        .destination
        .check(
            &archiver.config.destination.prefix,
            false,
            &archiver.config.required_of_bucket(),
        )
        .await?;
    archiver.recover().await?;
    let streams: HashMap<String, StreamConfig> = archiver
        .config
        .streams
        .iter()
        .map(|s| (s.label(), s.clone()))
        .collect();
    let (tx, rx) = mpsc::channel(streams.len() * 2 + 1);
    // Every stream gets a pass at once: a first start backfills the whole retention.
    for label in archiver.config.streams.iter().map(StreamConfig::label) {
        let _ = tx.try_send(label);
    }
    let firings = if once {
        drop(tx);
        None
    } else {
        let scheduler = start_schedules(&archiver, zone, tx, &shutdown).await?;
        let streams = streams.values().cloned().collect();
        Some(tokio::spawn(record_next_firings(
            archiver.clone(),
            scheduler,
            streams,
            shutdown.clone(),
        )))
    };
    let streams = Arc::new(streams);
    let pass_archiver = archiver.clone();
    let pass_shutdown = shutdown.clone();
    let outcomes = run_queue(
        rx,
        move |label: String| {
            let stream = streams.get(&label).cloned();
            Box::pin(scheduled_pass(
                pass_archiver.clone(),
                label,
                stream,
                pass_shutdown.clone(),
            ))
        },
        &shutdown,
    )
    .await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    shutdown.soft.cancel();
    if let Some(task) = firings {
        let _ = task.await;
    }
    archiver.close().await;
    Ok(!once
        || !outcomes
            .iter()
            .any(|(_, o)| !matches!(o, Err(Error::Interrupted)) && pass_failed(o)))
}

/// Starts every stream's cron schedule (firings queue its name on `queue`), tells systemd
/// the daemon is ready, and pings its watchdog until the hard stop.
async fn start_schedules(
    archiver: &Archiver,
    zone: Zone,
    queue: mpsc::Sender<String>,
    shutdown: &Shutdown,
) -> Result<Scheduler> {
    let default_schedule = &archiver.config.daemon.schedule;
    let pairs: Vec<(String, String)> = archiver
        .config
        .streams
        .iter()
        .map(|s| {
            let schedule = s.schedule.as_ref().unwrap_or(default_schedule);
            (s.label(), schedule.clone())
        })
        .collect();
    let scheduler = Scheduler::start(&pairs, zone, queue).await?;
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("archiving {} streams", pairs.len())),
    ]);
    if let Some(interval) = sd_notify::watchdog_enabled() {
        let stop = shutdown.hard.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval / 2);
            loop {
                tokio::select! {
                    _ = tick.tick() => { let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]); }
                    _ = stop.cancelled() => return,
                }
            }
        });
    }
    tracing::info!(streams = pairs.len(), "daemon started");
    Ok(scheduler)
}

/// Writes each stream's next firing to the ledger (for `status`) until the soft stop,
/// then stops the scheduler. Written only when it changes (after a firing): rewriting
/// every stream's row every 5 s was most of an idle daemon's CPU with a thousand streams.
async fn record_next_firings(
    archiver: Arc<Archiver>,
    mut scheduler: Scheduler,
    streams: Vec<StreamConfig>,
    shutdown: Shutdown,
) {
    let mut written: HashMap<String, EpochMs> = HashMap::new();
    loop {
        for s in &streams {
            let label = s.label();
            let Some(next) = scheduler.next_firing(&label).await else {
                continue;
            };
            if written.get(&label) == Some(&next) {
                continue;
            }
            let update = StreamProgress {
                next_run_ms: Some(next),
                ..Default::default()
            };
            if archiver
                .ledger
                .update_progress(&label, s.timestamp_source, &update)
                .await
                .is_ok()
            {
                written.insert(label, next);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(FIRINGS_REFRESH) => {}
            _ = shutdown.soft.cancelled() => break,
        }
    }
    scheduler.stop().await;
}

/// One queued pass over `label`, within `daemon.pass_timeout`, logged; the stream is
/// given back afterwards so any live daemon may take it at its next firing.
async fn scheduled_pass(
    archiver: Arc<Archiver>,
    label: String,
    stream: Option<StreamConfig>,
    shutdown: Shutdown,
) -> Result<PassReport> {
    let stream = stream.ok_or_else(|| Error::Usage(format!("unknown stream {label}")))?;
    let limit = archiver.config.daemon.pass_timeout;
    let pass = archive_stream(archiver.clone(), stream.clone(), shutdown);
    let outcome = match tokio::time::timeout(limit, pass).await {
        Ok(outcome) => outcome,
        // The pass's workers were dropped: their chunks are no longer active here, so
        // the next pass takes them back and aborts their uploads.
        Err(_) => Err(Error::PassTimeout {
            stream: label.clone(),
            limit: humantime::format_duration(limit).to_string(),
        }),
    };
    match &outcome {
        Ok(report) => tracing::info!(
            stream = %label,
            archived = report.summary.done,
            failed = report.summary.failed.len(),
            expired = report.summary.expired.len() as u64 + report.expired_fragments,
            at_risk = report.at_risk,
            "pass finished"
        ),
        Err(Error::Interrupted) => tracing::info!(stream = %label, "pass stopped by shutdown"),
        Err(error) => tracing::error!(stream = %label, %error, "pass failed"),
    }
    // A pass that timed out or failed gives the stream back too.
    if !matches!(&outcome, Ok(report) if report.skipped.is_some()) {
        archiver.release_stream(&stream).await;
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&format!(
        "last pass: {label}"
    ))]);
    outcome
}

/// What one pass over one stream did.
#[derive(Debug, Default)]
pub struct PassReport {
    /// The range's chunks by state after the pass.
    pub summary: RangeSummary,
    /// Fragments KVS deleted before they were archived, found in this pass.
    pub expired_fragments: u64,
    /// The oldest unarchived fragment is within `daemon.retention_alarm` of being deleted.
    pub at_risk: bool,
    /// The pass did not run: another process works the stream, or this daemon already
    /// works its share of the streams.
    pub skipped: Option<String>,
}

/// Runs queued passes: one at a time per stream, firings for a busy stream coalesced.
/// Returns when the queue is closed and drained, or at shutdown after passes in flight
/// end. The outcome of every pass is returned, in completion order.
pub async fn run_queue<F>(
    mut queue: mpsc::Receiver<String>,
    pass: F,
    shutdown: &Shutdown,
) -> Vec<(String, Result<PassReport>)>
where
    F: Fn(String) -> BoxFuture<'static, Result<PassReport>>,
{
    let mut busy: HashSet<String> = HashSet::new();
    let mut running: JoinSet<(String, Result<PassReport>)> = JoinSet::new();
    let mut outcomes = Vec::new();
    let mut open = true;
    loop {
        tokio::select! {
            next = queue.recv(), if open && !shutdown.soft.is_cancelled() => match next {
                // The shutdown began while this select was waiting: take nothing new.
                Some(_) if shutdown.soft.is_cancelled() => open = false,
                Some(stream) if busy.contains(&stream) => {
                    tracing::info!(stream = %stream, "firing coalesced: the previous pass is still running");
                    crate::metrics::coalesced_firing(&stream);
                }
                Some(stream) => {
                    busy.insert(stream.clone());
                    let work = pass(stream.clone());
                    running.spawn(async move { (stream, work.await) });
                }
                None => open = false,
            },
            done = running.join_next(), if !running.is_empty() => {
                if let Some(Ok((stream, outcome))) = done {
                    busy.remove(&stream);
                    outcomes.push((stream, outcome));
                }
            },
            _ = shutdown.soft.cancelled(), if open => open = false,
            else => return outcomes,
        }
        if !open && running.is_empty() {
            return outcomes;
        }
    }
}

/// Whether this process may work `stream` now, and takes its lease if so. One process
/// works a stream at a time (KVS's per-stream quotas hold across instances). Each
/// stream is assigned to one live daemon by rendezvous hashing of the stream's name
/// with the live instance ids: every stream has exactly one daemon, each daemon gets an
/// even share on average, and when a daemon comes or goes only its streams move (a new
/// one gets its streams at its next firing, a dead one's move once its heartbeat is a
/// lease old). `None`: take it; else why not.
pub async fn take_stream(
    archiver: &Archiver,
    stream: &StreamConfig,
    shutdown: &Shutdown,
) -> Result<Option<String>> {
    let ledger = &archiver.ledger;
    let me = ledger.identity().clone();
    if me.role != crate::ledger::Role::Daemon {
        // A one-shot pass waits for a stream another process holds, so that its exit
        // status says whether the stream is archived.
        archiver.hold_stream(stream, true, shutdown).await?;
        return Ok(None);
    }
    let alive_since = now_ms() - archiver.lease_ms();
    let daemons: HashSet<String> = ledger
        .instances()
        .await?
        .into_iter()
        .filter(|i| i.role == "daemon" && i.last_seen_ms >= alive_since)
        .map(|i| i.instance)
        .chain(std::iter::once(me.instance.clone()))
        .collect();
    let label = stream.label();
    let assigned = daemons
        .iter()
        .max_by_key(|instance| (rendezvous(instance, &label), instance.as_str()))
        .map_or(me.instance.as_str(), String::as_str);
    if assigned != me.instance {
        return Ok(Some(format!(
            "assigned to instance {assigned} ({} daemons alive)",
            daemons.len()
        )));
    }
    // A stream still held by another process's pass (it was assigned there a moment
    // ago) is left to it.
    Ok(archiver
        .hold_stream(stream, false, shutdown)
        .await?
        .map(|holder| {
            format!(
                "held by instance {} ({}, {})",
                holder.instance, holder.role, holder.owner
            )
        }))
}

/// The weight of `instance` for `stream` in rendezvous hashing: FNV-1a 64 over both
/// names, stable across builds and hosts (every daemon computes the same assignment).
fn rendezvous(instance: &str, stream: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in instance.bytes().chain([0]).chain(stream.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly on short keys: finish with a 64-bit avalanche.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// How long a stream's retention, read with DescribeStream, is taken as current: an
/// operator's change of it reaches the pass window and the at-risk alarm within this.
const DESCRIBE_EVERY: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// One pass over one stream: archive everything from KVS's retention edge (or the
/// stream's `retention_window`) to the last clip window closed `lag` ago.
pub async fn archive_stream(
    archiver: Arc<Archiver>,
    stream: StreamConfig,
    shutdown: Shutdown,
) -> Result<PassReport> {
    let label = stream.label();
    if let Some(why) = take_stream(&archiver, &stream, &shutdown).await? {
        tracing::info!(stream = %label, why = %why, "pass skipped");
        return Ok(PassReport {
            skipped: Some(why),
            ..PassReport::default()
        });
    }
    let retention_hours = archiver
        .source
        .retention_hours_within(&stream, DESCRIBE_EVERY)
        .await?;
    // Dead claims are taken back every pass; unrecorded uploads are swept now and then.
    archiver.recover().await?;
    let window = PassWindow::of(&archiver, &stream, retention_hours, now_ms())?;
    plan_new_windows(&archiver, &stream, &window).await?;
    // Chunks other processes hold are theirs to finish: the pass ends in bounded time.
    let fetched = archiver
        .fetch_pending(
            &stream,
            window.start,
            window.end,
            &Progress::hidden(),
            &shutdown,
            false,
        )
        .await;
    let (summary, error) = match fetched {
        Ok(summary) => (summary, None),
        Err(e) => (RangeSummary::default(), Some(e)),
    };
    let mut report = PassReport {
        expired_fragments: summary
            .expired
            .iter()
            .map(|c| u64::from(c.plan.fragment_count))
            .sum(),
        summary,
        ..PassReport::default()
    };
    report.at_risk = record_health(&archiver, &stream, window.retention_ms, error.as_ref()).await?;
    match error {
        Some(e) => Err(e),
        None => Ok(report),
    }
}

/// The span of time one pass archives, in epoch milliseconds.
struct PassWindow {
    /// How long KVS keeps the stream's fragments (its DataRetentionInHours).
    retention_ms: i64,
    /// The oldest time archived: KVS's retention edge, or the stream's
    /// `retention_window` if that is shorter.
    start: EpochMs,
    /// The last millisecond of the last clip window closed `lag` before `now`.
    end: EpochMs,
}

impl PassWindow {
    fn of(
        archiver: &Archiver,
        stream: &StreamConfig,
        retention_hours: u32,
        now: EpochMs,
    ) -> Result<Self> {
        let config = &archiver.config;
        // KVS's retention says what is deleted when; the window says how far back to archive.
        let retention_ms = i64::from(retention_hours) * 3_600_000;
        let window_ms = stream
            .retention_window
            .map_or(retention_ms, |w| (w.as_millis() as i64).min(retention_ms));
        if retention_ms == 0 {
            return Err(Error::Usage(format!(
                "stream {} keeps no media (DataRetentionInHours is 0): nothing to archive",
                stream.label()
            )));
        }
        let lag = stream.lag.unwrap_or(config.daemon.lag).as_millis() as i64;
        let clip = config.archive.clip_duration.as_millis() as i64;
        Ok(Self {
            retention_ms,
            start: now - window_ms,
            // Only closed clip windows: objects match a backfill's, and no tiny tails.
            end: (now - lag).div_euclid(clip) * clip - 1,
        })
    }
}

/// Plans the clip windows closed since the last pass, and records how far the stream is
/// planned.
async fn plan_new_windows(
    archiver: &Archiver,
    stream: &StreamConfig,
    window: &PassWindow,
) -> Result<()> {
    let label = stream.label();
    let source = stream.timestamp_source;
    let progress = archiver.ledger.progress(&label, source).await?;
    // Each pass lists its settle window again: fragments that reached KVS after their
    // time was planned (producer timestamps, delayed uploads) are archived too.
    let settle = archiver.config.settle(stream).as_millis() as i64;
    let plan_from = progress.planned_through_ms.map_or(window.start, |through| {
        (through + 1 - settle).max(window.start)
    });
    if plan_from > window.end {
        return Ok(());
    }
    let plan = archiver
        .plan_range(stream, plan_from, window.end, false, &Progress::hidden())
        .await?;
    tracing::info!(stream = %label, new_chunks = plan.chunks.len(), fragments = plan.fragments, late = plan.late, "planned");
    archiver
        .ledger
        .update_progress(
            &label,
            source,
            &StreamProgress {
                planned_through_ms: Some(window.end),
                retention_ms: Some(window.retention_ms),
                ..StreamProgress::default()
            },
        )
        .await
}

/// After a pass: publishes the stream's health (how far behind it is, how long until KVS
/// deletes the oldest unarchived fragment) and records the pass in the ledger. Returns
/// whether data is at risk.
async fn record_health(
    archiver: &Archiver,
    stream: &StreamConfig,
    retention_ms: i64,
    error: Option<&Error>,
) -> Result<bool> {
    let label = stream.label();
    let source = stream.timestamp_source;
    // Data at risk: how long until KVS deletes the oldest fragment not yet archived.
    let now = now_ms();
    let oldest = archiver.ledger.oldest_unarchived(&label, source).await?;
    let expiry_secs = oldest.map(|start| (start + retention_ms - now) as f64 / 1000.0);
    let alarm = archiver.config.daemon.retention_alarm.as_secs_f64();
    let at_risk = expiry_secs.is_some_and(|left| left < alarm);
    if at_risk {
        tracing::error!(
            stream = %label,
            seconds_left = expiry_secs.unwrap_or_default(),
            "data at risk: the oldest unarchived fragment is close to KVS's retention edge"
        );
    }
    let through = archiver.ledger.archived_through(&label).await?;
    let lag_secs = through.map(|t| (now - t) as f64 / 1000.0);
    crate::metrics::stream_health(&label, lag_secs, expiry_secs, at_risk);
    crate::metrics::chunks_by_state(&label, &archiver.ledger.counts(&label).await?);
    archiver
        .ledger
        .update_progress(
            &label,
            source,
            &StreamProgress {
                retention_ms: Some(retention_ms),
                last_run_ms: Some(now),
                last_run_error: error.map(ToString::to_string),
                ..StreamProgress::default()
            },
        )
        .await?;
    Ok(at_risk)
}

/// Whether a pass left work undone (failed or expired chunks).
pub fn pass_failed(outcome: &Result<PassReport>) -> bool {
    match outcome {
        Ok(report) => !report.summary.failed.is_empty() || !report.summary.expired.is_empty(),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_spreads_streams_evenly_and_moves_only_a_dead_daemons_streams() {
        let streams: Vec<String> = (0..300).map(|i| format!("cam-{i:03}")).collect();
        let assign = |daemons: &[&str]| -> Vec<String> {
            streams
                .iter()
                .map(|s| {
                    daemons
                        .iter()
                        .max_by_key(|d| (rendezvous(d, s), **d))
                        .map(|d| d.to_string())
                        .unwrap_or_default()
                })
                .collect()
        };
        let three = assign(&["fleet-a", "fleet-b", "fleet-c"]);
        for d in ["fleet-a", "fleet-b", "fleet-c"] {
            let n = three.iter().filter(|a| *a == d).count();
            assert!((70..=130).contains(&n), "{d} gets {n} of 300");
        }
        let two = assign(&["fleet-a", "fleet-c"]);
        for (before, after) in three.iter().zip(&two) {
            if before != "fleet-b" {
                assert_eq!(before, after, "only fleet-b's streams move");
            }
        }
    }
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn firings_for_a_busy_stream_are_coalesced_and_streams_run_side_by_side() {
        let (tx, rx) = mpsc::channel(16);
        let started = Arc::new(AtomicUsize::new(0));
        let counter = started.clone();
        let pass = move |_stream: String| -> BoxFuture<'static, Result<PassReport>> {
            let counter = counter.clone();
            Box::pin(async move {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(PassReport::default())
            })
        };
        let shutdown = Shutdown::new();
        let runner = tokio::spawn(async move { run_queue(rx, pass, &shutdown).await });
        for _ in 0..3 {
            tx.send("a".to_string()).await.expect("queued");
        }
        tx.send("b".to_string()).await.expect("queued");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            started.load(Ordering::SeqCst),
            2,
            "one pass for a, one for b"
        );
        tokio::time::sleep(Duration::from_secs(10)).await;
        tx.send("a".to_string()).await.expect("queued");
        drop(tx);
        let outcomes = runner.await.expect("runner ends");
        assert_eq!(started.load(Ordering::SeqCst), 3, "a runs again once free");
        assert_eq!(outcomes.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_taking_firings_and_waits_for_passes_in_flight() {
        let (tx, rx) = mpsc::channel(16);
        let pass = |_stream: String| -> BoxFuture<'static, Result<PassReport>> {
            Box::pin(async {
                tokio::time::sleep(Duration::from_secs(5)).await;
                Ok(PassReport::default())
            })
        };
        let shutdown = Shutdown::new();
        let stopper = shutdown.clone();
        let runner = tokio::spawn(async move { run_queue(rx, pass, &stopper).await });
        tx.send("a".to_string()).await.expect("queued");
        tokio::time::sleep(Duration::from_secs(1)).await;
        shutdown.soft.cancel();
        let _ = tx.send("b".to_string()).await;
        let started = tokio::time::Instant::now();
        let outcomes = runner.await.expect("runner ends");
        assert_eq!(outcomes.len(), 1, "b was not started after the shutdown");
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "a finished first"
        );
    }
}
