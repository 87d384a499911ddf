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

use crate::archive::ArchiveView;
use crate::config::StreamConfig;
use crate::domain::{rfc3339, EpochMs, Fragment};
use crate::error::Result;
use crate::ledger::Chunk;
use crate::plan::sort_and_dedup;
use crate::shutdown::Shutdown;
use crate::source::kvs::KvsSource;
use crate::telemetry::Progress;
use crate::worker::Archiver;
use serde::Serialize;
use std::collections::HashSet;

/// What is wrong with one done chunk's object.
#[derive(Debug, Clone, Serialize)]
pub struct Damaged {
    /// The object that is wrong.
    pub object_key: String,
    /// Its chunk's id (`--repair` plans it again).
    pub chunk: i64,
    /// missing, size, checksum or metadata.
    pub problem: String,
}

/// A fragment KVS holds that no archived object contains.
#[derive(Debug, Clone, Serialize)]
pub struct Unarchived {
    /// The fragment's number.
    pub fragment_number: String,
    /// Its start, RFC 3339.
    pub start: String,
    /// Why: in no chunk, or in a chunk not archived yet (its state).
    pub held_by: Option<String>,
}

/// What `verify` found for one stream: its exit status and report.
#[derive(Debug, Default, Clone, Serialize)]
pub struct VerifyReport {
    /// The stream's label.
    pub stream: String,
    /// Done chunks whose objects were checked.
    pub chunks_checked: usize,
    /// Of those, checked by HEAD alone: the store's whole-object CRC32C matched the
    /// ledger's, with no byte read.
    pub checked_by_head: usize,
    /// Of those, read whole: the store keeps no whole-object CRC32C for them (a
    /// directory, older multipart objects, a store without checksums), or it differed.
    pub read_whole: usize,
    /// Objects in an archive class whose bytes would have had to be read: not read
    /// (that needs a restore); their size and metadata were checked.
    pub not_read_cold: Vec<String>,
    /// Fragments KVS listed over the range.
    pub fragments_listed: usize,
    /// Done chunks whose object is missing or differs from the ledger's record.
    pub damaged: Vec<Damaged>,
    /// Chunks that could not be archived because another object holds their key: writes
    /// are create-only, so it was left as it is.
    pub occupied: Vec<Damaged>,
    /// Fragments KVS holds that no archived object contains.
    pub unarchived: Vec<Unarchived>,
    /// Objects under the stream's prefix that the ledger does not know.
    pub extra_objects: Vec<String>,
    /// Damaged chunks planned again by `--repair`.
    pub requeued: usize,
    /// `--repair` ran: damaged chunks and fragments no object held were archived again.
    pub repaired: bool,
}

impl VerifyReport {
    /// Nothing damaged, missing or extra: `verify` exits 0.
    pub fn clean(&self) -> bool {
        self.damaged.is_empty()
            && self.occupied.is_empty()
            && self.unarchived.is_empty()
            && self.extra_objects.is_empty()
    }

    /// The report as a person reads it (at most 20 lines of each finding).
    pub fn describe(&self) -> String {
        let mut text = format!(
            "verify {}: {} done chunks checked against the destination ({} by HEAD and the store's whole-object CRC32C, no object read; {} read whole), {} fragments listed in KVS: {} damaged or missing objects, {} fragments in no archived object, {} objects the ledger does not know",
            self.stream,
            self.chunks_checked,
            self.checked_by_head,
            self.read_whole,
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
        for o in self.occupied.iter().take(20) {
            text.push_str(&format!(
                "\n  occupied: {} (chunk {}) holds an object this archive did not write; it was not replaced: {}",
                o.object_key, o.chunk, o.problem
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
        if !self.not_read_cold.is_empty() {
            text.push_str(&format!(
                "\n  {} objects in an archive class were checked by size and metadata only (the store keeps no whole-object checksum for them; reading them needs `kvs-archiver restore`), e.g. {}",
                self.not_read_cold.len(),
                self.not_read_cold[0]
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
fn check_object(
    chunk: &Chunk,
    stored: Option<&crate::destination::StoredObject>,
) -> Option<String> {
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

/// Checks a stream's archive over `[start, end]` three ways (see the module's doc):
/// the ledger's objects in the destination, KVS's fragments in the ledger, and the
/// destination's objects in the ledger.
pub async fn verify(
    archive: &ArchiveView,
    kvs: &KvsSource,
    stream: &StreamConfig,
    start: EpochMs,
    end: EpochMs,
) -> Result<VerifyReport> {
    let label = stream.label();
    let done = archive
        .ledger
        .done_in(&label, stream.timestamp_source, start, end)
        .await?;
    let mut report = VerifyReport {
        stream: label.clone(),
        chunks_checked: done.len(),
        ..VerifyReport::default()
    };
    damaged_objects(archive, &done, &mut report).await?;
    report.occupied = archive
        .ledger
        .range_summary(&label, stream.timestamp_source, start, end)
        .await?
        .failed
        .into_iter()
        .filter(|c| c.error_kind.as_deref() == Some("occupied"))
        .map(|c| Damaged {
            object_key: c.object_key,
            chunk: c.id,
            problem: c.last_error.unwrap_or_default(),
        })
        .collect();
    let mut listed = kvs.list(stream, start, end).await?;
    sort_and_dedup(&mut listed);
    report.fragments_listed = listed.len();
    report.unarchived = unarchived_fragments(archive, stream, &done, &listed, (start, end)).await?;
    report.extra_objects = extra_objects(archive, &label).await?;
    Ok(report)
}

/// 1. Ledger → destination: the done chunks whose object is missing or not as written.
///
/// They go into `report.damaged`. A HEAD each; an object is read only where the store
/// keeps no whole-object CRC32C, or one that differs (confirmed by reading before it is
/// called damaged: a store may report another algorithm's value).
async fn damaged_objects(
    archive: &ArchiveView,
    done: &[Chunk],
    report: &mut VerifyReport,
) -> Result<()> {
    for chunk in done {
        // An object the destination refuses to read (a link, a FIFO, a key it will not
        // take) is a damaged object of the report, not the end of the check; a store that
        // does not answer still is.
        let problem = match check_by_head(archive, chunk).await {
            Ok(Checked::ByHead(problem)) => {
                report.checked_by_head += 1;
                problem
            }
            Ok(Checked::ReadWhole(problem)) => {
                report.read_whole += 1;
                problem
            }
            Ok(Checked::Cold(problem)) => {
                report.not_read_cold.push(chunk.object_key.clone());
                problem
            }
            Err(e) if !e.retryability().can_retry() => Some(format!("cannot be read: {e}")),
            Err(e) => return Err(e),
        };
        if let Some(problem) = problem {
            report.damaged.push(Damaged {
                object_key: chunk.object_key.clone(),
                chunk: chunk.id,
                problem,
            });
        }
    }
    Ok(())
}

/// How one object was checked, and what is wrong with it.
enum Checked {
    /// By HEAD alone.
    ByHead(Option<String>),
    /// By reading it whole.
    ReadWhole(Option<String>),
    /// By size and metadata alone: reading it needs a restore.
    Cold(Option<String>),
}

async fn check_by_head(archive: &ArchiveView, chunk: &Chunk) -> Result<Checked> {
    let Some(head) = archive.destination.head(&chunk.object_key).await? else {
        return Ok(Checked::ByHead(Some("missing".into())));
    };
    let settled_by_head = match (&head.crc32c, &chunk.archived_crc32c) {
        (Some(stored), Some(recorded)) => stored == recorded,
        _ => false,
    };
    if settled_by_head {
        let stored = crate::destination::StoredObject {
            size: head.size,
            crc32c: head.crc32c.clone().unwrap_or_default(),
            meta: head.meta,
        };
        return Ok(Checked::ByHead(check_object(chunk, Some(&stored))));
    }
    if head.readiness().blocks_reads() {
        // Never read blindly: without a restore, the store's checksum is all there is.
        let differs = head.crc32c.clone().filter(|_| !settled_by_head);
        let stored = crate::destination::StoredObject {
            size: head.size,
            crc32c: chunk.archived_crc32c.clone().unwrap_or_default(),
            meta: head.meta,
        };
        let problem = check_object(chunk, Some(&stored)).or_else(|| {
            differs.map(|crc| {
                format!(
                    "checksum {crc} where {} was written (unconfirmed: reading it needs a restore)",
                    chunk.archived_crc32c.as_deref().unwrap_or("none")
                )
            })
        });
        return Ok(Checked::Cold(problem));
    }
    let stored = archive.destination.inspect(&chunk.object_key).await?;
    Ok(Checked::ReadWhole(check_object(chunk, stored.as_ref())))
}

/// 2. KVS → ledger: the fragments KVS lists that no done chunk holds.
async fn unarchived_fragments(
    archive: &ArchiveView,
    stream: &StreamConfig,
    done: &[Chunk],
    listed: &[Fragment],
    (start, end): (EpochMs, EpochMs),
) -> Result<Vec<Unarchived>> {
    let label = stream.label();
    let holdings = archive
        .ledger
        .holdings(&label, stream.timestamp_source, start, end)
        .await?;
    // Fragments of damaged chunks are reported with their chunk, not again here.
    let mut archived = HashSet::new();
    for chunk in done {
        for f in archive.ledger.fragments_of(chunk.id).await? {
            archived.insert(f.number);
        }
    }
    let legacy_done: Vec<(EpochMs, EpochMs)> = done.iter().map(|c| c.plan.clip_range()).collect();
    let within =
        |ranges: &[(EpochMs, EpochMs)], t: EpochMs| ranges.iter().any(|(a, b)| *a <= t && t <= *b);
    Ok(listed
        .iter()
        .filter(|f| {
            let in_legacy =
                within(&holdings.legacy, f.start_ms) && within(&legacy_done, f.start_ms);
            !archived.contains(&f.number) && !in_legacy
        })
        .map(|f| Unarchived {
            fragment_number: f.number.clone(),
            start: rfc3339(f.start_ms),
            held_by: holdings
                .held
                .contains(&f.number)
                .then(|| "in a chunk not archived yet".to_string()),
        })
        .collect())
}

/// 3. Destination → ledger: objects under the stream's prefix the ledger does not know.
async fn extra_objects(archive: &ArchiveView, label: &str) -> Result<Vec<String>> {
    let prefix = format!("{}{}/", archive.config.destination.prefix, label);
    let known: HashSet<String> = archive
        .ledger
        .object_keys(label)
        .await?
        .into_iter()
        .collect();
    Ok(archive
        .destination
        .list_keys(&prefix)
        .await?
        .into_iter()
        .filter(|k| !known.contains(k))
        .collect())
}

/// `--repair`: plans the damaged chunks again, plans the fragments no object holds, and
/// archives everything queued in `[start, end]`, as a backfill of the range does.
pub async fn repair(
    archiver: &Archiver,
    stream: &StreamConfig,
    (start, end): (EpochMs, EpochMs),
    report: &mut VerifyReport,
    shutdown: &Shutdown,
) -> Result<()> {
    if report.damaged.is_empty() && report.unarchived.is_empty() {
        return Ok(());
    }
    for damaged in &report.damaged {
        if archiver.ledger.requeue_chunk(damaged.chunk).await? {
            report.requeued += 1;
        }
    }
    report.repaired = true;
    let summary = archiver
        .archive_range(stream, start, end, &Progress::hidden(), shutdown)
        .await?;
    tracing::info!(stream = %stream.label(), archived = summary.done, failed = summary.failed.len(), "repair finished");
    Ok(())
}
