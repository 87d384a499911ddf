//! HLS of a range: a media playlist whose segments are the archived fragments, each
//! remuxed on request into fragmented MP4 (`moof` + `mdat`) from its object, with an
//! initialization segment per object (`EXT-X-MAP`).
//!
//! Following Apple's HLS authoring rules: `EXT-X-TARGETDURATION` is at least every
//! segment's rounded duration, `EXT-X-INDEPENDENT-SEGMENTS` (every KVS fragment starts
//! with a keyframe), `EXT-X-PROGRAM-DATE-TIME` on every segment, and
//! `EXT-X-DISCONTINUITY` where the archive has a gap. Segments' decode times are their
//! wall times, so a player's timeline jumps over a gap by exactly its length.

use super::footage::{read_object, Footage, Tracks};
use super::GAP_REPORT_MS;
use crate::destination::Destination;
use crate::domain::{rfc3339, EpochMs};
use crate::error::Result;
use crate::mp4::fragmented::{init_segment, segment_header};

/// One segment of a playlist: an archived fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// The fragment's start (wall time).
    pub start_ms: EpochMs,
    /// How long it plays.
    pub duration_ms: u64,
    /// The fragment's number.
    pub number: String,
    /// Media is missing before it.
    pub after_gap: bool,
    /// Its object differs from the previous segment's: a new initialization segment.
    pub new_object: bool,
}

/// The segments of `footage` that start in `[start, end)`, or the one holding `start`.
pub fn segments(footage: &Footage, start: EpochMs, end: EpochMs) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    let mut previous: Option<(usize, EpochMs)> = None;
    for placed in &footage.placed {
        let f = footage.fragment(placed);
        let f_end = f.start_ms + f.duration_ms as i64;
        if f.start_ms >= end || f_end <= start {
            continue;
        }
        out.push(Segment {
            start_ms: f.start_ms,
            duration_ms: f.duration_ms,
            number: f.number.clone(),
            after_gap: previous.is_some_and(|(_, e)| f.start_ms - e > GAP_REPORT_MS),
            new_object: previous.is_none_or(|(o, _)| o != placed.object),
        });
        previous = Some((placed.object, f_end));
    }
    out
}

/// The playlist text. `query` (`start=…&end=…&expires=…&sig=…`) is appended to every
/// URI, so a player that cannot send headers still carries its grant. `complete`: the
/// range is in the past and archived, so nothing will be added (VOD); otherwise the
/// player reloads it (EVENT).
pub fn playlist(segments: &[Segment], query: &str, complete: bool) -> String {
    let target = segments
        .iter()
        .map(|s| (s.duration_ms + 500) / 1000)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut out = format!(
        "#EXTM3U\n#EXT-X-VERSION:7\n#EXT-X-TARGETDURATION:{target}\n#EXT-X-MEDIA-SEQUENCE:0\n#EXT-X-PLAYLIST-TYPE:{}\n#EXT-X-INDEPENDENT-SEGMENTS\n",
        if complete { "VOD" } else { "EVENT" }
    );
    for s in segments {
        if s.after_gap {
            out.push_str("#EXT-X-DISCONTINUITY\n");
        }
        if s.new_object {
            out.push_str(&format!(
                "#EXT-X-MAP:URI=\"hls/{}.init.mp4?f={}&{query}\"\n",
                s.start_ms, s.number
            ));
        }
        out.push_str(&format!(
            "#EXT-X-PROGRAM-DATE-TIME:{}\n#EXTINF:{:.3},\nhls/{}.m4s?f={}&{query}\n",
            rfc3339(s.start_ms),
            s.duration_ms as f64 / 1000.0,
            s.start_ms,
            s.number
        ));
    }
    if complete {
        out.push_str("#EXT-X-ENDLIST\n");
    }
    out
}

/// A segment ready to send: its header, then byte runs `(key, offset, len)` of its object.
pub struct SegmentBody {
    /// The init segment, or `moof` and the `mdat` header.
    pub header: Vec<u8>,
    /// The samples' bytes, in order.
    pub runs: Vec<(u64, u64)>,
    /// The object they are in.
    pub key: String,
}

impl SegmentBody {
    /// Bytes in all.
    pub fn len(&self) -> u64 {
        self.header.len() as u64 + self.runs.iter().map(|(_, len)| len).sum::<u64>()
    }

    /// Whether it has no bytes (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The fragment starting at `start_ms` numbered `number`, if archived: its placement
/// in a footage read for it.
fn fragment_at(footage: &Footage, start_ms: EpochMs, number: &str) -> Option<usize> {
    footage.placed.iter().position(|placed| {
        let f = footage.fragment(placed);
        f.start_ms == start_ms && f.number == number
    })
}

/// The initialization segment (`init`) or the media segment of the fragment starting at
/// `start_ms` numbered `number`; `None` when the archive holds no such fragment.
/// `tracks` is shared by every request: it is locked to look a track up or keep one,
/// never while one is read.
pub async fn segment(
    footage: &Footage,
    tracks: &tokio::sync::Mutex<Tracks>,
    destination: &Destination,
    start_ms: EpochMs,
    number: &str,
    init: bool,
) -> Result<Option<SegmentBody>> {
    let Some(at) = fragment_at(footage, start_ms, number) else {
        return Ok(None);
    };
    let placed = &footage.placed[at];
    let key = footage.objects[placed.object].key.clone();
    let held = tracks.lock().await.held(&key);
    let object = match held {
        Some(held) => held,
        None => {
            let read = read_object(footage, destination, placed.object).await?;
            tracks.lock().await.keep(key.clone(), read.clone());
            read
        }
    };
    if init {
        return Ok(Some(SegmentBody {
            header: init_segment(&object.track),
            runs: Vec::new(),
            key,
        }));
    }
    let samples = object.samples_of(placed.index);
    let timescale = u64::from(object.track.timescale);
    // A timescale no camera uses could overflow wall-time ticks: such a segment starts at 0.
    let base_dts = u64::try_from(start_ms)
        .ok()
        .and_then(|ms| ms.checked_mul(timescale))
        .map_or(0, |ticks| ticks / 1000);
    let sequence = (start_ms / 100) as u32;
    let header = segment_header(sequence, base_dts, samples);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for sample in samples {
        match runs.last_mut() {
            Some((offset, len)) if *offset + *len == sample.offset => {
                *len += u64::from(sample.size);
            }
            _ => runs.push((sample.offset, u64::from(sample.size))),
        }
    }
    Ok(Some(SegmentBody { header, runs, key }))
}
