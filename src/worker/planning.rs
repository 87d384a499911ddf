//! Planning: ListFragments window by window → [`plan_window`] around what the ledger
//! holds → new chunks recorded in the ledger, each with its fragments.

use super::Archiver;
use crate::config::StreamConfig;
use crate::domain::{ChunkPlan, EpochMs, TimestampSource};
use crate::error::Result;
use crate::plan::{plan_window, sort_and_dedup, ChunkLimits, Packer};
use crate::telemetry::Progress;

/// The longest a fragment may last (KVS's producer quota): a listing window starts this
/// much earlier so that holdings around its first fragment are known.
const MAX_FRAGMENT_MS: i64 = 20_000;
/// How many times planning re-plans a range around chunks recorded meanwhile.
const MAX_REPLANNING: u32 = 2;

/// What planning found.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PlanSummary {
    /// Fragments ListFragments returned over the range.
    pub fragments: u64,
    /// Fragments a chunk of the ledger already held.
    pub already_covered: u64,
    /// Fragments listed after the range around them was archived: planned alone.
    pub late: u64,
    /// Fragments inside a range not fetched yet: that chunk's GetClip takes them.
    pub left_to_their_range: u64,
    /// The chunks planned (recorded in the ledger unless it was a dry run).
    pub chunks: Vec<ChunkPlan>,
}

impl PlanSummary {
    /// The chunks a backfill would fetch, one line each, then the totals.
    pub fn describe(&self) -> String {
        let mut text = String::new();
        for c in &self.chunks {
            text.push_str(&format!(
                "{} .. {}  {:>3} fragments  {:>10} bytes  {:>7.1} s\n",
                crate::domain::rfc3339(c.start_ms),
                crate::domain::rfc3339(c.end_ms),
                c.fragment_count,
                c.bytes,
                c.duration_ms as f64 / 1000.0
            ));
        }
        text.push_str(&format!(
            "{} chunks, {} fragments listed, {} already archived",
            self.chunks.len(),
            self.fragments,
            self.already_covered
        ));
        text
    }
}

impl Archiver {
    /// Lists `[start, end]` window by window and records the chunks to fetch. Fragments
    /// already in the ledger are skipped, no new chunk reaches over them, and fragments
    /// listed late inside archived ranges get chunks of their own. With `dry_run` nothing
    /// is recorded.
    pub async fn plan_range(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        dry_run: bool,
        progress: &Progress,
    ) -> Result<PlanSummary> {
        self.plan_range_again(stream, start, end, dry_run, progress, 0)
            .await
    }

    /// [`Archiver::plan_range`], `depth` levels deep in re-planning around chunks that
    /// other processes recorded meanwhile.
    async fn plan_range_again(
        &self,
        stream: &StreamConfig,
        start: EpochMs,
        end: EpochMs,
        dry_run: bool,
        progress: &Progress,
        depth: u32,
    ) -> Result<PlanSummary> {
        let label = stream.label();
        let limits: ChunkLimits = self.config.archive.limits();
        let window = self.config.archive.plan_window.as_millis() as i64;
        let producer = stream.timestamp_source == TimestampSource::Producer;
        let mut summary = PlanSummary::default();
        let mut packer = Packer::new(limits).separating_equal_timestamps(producer);
        let mut closed = Vec::new();
        let mut window_start = start;
        while window_start <= end {
            let window_end = (window_start + window - 1).min(end);
            let mut fragments = self.source.list(stream, window_start, window_end).await?;
            sort_and_dedup(&mut fragments);
            // Read in a dry run too: `plan` shows what a backfill would still fetch.
            let holdings = self
                .ledger
                .holdings(
                    &label,
                    stream.timestamp_source,
                    window_start - MAX_FRAGMENT_MS,
                    window_end,
                )
                .await?;
            summary.fragments += fragments.len() as u64;
            let counts = plan_window(&mut packer, &fragments, &holdings, &mut closed);
            summary.already_covered += counts.held;
            summary.late += counts.late;
            summary.left_to_their_range += counts.left_to_their_range;
            self.record(stream, &mut closed, &mut summary, dry_run, depth)
                .await?;
            crate::crashpoint::hit("planning");
            progress.planned(window_end - start, end - start + 1, summary.chunks.len());
            window_start = window_end + 1;
        }
        packer.finish(&mut closed);
        self.record(stream, &mut closed, &mut summary, dry_run, depth)
            .await?;
        if summary.late > 0 {
            tracing::info!(stream = %label, late = summary.late, "fragments listed after their range was archived: archiving them alone");
            crate::metrics::late_fragments(&label, summary.late);
        }
        Ok(summary)
    }

    async fn record(
        &self,
        stream: &StreamConfig,
        closed: &mut Vec<ChunkPlan>,
        summary: &mut PlanSummary,
        dry_run: bool,
        depth: u32,
    ) -> Result<()> {
        for mut plan in closed.drain(..) {
            if !dry_run {
                let key = self.key(stream, &plan);
                let inserted = self
                    .ledger
                    .insert_planned(&stream.label(), stream.timestamp_source, &plan, &key)
                    .await?;
                if !inserted && depth >= MAX_REPLANNING {
                    // Planning the same range again keeps meeting a chunk it cannot see
                    // (one beyond this window's holdings): leave it to the next pass, and
                    // say so; verify reports its fragments until then.
                    tracing::warn!(stream = %stream.label(), start = %crate::domain::rfc3339(plan.start_ms), "a planned chunk overlaps one already recorded; left for the next pass");
                    continue;
                }
                if !inserted {
                    // Another process planned some of these fragments meanwhile: plan the
                    // range again, around what is held now.
                    let again = Box::pin(self.plan_range_again(
                        stream,
                        plan.start_ms,
                        plan.end_ms,
                        false,
                        &Progress::hidden(),
                        depth + 1,
                    ))
                    .await?;
                    summary.already_covered += again.already_covered;
                    summary.late += again.late;
                    summary.chunks.extend(again.chunks);
                    continue;
                }
            }
            // The summary names each chunk; its fragments are in the ledger now (or, in a
            // dry run, needed no longer): a month of 1 s fragments would hold 2.6 million.
            plan.fragments = Vec::new();
            summary.chunks.push(plan);
        }
        Ok(())
    }
}
