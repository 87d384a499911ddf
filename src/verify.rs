//! `kvs-archiver verify`: proves a stream's archive three ways, and repairs what it can.
//!
//! 1. Ledger → destination: every done chunk's object exists, with the size and CRC32C
//!    the ledger recorded when it was written, and metadata naming the chunk's fragments.
//! 2. KVS → ledger: the range is listed again; every fragment KVS still holds must be in a
//!    done chunk.
//! 3. Destination → ledger: objects under the stream's prefix the ledger does not know.
//!
//! `--repair` plans the affected chunks again (missing or damaged objects, fragments no
//! object holds) and archives them at once; extra objects are reported, never deleted.

use crate::config::StreamConfig;
use crate::domain::{rfc3339, EpochMs};
use crate::error::Result;
use crate::ledger::Chunk;
use crate::plan::sort_and_dedup;
use crate::shutdown::Shutdown;
use crate::telemetry::Progress;
use crate::worker::Archiver;
use serde::Serialize;
use std::collections::HashSet;

/// What is wrong with one done chunk's object.
#[derive(Debug, Clone, Serialize)]
pub struct Damaged {
    pub object_key: String,
    pub chunk: i64,
    /// missing, size, checksum or metadata.
    pub problem: String,
}

/// A fragment KVS holds that no archived object contains.
#[derive(Debug, Clone, Serialize)]
pub struct Unarchived {
    pub fragment_number: String,
    pub start: String,
    /// Why: in no chunk, or in a chunk not archived yet (its state).
    pub held_by: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    pub stream: String,
    pub chunks_checked: usize,
    pub fragments_listed: usize,
    pub damaged: Vec<Damaged>,
    pub unarchived: Vec<Unarchived>,
    pub extra_objects: Vec<String>,
    /// Damaged chunks planned again by `--repair`.
    pub requeued: usize,
    /// `--repair` ran: damaged chunks and fragments no object held were archived again.
    pub repaired: bool,
}

impl VerifyReport {
    pub fn clean(&self) -> bool {
        self.damaged.is_empty() && self.unarchived.is_empty() && self.extra_objects.is_empty()
    }

    pub fn describe(&self) -> String {
        let mut text = format!(
            "verify {}: {} done chunks checked against the destination, {} fragments listed in KVS: {} damaged or missing objects, {} fragments in no archived object, {} objects the ledger does not know",
            self.stream,
            self.chunks_checked,
            self.fragments_listed,
            self.damaged.len(),
            self.unarchived.len(),
            self.extra_objects.len()
        );
        for d in self.damaged.iter().take(20) {
            text.push_str(&format!(
                "\n  {}: {} (chunk {})",
                d.problem, d.object_key, d.chunk
            ));
        }
        for u in self.unarchived.iter().take(20) {
            text.push_str(&format!(
                "\n  not archived: fragment {} at {}{}",
                u.fragment_number,
                u.start,
                u.held_by
                    .as_deref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ));
        }
        for key in self.extra_objects.iter().take(20) {
            text.push_str(&format!(
                "\n  extra object: {}",
                crate::domain::printable(key)
            ));
        }
        if self.repaired {
            text.push_str(&format!(
                "\n  repaired: {} damaged chunks and {} fragments no object held were archived again (run verify again to check)",
                self.requeued,
                self.unarchived.len()
            ));
        }
        text
    }
}

/// Checks one done chunk's object; `None` if it is right.
fn check_object(chunk: &Chunk, stored: Option<&crate::sink::StoredObject>) -> Option<String> {
    let Some(stored) = stored else {
        return Some("missing".into());
    };
    if let Some(bytes) = chunk.archived_bytes {
        if bytes != stored.size {
            return Some(format!("size {} where {} were written", stored.size, bytes));
        }
    }
    if let Some(crc) = &chunk.archived_crc32c {
        if *crc != stored.crc32c {
            return Some(format!(
                "checksum {} where {} was written",
                stored.crc32c, crc
            ));
        }
    }
    let first = stored.meta.get("kvs-first-fragment");
    if first.is_some_and(|f| *f != chunk.plan.first_fragment) {
        return Some("metadata names other fragments".into());
    }
    None
}

pub async fn verify(
    archiver: &Archiver,
    stream: &StreamConfig,
    start: EpochMs,
    end: EpochMs,
    repair: bool,
    shutdown: &Shutdown,
) -> Result<VerifyReport> {
    let label = stream.label();
    let source = stream.timestamp_source;
    let mut report = VerifyReport {
        stream: label.clone(),
        ..VerifyReport::default()
    };
    // 1. Ledger → destination.
    let done = archiver.ledger.done_in(&label, source, start, end).await?;
    report.chunks_checked = done.len();
    let mut bad_chunks = Vec::new();
    for chunk in &done {
        // An object the destination refuses to read (a link, a FIFO, a key it will not
        // take) is a damaged object of the report, not the end of the check; a store that
        // does not answer still is.
        let problem = match archiver.sink.inspect(&chunk.object_key).await {
            Ok(stored) => check_object(chunk, stored.as_ref()),
            Err(e) if !e.retryability().can_retry() => Some(format!("cannot be read: {e}")),
            Err(e) => return Err(e),
        };
        if let Some(problem) = problem {
            report.damaged.push(Damaged {
                object_key: chunk.object_key.clone(),
                chunk: chunk.id,
                problem,
            });
            bad_chunks.push(chunk.id);
        }
    }
    // 2. KVS → ledger.
    let mut listed = archiver.source.list(stream, start, end).await?;
    sort_and_dedup(&mut listed);
    report.fragments_listed = listed.len();
    let holdings = archiver.ledger.holdings(&label, source, start, end).await?;
    // Fragments of damaged chunks are reported with their chunk, not again here.
    let archived: HashSet<String> = {
        let mut numbers = HashSet::new();
        for chunk in &done {
            for f in archiver.ledger.fragments_of(chunk.id).await? {
                numbers.insert(f.number);
            }
        }
        numbers
    };
    let legacy_done: Vec<(EpochMs, EpochMs)> = done.iter().map(|c| c.plan.clip_range()).collect();
    for f in &listed {
        let in_legacy = holdings
            .legacy
            .iter()
            .any(|(a, b)| *a <= f.start_ms && f.start_ms <= *b)
            && legacy_done
                .iter()
                .any(|(a, b)| *a <= f.start_ms && f.start_ms <= *b);
        if archived.contains(&f.number) || in_legacy {
            continue;
        }
        let held_by = holdings
            .held
            .contains(&f.number)
            .then(|| "in a chunk not archived yet".to_string());
        report.unarchived.push(Unarchived {
            fragment_number: f.number.clone(),
            start: rfc3339(f.start_ms),
            held_by,
        });
    }
    // 3. Destination → ledger.
    let prefix = format!("{}{}/", archiver.config.destination.prefix, label);
    let known: HashSet<String> = archiver
        .ledger
        .object_keys(&label)
        .await?
        .into_iter()
        .collect();
    report.extra_objects = archiver
        .sink
        .list_keys(&prefix)
        .await?
        .into_iter()
        .filter(|k| !known.contains(k))
        .collect();

    if repair && !(report.damaged.is_empty() && report.unarchived.is_empty()) {
        for id in &bad_chunks {
            if archiver.ledger.requeue_chunk(*id).await? {
                report.requeued += 1;
            }
        }
        // Fragments no object holds are planned, and everything queued archived, as a
        // backfill of the range does.
        report.repaired = true;
        let summary = archiver
            .archive_range(stream, start, end, &Progress::hidden(), shutdown)
            .await?;
        tracing::info!(stream = %label, archived = summary.done, failed = summary.failed.len(), "repair finished");
    }
    Ok(report)
}
