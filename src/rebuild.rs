//! `rebuild-ledger`: the ledger again from the destination, after its file was lost.
//!
//! Every object carries metadata naming its stream, range, kind, first and last fragment
//! and fragment count (see `worker::transfer`). That makes a chunk row; its fragment rows
//! (the numbers the planner needs so that nothing is archived twice, and the timings
//! `find` and `export` need) come from one ListFragments of the stream's archived range,
//! never from GetClip. Objects whose fragments KVS no longer lists get one fragment row
//! spanning the object, from the metadata alone: KVS cannot archive them again anyway.

use crate::archive::ArchiveView;
use crate::config::StreamConfig;
use crate::config::GET_CLIP_MAX_FRAGMENTS;
use crate::domain::{
    cmp_fragment_numbers, is_fragment_number, object_key, rfc3339, ChunkKind, ChunkPlan, EpochMs,
    Fragment, MAX_FRAGMENT_MS,
};
use crate::error::{Error, Result};
use crate::plan::sort_and_dedup;
use crate::source::kvs::KvsSource;
use futures_util::StreamExt;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// HeadObject requests in flight at once.
const HEADS_IN_FLIGHT: usize = 16;

/// What the rebuild found and recorded, per stream.
#[derive(Debug, Default, Clone, Serialize)]
pub struct RebuildReport {
    /// Objects listed under the stream's prefix.
    pub objects_listed: usize,
    /// Chunks recorded in the ledger as done.
    pub chunks_restored: usize,
    /// Objects whose fragments KVS no longer lists: restored from their metadata alone.
    pub from_metadata_only: Vec<String>,
    /// Objects a chunk of the ledger already held (with `--merge`).
    pub already_known: usize,
    /// Objects without this program's metadata, or of a stream not configured.
    pub skipped: Vec<String>,
    /// Objects whose metadata names this stream but cannot describe a chunk this
    /// program wrote (edited or corrupted): not restored.
    pub untrusted: Vec<Untrusted>,
    /// Objects the ledger could not take (with `--merge`): a chunk that is not done holds
    /// their range or fragments, so they may be archived again; `verify` reports them.
    pub refused: Vec<String>,
}

impl RebuildReport {
    /// The report as a person reads it.
    pub fn describe(&self) -> String {
        let mut text = format!(
            "rebuild-ledger: {} objects listed, {} chunks restored ({} from metadata only: KVS no longer lists their fragments), {} already in the ledger, {} skipped",
            self.objects_listed,
            self.chunks_restored,
            self.from_metadata_only.len(),
            self.already_known,
            self.skipped.len()
        );
        for key in &self.refused {
            let key = crate::domain::printable(key);
            text.push_str(&format!("\n  not restored {key}: a chunk of the ledger that is not done holds its range or fragments (`kvs-archiver verify` reports it)"));
        }
        for object in &self.untrusted {
            text.push_str(&format!(
                "\n  not restored {}: its metadata cannot be this program's ({}); compare it with the object, or remove the object",
                crate::domain::printable(&object.key),
                object.why
            ));
        }
        for key in &self.skipped {
            let key = crate::domain::printable(key);
            text.push_str(&format!(
                "\n  skipped {key}: no kvs-archiver metadata for a configured stream"
            ));
        }
        text
    }
}

/// An object whose metadata was refused, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Untrusted {
    /// The object's key.
    pub key: String,
    /// Why its metadata is refused.
    pub why: String,
}

/// No chunk spans this long: GetClip's limit is under 24 h.
const MAX_CLIP_SPAN_MS: EpochMs = 24 * 3_600_000;

/// One object as its metadata describes it.
struct Described {
    key: String,
    size: u64,
    kind: ChunkKind,
    start_ms: EpochMs,
    end_ms: EpochMs,
    count: usize,
    first: String,
    last: String,
    duration_ms: Option<u64>,
}

/// The object's metadata, checked as the bytes from outside they are (anyone who can
/// write to the bucket can edit it): `Ok(None)` when it is not this stream's object;
/// `Err` says why metadata of this stream cannot be a chunk this program wrote: its
/// range runs backwards or past 24 h, its count is outside GetClip's caps, its fragment
/// numbers or kind are not ones KVS or this program gives, or its key is not the key
/// that range and kind imply.
fn describe(
    key: &str,
    size: u64,
    meta: &BTreeMap<String, String>,
    stream: &StreamConfig,
    prefix: &str,
) -> std::result::Result<Option<Described>, String> {
    let label = stream.label();
    if meta.get("kvs-stream") != Some(&label)
        || meta.get("kvs-timestamp-source") != Some(&stream.timestamp_source.to_string())
    {
        return Ok(None);
    }
    let field = |name: &str| meta.get(name).ok_or(format!("no {name}"));
    let time = |name: &str| {
        field(name).and_then(|t| {
            chrono::DateTime::parse_from_rfc3339(t)
                .map(|t| t.timestamp_millis())
                .map_err(|_| format!("{name} {t:?} is not an RFC 3339 time"))
        })
    };
    let kind_text = field("kvs-chunk-kind")?;
    let kind =
        ChunkKind::parse(kind_text).ok_or(format!("kvs-chunk-kind {kind_text:?} is not a kind"))?;
    let (start_ms, end_ms) = (time("kvs-start")?, time("kvs-end")?);
    if end_ms < start_ms || end_ms - start_ms >= MAX_CLIP_SPAN_MS {
        return Err(format!(
            "kvs-start {} .. kvs-end {} is not a range under 24 h",
            rfc3339(start_ms),
            rfc3339(end_ms)
        ));
    }
    let count_text = field("kvs-fragment-count")?;
    let count = count_text
        .parse::<usize>()
        .ok()
        .filter(|n| (1..=GET_CLIP_MAX_FRAGMENTS as usize).contains(n))
        .filter(|n| kind != ChunkKind::Late || *n == 1)
        .ok_or(format!(
            "kvs-fragment-count {count_text:?} is not 1-{GET_CLIP_MAX_FRAGMENTS} (1 for a late fragment)"
        ))?;
    let (first, last) = (field("kvs-first-fragment")?, field("kvs-last-fragment")?);
    if !is_fragment_number(first)
        || !is_fragment_number(last)
        || cmp_fragment_numbers(first, last).is_gt()
    {
        return Err(format!(
            "kvs-first-fragment and kvs-last-fragment are not fragment numbers in order ({:?}, {:?})",
            first.chars().take(48).collect::<String>(),
            last.chars().take(48).collect::<String>()
        ));
    }
    let duration_ms = match meta.get("kvs-duration-ms") {
        None => None,
        Some(d) => Some(
            d.parse::<u64>()
                .ok()
                .filter(|d| *d <= count as u64 * MAX_FRAGMENT_MS)
                .ok_or(format!(
                    "kvs-duration-ms {d:?} is not a duration its fragments can have"
                ))?,
        ),
    };
    let implied = object_key(
        prefix,
        &label,
        &ChunkPlan {
            kind,
            start_ms,
            end_ms,
            fragment_count: count as u32,
            bytes: size,
            duration_ms: duration_ms.unwrap_or(0),
            first_fragment: first.clone(),
            last_fragment: last.clone(),
            fragments: Vec::new(),
        },
    );
    if implied != key {
        return Err(format!(
            "its metadata describes the object {implied}, not this one"
        ));
    }
    Ok(Some(Described {
        key: key.to_string(),
        size,
        kind,
        start_ms,
        end_ms,
        count,
        first: first.clone(),
        last: last.clone(),
        duration_ms,
    }))
}

/// The fragments of one object among those listed over its range.
fn fragments_of(object: &Described, listed: &[Fragment], taken: &HashSet<String>) -> Vec<Fragment> {
    let in_range: Vec<&Fragment> = listed
        .iter()
        .filter(|f| f.start_ms >= object.start_ms && f.start_ms <= object.end_ms)
        .filter(|f| !taken.contains(&f.number))
        .collect();
    let mut chosen: Vec<Fragment> = match object.kind {
        // Late: one fragment; Matroska: the fragments from the first to the last number.
        ChunkKind::Late | ChunkKind::Mkv => in_range
            .into_iter()
            .filter(|f| {
                cmp_fragment_numbers(&f.number, &object.first).is_ge()
                    && cmp_fragment_numbers(&f.number, &object.last).is_le()
            })
            .cloned()
            .collect(),
        // A clip: what its range lists, less what arrived after it was archived (those
        // came later, so they have the higher numbers).
        ChunkKind::Clip => {
            let mut by_number: Vec<&Fragment> = in_range;
            by_number.sort_by(|a, b| cmp_fragment_numbers(&a.number, &b.number));
            by_number.truncate(object.count);
            by_number.into_iter().cloned().collect()
        }
    };
    chosen.sort_by(Fragment::order);
    chosen
}

/// Rebuilds the ledger's chunks of `streams` from the destination.
pub async fn rebuild(
    archive: &ArchiveView,
    kvs: &KvsSource,
    streams: &[StreamConfig],
    merge: bool,
) -> Result<RebuildReport> {
    if !merge {
        refuse_a_ledger_with_chunks(archive).await?;
    }
    let mut report = RebuildReport::default();
    for stream in streams {
        let mut objects = described_objects(archive, stream, &mut report).await?;
        if objects.is_empty() {
            continue;
        }
        // Late and Matroska objects first: their fragments lie inside clip ranges.
        objects.sort_by_key(|o| (o.kind == ChunkKind::Clip, o.start_ms));
        restore_stream(archive, kvs, stream, &objects, &mut report).await?;
    }
    Ok(report)
}

/// Without `--merge`, the ledger must hold no chunk: rebuilding into a ledger in use
/// would mix two records of the same objects.
async fn refuse_a_ledger_with_chunks(archive: &ArchiveView) -> Result<()> {
    let held: Vec<String> = archive
        .ledger
        .status()
        .await?
        .into_iter()
        .filter(|s| s.done + s.pending + s.failed + s.expired + s.in_flight > 0)
        .map(|s| s.stream)
        .collect();
    if held.is_empty() {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "rebuild-ledger: the ledger at {} already holds chunks (streams: {}); give --merge to add only the objects it lacks, or point ledger.database_url at an empty ledger",
        crate::config::redact_url(&archive.config.ledger.database_url),
        held.join(", ")
    )))
}

/// The objects under the stream's folder, each described by its metadata. Objects this
/// program did not write are added to `report.skipped`, objects whose metadata is
/// refused to `report.untrusted`.
async fn described_objects(
    archive: &ArchiveView,
    stream: &StreamConfig,
    report: &mut RebuildReport,
) -> Result<Vec<Described>> {
    let prefix = &archive.config.destination.prefix;
    let keys = archive
        .destination
        .list_keys(&format!("{prefix}{}/", stream.label()))
        .await?;
    report.objects_listed += keys.len();
    // One HeadObject per object, several at a time.
    let heads: Vec<(String, Result<Option<crate::destination::ObjectHead>>)> =
        futures_util::stream::iter(keys)
            .map(|key| async move {
                let head = archive.destination.head(&key).await;
                (key, head)
            })
            .buffer_unordered(HEADS_IN_FLIGHT)
            .collect()
            .await;
    let mut objects = Vec::new();
    for (key, head) in heads {
        let Some(head) = head? else {
            continue;
        };
        match describe(&key, head.size, &head.meta, stream, prefix) {
            Ok(Some(object)) => objects.push(object),
            Ok(None) => report.skipped.push(key),
            Err(why) => {
                tracing::warn!(key = %key, why = %why, "rebuild-ledger: metadata refused");
                report.untrusted.push(Untrusted { key, why });
            }
        }
    }
    Ok(objects)
}

/// Records `objects` (late and Matroska ones first) in the ledger as archived chunks,
/// each with the fragments KVS still lists in its range, or one spanning it if none.
async fn restore_stream(
    archive: &ArchiveView,
    kvs: &KvsSource,
    stream: &StreamConfig,
    objects: &[Described],
    report: &mut RebuildReport,
) -> Result<()> {
    let label = stream.label();
    let from = objects.iter().map(|o| o.start_ms).min().unwrap_or(0);
    let to = objects.iter().map(|o| o.end_ms).max().unwrap_or(0);
    // A stream KVS no longer has (or no longer lets us list) is restored from the
    // metadata alone: its fragments cannot be fetched again anyway.
    let mut listed = match kvs.list(stream, from, to).await {
        Ok(listed) => listed,
        Err(e) if !e.retryability().can_retry() => {
            tracing::warn!(stream = %label, error = %e, "rebuild-ledger: cannot list the stream's fragments; restoring its objects from their metadata alone");
            Vec::new()
        }
        Err(e) => return Err(e),
    };
    sort_and_dedup(&mut listed);
    let mut taken: HashSet<String> = HashSet::new();
    let known: HashSet<String> = archive
        .ledger
        .done_in(&label, stream.timestamp_source, from - 86_400_000, to)
        .await?
        .into_iter()
        .map(|c| c.object_key)
        .collect();
    for object in objects {
        let mut fragments = fragments_of(object, &listed, &taken);
        if fragments.is_empty() {
            // KVS deleted them: one row spanning the object keeps `find` and `export`
            // working; nothing can fetch these fragments again.
            fragments = vec![Fragment {
                number: object.first.clone(),
                start_ms: object.start_ms,
                server_ms: object.start_ms,
                duration_ms: object
                    .duration_ms
                    .unwrap_or((object.end_ms - object.start_ms).max(1) as u64),
                size_bytes: object.size,
            }];
            report.from_metadata_only.push(object.key.clone());
        }
        taken.extend(fragments.iter().map(|f| f.number.clone()));
        let mut plan = ChunkPlan::of(object.kind, fragments);
        // The object's own range and fragment names, as written.
        plan.start_ms = object.start_ms;
        plan.end_ms = object.end_ms;
        plan.first_fragment = object.first.clone();
        plan.last_fragment = object.last.clone();
        let inserted = archive
            .ledger
            .insert_archived(
                &label,
                stream.timestamp_source,
                &plan,
                &object.key,
                object.size,
            )
            .await?;
        if inserted {
            report.chunks_restored += 1;
        } else if known.contains(&object.key) {
            report.already_known += 1;
        } else {
            report.refused.push(object.key.clone());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(number: &str, start_ms: i64) -> Fragment {
        Fragment {
            number: number.into(),
            start_ms,
            server_ms: start_ms,
            duration_ms: 1_000,
            size_bytes: 1,
        }
    }

    fn object(kind: ChunkKind, first: &str, last: &str, count: usize) -> Described {
        Described {
            key: "k".into(),
            size: 1,
            kind,
            start_ms: 0,
            end_ms: 3_000,
            count,
            first: first.into(),
            last: last.into(),
            duration_ms: None,
        }
    }

    #[test]
    fn a_clip_leaves_out_the_late_fragments_listed_inside_its_range() {
        // 9 and 10 were archived; 11 arrived later inside the range and is not the clip's.
        let listed = [fragment("9", 0), fragment("11", 500), fragment("10", 1_000)];
        let clip = fragments_of(
            &object(ChunkKind::Clip, "9", "10", 2),
            &listed,
            &HashSet::new(),
        );
        let numbers: Vec<&str> = clip.iter().map(|f| f.number.as_str()).collect();
        assert_eq!(numbers, ["9", "10"]);
        let taken: HashSet<String> = ["11".to_string()].into();
        let late = fragments_of(
            &object(ChunkKind::Late, "11", "11", 1),
            &listed,
            &HashSet::new(),
        );
        assert_eq!(late.len(), 1);
        let clip = fragments_of(&object(ChunkKind::Clip, "9", "10", 3), &listed, &taken);
        assert_eq!(
            clip.len(),
            2,
            "a late fragment taken by its own object is not the clip's"
        );
    }
}
