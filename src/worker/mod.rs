//! The archiver: plans a range into chunks ([`planning`]), then claims each chunk and
//! moves its media from KVS to the destination ([`transfer`]), recording every outcome in
//! the ledger under the chunk's lease.
//!
//! Policy lives here, SQL in the ledger: which failure is retried now, which waits for a
//! later pass (every failure does, with a backoff stored in the ledger), and what a lost
//! lease means (stop, record nothing).

pub mod planning;
pub mod transfer;

use crate::config::{Config, StreamConfig};
use crate::destination::Destination;
use crate::domain::{object_key, ChunkPlan, EpochMs};
use crate::error::{Error, Result};
use crate::ledger::{Chunk, Failure, Lease, Ledger, RangeSummary, StreamClaim, StreamHolder};
use crate::retry::RetryPolicy;
use crate::shutdown::Shutdown;
use crate::source::kvs::KvsSource;
use crate::telemetry::Progress;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Semaphore;
use transfer::Transferred;

pub use planning::PlanSummary;

/// How often to look again when another process holds chunks of our range.
const FOREIGN_WAIT: Duration = Duration::from_secs(2);
/// The first pause before a later pass retries a chunk that failed; it doubles with each
/// claim of the chunk up to [`PASS_RETRY_MAX`], so a chunk that cannot succeed yet costs a
/// few requests an hour, and one that can heals within the hour.
const PASS_RETRY_FIRST: Duration = Duration::from_secs(15);
const PASS_RETRY_MAX: Duration = Duration::from_secs(3600);
/// A store that forgets an upload (NoSuchUpload) gets this many fresh starts per claim.
const UPLOAD_RESTARTS: u32 = 3;

impl RangeSummary {
    /// Every chunk of the range is archived.
    pub fn complete(&self) -> bool {
        self.failed.is_empty()
            && self.expired.is_empty()
            && self.pending == 0
            && self.in_flight == 0
    }
}

/// The archiving core: plans ranges into the ledger and moves claimed chunks from KVS to
/// the destination.
pub struct Archiver {
    /// Where media comes from.
    pub source: Arc<KvsSource>,
    /// Where objects go.
    pub destination: Arc<Destination>,
    /// The record of every chunk: claims, outcomes and fencing.
    pub ledger: Arc<dyn Ledger>,
    /// The settings the worker follows (caps, retries, streams).
    pub config: Arc<Config>,
    /// How an operation within one attempt is retried.
    pub policy: RetryPolicy,
    /// Clips in flight across all streams (the daemon's global limit); `None`: no limit
    /// beyond `archive.concurrency` per range.
    pub in_flight: Option<Arc<Semaphore>>,
    /// Chunks this process's workers hold now: an in-flight chunk of ours that is not here
    /// was left behind by a worker that returned early, and is taken back.
    pub active: Arc<Mutex<HashSet<i64>>>,
    /// When the sweep of unrecorded uploads last ran: the daemon sweeps every
    /// [`SWEEP_INTERVAL`], not every pass.
    last_sweep: Mutex<Option<std::time::Instant>>,
    /// Claiming (read) and taking back dead claims (write) exclude each other, so that
    /// a recovery never sees a claim of ours before its worker is in `active`.
    claiming: tokio::sync::RwLock<()>,
    /// Ends the heartbeat when the archiver is dropped.
    heartbeat: Mutex<Option<tokio_util::sync::DropGuard>>,
    /// Keys whose object this process may replace, create-only writes notwithstanding:
    /// a chunk `verify --repair` planned again (its object damaged, under a key the
    /// ledger recorded), or one whose earlier claim stored an older copy of it.
    replaceable: Mutex<HashSet<String>>,
    /// When the heartbeat last got through again after failing (epoch ms): for one lease
    /// after, other processes' lapsed claims are left alone, since they too may only have
    /// lost the database for a while.
    ledger_back_at: Arc<std::sync::atomic::AtomicI64>,
}

/// How often a long-running process looks for unrecorded partial uploads.
const SWEEP_INTERVAL: Duration = Duration::from_secs(15 * 60);

/// Removes a chunk from [`Archiver::active`] however its worker returns.
struct ActiveClaim {
    active: Arc<Mutex<HashSet<i64>>>,
    chunk: i64,
}

impl Drop for ActiveClaim {
    fn drop(&mut self) {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.chunk);
    }
}

pub(crate) fn now_ms() -> EpochMs {
    chrono::Utc::now().timestamp_millis()
}

/// How a claimed chunk ended for this process.
enum ChunkOutcome {
    Done,
    /// Replaced by other chunks, turned into Matroska, or expired: look at the range again.
    Changed,
    /// Held elsewhere, finished, or not due.
    Skipped,
}

/// When a later pass may try a chunk that has been claimed `attempts` times.
pub fn next_pass_attempt(now: EpochMs, attempts: u32) -> EpochMs {
    let factor = 1u32 << attempts.saturating_sub(1).min(10);
    now + PASS_RETRY_FIRST
        .saturating_mul(factor)
        .min(PASS_RETRY_MAX)
        .as_millis() as i64
}

impl Archiver {
    /// A worker with no limit on clips in flight (the daemon sets `in_flight`).
    pub fn new(
        source: Arc<KvsSource>,
        destination: Arc<Destination>,
        ledger: Arc<dyn Ledger>,
        config: Arc<Config>,
        policy: RetryPolicy,
    ) -> Archiver {
        Archiver {
            source,
            destination,
            ledger,
            config,
            policy,
            in_flight: None,
            active: Arc::new(Mutex::new(HashSet::new())),
            last_sweep: Mutex::new(None),
            claiming: tokio::sync::RwLock::new(()),
            heartbeat: Mutex::new(None),
            replaceable: Mutex::new(HashSet::new()),
            ledger_back_at: Arc::new(std::sync::atomic::AtomicI64::new(0)),
        }
    }

    /// How long a claim holds without a heartbeat (`ledger.lease`).
    pub fn lease(&self) -> Duration {
        self.config.ledger.lease
    }

    pub(crate) fn lease_ms(&self) -> i64 {
        self.lease().as_millis() as i64
    }

    /// How often this process tells the ledger it is alive, and a streaming clip checks
    /// its lease.
    pub(crate) fn renewal_interval(&self) -> Duration {
        self.lease() / 3
    }

    /// Registers this process with the ledger (a daemon waits, up to two leases, for a
    /// dead predecessor under the same instance id to lapse) and starts its heartbeat,
    /// which renews the registration, the stream leases and the leases of the chunks its
    /// workers hold, until the archiver is dropped.
    pub async fn register(&self) -> Result<()> {
        let identity = self.ledger.identity().clone();
        let waited_since = std::time::Instant::now();
        let mut told = false;
        loop {
            match self.ledger.register(now_ms(), self.lease_ms()).await? {
                crate::ledger::Registration::Registered => break,
                crate::ledger::Registration::InstanceInUse(other) => {
                    if waited_since.elapsed() > self.lease() * 2 {
                        return Err(Error::Usage(format!(
                            "instance id {:?} is in use by a running daemon ({} on {}, pid {}, seen {} ago): give each daemon its own ledger.instance_id",
                            identity.instance,
                            other.owner,
                            other.host,
                            other.pid,
                            humantime::format_duration(Duration::from_secs(((now_ms() - other.last_seen_ms).max(0) / 1000) as u64)),
                        )));
                    }
                    if !told {
                        tracing::warn!(instance = %identity.instance, other = %other.owner, "another daemon was running under this instance id moments ago; waiting for its lease to lapse");
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        let stop = tokio_util::sync::CancellationToken::new();
        let ledger = self.ledger.clone();
        let active = self.active.clone();
        let (lease_ms, every) = (self.lease_ms(), self.renewal_interval());
        let token = stop.clone();
        let back_at = self.ledger_back_at.clone();
        tokio::spawn(async move {
            let mut failing = false;
            loop {
                // While the ledger does not answer, try every second: the leases lapse
                // one lease after the last heartbeat that got through.
                let pause = if failing {
                    Duration::from_secs(1)
                } else {
                    every
                };
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = token.cancelled() => return,
                }
                let ids: Vec<i64> = active
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .iter()
                    .copied()
                    .collect();
                match ledger.heartbeat(now_ms(), lease_ms, &ids).await {
                    Ok(()) if failing => {
                        failing = false;
                        back_at.store(now_ms(), std::sync::atomic::Ordering::Relaxed);
                        tracing::info!("ledger reachable again: heartbeat renewed");
                    }
                    Ok(()) => {}
                    Err(error) if !failing => {
                        failing = true;
                        tracing::error!(%error, "heartbeat failed: this instance's leases lapse unless the ledger answers again soon");
                    }
                    Err(_) => {}
                }
            }
        });
        *self.heartbeat.lock().unwrap_or_else(|p| p.into_inner()) = Some(stop.drop_guard());
        Ok(())
    }

    /// The archive as its readers see it: the ledger, the destination, the settings.
    pub fn view(&self) -> crate::archive::ArchiveView {
        crate::archive::ArchiveView {
            ledger: self.ledger.clone(),
            destination: self.destination.clone(),
            config: self.config.clone(),
        }
    }

    /// A clean stop: ends the heartbeat, gives back stream leases, closes the ledger.
    pub async fn close(&self) {
        self.heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if self.ledger.identity().role != crate::ledger::Role::Reader {
            if let Err(error) = self.ledger.unregister().await {
                tracing::warn!(%error, "could not unregister from the ledger; the registration lapses by itself");
            }
        }
        self.ledger.close().await;
    }

    /// Takes the stream's lease: one process works a stream at a time, so KVS's
    /// per-stream quotas hold across processes. With `wait`, waits while another live
    /// process holds it; without, returns who holds it.
    pub async fn hold_stream(
        &self,
        stream: &StreamConfig,
        wait: bool,
        shutdown: &Shutdown,
    ) -> Result<Option<StreamHolder>> {
        let mut told = false;
        loop {
            let claim = self
                .ledger
                .acquire_stream(
                    &stream.label(),
                    stream.timestamp_source,
                    now_ms(),
                    self.lease_ms(),
                )
                .await?;
            match claim {
                StreamClaim::Acquired => return Ok(None),
                StreamClaim::HeldBy(holder) if !wait => return Ok(Some(holder)),
                StreamClaim::HeldBy(holder) => {
                    if !told {
                        tracing::warn!(stream = %stream.label(), instance = %holder.instance, role = %holder.role, owner = %holder.owner, "another process is archiving this stream; waiting until it is done (KVS's per-stream quota is shared)");
                        told = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(FOREIGN_WAIT) => {}
                        _ = shutdown.soft.cancelled() => return Err(Error::Interrupted),
                    }
                }
            }
        }
    }

    /// Gives the stream's lease back; a failure is logged, as the lease lapses by itself.
    pub async fn release_stream(&self, stream: &StreamConfig) {
        if let Err(error) = self
            .ledger
            .release_stream(&stream.label(), stream.timestamp_source)
            .await
        {
            tracing::warn!(stream = %stream.label(), %error, "could not release the stream's lease; it lapses by itself");
        }
    }

    /// Runs a ledger write again while the database is unreachable (a restart, a
    /// fail-over), for up to one lease: finished work is not thrown away for a blip.
    /// Fencing keeps a late write from landing once another process took the chunk.
    pub(crate) async fn ledger_write<T, F, Fut>(&self, what: &str, mut write: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let deadline = std::time::Instant::now() + self.lease();
        let mut delay = Duration::from_millis(500);
        loop {
            match write().await {
                Err(error)
                    if matches!(error, Error::Ledger { .. })
                        && error.retryability() != crate::error::Retryability::Permanent
                        && std::time::Instant::now() < deadline =>
                {
                    tracing::warn!(%error, what, "ledger unreachable; trying again");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                other => return other,
            }
        }
    }

    /// Lets this process replace the object at `key` (see `replaceable`).
    pub fn allow_replacing(&self, key: &str) {
        self.replaceable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_string());
    }

    /// Whether the object at `key` may be replaced (see `replaceable`).
    pub(crate) fn may_replace(&self, key: &str) -> bool {
        self.replaceable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(key)
    }

    /// What S3 stores with the objects of the stream labelled `label`.
    pub(crate) fn object_settings(&self, label: &str) -> crate::storage::StreamSettings {
        match self.config.stream(label) {
            Some(stream) => self.config.object_settings(stream),
            None => self.config.object_settings(&StreamConfig::named(label)),
        }
    }

    pub(crate) fn key(&self, stream: &StreamConfig, plan: &ChunkPlan) -> String {
        object_key(&self.config.destination.prefix, &stream.label(), plan)
    }

    fn active_ids(&self) -> Vec<i64> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Takes back chunks whose claim is dead (a killed process, an expired lease, a
    /// worker of ours that returned early): aborts the upload each recorded and makes it
    /// pending again. Never touches a chunk under a live lease.
    pub async fn recover_abandoned(&self) -> Result<usize> {
        let back_at = self
            .ledger_back_at
            .load(std::sync::atomic::Ordering::Relaxed);
        if now_ms() - back_at < self.lease_ms() {
            tracing::debug!(
                "the ledger was away moments ago: lapsed claims get one lease to be renewed first"
            );
            return Ok(0);
        }
        let _exclusive = self.claiming.write().await;
        let abandoned = self.ledger.abandoned(now_ms(), &self.active_ids()).await?;
        let mut recovered = 0;
        for chunk in &abandoned {
            let Some(lease) = self
                .ledger
                .take_over(chunk, now_ms(), self.lease_ms())
                .await?
            else {
                continue;
            };
            if let Some(upload_id) = &chunk.upload_id {
                self.destination
                    .abort_abandoned(&chunk.object_key, upload_id)
                    .await?;
            }
            self.destination.abort_uploads_of(&chunk.object_key).await?;
            self.ledger.release(&lease).await?;
            recovered += 1;
            tracing::info!(key = %chunk.object_key, owner = chunk.owner.as_deref().unwrap_or("none"), "took back a chunk a stopped worker left in {}", chunk.state);
        }
        Ok(recovered)
    }

    /// At start: takes back abandoned chunks, then removes uploads no ledger row names
    /// that are older than the destination's safety age (a crash between creating an upload and
    /// recording it). Uploads that any in-flight chunk records are never touched.
    pub async fn recover(&self) -> Result<usize> {
        let recovered = self.recover_abandoned().await?;
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|at| at.elapsed() < SWEEP_INTERVAL) {
                return Ok(recovered);
            }
            *last = Some(std::time::Instant::now());
        }
        let live = self.ledger.live_upload_ids().await?;
        let swept = self
            .destination
            .sweep_orphans(&self.config.destination.prefix, &live)
            .await;
        if swept > 0 {
            tracing::info!(swept, "removed orphaned partial uploads");
        }
        Ok(recovered)
    }

    /// Archives every fragment of `[start, end]`: re-queues the range's failed chunks,
    /// plans, then fetches all chunks that are not done, `archive.concurrency` at a time.
    pub async fn archive_range(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        progress: &Progress,
        shutdown: &Shutdown,
    ) -> Result<RangeSummary> {
        self.recover().await?;
        let requeued = self
            .ledger
            .requeue_failed(&stream.label(), stream.timestamp_source, start, end)
            .await?;
        if requeued > 0 {
            tracing::info!(stream = %stream.label(), requeued, "failed chunks of the range are tried again");
        }
        let plan = self.plan_range(stream, start, end, false, progress).await?;
        tracing::info!(
            stream = %stream.label(),
            fragments = plan.fragments,
            already_archived = plan.already_covered,
            late = plan.late,
            new_chunks = plan.chunks.len(),
            "planned"
        );
        self.fetch_pending(stream, start, end, progress, shutdown, true)
            .await
    }

    /// Fetches every claimable chunk reaching into `[start, end]`. With
    /// `wait_for_others`, waits for chunks other processes hold (a backfill reports on the
    /// whole range); without, leaves them to their holders (a daemon pass ends in bounded
    /// time).
    pub async fn fetch_pending(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        progress: &Progress,
        shutdown: &Shutdown,
        wait_for_others: bool,
    ) -> Result<RangeSummary> {
        let label = stream.label();
        let source = stream.timestamp_source;
        // Chunks a dead or stalled claim left in flight (another process's, or a worker of
        // ours that returned early or whose pass timed out) are taken back first.
        self.recover_abandoned().await?;
        // Each chunk gets one round of attempts per run; ids are never reused.
        let attempted: Mutex<HashSet<i64>> = Mutex::new(HashSet::new());
        loop {
            if shutdown.soft.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let summary = self
                .ledger
                .range_summary(&label, source, start, end)
                .await?;
            progress.set_totals(summary.chunks, summary.done);
            // `archive.concurrency` workers, each claiming the next chunk until none is
            // left; a chunk split or converted meanwhile is claimed in its new form.
            let slots = (0..self.config.archive.concurrency.max(1))
                .map(|_| self.work_slot(stream, start, end, &attempted, progress, shutdown));
            let mut worked = 0;
            for outcome in futures_util::future::join_all(slots).await {
                worked += outcome?;
            }
            if worked > 0 {
                continue;
            }
            if summary.in_flight > 0 && wait_for_others {
                tokio::select! {
                    _ = tokio::time::sleep(FOREIGN_WAIT) => {}
                    _ = shutdown.soft.cancelled() => return Err(Error::Interrupted),
                }
                self.recover_abandoned().await?;
                continue;
            }
            return Ok(summary);
        }
    }

    /// One worker of a range: claims the next chunk and archives it, until nothing of the
    /// range is claimable. Returns how many chunks it claimed.
    async fn work_slot(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        attempted: &Mutex<HashSet<i64>>,
        progress: &Progress,
        shutdown: &Shutdown,
    ) -> Result<usize> {
        let label = stream.label();
        let mut claimed = 0;
        loop {
            if shutdown.soft.is_cancelled() {
                return Err(Error::Interrupted);
            }
            // The daemon's limit of clips in flight across streams, taken before the
            // claim so that no claim waits for it.
            let _permit = match &self.in_flight {
                Some(limit) => tokio::select! {
                    permit = limit.clone().acquire_owned() => permit.ok(),
                    _ = shutdown.soft.cancelled() => return Err(Error::Interrupted),
                },
                None => None,
            };
            // The stream's lease still ours: a pass whose lease lapsed (the ledger was away
            // longer than a lease) and went to another process stops here.
            if let StreamClaim::HeldBy(holder) = self
                .ledger
                .acquire_stream(&label, stream.timestamp_source, now_ms(), self.lease_ms())
                .await?
            {
                tracing::warn!(stream = %label, instance = %holder.instance, "the stream went to another process; this pass stops");
                return Ok(claimed);
            }
            let skip: Vec<i64> = attempted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .copied()
                .collect();
            let next = {
                let _shared = self.claiming.read().await;
                let next = self
                    .ledger
                    .claim_next(
                        &label,
                        stream.timestamp_source,
                        start,
                        end,
                        now_ms(),
                        self.lease_ms(),
                        &skip,
                    )
                    .await?;
                if let Some((chunk, _)) = &next {
                    self.active
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(chunk.id);
                }
                next
            };
            let Some((chunk, lease)) = next else {
                return Ok(claimed);
            };
            let _claim = ActiveClaim {
                active: self.active.clone(),
                chunk: chunk.id,
            };
            claimed += 1;
            let id = chunk.id;
            let finished = match self
                .archive_claimed(stream, chunk, lease, progress, shutdown)
                .await
            {
                Ok(ChunkOutcome::Done) => true,
                // Its replacements are new chunks; a converted chunk is tried again.
                Ok(ChunkOutcome::Changed) => false,
                // Another process took it over: it may fail there, so look again later.
                Ok(ChunkOutcome::Skipped) => {
                    tracing::debug!(id, "chunk taken over by another process");
                    false
                }
                Err(e @ (Error::Interrupted | Error::Ledger { .. })) => return Err(e),
                // Recorded on the chunk; the summary reports it.
                Err(_) => true,
            };
            if finished {
                attempted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id);
            }
        }
    }

    /// One claimed chunk, with retries under its claim: returns after it is done,
    /// changed, given up for this pass (recorded failed, with the time a later pass tries
    /// again), or taken by another process.
    async fn archive_claimed(
        &self,
        stream: &StreamConfig,
        chunk: Chunk,
        lease: Lease,
        progress: &Progress,
        shutdown: &Shutdown,
    ) -> Result<ChunkOutcome> {
        // An upload an earlier claim of this chunk recorded and could not abort (the destination
        // was down, the process stopped) is dead now: abort it before starting anew.
        if let Some(upload_id) = &chunk.upload_id {
            self.destination
                .abort_abandoned(&chunk.object_key, upload_id)
                .await?;
        }
        let outcome = self
            .attempts(stream, &chunk, &lease, progress, shutdown)
            .await;
        match outcome {
            Err(Error::LeaseLost { .. }) => {
                tracing::warn!(key = %chunk.object_key, "lease lost: stopped, nothing recorded; its new holder finishes the chunk");
                Ok(ChunkOutcome::Skipped)
            }
            Err(Error::Interrupted) => {
                // The upload was aborted; the chunk waits for the next start.
                self.ledger_write("release", || self.ledger.release(&lease))
                    .await?;
                tracing::info!(key = %chunk.object_key, "stopped mid-clip; the chunk is pending again");
                Err(Error::Interrupted)
            }
            other => other,
        }
    }

    /// The attempts of one claim.
    async fn attempts(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        lease: &Lease,
        progress: &Progress,
        shutdown: &Shutdown,
    ) -> Result<ChunkOutcome> {
        let mut attempt = 0;
        let mut restarts = 0;
        loop {
            // Kind and key may have changed since the chunk was listed (converted).
            let Some(current) = self.ledger.chunk(chunk.id).await? else {
                return Ok(ChunkOutcome::Skipped);
            };
            attempt += 1;
            let span = tracing::info_span!("chunk", stream = %current.stream, key = %current.object_key, attempt);
            let started = std::time::Instant::now();
            let result = tracing::Instrument::instrument(
                self.transfer(stream, &current, lease, &shutdown.hard),
                span,
            )
            .await;
            let error = match result {
                Ok(Transferred::Archived(archived)) => {
                    self.ledger_write("mark done", || self.ledger.mark_done(lease, &archived))
                        .await?;
                    crate::metrics::chunk_archived(
                        &current.stream,
                        current.plan.kind,
                        archived.bytes,
                        u64::from(current.plan.fragment_count),
                        started.elapsed(),
                    );
                    progress.chunk_done(archived.bytes, &current);
                    return Ok(ChunkOutcome::Done);
                }
                Ok(Transferred::Changed) => return Ok(ChunkOutcome::Changed),
                Err(Error::UploadLost { .. }) if restarts < UPLOAD_RESTARTS => {
                    restarts += 1;
                    attempt -= 1;
                    // Someone aborted the upload: make sure it was not our lease's successor.
                    self.renew(lease).await?;
                    tracing::warn!(key = %current.object_key, restarts, "the destination forgot the upload; starting it again");
                    continue;
                }
                Err(e @ (Error::LeaseLost { .. } | Error::Interrupted)) => return Err(e),
                Err(error) => error,
            };
            let retry = error.retryability();
            crate::metrics::chunk_failed(&current.stream, &error);
            if self.policy.allows(attempt, retry) && !shutdown.soft.is_cancelled() {
                let delay = self.policy.delay(attempt, retry);
                tracing::warn!(key = %current.object_key, attempt, ?retry, delay_ms = delay.as_millis() as u64, %error, "chunk failed; retrying");
                // The claim is kept while waiting: no other process takes the chunk, and
                // no summary counts it failed meanwhile.
                self.renew(lease).await?;
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.soft.cancelled() => return Err(Error::Interrupted),
                }
                continue;
            }
            let next_attempt = next_pass_attempt(now_ms(), current.attempts);
            let failure = Failure::of(&error, next_attempt);
            self.ledger_write("mark failed", || self.ledger.mark_failed(lease, &failure))
                .await?;
            tracing::error!(key = %current.object_key, attempt, kind = error.kind(), next_attempt = %crate::domain::rfc3339(next_attempt), %error, "chunk failed; a later pass tries again");
            progress.chunk_failed(&current, &error);
            return Err(error);
        }
    }

    /// The lease's renewal deadline from now.
    pub(crate) fn lease_until(&self) -> EpochMs {
        now_ms() + self.lease_ms()
    }

    pub(crate) async fn renew(&self, lease: &Lease) -> Result<()> {
        self.ledger.renew(lease, self.lease_until()).await
    }
}
