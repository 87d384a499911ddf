//! The video track of a progressive MP4, sample by sample: what `export` needs to copy
//! samples out of archived objects without decoding them.

use super::{be_u32, be_u64, box_at, children, Mp4Error};

/// One video sample: where its bytes are and when it plays, in the track's timescale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Byte offset in the file.
    pub offset: u64,
    /// Bytes in the file.
    pub size: u32,
    /// Decode time from the start of the track.
    pub dts: u64,
    /// Decode duration, in the track's timescale.
    pub duration: u32,
    /// Composition minus decode time (`ctts`; 0 without B-frames).
    pub cts_offset: i32,
    /// A keyframe (`stss`; every sample when the box is absent).
    pub sync: bool,
}

/// The first video track of a file.
#[derive(Debug, Clone)]
pub struct VideoTrack {
    /// Ticks per second of the track's times.
    pub timescale: u32,
    /// Width in pixels (`tkhd`).
    pub width: u32,
    /// Height in pixels (`tkhd`).
    pub height: u32,
    /// The `stsd` box whole (header included): the codec and its parameter sets. Samples
    /// of two tracks can share one output track only when these bytes are equal.
    pub sample_description: Vec<u8>,
    /// Every sample, in decode order.
    pub samples: Vec<Sample>,
    /// Tracks other than this one (audio, metadata), which `export` leaves out.
    pub other_tracks: Vec<String>,
}

/// What an object's sample tables may claim, from what the ledger recorded of the object:
/// a table that claims more is refused before anything is allocated for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackLimits {
    /// The object's size in bytes: every sample lies inside it.
    pub file_len: u64,
    /// The most samples the object's media can hold (its duration at a frame rate no
    /// camera reaches).
    pub max_samples: usize,
}

impl TrackLimits {
    /// A frame rate above any camera's: the samples an object's duration may hold.
    pub const MAX_FRAMES_PER_SECOND: u64 = 300;

    /// Limits for an object of `file_len` bytes holding `duration_ms` of media.
    pub fn for_object(file_len: u64, duration_ms: u64) -> TrackLimits {
        // One second more: the listing's durations are rounded, the track's are not.
        let samples = (duration_ms / 1000 + 1).saturating_mul(Self::MAX_FRAMES_PER_SECOND);
        TrackLimits {
            file_len,
            max_samples: usize::try_from(samples).unwrap_or(usize::MAX),
        }
    }
}

/// No track this program reads plays longer than this (GetClip's limit is 24 h): longer
/// decode times would only come from hostile tables, and would overflow wall-time sums.
const MAX_TRACK_MS: u64 = 48 * 3_600_000;

impl VideoTrack {
    /// Milliseconds of track time `t`.
    pub fn ms(&self, t: u64) -> u64 {
        t.saturating_mul(1000) / u64::from(self.timescale)
    }
}

/// Where `moov` ends in a file whose first bytes are `prefix`: `Ok(None)` means more
/// bytes are needed to know (the boxes before it are not all there).
pub fn moov_extent(prefix: &[u8]) -> Result<Option<(usize, usize)>, Mp4Error> {
    let mut pos = 0usize;
    while let Some((kind, _, size)) = box_at(prefix, pos)? {
        let end = usize::try_from(size)
            .ok()
            .and_then(|size| pos.checked_add(size))
            .ok_or_else(|| Mp4Error::Malformed(format!("box size {size} at byte {pos}")))?;
        match &kind {
            b"moov" => return Ok(Some((pos, end))),
            b"mdat" => return Err(Mp4Error::NotProgressive),
            _ => pos = end,
        }
        if pos > prefix.len() {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Reads the first video track out of a whole `moov` box (header included), refusing
/// tables that claim more than `limits` allow.
pub fn video_track(moov_box: &[u8], limits: TrackLimits) -> Result<VideoTrack, Mp4Error> {
    let header_len = match box_at(moov_box, 0)? {
        Some((kind, header_len, _)) if &kind == b"moov" => header_len,
        _ => return Err(Mp4Error::Malformed("not a moov box".into())),
    };
    let mut found = None;
    let mut other_tracks = Vec::new();
    for (kind, trak) in children(&moov_box[header_len..])? {
        if &kind != b"trak" {
            continue;
        }
        match (found.is_none(), parse_trak(trak, limits)?) {
            (true, Parsed::Video(track)) => found = Some(track),
            (_, Parsed::Video(_)) => other_tracks.push("vide".to_string()),
            (_, Parsed::Other(handler)) => other_tracks.push(handler),
        }
    }
    let mut track = found.ok_or_else(|| Mp4Error::Malformed("no video track".into()))?;
    track.other_tracks = other_tracks;
    Ok(track)
}

enum Parsed {
    Video(VideoTrack),
    Other(String),
}

fn find<'a>(boxes: &[super::Child<'a>], kind: &[u8; 4]) -> Option<&'a [u8]> {
    boxes.iter().find(|(k, _)| k == kind).map(|(_, body)| *body)
}

fn need<'a>(boxes: &[super::Child<'a>], kind: &[u8; 4]) -> Result<&'a [u8], Mp4Error> {
    find(boxes, kind)
        .ok_or_else(|| Mp4Error::Malformed(format!("no {} box", String::from_utf8_lossy(kind))))
}

/// `count` entries of `width` bytes after a full box's version, flags and count.
fn entries(body: &[u8], width: usize) -> Result<(u32, &[u8]), Mp4Error> {
    let count = be_u32(body, 4)?;
    let len = (count as usize)
        .checked_mul(width)
        .filter(|len| 8 + len <= body.len())
        .ok_or_else(|| Mp4Error::Malformed(format!("{count} table entries overrun the box")))?;
    Ok((count, &body[8..8 + len]))
}

/// One `trak`: a video track's sample table, laid out table by table, or the handler of
/// any other track.
fn parse_trak(trak: &[u8], limits: TrackLimits) -> Result<Parsed, Mp4Error> {
    let boxes = children(trak)?;
    let mdia = children(need(&boxes, b"mdia")?)?;
    let handler = need(&mdia, b"hdlr")?
        .get(8..12)
        .map(|h| String::from_utf8_lossy(h).into_owned())
        .unwrap_or_default();
    if handler != "vide" {
        return Ok(Parsed::Other(handler));
    }
    let (width, height) = picture_size(&boxes)?;
    let timescale = media_timescale(need(&mdia, b"mdhd")?)?;
    let minf = children(need(&mdia, b"minf")?)?;
    let stbl_body = need(&minf, b"stbl")?;
    let stbl = children(stbl_body)?;
    let sample_description = whole_stsd(stbl_body)?;

    let mut samples: Vec<Sample> = sample_sizes(&stbl, limits)?
        .into_iter()
        .map(|size| Sample {
            offset: 0,
            size,
            dts: 0,
            duration: 0,
            cts_offset: 0,
            sync: true,
        })
        .collect();
    set_decode_times(&stbl, &mut samples, timescale)?;
    set_composition_offsets(&stbl, &mut samples)?;
    set_sync_samples(&stbl, &mut samples)?;
    set_offsets(&stbl, &mut samples, limits)?;

    Ok(Parsed::Video(VideoTrack {
        timescale,
        width,
        height,
        sample_description,
        samples,
        other_tracks: Vec::new(),
    }))
}

/// The picture's width and height from `tkhd` (16.16 fixed point), or 0 × 0 without one.
fn picture_size(trak: &[super::Child<'_>]) -> Result<(u32, u32), Mp4Error> {
    Ok(match find(trak, b"tkhd") {
        Some(tkhd) => {
            let at = if tkhd.first() == Some(&1) { 88 } else { 76 };
            (be_u32(tkhd, at)? >> 16, be_u32(tkhd, at + 4)? >> 16)
        }
        None => (0, 0),
    })
}

/// The track's ticks per second, from `mdhd`; never 0, as every time is divided by it.
fn media_timescale(mdhd: &[u8]) -> Result<u32, Mp4Error> {
    let timescale = if mdhd.first() == Some(&1) {
        be_u32(mdhd, 20)?
    } else {
        be_u32(mdhd, 12)?
    };
    if timescale == 0 {
        return Err(Mp4Error::Malformed("mdhd timescale is 0".into()));
    }
    Ok(timescale)
}

/// `stsd` whole, header included (the output copies it as it is), found again by
/// position inside `stbl`'s body.
fn whole_stsd(stbl_body: &[u8]) -> Result<Vec<u8>, Mp4Error> {
    let mut pos = 0;
    while let Some((kind, _, size)) = box_at(stbl_body, pos)? {
        let end = usize::try_from(size)
            .ok()
            .and_then(|size| pos.checked_add(size))
            .ok_or_else(|| Mp4Error::Malformed(format!("box size {size} in stbl")))?;
        if &kind == b"stsd" {
            if let Some(whole) = stbl_body.get(pos..end) {
                return Ok(whole.to_vec());
            }
            break;
        }
        pos = end;
    }
    Err(Mp4Error::Malformed("no stsd box".into()))
}

/// `stts`: each sample's decode time and duration. The track must cover every sample
/// and play no longer than any clip.
fn set_decode_times(
    stbl: &[super::Child<'_>],
    samples: &mut [Sample],
    timescale: u32,
) -> Result<(), Mp4Error> {
    let (n, table) = entries(need(stbl, b"stts")?, 8)?;
    let mut i = 0usize;
    let mut dts = 0u64;
    for e in 0..n as usize {
        let run = be_u32(table, e * 8)? as usize;
        let delta = be_u32(table, e * 8 + 4)?;
        for _ in 0..run {
            let Some(sample) = samples.get_mut(i) else {
                break;
            };
            sample.dts = dts;
            sample.duration = delta;
            dts = dts.saturating_add(u64::from(delta));
            i += 1;
        }
    }
    let track_ms = dts.saturating_mul(1000) / u64::from(timescale);
    if track_ms > MAX_TRACK_MS {
        return Err(Mp4Error::Malformed(format!(
            "stts: the track plays {track_ms} ms, longer than any clip"
        )));
    }
    if i != samples.len() {
        return Err(Mp4Error::Malformed(format!(
            "stts covers {i} of {} samples",
            samples.len()
        )));
    }
    Ok(())
}

/// `ctts`, if present (B-frames): each sample's composition offset.
fn set_composition_offsets(
    stbl: &[super::Child<'_>],
    samples: &mut [Sample],
) -> Result<(), Mp4Error> {
    let Some(ctts) = find(stbl, b"ctts") else {
        return Ok(());
    };
    let (n, table) = entries(ctts, 8)?;
    let mut i = 0usize;
    for e in 0..n as usize {
        let run = be_u32(table, e * 8)? as usize;
        // Version 0 is unsigned, version 1 signed; both fit an i32 in practice.
        let offset = be_u32(table, e * 8 + 4)? as i32;
        for _ in 0..run {
            let Some(sample) = samples.get_mut(i) else {
                break;
            };
            sample.cts_offset = offset;
            i += 1;
        }
    }
    Ok(())
}

/// `stss`, if present: only the samples it lists are keyframes. Without it every sample
/// is one.
fn set_sync_samples(stbl: &[super::Child<'_>], samples: &mut [Sample]) -> Result<(), Mp4Error> {
    let Some(stss) = find(stbl, b"stss") else {
        return Ok(());
    };
    samples.iter_mut().for_each(|s| s.sync = false);
    let (n, table) = entries(stss, 4)?;
    for e in 0..n as usize {
        let number = be_u32(table, e * 4)? as usize;
        if let Some(sample) = number.checked_sub(1).and_then(|i| samples.get_mut(i)) {
            sample.sync = true;
        }
    }
    Ok(())
}

/// Each sample's byte offset: the chunk offsets (`stco` or `co64`), with `stsc` laying
/// the samples into the chunks. Every sample must be placed, inside the object.
fn set_offsets(
    stbl: &[super::Child<'_>],
    samples: &mut [Sample],
    limits: TrackLimits,
) -> Result<(), Mp4Error> {
    let chunk_offsets = chunk_offsets(stbl)?;
    let (n, table) = entries(need(stbl, b"stsc")?, 12)?;
    let runs: Vec<(u32, u32)> = (0..n as usize)
        .map(|e| Ok((be_u32(table, e * 12)?, be_u32(table, e * 12 + 4)?)))
        .collect::<Result<_, Mp4Error>>()?;
    let mut i = 0usize;
    let mut run = 0usize;
    for (chunk_index, chunk_offset) in chunk_offsets.iter().enumerate() {
        let chunk_number = chunk_index as u32 + 1;
        while runs
            .get(run + 1)
            .is_some_and(|(first, _)| *first <= chunk_number)
        {
            run += 1;
        }
        let per_chunk = runs
            .get(run)
            .filter(|(first, _)| *first <= chunk_number)
            .map_or(0, |(_, n)| *n);
        let mut offset = *chunk_offset;
        for _ in 0..per_chunk {
            let Some(sample) = samples.get_mut(i) else {
                break;
            };
            // Every sample lies inside the object: the copy reads exactly these bytes.
            let end = offset
                .checked_add(u64::from(sample.size))
                .filter(|end| *end <= limits.file_len)
                .ok_or_else(|| {
                    Mp4Error::Malformed(format!(
                        "sample {} at byte {offset} ({} bytes) lies outside the object's {} bytes",
                        i + 1,
                        sample.size,
                        limits.file_len
                    ))
                })?;
            sample.offset = offset;
            offset = end;
            i += 1;
        }
    }
    if i != samples.len() {
        return Err(Mp4Error::Malformed(format!(
            "stsc and chunk offsets place {i} of {} samples",
            samples.len()
        )));
    }
    Ok(())
}

/// The chunks' byte offsets, from `co64` or else `stco`.
fn chunk_offsets(stbl: &[super::Child<'_>]) -> Result<Vec<u64>, Mp4Error> {
    if let Some(co64) = find(stbl, b"co64") {
        let (n, table) = entries(co64, 8)?;
        (0..n as usize).map(|e| be_u64(table, e * 8)).collect()
    } else {
        let (n, table) = entries(need(stbl, b"stco")?, 4)?;
        (0..n as usize)
            .map(|e| be_u32(table, e * 4).map(u64::from))
            .collect()
    }
}

fn sample_sizes(stbl: &[super::Child<'_>], limits: TrackLimits) -> Result<Vec<u32>, Mp4Error> {
    if let Some(stsz) = find(stbl, b"stsz") {
        let uniform = be_u32(stsz, 4)?;
        let count = be_u32(stsz, 8)?;
        // Checked before anything is allocated: with one uniform size, 12 bytes of box
        // could otherwise claim 4 billion samples.
        if count as usize > limits.max_samples {
            return Err(Mp4Error::Malformed(format!(
                "stsz: {count} samples, more than the object's media can hold ({} at {} frames per second)",
                limits.max_samples,
                TrackLimits::MAX_FRAMES_PER_SECOND
            )));
        }
        if uniform != 0 {
            if u64::from(count).saturating_mul(u64::from(uniform)) > limits.file_len {
                return Err(Mp4Error::Malformed(format!(
                    "stsz: {count} samples of {uniform} bytes do not fit the object's {} bytes",
                    limits.file_len
                )));
            }
            return Ok(vec![uniform; count as usize]);
        }
        let len = (count as usize)
            .checked_mul(4)
            .filter(|len| 12 + len <= stsz.len())
            .ok_or_else(|| Mp4Error::Malformed(format!("stsz: {count} sizes overrun the box")))?;
        return (0..count as usize)
            .map(|e| be_u32(&stsz[12..12 + len], e * 4))
            .collect();
    }
    Err(Mp4Error::Malformed(
        "no stsz box (stz2 is not supported)".into(),
    ))
}
