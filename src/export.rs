//! `export`: one MP4 of any time range, taken from the archive (never from KVS, which may
//! have deleted the media long ago).
//!
//! The samples of the range are copied out of the archived objects as they are (no
//! decoding, no re-encoding): the output starts at the keyframe at or before the start,
//! so it plays from its first frame, and ends with the last frame that starts before the
//! end. Late fragments archived in objects of their own are put back in their place.
//! Memory holds the sample tables (a few bytes per frame), never the media: the header is
//! written first, then each run of samples is streamed from the destination into the file.

use crate::archive::ArchiveView;
use crate::destination::Destination;
use crate::domain::ChunkKind;
use crate::domain::{rfc3339, EpochMs, Fragment, TimestampSource};
use crate::error::{Error, Result};
use crate::find::Finding;
use crate::ledger::{ChunkState, Ledger};
use crate::mp4::track::{moov_extent, video_track, Sample, TrackLimits, VideoTrack};
use crate::mp4::writer::TrackTable;
use crate::retry::RetryPolicy;
use crate::telemetry::ByteProgress;
use serde::Serialize;
use std::path::Path;
use tokio::io::AsyncWriteExt;

/// A fragment lasts less than this: chunks starting this long before the range cannot
/// reach into it.
const LONGEST_FRAGMENT_MS: i64 = crate::domain::MAX_FRAGMENT_MS as i64;
/// Media missing for longer than this is reported as a gap (shorter ones are the jitter
/// between fragments' timestamps).
pub const GAP_REPORT_MS: i64 = 500;
/// Bytes read first from an object: its `ftyp` and `moov` are almost always within them.
const HEADER_PROBE: u64 = 256 * 1024;
/// An object whose `moov` is larger than this is not one this program wrote.
const MAX_MOOV: u64 = 64 << 20;

/// What the output's timeline does where the archive has no media.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
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

/// What `export` wrote, for its summary and `--json`.
#[derive(Debug, Clone, Serialize)]
pub struct ExportReport {
    /// The file written.
    pub output: String,
    /// Wall time of the first frame (the keyframe at or before the requested start).
    pub first_frame_ms: EpochMs,
    /// Wall time where the last frame ends.
    pub last_frame_end_ms: EpochMs,
    /// How long the output plays.
    pub duration_ms: u64,
    /// Video frames in the output.
    pub frames: u32,
    /// The output's size, in bytes.
    pub bytes: u64,
    /// How gaps were written (`--gaps`).
    pub gap_mode: GapMode,
    /// The archived objects the output's samples come from, in time order.
    pub objects: Vec<String>,
    /// The fragments whose samples the output holds, in time order.
    pub fragments: Vec<String>,
    /// Spans of the range with no media in the output.
    pub gaps: Vec<Gap>,
    /// Objects with media of the range that the output leaves out.
    pub left_out: Vec<LeftOut>,
}

impl ExportReport {
    /// The report as a person reads it.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "wrote {}: {:.1} s, {} frames, {:.1} MB from {} objects ({} fragments), {} .. {}",
            self.output,
            self.duration_ms as f64 / 1000.0,
            self.frames,
            self.bytes as f64 / 1e6,
            self.objects.len(),
            self.fragments.len(),
            rfc3339(self.first_frame_ms),
            rfc3339(self.last_frame_end_ms),
        );
        for gap in &self.gaps {
            out.push_str(&format!(
                "\ngap {} .. {} ({:.1} s): {}{}",
                rfc3339(gap.from_ms),
                rfc3339(gap.to_ms),
                (gap.to_ms - gap.from_ms) as f64 / 1000.0,
                gap.why,
                if gap.held {
                    "; the frame before it stays on screen"
                } else {
                    ""
                }
            ));
        }
        for left in &self.left_out {
            out.push_str(&format!("\nleft out {}: {}", left.object_key, left.reason));
        }
        out
    }
}

/// One fragment's samples in one object.
struct Piece {
    object: usize,
    fragment: String,
    wall_start: EpochMs,
    /// Track time of the fragment's first sample.
    first_dts: u64,
    samples: Vec<Sample>,
}

struct Object {
    key: String,
    track: VideoTrack,
}

/// Bytes of `moov` per sample, at most: its sample tables (`stsz`, `stts`, `ctts`,
/// `stss`, `co64`, `stsc`) take 44 bytes for a sample in the worst layout.
const MOOV_BYTES_PER_SAMPLE: u64 = 64;

/// Reads an object's `moov` (a range read of its first bytes) and its video track, which
/// may claim no more than `limits` (from the ledger's record of the object).
async fn read_track(
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
fn fragment_bounds(track: &VideoTrack, fragments: &[Fragment]) -> Vec<(usize, usize)> {
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

/// Why the archive has nothing at `t`, in a few words.
async fn why_missing(
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

/// Writes `[start, end)` of `stream` from the archive to `output`.
#[allow(clippy::too_many_arguments)]
pub async fn export(
    archive: &ArchiveView,
    stream: &str,
    source: TimestampSource,
    start: EpochMs,
    end: EpochMs,
    gap_mode: GapMode,
    output: &Path,
    label: &str,
    policy: &RetryPolicy,
) -> Result<ExportReport> {
    let (ledger, destination) = (archive.ledger.as_ref(), archive.destination.as_ref());
    let request = Request {
        ledger,
        stream,
        source,
        start,
        end,
        gap_mode,
    };
    let (media, left_out) = ArchivedMedia::gather(&request, destination).await?;
    let Some((first_piece, first_sample, first_frame_ms)) =
        media.first_keyframe(start).filter(|f| f.2 < end)
    else {
        let why = why_missing(ledger, stream, source, start).await?;
        return Err(Error::Usage(format!(
            "export {stream}: the archive holds no video between {} and {} ({why}); `kvs-archiver find --stream {stream} --at T` tells what the archive holds at an instant",
            rfc3339(start),
            rfc3339(end)
        )));
    };
    let mut assembly = assemble(&request, &media, first_piece, first_sample).await?;
    let last_frame_end_ms = assembly.last_frame_end_ms.unwrap_or(first_frame_ms);
    if first_frame_ms - start > GAP_REPORT_MS {
        assembly.gaps.insert(
            0,
            Gap {
                from_ms: start,
                to_ms: first_frame_ms,
                why: why_missing(ledger, stream, source, start).await?,
                // Before the first frame: the output starts with it.
                held: false,
            },
        );
    }
    if end - last_frame_end_ms > GAP_REPORT_MS {
        assembly.gaps.push(Gap {
            from_ms: last_frame_end_ms,
            to_ms: end,
            why: why_missing(ledger, stream, source, last_frame_end_ms + 1).await?,
            held: false,
        });
    }
    let bytes = write_output(&assembly, &media, destination, output, label, policy).await?;
    let table = &assembly.table;
    Ok(ExportReport {
        output: output.display().to_string(),
        first_frame_ms,
        last_frame_end_ms,
        duration_ms: table.duration() * 1000 / u64::from(table.timescale),
        frames: table.sample_count(),
        bytes,
        gap_mode,
        objects: assembly
            .used_objects
            .iter()
            .map(|&o| media.objects[o].key.clone())
            .collect(),
        fragments: assembly.fragments,
        gaps: assembly.gaps,
        left_out,
    })
}

/// What an export asks for, and where to look up why media is missing.
struct Request<'a> {
    ledger: &'a dyn Ledger,
    stream: &'a str,
    source: TimestampSource,
    start: EpochMs,
    end: EpochMs,
    gap_mode: GapMode,
}

/// The archived objects that hold media of the range, and their fragments' samples in
/// wall-time order.
struct ArchivedMedia {
    /// Each object's video track, without its samples (they live in `pieces`).
    objects: Vec<Object>,
    /// Sorted by wall time, then fragment number.
    pieces: Vec<Piece>,
}

impl ArchivedMedia {
    /// Reads the sample tables of every archived chunk with a fragment in the range.
    /// Returns them with the objects that hold media of the range but are left out.
    async fn gather(
        request: &Request<'_>,
        destination: &Destination,
    ) -> Result<(Self, Vec<LeftOut>)> {
        let (ledger, start, end) = (request.ledger, request.start, request.end);
        let mut media = ArchivedMedia {
            objects: Vec::new(),
            pieces: Vec::new(),
        };
        let mut left_out: Vec<LeftOut> = Vec::new();
        for chunk in ledger
            .done_in(
                request.stream,
                request.source,
                start - LONGEST_FRAGMENT_MS,
                end,
            )
            .await?
        {
            let fragments = ledger.fragments_of(chunk.id).await?;
            let overlaps =
                |f: &Fragment| f.start_ms < end && f.start_ms + f.duration_ms as i64 > start;
            if !fragments.iter().any(overlaps) {
                continue;
            }
            if chunk.plan.kind == ChunkKind::Mkv {
                left_out.push(LeftOut {
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
            let track = read_track(destination, &chunk.object_key, limits).await?;
            if !track.other_tracks.is_empty() {
                left_out.push(LeftOut {
                    object_key: chunk.object_key.clone(),
                    reason: format!(
                        "its {} track(s) (export copies the video track only)",
                        track.other_tracks.join(", ")
                    ),
                });
            }
            media.add_object(chunk.object_key, track, &fragments, overlaps);
        }
        media.pieces.sort_by(|a, b| {
            a.wall_start
                .cmp(&b.wall_start)
                .then_with(|| crate::domain::cmp_fragment_numbers(&a.fragment, &b.fragment))
        });
        Ok((media, left_out))
    }

    /// Adds an object's track, its samples cut into one piece per fragment of the range
    /// (`in_range`); the bounds come from all of the chunk's `fragments`, which its MP4
    /// plays back to back.
    fn add_object(
        &mut self,
        key: String,
        track: VideoTrack,
        fragments: &[Fragment],
        in_range: impl Fn(&Fragment) -> bool,
    ) {
        let bounds = fragment_bounds(&track, fragments);
        for (fragment, (from, to)) in fragments.iter().zip(bounds) {
            if !in_range(fragment) || from >= to {
                continue;
            }
            self.pieces.push(Piece {
                object: self.objects.len(),
                fragment: fragment.number.clone(),
                wall_start: fragment.start_ms,
                first_dts: track.samples[from].dts,
                samples: track.samples[from..to].to_vec(),
            });
        }
        self.objects.push(Object {
            key,
            track: VideoTrack {
                samples: Vec::new(),
                ..track
            },
        });
    }

    /// The wall time of `sample`, one of `piece`'s.
    fn wall(&self, piece: &Piece, sample: &Sample) -> EpochMs {
        let track = &self.objects[piece.object].track;
        piece.wall_start + track.ms(sample.dts.saturating_sub(piece.first_dts)) as i64
    }

    /// The keyframe at or before `start`, or the first one after it: (piece, sample,
    /// wall time).
    fn first_keyframe(&self, start: EpochMs) -> Option<(usize, usize, EpochMs)> {
        let mut first: Option<(usize, usize, EpochMs)> = None;
        for (p, piece) in self.pieces.iter().enumerate() {
            for (i, sample) in piece.samples.iter().enumerate() {
                if !sample.sync {
                    continue;
                }
                let t = self.wall(piece, sample);
                if t <= start || first.is_none() {
                    first = Some((p, i, t));
                }
                if t > start {
                    return first;
                }
            }
        }
        first
    }

    /// Every sample from the first one that starts before `end`, with its wall time:
    /// (piece, sample, wall time).
    fn selected(
        &self,
        first_piece: usize,
        first_sample: usize,
        end: EpochMs,
    ) -> impl Iterator<Item = (usize, usize, EpochMs)> + '_ {
        self.pieces
            .iter()
            .enumerate()
            .skip(first_piece)
            .flat_map(move |(p, piece)| {
                let from = if p == first_piece { first_sample } else { 0 };
                piece
                    .samples
                    .iter()
                    .enumerate()
                    .skip(from)
                    .map(move |(i, sample)| (p, i, self.wall(piece, sample)))
            })
            .take_while(move |e| e.2 < end)
    }
}

/// The output's track, laid out from the selected samples, and what it took them from.
struct Assembly {
    table: TrackTable,
    /// Runs of bytes to copy: (object, offset, length), one per output chunk.
    runs: Vec<(usize, u64, u64)>,
    /// Gaps between the first and the last frame (those at the edges are added after).
    gaps: Vec<Gap>,
    /// Indexes into [`ArchivedMedia::objects`], in the order first used.
    used_objects: Vec<usize>,
    /// The fragments whose samples the output holds, in time order.
    fragments: Vec<String>,
    /// Wall time where the last frame ends; `None` with no sample.
    last_frame_end_ms: Option<EpochMs>,
}

/// Lays out every selected sample from the first keyframe as one track: a sample joins
/// the output chunk before it when its bytes follow on in the same object, and the gaps
/// between samples are reported (and held over, with `--gaps hold`).
async fn assemble(
    request: &Request<'_>,
    media: &ArchivedMedia,
    first_piece: usize,
    first_sample: usize,
) -> Result<Assembly> {
    let (objects, pieces) = (&media.objects, &media.pieces);
    let reference = &objects[pieces[first_piece].object];
    let mut out = Assembly {
        table: TrackTable::new(
            reference.track.timescale,
            reference.track.width,
            reference.track.height,
            reference.track.sample_description.clone(),
        ),
        runs: Vec::new(),
        gaps: Vec::new(),
        used_objects: Vec::new(),
        fragments: Vec::new(),
        last_frame_end_ms: None,
    };
    let mut previous: Option<(usize, Sample, EpochMs)> = None;
    for (p, i, t) in media.selected(first_piece, first_sample, request.end) {
        let piece = &pieces[p];
        let object = &objects[piece.object];
        let sample = piece.samples[i];
        check_same_format(request, &reference.track, object, t)?;
        if out.fragments.last() != Some(&piece.fragment) {
            out.fragments.push(piece.fragment.clone());
        }
        if out.used_objects.last() != Some(&piece.object)
            && !out.used_objects.contains(&piece.object)
        {
            out.used_objects.push(piece.object);
        }
        let mut new_chunk = true;
        if let Some((previous_piece, previous_sample, previous_t)) = previous {
            let hold = note_gap(
                request,
                &mut out.gaps,
                &object.track,
                previous_sample,
                previous_t,
                t,
            )
            .await?;
            if let Some(ticks) = hold {
                out.table.extend_last(ticks);
            }
            let same_object = pieces[previous_piece].object == piece.object;
            new_chunk = !(same_object
                && previous_sample.offset + u64::from(previous_sample.size) == sample.offset);
        }
        out.table.push(
            sample.size,
            sample.duration,
            sample.cts_offset,
            sample.sync,
            new_chunk,
        );
        match out.runs.last_mut() {
            Some(run) if !new_chunk => run.2 += u64::from(sample.size),
            _ => out
                .runs
                .push((piece.object, sample.offset, u64::from(sample.size))),
        }
        previous = Some((p, sample, t));
    }
    out.last_frame_end_ms = previous
        .map(|(p, s, t)| t + objects[pieces[p].object].track.ms(u64::from(s.duration)) as i64);
    Ok(out)
}

/// Refuses a sample whose object's codec, picture size or timescale differs from the
/// first frame's: one MP4 track cannot hold both.
fn check_same_format(
    request: &Request<'_>,
    reference: &VideoTrack,
    object: &Object,
    t: EpochMs,
) -> Result<()> {
    if object.track.sample_description == reference.sample_description
        && object.track.timescale == reference.timescale
    {
        return Ok(());
    }
    let (stream, start, end) = (request.stream, request.start, request.end);
    Err(Error::Usage(format!(
        "export {stream}: the codec or picture size changes at {} (object {}), which one MP4 track cannot hold; export [{}, {}) and [{}, {}] separately",
        rfc3339(t),
        object.key,
        rfc3339(start),
        rfc3339(t),
        rfc3339(t),
        rfc3339(end)
    )))
}

/// Looks at the time between the previous sample's end and a sample at `t`: a gap
/// longer than [`GAP_REPORT_MS`] is added to `gaps`, with why it is missing. Returns the
/// ticks to lengthen the previous sample by when the gap is held over (`--gaps hold`).
async fn note_gap(
    request: &Request<'_>,
    gaps: &mut Vec<Gap>,
    track: &VideoTrack,
    previous_sample: Sample,
    previous_t: EpochMs,
    t: EpochMs,
) -> Result<Option<u32>> {
    let expected = previous_t + track.ms(u64::from(previous_sample.duration)) as i64;
    let missing = t - expected;
    // A sample lasts at most 2^32 ticks (13 h at 90 kHz): a longer gap is joined.
    let ticks = u32::try_from(missing.max(0) as u64 * u64::from(track.timescale) / 1000)
        .ok()
        .and_then(|t| t.checked_add(previous_sample.duration).map(|_| t));
    let held = request.gap_mode == GapMode::Hold && ticks.is_some();
    if missing > GAP_REPORT_MS {
        let mut why = why_missing(
            request.ledger,
            request.stream,
            request.source,
            expected + missing / 2,
        )
        .await?;
        if request.gap_mode == GapMode::Hold && !held {
            why.push_str("; too long to hold one frame over, so joined");
        }
        gaps.push(Gap {
            from_ms: expected,
            to_ms: t,
            why,
            held,
        });
    }
    Ok(ticks.filter(|_| held))
}

/// Writes the assembled track to `output`: to a new partial file first, renamed into
/// place once complete, so a failed export leaves no half file under the asked name.
/// Returns the bytes written.
async fn write_output(
    assembly: &Assembly,
    media: &ArchivedMedia,
    destination: &Destination,
    output: &Path,
    label: &str,
    policy: &RetryPolicy,
) -> Result<u64> {
    let header = assembly.table.header();
    let total = header.len() as u64 + assembly.table.media_bytes();
    let progress = ByteProgress::new(label, total);
    // A name no one knows in advance, created new: a file or link planted beside the
    // output is never written through.
    let partial = std::path::PathBuf::from(format!(
        "{}.{:016x}.partial",
        output.display(),
        fastrand::u64(..)
    ));
    let written = write_file(
        &partial,
        &header,
        &assembly.runs,
        &media.objects,
        destination,
        &progress,
        policy,
    )
    .await;
    progress.finish();
    if let Err(e) = written.and_then(|()| {
        std::fs::rename(&partial, output).map_err(|e| file_error("rename", output, e))
    }) {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    Ok(total)
}
fn file_error(op: &'static str, path: &Path, e: std::io::Error) -> Error {
    let hint = if e.raw_os_error() == Some(28) {
        " (the disk is full: free space or write the export elsewhere)"
    } else {
        ""
    };
    Error::Destination {
        op,
        target: path.display().to_string(),
        message: format!("{e}{hint}"),
        retry: crate::error::Retryability::Permanent,
    }
}

async fn write_file(
    path: &Path,
    header: &[u8],
    runs: &[(usize, u64, u64)],
    objects: &[Object],
    destination: &Destination,
    progress: &ByteProgress,
    policy: &RetryPolicy,
) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Mode 0666 before the umask, as any new file of the user's.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map(tokio::fs::File::from_std)
        .map_err(|e| file_error("create", path, e))?;
    file.write_all(header)
        .await
        .map_err(|e| file_error("write", path, e))?;
    progress.advance(header.len() as u64);
    for &(object, offset, len) in runs {
        let key = &objects[object].key;
        let mut copied = 0u64;
        let mut attempt = 0u32;
        // A body that breaks off is read again from where it stopped.
        while copied < len {
            let read = async {
                let mut body = destination
                    .read_range(key, offset + copied, len - copied)
                    .await?;
                let mut got = 0u64;
                while let Some(bytes) = body.next().await? {
                    let take = bytes.len().min((len - copied) as usize);
                    file.write_all(&bytes[..take])
                        .await
                        .map_err(|e| file_error("write", path, e))?;
                    copied += take as u64;
                    got += take as u64;
                    progress.advance(take as u64);
                    if copied == len {
                        break;
                    }
                }
                Ok::<u64, Error>(got)
            }
            .await;
            match read {
                Ok(0) => break,
                Ok(_) => attempt = 0,
                Err(e) if policy.allows(attempt, e.retryability()) => {
                    attempt += 1;
                    tracing::warn!(key = %key, error = %e, attempt, "export: reading again");
                    tokio::time::sleep(policy.delay(attempt, e.retryability())).await;
                }
                Err(e) => return Err(e),
            }
        }
        if copied != len {
            return Err(Error::Clip {
                key: key.clone(),
                message: format!(
                    "the object ends before its samples do (read {copied} of {len} bytes at {offset}): `kvs-archiver verify` checks it"
                ),
                retry: crate::error::Retryability::Permanent,
            });
        }
    }
    file.sync_all()
        .await
        .map_err(|e| file_error("sync", path, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
