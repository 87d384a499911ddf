//! `find`: which archived object holds an instant of a stream, and where in it; or, when
//! none does, why not.

use crate::domain::{EpochMs, Fragment, TimestampSource};
use crate::error::Result;
use crate::ledger::{Chunk, ChunkState, Ledger};
use serde::Serialize;
use std::collections::HashMap;

/// Chunks are under 24 hours: any chunk holding an instant starts within a day before it.
const DAY_MS: i64 = 86_400_000;
/// A fragment lasts less than this.
const LONGEST: i64 = crate::domain::MAX_FRAGMENT_MS as i64;

/// A chunk's fragments, read once.
async fn fragments_read<'a>(
    ledger: &dyn Ledger,
    read: &'a mut HashMap<i64, Vec<Fragment>>,
    chunk: i64,
) -> Result<&'a [Fragment]> {
    if let std::collections::hash_map::Entry::Vacant(entry) = read.entry(chunk) {
        entry.insert(ledger.fragments_of(chunk).await?);
    }
    Ok(read.get(&chunk).map_or(&[][..], Vec::as_slice))
}

/// What the archive holds at an instant.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "found", rename_all = "snake_case")]
pub enum Finding {
    /// An archived object holds it.
    Archived {
        /// The object holding the instant.
        object_key: String,
        /// Into the object's timeline: GetClip's MP4 plays the chunk's fragments back to
        /// back, so this is the durations of the fragments before plus the way into this
        /// one.
        offset_ms: u64,
        /// The fragment holding the instant.
        fragment: String,
        /// Start of the chunk's first fragment: the object's time zero.
        chunk_start_ms: EpochMs,
    },
    /// A chunk holds it but is not archived.
    NotArchived {
        /// The chunk's state (planned, in flight, failed, expired).
        state: ChunkState,
        /// The object the chunk will be archived as.
        object_key: String,
        /// Why its last attempt failed, if one did.
        last_error: Option<String>,
    },
    /// Planning has not reached it yet.
    NotPlannedYet {
        /// Where planning has reached (`None`: it has not run).
        planned_through_ms: Option<EpochMs>,
    },
    /// KVS had no media then: planning listed past it and found no fragment holding it.
    NoMedia {
        /// Where archived media before it ends, and its object.
        before: Option<(EpochMs, String)>,
        /// Where archived media after it starts, and its object.
        after: Option<(EpochMs, String)>,
    },
}

/// Where `t` falls among a chunk's fragments (sorted by start): the fragment holding it
/// and the offset into the chunk's timeline.
fn locate(fragments: &[Fragment], t: EpochMs) -> Option<(&Fragment, u64)> {
    let mut before = 0u64;
    for f in fragments {
        let end = f.start_ms + f.duration_ms as i64;
        if f.start_ms <= t && t < end {
            return Some((f, before + (t - f.start_ms) as u64));
        }
        before += f.duration_ms;
    }
    None
}

/// Looks `t` up in the ledger for one stream.
pub async fn find(
    ledger: &dyn Ledger,
    stream: &str,
    source: TimestampSource,
    t: EpochMs,
) -> Result<Finding> {
    let (from, to) = (t - DAY_MS, t + DAY_MS);
    let chunks = ledger.done_in(stream, source, from, to).await?;
    // A chunk's fragments start within [plan.start_ms, plan.end_ms] and last at most
    // LONGEST: only the chunks that can hold `t`, or hold the media nearest it, are read,
    // not every fragment of two days.
    let mut read: HashMap<i64, Vec<Fragment>> = HashMap::new();
    for chunk in chunks
        .iter()
        .filter(|c| c.plan.start_ms <= t && t < c.plan.end_ms + LONGEST)
    {
        let fragments = ledger.fragments_of(chunk.id).await?;
        if let Some((fragment, offset_ms)) = locate(&fragments, t) {
            return Ok(Finding::Archived {
                object_key: chunk.object_key.clone(),
                offset_ms,
                fragment: fragment.number.clone(),
                chunk_start_ms: chunk.plan.start_ms,
            });
        }
        read.insert(chunk.id, fragments);
    }
    let mut before: Option<(EpochMs, String)> = None;
    let mut earlier: Vec<&Chunk> = chunks.iter().filter(|c| c.plan.start_ms <= t).collect();
    earlier.sort_by_key(|c| std::cmp::Reverse(c.plan.end_ms));
    for chunk in earlier {
        if before
            .as_ref()
            .is_some_and(|(b, _)| chunk.plan.end_ms + LONGEST <= *b)
        {
            break;
        }
        for f in fragments_read(ledger, &mut read, chunk.id).await? {
            let end = f.start_ms + f.duration_ms as i64;
            if end <= t && before.as_ref().is_none_or(|(b, _)| end > *b) {
                before = Some((end, chunk.object_key.clone()));
            }
        }
    }
    let mut after: Option<(EpochMs, String)> = None;
    let mut later: Vec<&Chunk> = chunks.iter().filter(|c| c.plan.end_ms > t).collect();
    later.sort_by_key(|c| c.plan.start_ms);
    for chunk in later {
        if after
            .as_ref()
            .is_some_and(|(a, _)| chunk.plan.start_ms >= *a)
        {
            break;
        }
        for f in fragments_read(ledger, &mut read, chunk.id).await? {
            if f.start_ms > t && after.as_ref().is_none_or(|(a, _)| f.start_ms < *a) {
                after = Some((f.start_ms, chunk.object_key.clone()));
            }
        }
    }
    let summary = ledger.range_summary(stream, source, t, t).await?;
    let unarchived: Vec<Chunk> = summary
        .failed
        .into_iter()
        .chain(summary.expired)
        .chain(ledger.claimable(stream, source, t, t, i64::MAX).await?)
        .collect();
    for chunk in unarchived {
        let fragments = ledger.fragments_of(chunk.id).await?;
        if locate(&fragments, t).is_some() {
            return Ok(Finding::NotArchived {
                state: chunk.state,
                object_key: chunk.object_key,
                last_error: chunk.last_error,
            });
        }
    }
    let planned_through_ms = ledger.progress(stream, source).await?.planned_through_ms;
    if planned_through_ms.is_none_or(|through| through < t) && after.is_none() {
        return Ok(Finding::NotPlannedYet { planned_through_ms });
    }
    Ok(Finding::NoMedia { before, after })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fragment(number: &str, start_ms: i64, duration_ms: u64) -> Fragment {
        Fragment {
            number: number.into(),
            start_ms,
            server_ms: start_ms,
            duration_ms,
            size_bytes: 1,
        }
    }

    #[test]
    fn offsets_run_back_to_back_across_a_gap_inside_a_chunk() {
        let fragments = [
            fragment("1", 1_000, 2_000),
            fragment("2", 3_000, 2_000),
            // A gap from 5,000 to 9,000: the MP4 plays 3 straight after 2.
            fragment("3", 9_000, 2_000),
        ];
        assert_eq!(
            locate(&fragments, 1_000).map(|(f, o)| (f.number.as_str(), o)),
            Some(("1", 0))
        );
        assert_eq!(
            locate(&fragments, 4_999).map(|(f, o)| (f.number.as_str(), o)),
            Some(("2", 3_999))
        );
        assert!(locate(&fragments, 5_000).is_none());
        assert_eq!(
            locate(&fragments, 9_500).map(|(f, o)| (f.number.as_str(), o)),
            Some(("3", 4_500))
        );
        assert!(locate(&fragments, 11_000).is_none());
    }
}
