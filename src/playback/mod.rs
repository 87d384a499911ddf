//! Footage by time: any range of a stream, read back from the archive (never from KVS,
//! which may have deleted it long ago) and remuxed without decoding.
//!
//! - [`footage`]: which archived objects and fragments hold a range, from the ledger.
//! - [`clip`]: one progressive MP4 of the range, frame-exact by an edit list, laid out
//!   before a byte is read (its length is known, any byte range can be served), then
//!   streamed from the objects.
//! - [`hls`]: an HLS playlist of the range, and its fragmented-MP4 segments.
//! - [`preview`]: the keyframe at an instant, as a one-frame MP4 a browser decodes.
//!
//! `export` and `serve`'s playback API are both built on these.

pub mod clip;
pub mod footage;
pub mod hls;
pub mod preview;

use crate::destination::Destination;
use crate::domain::{EpochMs, Fragment, TimestampSource};
use crate::error::{Error, Result};
use crate::find::Finding;
use crate::ledger::{ChunkState, Ledger};
use crate::mp4::track::{moov_extent, video_track, TrackLimits, VideoTrack};
use serde::Serialize;

/// Media missing for longer than this is reported as a gap (shorter ones are the jitter
/// between fragments' timestamps).
pub const GAP_REPORT_MS: i64 = 500;
/// Bytes read first from an object: its `ftyp` and `moov` are almost always within them.
const HEADER_PROBE: u64 = 256 * 1024;
/// An object whose `moov` is larger than this is not one this program wrote.
const MAX_MOOV: u64 = 64 << 20;

/// What the output's timeline does where the archive has no media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GapMode {
    /// The frame before a gap stays on screen for the gap's length: the output's time
    /// `t` is always wall time `first frame + t` (the first frame is the keyframe at or
    /// before the requested start).
    Hold,
    /// Media on either side of a gap plays back to back, as GetClip's own MP4s do.
    Join,
}

/// A span of the range with no media in the output, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Gap {
    /// Where the gap starts (wall time).
    pub from_ms: EpochMs,
    /// Where it ends.
    pub to_ms: EpochMs,
    /// What the range holds there: no media, media not archived yet, or media left out.
    pub why: String,
    /// The frame before it stays on screen for its length (`--gaps hold`); otherwise the
    /// media after it follows at once.
    pub held: bool,
}

/// An object holding media of the range that the output leaves out.
#[derive(Debug, Clone, Serialize)]
pub struct LeftOut {
    /// The object left out.
    pub object_key: String,
    /// Why: stored as Matroska, or tracks other than video.
    pub reason: String,
}

/// Why the archive has nothing at `t`, in a few words.
pub async fn why_missing(
    ledger: &dyn Ledger,
    stream: &str,
    source: TimestampSource,
    t: EpochMs,
) -> Result<String> {
    Ok(match crate::find::find(ledger, stream, source, t).await? {
        Finding::NoMedia { .. } => "KVS had no media then".into(),
        Finding::Archived { object_key, .. } => format!("in {object_key}, left out (see below)"),
        Finding::NotArchived {
            state: ChunkState::Failed,
            last_error,
            ..
        } => format!(
            "its chunk failed ({}); a backfill of this time tries again",
            last_error.as_deref().unwrap_or("no error recorded")
        ),
        Finding::NotArchived {
            state: ChunkState::Expired,
            ..
        } => "KVS deleted the media before it was archived".into(),
        Finding::NotArchived { state, .. } => format!("not archived yet (chunk {state})"),
        Finding::NotPlannedYet { .. } => "not archived yet".into(),
    })
}

/// Bytes of `moov` per sample, at most: its sample tables (`stsz`, `stts`, `ctts`,
/// `stss`, `co64`, `stsc`) take 44 bytes for a sample in the worst layout.
const MOOV_BYTES_PER_SAMPLE: u64 = 64;

/// Reads an object's `moov` (a range read of its first bytes) and its video track, which
/// may claim no more than `limits` (from the ledger's record of the object).
pub(crate) async fn read_track(
    destination: &Destination,
    key: &str,
    limits: TrackLimits,
) -> Result<VideoTrack> {
    let max_moov = (limits.max_samples as u64)
        .saturating_mul(MOOV_BYTES_PER_SAMPLE)
        .saturating_add(HEADER_PROBE)
        .min(MAX_MOOV);
    let malformed = |e: crate::mp4::Mp4Error| Error::Clip {
        key: key.to_string(),
        message: format!("cannot read its MP4 header: {e}"),
        retry: crate::error::Retryability::Permanent,
    };
    let mut prefix = destination
        .read_range(key, 0, HEADER_PROBE)
        .await?
        .collect()
        .await?;
    let (start, end) = loop {
        match moov_extent(&prefix).map_err(malformed)? {
            Some((start, end)) if end <= prefix.len() => break (start, end),
            Some((_, end)) if end as u64 <= max_moov => {
                prefix = destination
                    .read_range(key, 0, end as u64)
                    .await?
                    .collect()
                    .await?;
                if prefix.len() < end {
                    return Err(malformed(crate::mp4::Mp4Error::Malformed(
                        "the object ends inside its moov".into(),
                    )));
                }
            }
            _ => {
                return Err(malformed(crate::mp4::Mp4Error::Malformed(
                    "no moov box in its first bytes".into(),
                )))
            }
        }
    };
    video_track(&prefix[start..end], limits).map_err(malformed)
}

/// Splits a track's samples among the chunk's fragments, which its MP4 plays back to
/// back: fragment `i` starts at the keyframe nearest the sum of the durations before it
/// (the listing's durations are whole milliseconds; the track's need not be).
pub(crate) fn fragment_bounds(track: &VideoTrack, fragments: &[Fragment]) -> Vec<(usize, usize)> {
    let samples = &track.samples;
    let syncs: Vec<usize> = (0..samples.len()).filter(|&i| samples[i].sync).collect();
    let mut starts = vec![0usize];
    for f in fragments.iter().take(fragments.len().saturating_sub(1)) {
        let previous = *starts.last().unwrap_or(&0);
        // From the previous boundary, so the listing's rounding never adds up.
        let elapsed = samples
            .get(previous)
            .map_or(u64::MAX, |s| track.ms(s.dts))
            .saturating_add(f.duration_ms);
        let at = syncs.partition_point(|&i| track.ms(samples[i].dts) < elapsed);
        let candidates = [at.checked_sub(1), Some(at)];
        let nearest = candidates
            .into_iter()
            .flatten()
            .filter_map(|k| syncs.get(k).copied())
            .filter(|&i| i > previous)
            .min_by_key(|&i| track.ms(samples[i].dts).abs_diff(elapsed));
        starts.push(nearest.unwrap_or(samples.len()).max(previous));
    }
    let mut bounds: Vec<(usize, usize)> = starts.windows(2).map(|w| (w[0], w[1])).collect();
    bounds.push((*starts.last().unwrap_or(&0), samples.len()));
    bounds
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mp4::track::Sample;

    fn track(frames_per_fragment: &[usize]) -> VideoTrack {
        let mut samples = Vec::new();
        let mut dts = 0;
        for &n in frames_per_fragment {
            for i in 0..n {
                samples.push(Sample {
                    offset: 0,
                    size: 1,
                    dts,
                    duration: 9_000,
                    cts_offset: 0,
                    sync: i == 0,
                });
                dts += 9_000;
            }
        }
        VideoTrack {
            timescale: 90_000,
            width: 0,
            height: 0,
            sample_description: Vec::new(),
            samples,
            other_tracks: Vec::new(),
        }
    }

    fn fragment(duration_ms: u64) -> Fragment {
        Fragment {
            number: String::new(),
            start_ms: 0,
            server_ms: 0,
            duration_ms,
            size_bytes: 0,
        }
    }

    #[test]
    fn rounded_listing_durations_do_not_add_up_over_a_long_clip() {
        // 3,000 fragments of 20 frames of 9,004 ticks at 90 kHz (2,000.9 ms each), listed
        // as 2,000 ms: summed from the clip's start, the error passes a GOP.
        let mut track = track(&[20; 3_000]);
        for (i, sample) in track.samples.iter_mut().enumerate() {
            sample.dts = i as u64 * 9_004;
            sample.duration = 9_004;
        }
        let fragments = vec![fragment(2_000); 3_000];
        let bounds = fragment_bounds(&track, &fragments);
        for (k, bound) in bounds.iter().enumerate() {
            assert_eq!(*bound, (20 * k, 20 * k + 20), "fragment {k}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1_000))]

        /// Whatever a track's samples and a listing's durations, the bounds cover the
        /// samples in order, one pair per fragment, each within the track.
        #[test]
        fn fragment_bounds_cover_the_track_in_order(
            samples in proptest::collection::vec((0u32..200_000, proptest::bool::ANY), 0..300),
            durations in proptest::collection::vec(0u64..=crate::domain::MAX_FRAGMENT_MS, 1..40),
        ) {
            let mut track = track(&[]);
            let mut dts = 0u64;
            for (duration, sync) in samples {
                track.samples.push(Sample { offset: 0, size: 1, dts, duration, cts_offset: 0, sync });
                dts += u64::from(duration);
            }
            let fragments: Vec<Fragment> = durations.into_iter().map(fragment).collect();
            let bounds = fragment_bounds(&track, &fragments);
            proptest::prop_assert_eq!(bounds.len(), fragments.len());
            let mut previous_end = 0;
            for (from, to) in bounds {
                proptest::prop_assert!(from <= to && to <= track.samples.len());
                proptest::prop_assert_eq!(from, previous_end);
                previous_end = to;
            }
            proptest::prop_assert_eq!(previous_end, track.samples.len());
        }
    }

    /// An object's bytes as the export reader meets them: a real header of `frames`
    /// samples (the writer's), the media after it.
    fn object_bytes(frames: u32) -> Vec<u8> {
        let stsd = crate::mp4::writer::tests::sample_description();
        let mut table = crate::mp4::writer::TrackTable::new(90_000, 320, 180, stsd);
        for i in 0..frames {
            table.push(100 + i, 3_000, 0, i % 30 == 0, i == 0);
        }
        let mut bytes = table.header();
        bytes.resize(bytes.len() + table.media_bytes() as usize, 0);
        bytes
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(300))]

        /// The export reader (a range read of the first bytes, `moov_extent`, a second
        /// read when `moov` is longer, `video_track`) on damaged objects from a
        /// destination: it never panics, never reads past what the limits allow, and a
        /// track it accepts lies inside the object.
        #[test]
        fn the_export_reader_takes_or_refuses_damaged_objects(
            edits in proptest::collection::vec((0usize..2048, proptest::num::u8::ANY), 0..10),
            cut in 0usize..8192,
        ) {
            let mut bytes = object_bytes(90);
            for (at, byte) in edits {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            bytes.truncate(cut.max(1).min(bytes.len()));
            let work = tempfile::tempdir().expect("tempdir");
            std::fs::create_dir_all(work.path().join("kvs/cam")).expect("dirs");
            std::fs::write(work.path().join("kvs/cam/x.mp4"), &bytes).expect("object");
            let destination = Destination::Dir(crate::destination::dir::DirDestination::new(work.path().to_path_buf(), "kvs/"));
            let limits = TrackLimits::for_object(bytes.len() as u64, 3_000);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            if let Ok(track) = runtime.block_on(read_track(&destination, "kvs/cam/x.mp4", limits)) {
                proptest::prop_assert!(track.samples.len() <= limits.max_samples);
                for sample in &track.samples {
                    proptest::prop_assert!(sample.offset + u64::from(sample.size) <= bytes.len() as u64);
                }
            }
        }
    }

    #[test]
    fn fragments_start_at_the_keyframe_nearest_their_listed_start() {
        // 100 ms frames; the listing rounds durations (2,001 and 999 ms).
        let track = track(&[20, 10, 5]);
        let bounds = fragment_bounds(&track, &[fragment(2_001), fragment(999), fragment(500)]);
        assert_eq!(bounds, vec![(0, 20), (20, 30), (30, 35)]);
    }
}
