//! One progressive MP4 of any range of a stream: the samples of every archived object
//! the range crosses, as one video track, copied as they are.
//!
//! The clip is laid out before a byte of media is read: its header (the sample tables),
//! its length and, for each run of bytes, the object and offset it comes from. Any byte
//! range of it can then be served, and memory holds the tables in their compact written
//! form, never the media, and never more than a few objects' tables as read ([`Tracks`]).
//!
//! A frame-exact cut ([`Cut::Exact`]) keeps the frames from the keyframe at or before the
//! start (a decoder needs them) and presents from the frame showing at the start, by an
//! edit list; the end is cut the same way.

use super::footage::{read_object, Footage, ObjectTrack, Tracks};
use super::{why_missing, Gap, GapMode, LeftOut, GAP_REPORT_MS};
use crate::destination::Destination;
use crate::domain::{rfc3339, EpochMs, TimestampSource};
use crate::error::{Error, Result, Retryability};
use crate::ledger::Ledger;
use crate::mp4::text::WallClockText;
use crate::mp4::track::{Sample, VideoTrack};
use crate::mp4::writer::{Edit, TrackTable};
use crate::retry::RetryPolicy;
use bytes::Bytes;
use serde::Serialize;
use std::sync::Arc;

/// Where the clip starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Cut {
    /// On the frame showing at the start (and the end): the frames before it from the
    /// keyframe are in the file, decoded but not shown.
    Exact,
    /// On the keyframe at or before the start: every frame in the file is shown.
    Keyframe,
}

/// What clip to make.
#[derive(Debug, Clone, Copy)]
pub struct ClipSpec {
    /// The range's start (wall time of the stream's timestamps).
    pub start: EpochMs,
    /// The range's end: frames starting at or after it are left out.
    pub end: EpochMs,
    /// What the timeline does where the archive has no media.
    pub gaps: GapMode,
    /// Where the clip starts and ends.
    pub cut: Cut,
    /// Adds a text track of wall-clock time.
    pub wall_clock_text: bool,
}

/// What a clip holds, for `export`'s report and the API's headers.
#[derive(Debug, Clone, Serialize)]
pub struct ClipReport {
    /// Wall time of the first frame in the file (the keyframe at or before the start).
    pub first_frame_ms: EpochMs,
    /// Wall time of the first frame shown: the one at the start with an exact cut.
    pub shown_from_ms: EpochMs,
    /// Wall time where the last frame shown ends.
    pub last_frame_end_ms: EpochMs,
    /// How long the clip plays.
    pub duration_ms: u64,
    /// Video frames shown.
    pub frames: u32,
    /// Video frames in the file (those before the first shown included).
    pub samples: u32,
    /// The file's size, in bytes.
    pub bytes: u64,
    /// How gaps were written.
    pub gap_mode: GapMode,
    /// Where the clip was cut.
    pub cut: Cut,
    /// The archived objects the samples come from, in time order.
    pub objects: Vec<String>,
    /// The fragments whose samples the clip holds, in time order.
    pub fragments: Vec<String>,
    /// Spans of the range with no media in the clip.
    pub gaps: Vec<Gap>,
    /// Objects with media of the range that the clip leaves out.
    pub left_out: Vec<LeftOut>,
}

/// Bytes of one object copied into the clip.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// Index into [`Clip::keys`].
    object: u32,
    /// Where the bytes start in the object.
    offset: u64,
    /// How many.
    len: u64,
    /// Where they start in the clip.
    at: u64,
}

/// A clip laid out: its bytes are the header, the text track's samples, then the runs.
pub struct Clip {
    header: Bytes,
    text: Option<WallClockText>,
    text_bytes: u64,
    runs: Vec<Run>,
    keys: Vec<String>,
    /// What the clip holds.
    pub report: ClipReport,
}

/// The clip's sample tables as they are laid out, and what they came from.
struct Layout {
    table: TrackTable,
    runs: Vec<Run>,
    keys: Vec<String>,
    gaps: Vec<Gap>,
    fragments: Vec<String>,
    /// Track time so far (the sum of the durations laid out).
    ticks: u64,
    /// (track time, wall time) where each fragment's samples start.
    anchors: Vec<(u64, EpochMs)>,
    /// The frame showing at the start: (track time, wall time, samples before it).
    shown: Option<(u64, EpochMs, u32)>,
    /// The previous sample: (object key index, sample, wall time).
    previous: Option<(u32, Sample, EpochMs)>,
    first_cts: i32,
    left_out: Vec<LeftOut>,
}

/// Where the keyframe the clip starts with is: (placed fragment, sample, wall time).
type Start = (usize, usize, EpochMs);

impl Clip {
    /// Lays out the clip of `spec`'s range of `stream`. An error when the archive holds
    /// no video in the range says why, as `find` would.
    pub async fn build(
        ledger: &dyn Ledger,
        destination: &Destination,
        stream: &str,
        source: TimestampSource,
        spec: ClipSpec,
    ) -> Result<Clip> {
        let footage =
            Footage::of_range(ledger, destination, stream, source, spec.start, spec.end).await?;
        let mut tracks = Tracks::new(4);
        let first = first_keyframe(&footage, &mut tracks, destination, spec.start).await?;
        let Some(first) = first.filter(|first| first.2 < spec.end) else {
            let why = why_missing(ledger, stream, source, spec.start).await?;
            return Err(Error::Usage(format!(
                "{stream}: the archive holds no video between {} and {} ({why}); `kvs-archiver find --stream {stream} --at T` tells what the archive holds at an instant",
                rfc3339(spec.start),
                rfc3339(spec.end)
            )));
        };
        let mut layout = lay_out(ledger, destination, &footage, &mut tracks, spec, first).await?;
        layout.left_out.splice(0..0, footage.left_out.clone());
        layout.finish(ledger, &footage, spec, first.2).await
    }

    /// The clip's length in bytes.
    pub fn len(&self) -> u64 {
        self.report.bytes
    }

    /// A strong entity tag: the header holds every sample's size and place, and the
    /// objects never change once written.
    pub fn etag(&self) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        hash.update(&self.header);
        for key in &self.keys {
            hash.update(key.as_bytes());
            hash.update([0]);
        }
        for run in &self.runs {
            hash.update(run.object.to_be_bytes());
            hash.update(run.offset.to_be_bytes());
        }
        format!("\"{}\"", hex::encode(&hash.finalize()[..16]))
    }

    /// Whether the clip has no bytes (never: it has a header).
    pub fn is_empty(&self) -> bool {
        self.report.bytes == 0
    }

    /// Bytes `[from, to)` of the clip, read as they are sent into the channel returned
    /// (a few chunks ahead of its reader). A body that breaks off is read again from
    /// where it stopped, as `policy` allows; an error ends the stream.
    pub fn stream(
        self: std::sync::Arc<Self>,
        destination: std::sync::Arc<Destination>,
        from: u64,
        to: u64,
        policy: RetryPolicy,
    ) -> tokio::sync::mpsc::Receiver<Result<Bytes>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            if let Err(e) = self.send(&destination, from, to, &policy, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        rx
    }

    async fn send(
        &self,
        destination: &Destination,
        mut at: u64,
        to: u64,
        policy: &RetryPolicy,
        tx: &tokio::sync::mpsc::Sender<Result<Bytes>>,
    ) -> Result<()> {
        let to = to.min(self.len());
        let header_len = self.header.len() as u64;
        let closed = || Error::Usage("the reader went away".into());
        if at < header_len.min(to) {
            let end = header_len.min(to);
            tx.send(Ok(self.header.slice(at as usize..end as usize)))
                .await
                .map_err(|_| closed())?;
            at = end;
        }
        let media_start = header_len + self.text_bytes;
        if let Some(text) = &self.text {
            while at < media_start.min(to) {
                let len = (media_start.min(to) - at).min(64 << 10);
                let bytes = text.read(at - header_len, len);
                at += bytes.len() as u64;
                tx.send(Ok(Bytes::from(bytes)))
                    .await
                    .map_err(|_| closed())?;
            }
        }
        let first = self.runs.partition_point(|run| run.at + run.len <= at);
        for run in &self.runs[first..] {
            if at >= to {
                break;
            }
            let within = at - run.at;
            let len = (run.len - within).min(to - at);
            let key = &self.keys[run.object as usize];
            send_range(destination, key, run.offset + within, len, policy, tx).await?;
            at += len;
        }
        Ok(())
    }
}

/// Sends `len` bytes of `key` from `offset` into `tx`, reading again where a body broke
/// off, as `policy` allows.
pub async fn send_range(
    destination: &Destination,
    key: &str,
    offset: u64,
    len: u64,
    policy: &RetryPolicy,
    tx: &tokio::sync::mpsc::Sender<Result<Bytes>>,
) -> Result<()> {
    let mut copied = 0u64;
    let mut attempt = 0u32;
    while copied < len {
        let read = async {
            let mut body = destination
                .read_range(key, offset + copied, len - copied)
                .await?;
            let mut got = 0u64;
            while let Some(mut bytes) = body.next().await? {
                bytes.truncate((len - copied) as usize);
                copied += bytes.len() as u64;
                got += bytes.len() as u64;
                tx.send(Ok(bytes))
                    .await
                    .map_err(|_| Error::Usage("the reader went away".into()))?;
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
                tracing::warn!(key = %key, error = %e, attempt, "clip: reading again");
                tokio::time::sleep(policy.delay(attempt, e.retryability())).await;
            }
            Err(e) => return Err(e),
        }
    }
    if copied != len {
        return Err(Error::Clip {
            key: key.to_string(),
            message: format!(
                "the object ends before its samples do (read {copied} of {len} bytes at {offset}): `kvs-archiver verify` checks it"
            ),
            retry: Retryability::Permanent,
        });
    }
    Ok(())
}

/// The keyframe at or before `start`, or else the first one after it.
async fn first_keyframe(
    footage: &Footage,
    tracks: &mut Tracks,
    destination: &Destination,
    start: EpochMs,
) -> Result<Option<Start>> {
    let mut first: Option<Start> = None;
    for (p, placed) in footage.placed.iter().enumerate() {
        let object = tracks.get(footage, destination, placed.object).await?;
        let fragment = footage.fragment(placed);
        let samples = object.samples_of(placed.index);
        let Some(base) = samples.first().map(|s| s.dts) else {
            continue;
        };
        for (i, sample) in samples.iter().enumerate() {
            if !sample.sync {
                continue;
            }
            let t = fragment.start_ms + object.track.ms(sample.dts - base) as i64;
            if t <= start || first.is_none() {
                first = Some((p, i, t));
            }
            if t > start {
                return Ok(first);
            }
        }
    }
    Ok(first)
}

/// Object tracks read ahead of a walk through the fragments: the objects in the order the
/// walk first needs them, [`READ_AHEAD`] read at once; revisits (a late fragment's
/// object, then back) come from the few held.
struct ReadAhead<'a> {
    tracks: &'a mut Tracks,
    /// Objects the read-ahead has already yielded: one let go since is read again alone.
    yielded: std::collections::HashSet<usize>,
    destination: &'a Destination,
    ahead: TracksInOrder<'a>,
}

/// Object tracks as the read-ahead yields them: (object, its track or why not).
type TracksInOrder<'a> = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = (usize, Result<Arc<ObjectTrack>>)> + Send + 'a>,
>;

/// Objects whose headers are read at once: the walk waits on one round trip per few
/// objects, not per object, and holds no more than this many tables ahead.
const READ_AHEAD: usize = 6;

impl<'a> ReadAhead<'a> {
    fn new(
        footage: &'a Footage,
        tracks: &'a mut Tracks,
        destination: &'a Destination,
        from: usize,
    ) -> Self {
        use futures_util::StreamExt;
        let mut order: Vec<usize> = Vec::new();
        for placed in &footage.placed[from..] {
            if !order.contains(&placed.object) {
                order.push(placed.object);
            }
        }
        let ahead =
            futures_util::stream::iter(order)
                .map(move |object| async move {
                    (object, read_object(footage, destination, object).await)
                })
                .buffered(READ_AHEAD);
        ReadAhead {
            tracks,
            yielded: std::collections::HashSet::new(),
            destination,
            ahead: Box::pin(ahead),
        }
    }

    async fn get(&mut self, footage: &Footage, object: usize) -> Result<Arc<ObjectTrack>> {
        use futures_util::StreamExt;
        let key = &footage.objects[object].key;
        if let Some(held) = self.tracks.held(key) {
            return Ok(held);
        }
        if self.yielded.contains(&object) {
            return self.tracks.get(footage, self.destination, object).await;
        }
        while let Some((read_object, read)) = self.ahead.next().await {
            self.yielded.insert(read_object);
            let read = read?;
            self.tracks
                .keep(footage.objects[read_object].key.clone(), read.clone());
            if read_object == object {
                return Ok(read);
            }
        }
        self.tracks.get(footage, self.destination, object).await
    }
}

/// Lays out every sample from the `first` keyframe to the end of the range as one track.
async fn lay_out(
    ledger: &dyn Ledger,
    destination: &Destination,
    footage: &Footage,
    tracks: &mut Tracks,
    spec: ClipSpec,
    first: Start,
) -> Result<Layout> {
    let reference = tracks
        .get(footage, destination, footage.placed[first.0].object)
        .await?;
    let mut tracks = ReadAhead::new(footage, tracks, destination, first.0);
    let reference = VideoTrack {
        samples: Vec::new(),
        ..reference.track.clone()
    };
    let mut layout = Layout {
        table: TrackTable::new(
            reference.timescale,
            reference.width,
            reference.height,
            reference.sample_description.clone(),
        ),
        runs: Vec::new(),
        keys: Vec::new(),
        gaps: Vec::new(),
        fragments: Vec::new(),
        ticks: 0,
        anchors: Vec::new(),
        shown: None,
        previous: None,
        first_cts: 0,
        left_out: Vec::new(),
    };
    for (p, placed) in footage.placed.iter().enumerate().skip(first.0) {
        let fragment = footage.fragment(placed);
        if fragment.start_ms >= spec.end {
            break;
        }
        let object = tracks.get(footage, placed.object).await?;
        let key = &footage.objects[placed.object].key;
        layout.note_other_tracks(key, &object.track);
        let samples = object.samples_of(placed.index);
        let Some(base) = samples.first().map(|s| s.dts) else {
            continue;
        };
        let skip = if p == first.0 { first.1 } else { 0 };
        let mut anchored = false;
        for sample in samples.iter().skip(skip) {
            let t = fragment.start_ms + object.track.ms(sample.dts - base) as i64;
            if t >= spec.end {
                break;
            }
            check_same_format(footage, spec, &reference, key, &object.track, t)?;
            let object_index = layout.key_index(key);
            if !anchored {
                // Gaps lie between fragments; within one, frame times are the track's.
                layout
                    .note_gap(ledger, footage, spec, &object.track, t)
                    .await?;
                layout.anchors.push((layout.ticks, t));
                anchored = true;
                if layout.fragments.last() != Some(&fragment.number) {
                    layout.fragments.push(fragment.number.clone());
                }
            }
            if spec.cut == Cut::Exact && t <= spec.start {
                layout.shown = Some((layout.ticks, t, layout.table.sample_count()));
            }
            layout.push(object_index, *sample, t);
        }
    }
    Ok(layout)
}

impl Layout {
    /// The index of `key` in the clip's objects, added when new.
    fn key_index(&mut self, key: &str) -> u32 {
        match self.keys.iter().rposition(|k| k == key) {
            Some(i) => i as u32,
            None => {
                self.keys.push(key.to_string());
                (self.keys.len() - 1) as u32
            }
        }
    }

    /// Reports, once per object, the tracks other than video it holds.
    fn note_other_tracks(&mut self, key: &str, track: &VideoTrack) {
        if !track.other_tracks.is_empty() && !self.left_out.iter().any(|l| l.object_key == key) {
            self.left_out.push(LeftOut {
                object_key: key.to_string(),
                reason: format!(
                    "its {} track(s) (clips copy the video track only)",
                    track.other_tracks.join(", ")
                ),
            });
        }
    }

    /// Appends a sample at wall time `t`: it joins the run before it when its bytes
    /// follow on in the same object.
    fn push(&mut self, object: u32, sample: Sample, t: EpochMs) {
        let follows = self.previous.is_some_and(|(o, previous, _)| {
            o == object && previous.offset + u64::from(previous.size) == sample.offset
        });
        if self.table.sample_count() == 0 {
            self.first_cts = sample.cts_offset;
        }
        self.table.push(
            sample.size,
            sample.duration,
            sample.cts_offset,
            sample.sync,
            !follows,
        );
        match self.runs.last_mut() {
            Some(run) if follows => run.len += u64::from(sample.size),
            _ => self.runs.push(Run {
                object,
                offset: sample.offset,
                len: u64::from(sample.size),
                at: 0,
            }),
        }
        self.ticks += u64::from(sample.duration);
        self.previous = Some((object, sample, t));
    }

    /// Looks at the time between the previous sample's end and a sample at `t`: a gap
    /// longer than [`GAP_REPORT_MS`] is reported, with why it is missing, and held over
    /// (the previous frame lengthened) with [`GapMode::Hold`].
    async fn note_gap(
        &mut self,
        ledger: &dyn Ledger,
        footage: &Footage,
        spec: ClipSpec,
        track: &VideoTrack,
        t: EpochMs,
    ) -> Result<()> {
        let Some((_, previous, previous_t)) = self.previous else {
            return Ok(());
        };
        // check_same_format holds: one timescale throughout.
        let timescale = u64::from(track.timescale);
        let expected = previous_t + (u64::from(previous.duration) * 1000 / timescale) as i64;
        let missing = t - expected;
        // A sample lasts at most 2^32 ticks (13 h at 90 kHz): a longer gap is joined.
        let ticks = u32::try_from(missing.max(0) as u64 * u64::from(track.timescale) / 1000)
            .ok()
            .filter(|ticks| ticks.checked_add(previous.duration).is_some());
        // Less than half a frame is the rounding of the listing's times, not a gap: held
        // over at every fragment, it would stretch a long clip.
        let frame_ms = (u64::from(previous.duration) * 1000 / timescale) as i64;
        let held = spec.gaps == GapMode::Hold && ticks.is_some() && 2 * missing >= frame_ms.max(1);
        if missing > GAP_REPORT_MS {
            let mut why = why_missing(
                ledger,
                &footage.stream,
                footage.source,
                expected + missing / 2,
            )
            .await?;
            if spec.gaps == GapMode::Hold && !held {
                why.push_str("; too long to hold one frame over, so joined");
            }
            self.gaps.push(Gap {
                from_ms: expected,
                to_ms: t,
                why,
                held,
            });
        }
        if let Some(ticks) = ticks.filter(|ticks| held && *ticks > 0) {
            self.table.extend_last(ticks);
            self.ticks += u64::from(ticks);
        }
        Ok(())
    }

    /// Reports the range's edges that no frame covers, first and last among the gaps.
    async fn report_edge_gaps(
        &mut self,
        ledger: &dyn Ledger,
        footage: &Footage,
        spec: &ClipSpec,
        edge_start: EpochMs,
        last_frame_end_ms: EpochMs,
    ) -> Result<()> {
        if edge_start - spec.start > GAP_REPORT_MS {
            let why = why_missing(ledger, &footage.stream, footage.source, spec.start).await?;
            self.gaps.insert(
                0,
                Gap {
                    from_ms: spec.start,
                    to_ms: edge_start,
                    why,
                    held: false,
                },
            );
        }
        if spec.end - last_frame_end_ms > GAP_REPORT_MS {
            let why = why_missing(
                ledger,
                &footage.stream,
                footage.source,
                last_frame_end_ms + 1,
            )
            .await?;
            self.gaps.push(Gap {
                from_ms: last_frame_end_ms,
                to_ms: spec.end,
                why,
                held: false,
            });
        }
        Ok(())
    }

    /// The edit list, the gaps at the edges, the header: the clip laid out.
    async fn finish(
        mut self,
        ledger: &dyn Ledger,
        footage: &Footage,
        spec: ClipSpec,
        first_frame_ms: EpochMs,
    ) -> Result<Clip> {
        let timescale = u64::from(self.table.timescale);
        let ms = |ticks: u64| ticks * 1000 / timescale;
        let last_frame_end_ms = self.previous.map_or(first_frame_ms, |(_, s, t)| {
            t + ms(u64::from(s.duration)) as i64
        });
        let (shown_ticks, shown_from_ms, hidden) = self.shown.unwrap_or((0, first_frame_ms, 0));
        let (presented_end_ms, duration) = match spec.cut {
            Cut::Exact => {
                let past_end = (last_frame_end_ms - spec.end).max(0) as u64 * timescale / 1000;
                let duration = self.ticks.saturating_sub(shown_ticks + past_end);
                let media_time = shown_ticks + self.first_cts.max(0) as u64;
                self.table.set_edit(Edit {
                    media_time,
                    duration,
                });
                (last_frame_end_ms.min(spec.end), duration)
            }
            Cut::Keyframe => (last_frame_end_ms, self.ticks),
        };
        let edge_start = shown_from_ms.max(first_frame_ms);
        self.report_edge_gaps(ledger, footage, &spec, edge_start, last_frame_end_ms)
            .await?;
        let text = spec.wall_clock_text.then(|| {
            // Presentation starts at the shown frame: an anchor before it is moved up to it,
            // its wall time with it.
            let anchors = self
                .anchors
                .iter()
                .map(|&(ticks, wall)| match ticks.checked_sub(shown_ticks) {
                    Some(after) => (ms(after), wall),
                    None => (0, wall + ms(shown_ticks - ticks) as i64),
                })
                .collect();
            WallClockText::new(anchors, ms(duration).max(1))
        });
        if let Some(text) = &text {
            self.table.set_text(text.clone());
        }
        let header = Bytes::from(self.table.take_header());
        let text_bytes = text.as_ref().map_or(0, WallClockText::bytes);
        let mut at = header.len() as u64 + text_bytes;
        for run in &mut self.runs {
            run.at = at;
            at += run.len;
        }
        let samples = self.table.sample_count();
        let mut objects: Vec<String> = Vec::new();
        for run in &self.runs {
            let key = &self.keys[run.object as usize];
            if !objects.contains(key) {
                objects.push(key.clone());
            }
        }
        Ok(Clip {
            header,
            text,
            text_bytes,
            runs: self.runs,
            keys: self.keys,
            report: ClipReport {
                first_frame_ms,
                shown_from_ms: shown_from_ms.max(first_frame_ms),
                last_frame_end_ms: presented_end_ms,
                duration_ms: ms(duration),
                frames: samples - hidden,
                samples,
                bytes: at,
                gap_mode: spec.gaps,
                cut: spec.cut,
                objects,
                fragments: self.fragments,
                gaps: self.gaps,
                left_out: self.left_out,
            },
        })
    }
}

/// Refuses a sample whose object's codec, picture size or timescale differs from the
/// first frame's: one MP4 track cannot hold both.
fn check_same_format(
    footage: &Footage,
    spec: ClipSpec,
    reference: &VideoTrack,
    key: &str,
    track: &VideoTrack,
    t: EpochMs,
) -> Result<()> {
    if track.sample_description == reference.sample_description
        && track.timescale == reference.timescale
    {
        return Ok(());
    }
    let (stream, start, end) = (&footage.stream, spec.start, spec.end);
    Err(Error::Usage(format!(
        "{stream}: the codec or picture size changes at {} (object {key}), which one MP4 track cannot hold; ask for [{}, {}) and [{}, {}] separately",
        rfc3339(t),
        rfc3339(start),
        rfc3339(t),
        rfc3339(t),
        rfc3339(end)
    )))
}
