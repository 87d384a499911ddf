//! The archiver: plans a range into chunks (ListFragments → planner → ledger), then
//! fetches each chunk with GetClip and streams it into the sink, recording every
//! transition in the ledger.
//!
//! Per chunk: claim (ledger) → GetClip → check the MP4 header against the plan (a clip cut
//! by GetClip's caps is split and refetched, never recorded as done) → stream to the sink
//! → finish the upload → mark done. The upload finishes before the ledger says done, so a
//! crash in between re-uploads the same bytes to the same key.

use crate::config::{Config, StreamConfig};
use crate::domain::{object_key, rfc3339, ChunkPlan, EpochMs, Fragment};
use crate::error::{Error, Result};
use crate::mp4;
use crate::plan::{sort_and_dedup, ChunkLimits, Packer};
use crate::retry::{RetryPolicy, Retryability};
use crate::shutdown::Shutdown;
use crate::sink::{ObjectMeta, Sink};
use crate::source::kvs::{means_expired, means_unpackageable, KvsSource};
use crate::store::{Chunk, Ledger};
use crate::telemetry::Progress;
use futures_util::StreamExt;
use std::collections::HashSet;
use std::sync::Arc;
use tokio::sync::Semaphore;

/// A clip may play this much shorter than its fragments' summed durations before it
/// counts as cut: less than KVS's minimum fragment duration (1 s), so one missing
/// fragment is always noticed, yet above per-fragment rounding.
const TRUNCATION_TOLERANCE_MS: u64 = 500;
/// The most header bytes read while looking for `moov` before giving up.
const MAX_HEADER_BYTES: usize = 16 * 1024 * 1024;
/// How often a clip still streaming renews its claim (the lease lasts 15 minutes).
const LEASE_RENEWAL: std::time::Duration = std::time::Duration::from_secs(60);
/// How often to look again when another process holds chunks of our range.
const FOREIGN_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Archiver {
    pub source: Arc<KvsSource>,
    pub sink: Arc<Sink>,
    pub ledger: Ledger,
    pub config: Arc<Config>,
    pub policy: RetryPolicy,
    /// Clips in flight across all streams (the daemon's global limit); `None`: no limit
    /// beyond `archive.concurrency` per range.
    pub in_flight: Option<Arc<Semaphore>>,
}

/// What planning found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PlanSummary {
    pub fragments: u64,
    pub already_covered: u64,
    pub chunks: Vec<ChunkPlan>,
}

/// The outcome of a range.
#[derive(Debug, Default)]
pub struct RunSummary {
    pub chunks: usize,
    pub done: usize,
    pub failed: Vec<Chunk>,
    pub expired: Vec<Chunk>,
    pub pending: usize,
    pub bytes: u64,
}

impl RunSummary {
    pub fn complete(&self) -> bool {
        self.failed.is_empty() && self.expired.is_empty() && self.pending == 0
    }
}

enum ChunkOutcome {
    Done(u64),
    Split,
    Skipped,
}

impl Archiver {
    fn key(&self, stream: &StreamConfig, plan: &ChunkPlan) -> String {
        object_key(&self.config.destination.prefix, &stream.label(), plan)
    }

    /// Aborts uploads of chunks whose process died and makes those chunks pending again;
    /// sweeps orphaned uploads the ledger never heard of.
    pub async fn recover(&self) -> Result<usize> {
        let abandoned = self.ledger.abandoned().await?;
        let mut known = Vec::new();
        for chunk in &abandoned {
            if !self.ledger.claim(chunk.id, chunk.owner.as_deref()).await? {
                continue;
            }
            if let Some(upload_id) = &chunk.upload_id {
                self.sink
                    .abort_abandoned(&chunk.object_key, upload_id)
                    .await?;
                known.push(upload_id.clone());
            }
            self.ledger.release(chunk.id).await?;
            tracing::info!(key = %chunk.object_key, "took back a chunk a stopped process left in {}", chunk.state);
        }
        let swept = self
            .sink
            .sweep_orphans(&self.config.destination.prefix, &known)
            .await;
        if swept > 0 {
            tracing::info!(swept, "removed orphaned partial uploads");
        }
        Ok(abandoned.len())
    }

    /// Lists `[start, end]` window by window and records the chunks to fetch. Fragments
    /// already in the ledger are skipped, and no new chunk reaches over them. With
    /// `dry_run` nothing is recorded.
    pub async fn plan_range(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        dry_run: bool,
        progress: &Progress,
    ) -> Result<PlanSummary> {
        let label = stream.label();
        let limits: ChunkLimits = self.config.archive.limits();
        let window = self.config.archive.plan_window.as_millis() as i64;
        let mut summary = PlanSummary::default();
        let mut packer = Packer::new(limits);
        let mut closed = Vec::new();
        let mut window_start = start;
        while window_start <= end {
            let window_end = (window_start + window - 1).min(end);
            let mut fragments = self.source.list(stream, window_start, window_end).await?;
            sort_and_dedup(&mut fragments);
            // Read in a dry run too: `plan` shows what a backfill would still fetch.
            let covered = self
                .ledger
                .covered(&label, stream.timestamp_source, window_start, window_end)
                .await?;
            summary.fragments += fragments.len() as u64;
            for fragment in fragments {
                if is_covered(&covered, &fragment) {
                    summary.already_covered += 1;
                    packer.cut(&mut closed);
                } else {
                    packer.push(fragment, &mut closed);
                }
            }
            self.record(stream, &mut closed, &mut summary, dry_run)
                .await?;
            crate::crashpoint::hit("planning");
            progress.planned(window_end - start, end - start + 1, summary.chunks.len());
            window_start = window_end + 1;
        }
        packer.finish(&mut closed);
        self.record(stream, &mut closed, &mut summary, dry_run)
            .await?;
        Ok(summary)
    }

    async fn record(
        &self,
        stream: &StreamConfig,
        closed: &mut Vec<ChunkPlan>,
        summary: &mut PlanSummary,
        dry_run: bool,
    ) -> Result<()> {
        for plan in closed.drain(..) {
            if !dry_run {
                let key = self.key(stream, &plan);
                let inserted = self
                    .ledger
                    .insert_planned(&stream.label(), stream.timestamp_source, &plan, &key)
                    .await?;
                if !inserted {
                    // Another process planned an overlapping chunk meanwhile. Some of this
                    // chunk's fragments may lie outside it: plan the range again, around
                    // what is covered now.
                    let again = Box::pin(self.plan_range(
                        stream,
                        plan.start_ms,
                        plan.end_ms,
                        false,
                        &Progress::hidden(),
                    ))
                    .await?;
                    summary.already_covered += again.already_covered;
                    summary.chunks.extend(again.chunks);
                    continue;
                }
            }
            summary.chunks.push(plan);
        }
        Ok(())
    }

    /// Archives every fragment of `[start, end]`: plans, then fetches all chunks that are
    /// not done, `archive.concurrency` at a time.
    pub async fn archive_range(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        progress: &Progress,
        shutdown: &Shutdown,
    ) -> Result<RunSummary> {
        self.recover().await?;
        let plan = self.plan_range(stream, start, end, false, progress).await?;
        tracing::info!(
            stream = %stream.label(),
            fragments = plan.fragments,
            already_archived = plan.already_covered,
            new_chunks = plan.chunks.len(),
            "planned"
        );
        self.fetch_pending(stream, start, end, progress, shutdown)
            .await
    }

    /// Fetches every chunk of the stream starting in `[start, end]` that is not done.
    pub async fn fetch_pending(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        progress: &Progress,
        shutdown: &Shutdown,
    ) -> Result<RunSummary> {
        let label = stream.label();
        // Each chunk gets one round of attempts per run. SQLite may give a split chunk's
        // part the id of the chunk it replaced, so a chunk is known by id and range.
        let mut attempted: HashSet<(i64, EpochMs, EpochMs)> = HashSet::new();
        loop {
            if shutdown.soft.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let chunks = self
                .ledger
                .chunks_in(&label, stream.timestamp_source, start, end)
                .await?;
            progress.set_totals(&chunks);
            let todo: Vec<Chunk> = chunks
                .iter()
                .filter(|c| {
                    !attempted.contains(&(c.id, c.plan.start_ms, c.plan.end_ms))
                        && (c.state == "planned" || (c.state == "failed" && c.retryable))
                })
                .cloned()
                .collect();
            let foreign = chunks
                .iter()
                .any(|c| matches!(c.state.as_str(), "fetching" | "uploading"));
            if todo.is_empty() {
                if foreign {
                    // Another process (the daemon, a second backfill) is on them.
                    tokio::select! {
                        _ = tokio::time::sleep(FOREIGN_WAIT) => {}
                        _ = shutdown.soft.cancelled() => return Err(Error::Interrupted),
                    }
                    self.recover().await?;
                    continue;
                }
                return Ok(summarize(&chunks));
            }
            type Attempted = (i64, EpochMs, EpochMs);
            let results: Vec<(Attempted, Result<ChunkOutcome>)> = futures_util::stream::iter(todo)
                .map(|chunk| async move {
                    let known_as = (chunk.id, chunk.plan.start_ms, chunk.plan.end_ms);
                    let outcome = self.archive_chunk(stream, chunk, progress, shutdown).await;
                    (known_as, outcome)
                })
                .buffer_unordered(self.config.archive.concurrency)
                .collect()
                .await;
            for (known_as, result) in results {
                // A chunk another process holds is looked at again: it may fail there.
                if !matches!(result, Ok(ChunkOutcome::Skipped)) {
                    attempted.insert(known_as);
                }
                let id = known_as.0;
                match result {
                    Ok(ChunkOutcome::Done(bytes)) => tracing::debug!(id, bytes, "chunk archived"),
                    Ok(ChunkOutcome::Split) => tracing::debug!(id, "chunk split"),
                    Ok(ChunkOutcome::Skipped) => {
                        tracing::debug!(id, "chunk held elsewhere or finished")
                    }
                    Err(Error::Interrupted) => return Err(Error::Interrupted),
                    Err(Error::Store { op, source }) => return Err(Error::Store { op, source }),
                    // Recorded on the chunk; the summary reports it.
                    Err(_) => {}
                }
            }
        }
    }

    /// One chunk, with retries: returns after it is done, split, or given up.
    async fn archive_chunk(
        &self,
        stream: &StreamConfig,
        chunk: Chunk,
        progress: &Progress,
        shutdown: &Shutdown,
    ) -> Result<ChunkOutcome> {
        let mut attempt = 0;
        loop {
            if shutdown.soft.is_cancelled() {
                return Err(Error::Interrupted);
            }
            let _permit = match &self.in_flight {
                Some(limit) => tokio::select! {
                    permit = limit.clone().acquire_owned() => permit.ok(),
                    _ = shutdown.soft.cancelled() => return Err(Error::Interrupted),
                },
                None => None,
            };
            if !self.ledger.claim(chunk.id, None).await? {
                return Ok(ChunkOutcome::Skipped);
            }
            attempt += 1;
            let span = tracing::info_span!("chunk", stream = %chunk.stream, key = %chunk.object_key, attempt);
            let started = std::time::Instant::now();
            let result = tracing::Instrument::instrument(
                self.fetch_and_store(stream, &chunk, &shutdown.hard),
                span,
            )
            .await;
            match result {
                Ok(bytes) => {
                    self.ledger.mark_done(chunk.id, bytes).await?;
                    crate::metrics::clip_archived(&chunk.stream, bytes, started.elapsed());
                    progress.chunk_done(bytes, &chunk);
                    return Ok(ChunkOutcome::Done(bytes));
                }
                Err(Error::Interrupted) => {
                    // The upload was aborted; the chunk waits for the next start.
                    self.ledger.release(chunk.id).await?;
                    tracing::info!(key = %chunk.object_key, "stopped mid-clip; the chunk is pending again");
                    return Err(Error::Interrupted);
                }
                Err(Error::Truncated {
                    key,
                    got_ms,
                    planned_ms,
                }) => {
                    tracing::warn!(%key, got_ms, planned_ms, "GetClip cut the clip short: splitting the chunk");
                    self.split(stream, &chunk).await?;
                    return Ok(ChunkOutcome::Split);
                }
                Err(error) if means_unpackageable(&error) && chunk.plan.fragment_count > 1 => {
                    tracing::warn!(key = %chunk.object_key, %error, "KVS cannot package this range as one MP4: splitting the chunk");
                    self.split(stream, &chunk).await?;
                    return Ok(ChunkOutcome::Split);
                }
                Err(error) => {
                    let error = if means_expired(&error) {
                        Error::Expired {
                            key: chunk.object_key.clone(),
                            message: format!("KVS no longer has these fragments ({error})"),
                        }
                    } else {
                        error
                    };
                    self.ledger.mark_failed(chunk.id, &error).await?;
                    let retry = error.retryability();
                    crate::metrics::clip_failed(&chunk.stream, &error);
                    if !self.policy.allows(attempt, retry) || shutdown.soft.is_cancelled() {
                        tracing::error!(key = %chunk.object_key, attempt, %error, "gave up on chunk");
                        progress.chunk_failed(&chunk, &error);
                        return Err(error);
                    }
                    let delay = self.policy.delay(attempt, retry);
                    tracing::warn!(key = %chunk.object_key, attempt, ?retry, delay_ms = delay.as_millis() as u64, %error, "chunk failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.soft.cancelled() => return Err(Error::Interrupted),
                    }
                }
            }
        }
    }

    /// Re-lists a truncated chunk's fragments and replaces it by chunks of half the size.
    async fn split(&self, stream: &StreamConfig, chunk: &Chunk) -> Result<()> {
        let (start, end) = chunk.plan.clip_range();
        let mut fragments: Vec<Fragment> = self.source.list(stream, start, end).await?;
        sort_and_dedup(&mut fragments);
        let limits = self.config.archive.limits();
        let halved = ChunkLimits {
            max_fragments: (chunk.plan.fragment_count / 2).max(1),
            max_bytes: (chunk.plan.bytes / 2).max(1),
            ..limits
        };
        // Fragments missing from the old end were deleted by KVS's retention meanwhile.
        let listed = fragments.len() as u32;
        let expired = match fragments.first() {
            Some(first_left)
                if listed < chunk.plan.fragment_count
                    && chunk.plan.start_ms < first_left.start_ms =>
            {
                Some(ChunkPlan {
                    start_ms: chunk.plan.start_ms,
                    end_ms: first_left.start_ms - 1,
                    fragment_count: chunk.plan.fragment_count - listed,
                    bytes: 0,
                    duration_ms: 0,
                    first_fragment: chunk.plan.first_fragment.clone(),
                    last_fragment: String::new(),
                })
            }
            _ => None,
        };
        if let Some(gone) = &expired {
            tracing::error!(key = %chunk.object_key, fragments = gone.fragment_count, "fragments expired before they were archived");
            crate::metrics::fragments_expired(&chunk.stream, u64::from(gone.fragment_count));
        }
        let parts: Vec<(ChunkPlan, String)> = crate::plan::plan_all(&fragments, halved)
            .into_iter()
            .map(|p| {
                let key = self.key(stream, &p);
                (p, key)
            })
            .collect();
        if parts.is_empty() {
            let error = Error::Expired {
                key: chunk.object_key.clone(),
                message: "KVS lists none of the chunk's fragments any more".into(),
            };
            return self.ledger.mark_failed(chunk.id, &error).await;
        }
        let reason = "deleted by KVS retention before they were archived";
        self.ledger
            .split(chunk, &parts, expired.as_ref().map(|gone| (gone, reason)))
            .await
    }

    /// One attempt: GetClip, header check, upload. Returns the object's size.
    async fn fetch_and_store(
        &self,
        stream: &StreamConfig,
        chunk: &Chunk,
        hard: &tokio_util::sync::CancellationToken,
    ) -> Result<u64> {
        let (start, end) = chunk.plan.clip_range();
        let mut body = self
            .source
            .get_clip(stream, start, end, chunk.plan.fragment_count)
            .await?;
        let key = chunk.object_key.clone();
        let mut head = Vec::new();
        let header = loop {
            match body.next().await? {
                Some(bytes) => head.extend_from_slice(&bytes),
                None => break mp4::parse_header(&head).ok().flatten(),
            }
            match mp4::parse_header(&head) {
                Ok(Some(header)) => break Some(header),
                Ok(None) if head.len() < MAX_HEADER_BYTES => continue,
                Ok(None) => break None,
                Err(e) => {
                    return Err(Error::Clip {
                        key,
                        message: format!("GetClip returned no playable MP4: {e}"),
                        retry: Retryability::Transient,
                    })
                }
            }
        };
        let Some(header) = header else {
            return Err(Error::Clip {
                key,
                message: format!(
                    "GetClip body ended after {} bytes without an MP4 header",
                    head.len()
                ),
                retry: Retryability::Transient,
            });
        };
        if header.duration_ms + TRUNCATION_TOLERANCE_MS < chunk.plan.duration_ms {
            return Err(Error::Truncated {
                key,
                got_ms: header.duration_ms,
                planned_ms: chunk.plan.duration_ms,
            });
        }
        let meta = object_meta(stream, chunk, &header);
        let mut upload = self.sink.begin(&key, meta).await?;
        self.ledger.mark_uploading(chunk.id, None).await?;
        let mut received = head.len() as u64;
        let mut recorded_upload = false;
        let mut renewed = std::time::Instant::now();
        let first = bytes::Bytes::from(head);
        let mut next = Some(first);
        loop {
            if let Some(bytes) = next.take() {
                if let Err(e) = upload.write(bytes).await {
                    upload.abort().await;
                    return Err(e);
                }
                crate::crashpoint::hit("mid-body");
                if renewed.elapsed() > LEASE_RENEWAL {
                    self.ledger.renew(chunk.id).await?;
                    renewed = std::time::Instant::now();
                }
                if !recorded_upload {
                    if let Some(id) = upload.upload_id() {
                        self.ledger.mark_uploading(chunk.id, Some(id)).await?;
                        recorded_upload = true;
                        crate::crashpoint::hit("mid-upload");
                    }
                }
            }
            let piece = tokio::select! {
                piece = body.next() => piece,
                _ = hard.cancelled() => {
                    upload.abort().await;
                    return Err(Error::Interrupted);
                }
            };
            match piece {
                Ok(Some(bytes)) => {
                    received += bytes.len() as u64;
                    next = Some(bytes);
                }
                Ok(None) => break,
                Err(e) => {
                    upload.abort().await;
                    return Err(e);
                }
            }
        }
        if received != header.total_len {
            upload.abort().await;
            return Err(Error::Clip {
                key,
                message: format!(
                    "body has {received} bytes, the MP4 header says {}",
                    header.total_len
                ),
                retry: Retryability::Transient,
            });
        }
        let finishing = std::time::Instant::now();
        let size = upload.finish().await?;
        crate::metrics::upload_latency(&chunk.stream, finishing.elapsed());
        crate::crashpoint::hit("after-upload");
        Ok(size)
    }
}

fn is_covered(covered: &[(EpochMs, EpochMs)], fragment: &Fragment) -> bool {
    covered
        .iter()
        .any(|(a, b)| *a <= fragment.start_ms && fragment.start_ms <= *b)
}

fn object_meta(stream: &StreamConfig, chunk: &Chunk, header: &mp4::ClipHeader) -> ObjectMeta {
    ObjectMeta {
        pairs: vec![
            ("kvs-stream", stream.label()),
            ("kvs-timestamp-source", stream.timestamp_source.to_string()),
            ("kvs-start", rfc3339(chunk.plan.start_ms)),
            ("kvs-end", rfc3339(chunk.plan.end_ms)),
            ("kvs-fragment-count", chunk.plan.fragment_count.to_string()),
            ("kvs-first-fragment", chunk.plan.first_fragment.clone()),
            ("kvs-last-fragment", chunk.plan.last_fragment.clone()),
            ("kvs-duration-ms", header.duration_ms.to_string()),
        ],
    }
}

fn summarize(chunks: &[Chunk]) -> RunSummary {
    let mut summary = RunSummary {
        chunks: chunks.len(),
        ..RunSummary::default()
    };
    for c in chunks {
        match c.state.as_str() {
            "done" => summary.done += 1,
            "failed" => summary.failed.push(c.clone()),
            "expired" => summary.expired.push(c.clone()),
            _ => summary.pending += 1,
        }
    }
    summary
}
