//! What the archive holds of a stream over a range, read from the ledger alone: the done
//! chunks whose fragments reach into it, and those fragments in wall-time order (late
//! fragments archived in objects of their own fall back into their place). The objects'
//! sample tables are read only when a caller walks the fragments, a few objects at a
//! time ([`Tracks`]), so memory does not grow with the range.

use super::{fragment_bounds, read_track, LeftOut};
use crate::destination::Destination;
use crate::domain::{ChunkKind, EpochMs, Fragment, TimestampSource};
use crate::error::Result;
use crate::ledger::{Chunk, Ledger};
use crate::mp4::track::{Sample, TrackLimits, VideoTrack};
use std::sync::Arc;

/// A fragment lasts less than this: chunks starting this long before the range cannot
/// reach into it.
const LONGEST_FRAGMENT_MS: i64 = crate::domain::MAX_FRAGMENT_MS as i64;

fn reaches_into(fragment: &Fragment, start: EpochMs, end: EpochMs) -> bool {
    fragment.start_ms < end && fragment.start_ms + fragment.duration_ms as i64 > start
}

/// The done chunks of `stream` with a fragment playing in `[start, end)`, each with its
/// fragments: the objects a read of the range reads, so also those `restore` must make
/// readable first. (A chunk's range ends where its last fragment starts: one ending
/// exactly at `start` still plays into the range.)
pub async fn chunks_reaching_into(
    ledger: &dyn Ledger,
    stream: &str,
    source: TimestampSource,
    start: EpochMs,
    end: EpochMs,
) -> Result<Vec<(Chunk, Vec<Fragment>)>> {
    let reach = start.saturating_sub(LONGEST_FRAGMENT_MS);
    let mut found = Vec::new();
    for chunk in ledger.done_in(stream, source, reach, end).await? {
        let fragments = ledger.fragments_of(chunk.id).await?;
        if fragments.iter().any(|f| reaches_into(f, start, end)) {
            found.push((chunk, fragments));
        }
    }
    Ok(found)
}

/// An archived object holding fragments of the range.
#[derive(Debug, Clone)]
pub struct ArchivedObject {
    /// Its key in the destination.
    pub key: String,
    /// What its sample tables may claim (from the ledger's record of it).
    pub limits: TrackLimits,
    /// All of its chunk's fragments, which its MP4 plays back to back.
    pub fragments: Vec<Fragment>,
}

/// One fragment of the range, and where it is archived.
#[derive(Debug, Clone)]
pub struct Placed {
    /// Index into [`Footage::objects`].
    pub object: usize,
    /// Index into that object's fragments.
    pub index: usize,
}

/// The archive's fragments over a range of one stream.
#[derive(Debug, Clone)]
pub struct Footage {
    /// The stream's label.
    pub stream: String,
    /// Which timestamps the range is in.
    pub source: TimestampSource,
    /// The objects holding fragments of the range, in the order the ledger gave them.
    pub objects: Vec<ArchivedObject>,
    /// The fragments reaching into the range, by start time (then number).
    pub placed: Vec<Placed>,
    /// Objects with media of the range that cannot be remuxed (Matroska).
    pub left_out: Vec<LeftOut>,
}

impl Footage {
    /// Reads the done chunks of `stream` reaching into `[start, end)` and their
    /// fragments. `destination` is asked for an object's size only when the ledger has
    /// none (a ledger rebuilt from metadata).
    pub async fn of_range(
        ledger: &dyn Ledger,
        destination: &Destination,
        stream: &str,
        source: TimestampSource,
        start: EpochMs,
        end: EpochMs,
    ) -> Result<Footage> {
        let mut footage = Footage {
            stream: stream.to_string(),
            source,
            objects: Vec::new(),
            placed: Vec::new(),
            left_out: Vec::new(),
        };
        let overlaps = |f: &Fragment| reaches_into(f, start, end);
        for (chunk, fragments) in chunks_reaching_into(ledger, stream, source, start, end).await? {
            if chunk.plan.kind == ChunkKind::Mkv {
                footage.left_out.push(LeftOut {
                    object_key: chunk.object_key.clone(),
                    reason:
                        "stored as Matroska (KVS could not package it as MP4); play it on its own"
                            .into(),
                });
                continue;
            }
            let object_len = match chunk.archived_bytes {
                Some(bytes) => bytes,
                None => destination
                    .head(&chunk.object_key)
                    .await?
                    .map_or(0, |head| head.size),
            };
            // At least KVS's longest fragment (20 s) per fragment: a chunk restored from
            // metadata alone may record less than its media plays.
            let longest = u64::from(chunk.plan.fragment_count).saturating_mul(20_000);
            let limits = TrackLimits::for_object(object_len, chunk.plan.duration_ms.max(longest));
            let object = footage.objects.len();
            for (index, fragment) in fragments.iter().enumerate() {
                if overlaps(fragment) {
                    footage.placed.push(Placed { object, index });
                }
            }
            footage.objects.push(ArchivedObject {
                key: chunk.object_key,
                limits,
                fragments,
            });
        }
        let objects = &footage.objects;
        footage.placed.sort_by(|a, b| {
            let (fa, fb) = (footage_fragment(objects, a), footage_fragment(objects, b));
            fa.start_ms
                .cmp(&fb.start_ms)
                .then_with(|| crate::domain::cmp_fragment_numbers(&fa.number, &fb.number))
        });
        Ok(footage)
    }

    /// The fragment `placed` names.
    pub fn fragment(&self, placed: &Placed) -> &Fragment {
        footage_fragment(&self.objects, placed)
    }
}

fn footage_fragment<'a>(objects: &'a [ArchivedObject], placed: &Placed) -> &'a Fragment {
    &objects[placed.object].fragments[placed.index]
}

/// An object's video track and the samples of each of its fragments.
pub struct ObjectTrack {
    /// The track, every sample included.
    pub track: VideoTrack,
    /// `(from, to)` sample indexes of each fragment of the chunk.
    bounds: Vec<(usize, usize)>,
}

impl ObjectTrack {
    /// The samples of fragment `index` of the chunk.
    pub fn samples_of(&self, index: usize) -> &[Sample] {
        self.bounds
            .get(index)
            .and_then(|&(from, to)| self.track.samples.get(from..to))
            .unwrap_or(&[])
    }
}

/// The few objects' tracks a walk through the fragments needs at once: the object being
/// read, and the late fragments' objects it steps out to and back from.
pub struct Tracks {
    kept: Vec<(String, Arc<ObjectTrack>)>,
    capacity: usize,
}

impl Tracks {
    /// Tracks of at most `capacity` objects held at a time.
    pub fn new(capacity: usize) -> Tracks {
        Tracks {
            kept: Vec::new(),
            capacity: capacity.max(1),
        }
    }

    /// The track of `footage`'s object `object`, read from `destination` unless held.
    pub async fn get(
        &mut self,
        footage: &Footage,
        destination: &Destination,
        object: usize,
    ) -> Result<Arc<ObjectTrack>> {
        if let Some(held) = self.held(&footage.objects[object].key) {
            return Ok(held);
        }
        let read = read_object(footage, destination, object).await?;
        self.keep(footage.objects[object].key.clone(), read.clone());
        Ok(read)
    }

    /// The track of the object `key`, if held (it becomes the most recently used).
    pub fn held(&mut self, key: &str) -> Option<Arc<ObjectTrack>> {
        let at = self.kept.iter().position(|(held, _)| held == key)?;
        let kept = self.kept.remove(at);
        self.kept.push(kept.clone());
        Some(kept.1)
    }

    /// Holds `track` as the object `key`'s, letting the least recently used go.
    pub fn keep(&mut self, key: String, track: Arc<ObjectTrack>) {
        if self.held(&key).is_some() {
            return;
        }
        if self.kept.len() >= self.capacity {
            self.kept.remove(0);
        }
        self.kept.push((key, track));
    }
}

/// Reads the track of `footage`'s object `object` from `destination`.
pub async fn read_object(
    footage: &Footage,
    destination: &Destination,
    object: usize,
) -> Result<Arc<ObjectTrack>> {
    let archived = &footage.objects[object];
    let track = read_track(destination, &archived.key, archived.limits).await?;
    let bounds = fragment_bounds(&track, &archived.fragments);
    Ok(Arc::new(ObjectTrack { track, bounds }))
}
