//! Writes the header of a progressive MP4 with one video track: `ftyp`, `moov` with the
//! complete sample tables, and the `mdat` header. The media follows it unchanged, chunk by
//! chunk, so the caller streams the samples from wherever they are.
//!
//! Two optional parts: an edit list that starts presentation at a chosen frame (a cut
//! that needs no re-encoding: the frames from the keyframe before are decoded, not
//! shown), and a text track of wall-clock time ([`WallClockText`]), whose samples come
//! first in `mdat` and are generated, not stored.

use super::text::WallClockText;

/// The samples of the output track, in decode order, and how they are grouped into
/// chunks (runs of samples whose bytes follow each other in `mdat`).
#[derive(Debug, Default, Clone)]
pub struct TrackTable {
    /// Ticks per second of the track's times.
    pub timescale: u32,
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// The `stsd` box whole, copied from the source.
    pub sample_description: Vec<u8>,
    /// Sample sizes, in blocks of [`SIZE_BLOCK`]: a day of frames grows without ever
    /// copying them all into a buffer twice their size.
    sizes: Vec<Vec<u32>>,
    /// Samples so far.
    samples: u32,
    /// Decode durations as runs: (count, delta).
    durations: Vec<(u32, u32)>,
    /// Composition offsets as runs: (count, offset).
    cts_offsets: Vec<(u32, i32)>,
    /// 1-based numbers of the keyframes.
    sync: Vec<u32>,
    /// Samples per chunk, and bytes per chunk.
    chunks: Vec<(u32, u64)>,
    /// What is presented, when not every sample from the first on.
    edit: Option<Edit>,
    /// A second track, of wall-clock time as text.
    text: Option<WallClockText>,
}

/// The part of the track that is presented, in the track's timescale: from `media_time`
/// (a sample's decode time) for `duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Edit {
    /// Where presentation starts in the track's own time.
    pub media_time: u64,
    /// How long it lasts.
    pub duration: u64,
}

impl TrackTable {
    /// An empty track in `timescale` ticks per second, of the codec `sample_description`
    /// describes.
    pub fn new(timescale: u32, width: u32, height: u32, sample_description: Vec<u8>) -> Self {
        TrackTable {
            timescale,
            width,
            height,
            sample_description,
            ..TrackTable::default()
        }
    }

    /// Samples so far.
    pub fn sample_count(&self) -> u32 {
        self.samples
    }

    /// Track duration in the track's timescale.
    pub fn duration(&self) -> u64 {
        self.durations
            .iter()
            .map(|(n, d)| u64::from(*n) * u64::from(*d))
            .sum()
    }

    /// Bytes of video: what follows the header (and the text track's samples).
    pub fn media_bytes(&self) -> u64 {
        self.chunks.iter().map(|(_, bytes)| bytes).sum()
    }

    /// Presents `edit` only: a cut on any frame, without re-encoding.
    pub fn set_edit(&mut self, edit: Edit) {
        self.edit = Some(edit);
    }

    /// Adds the wall-clock text track, whose samples lead `mdat`.
    pub fn set_text(&mut self, text: WallClockText) {
        self.text = Some(text);
    }

    /// How long the movie plays, in the track's timescale: the edit's length, or the
    /// whole track.
    pub fn presented_duration(&self) -> u64 {
        self.edit.map_or_else(|| self.duration(), |e| e.duration)
    }

    /// Appends a sample; `new_chunk` starts a chunk (the bytes are not contiguous with
    /// the previous sample's in the source).
    pub fn push(&mut self, size: u32, duration: u32, cts_offset: i32, sync: bool, new_chunk: bool) {
        match self.sizes.last_mut() {
            Some(block) if block.len() < SIZE_BLOCK => block.push(size),
            _ => {
                let mut block = Vec::with_capacity(SIZE_BLOCK);
                block.push(size);
                self.sizes.push(block);
            }
        }
        self.samples += 1;
        push_run(&mut self.durations, duration);
        push_run(&mut self.cts_offsets, cts_offset);
        if sync {
            self.sync.push(self.samples);
        }
        match self.chunks.last_mut() {
            Some((samples, bytes)) if !new_chunk => {
                *samples += 1;
                *bytes += u64::from(size);
            }
            _ => self.chunks.push((1, u64::from(size))),
        }
    }

    /// Lengthens the last sample by `extra` (to hold its frame across a gap).
    pub fn extend_last(&mut self, extra: u32) {
        if extra == 0 {
            return;
        }
        let Some((count, delta)) = self.durations.pop() else {
            return;
        };
        if count > 1 {
            self.durations.push((count - 1, delta));
        }
        self.durations.push((1, delta.saturating_add(extra)));
    }

    /// `ftyp`, `moov` and the `mdat` header: the media bytes follow, chunk by chunk.
    pub fn header(&self) -> Vec<u8> {
        self.clone().take_header()
    }

    /// The header, written once into a buffer of its counted size (co64 has a fixed size,
    /// so a pass that only counts gives the length). The sample sizes are let go block
    /// by block as they are written, so the table and its header are never both whole in
    /// memory. The table keeps everything but the sizes.
    pub fn take_header(&mut self) -> Vec<u8> {
        let mut counted = Boxes::counting();
        self.write(&mut counted, 0);
        let len = counted.len;
        let mut w = Boxes::with_capacity(len);
        self.write(&mut w, len as u64);
        debug_assert_eq!(w.out.len(), len);
        w.out
    }

    fn write(&mut self, w: &mut Boxes, data_start: u64) {
        let duration = self.duration();
        let presented = self.presented_duration();
        let text_bytes = self.text.as_ref().map_or(0, WallClockText::bytes);
        write_ftyp(w);
        w.open(b"moov");
        self.write_mvhd(w, presented);
        w.open(b"trak");
        self.write_tkhd(w, presented);
        self.write_edts(w, duration);
        w.open(b"mdia");
        self.write_mdhd(w, duration);
        write_hdlr(w);
        w.open(b"minf");
        write_vmhd_and_dinf(w);
        w.open(b"stbl");
        w.bytes(&self.sample_description);
        self.write_sample_times(w);
        self.write_sample_layout(w, data_start + text_bytes);
        w.close(); // stbl
        w.close(); // minf
        w.close(); // mdia
        w.close(); // trak
        if let Some(text) = &self.text {
            text.write_trak(w, self.timescale, data_start);
        }
        w.close(); // moov

        // Always the 64-bit form, so the header length does not depend on the media size.
        w.u32(1);
        w.bytes(b"mdat");
        w.u64(text_bytes + self.media_bytes() + 16);
    }

    /// The movie header: the timescale and duration of the whole file.
    fn write_mvhd(&self, w: &mut Boxes, duration: u64) {
        w.open_full(b"mvhd", 1, 0);
        w.u64(0);
        w.u64(0);
        w.u32(self.timescale);
        w.u64(duration);
        w.u32(0x0001_0000);
        w.u16(0x0100);
        w.bytes(&[0; 10]);
        w.matrix();
        w.bytes(&[0; 24]);
        w.u32(if self.text.is_some() { 3 } else { 2 });
        w.close();
    }

    /// The track header: track 1, enabled and in the movie, with its picture size.
    fn write_tkhd(&self, w: &mut Boxes, duration: u64) {
        w.open_full(b"tkhd", 1, 3);
        w.u64(0);
        w.u64(0);
        w.u32(1);
        w.u32(0);
        w.u64(duration);
        w.bytes(&[0; 8]);
        w.u32(0); // layer, alternate group
        w.u32(0); // volume, reserved
        w.matrix();
        w.u32(self.width << 16);
        w.u32(self.height << 16);
        w.close();
    }

    /// An edit list when presentation does not start at the first sample's decode time:
    /// a cut ([`Edit`]), or B-frames, whose first frame is presented at its composition
    /// offset, so the output's time 0 is its first frame.
    fn write_edts(&self, w: &mut Boxes, duration: u64) {
        let first_offset = self.cts_offsets.first().map_or(0, |(_, offset)| *offset);
        let edit = self.edit.or((first_offset > 0).then_some(Edit {
            media_time: first_offset as u64,
            duration,
        }));
        if let Some(edit) = edit {
            w.open(b"edts");
            w.open_full(b"elst", 1, 0);
            w.u32(1);
            w.u64(edit.duration);
            w.u64(edit.media_time);
            w.u32(0x0001_0000); // rate 1.0
            w.close();
            w.close();
        }
    }

    /// The media header: the track's timescale and duration, language undetermined.
    fn write_mdhd(&self, w: &mut Boxes, duration: u64) {
        w.open_full(b"mdhd", 1, 0);
        w.u64(0);
        w.u64(0);
        w.u32(self.timescale);
        w.u64(duration);
        w.u16(0x55c4); // "und"
        w.u16(0);
        w.close();
    }

    /// When each sample plays: decode durations (`stts`), composition offsets (`ctts`,
    /// only with B-frames) and keyframes (`stss`, left out when every sample is one).
    fn write_sample_times(&self, w: &mut Boxes) {
        w.open_full(b"stts", 0, 0);
        w.u32(self.durations.len() as u32);
        for (count, delta) in &self.durations {
            w.u32(*count);
            w.u32(*delta);
        }
        w.close();
        if self.cts_offsets.iter().any(|(_, offset)| *offset != 0) {
            let signed = self.cts_offsets.iter().any(|(_, offset)| *offset < 0);
            w.open_full(b"ctts", u8::from(signed), 0);
            w.u32(self.cts_offsets.len() as u32);
            for (count, offset) in &self.cts_offsets {
                w.u32(*count);
                w.u32(*offset as u32);
            }
            w.close();
        }
        if self.sync.len() != self.samples as usize {
            w.open_full(b"stss", 0, 0);
            w.u32(self.sync.len() as u32);
            for number in &self.sync {
                w.u32(*number);
            }
            w.close();
        }
    }

    /// Where each sample lies: samples per chunk (`stsc`), sizes (`stsz`) and chunk
    /// offsets (`co64`), counted from `data_start`, where the media follows the header.
    fn write_sample_layout(&mut self, w: &mut Boxes, data_start: u64) {
        w.open_full(b"stsc", 0, 0);
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for (i, (samples, _)) in self.chunks.iter().enumerate() {
            if runs.last().map(|(_, n)| *n) != Some(*samples) {
                runs.push((i as u32 + 1, *samples));
            }
        }
        w.u32(runs.len() as u32);
        for (first, samples) in runs {
            w.u32(first);
            w.u32(samples);
            w.u32(1);
        }
        w.close();
        w.open_full(b"stsz", 0, 0);
        w.u32(0);
        w.u32(self.samples);
        if w.counting {
            w.len += 4 * self.samples as usize;
        } else {
            // Each block is freed once written.
            for block in std::mem::take(&mut self.sizes) {
                for size in block {
                    w.u32(size);
                }
            }
        }
        w.close();
        w.open_full(b"co64", 0, 0);
        w.u32(self.chunks.len() as u32);
        let mut offset = data_start;
        for (_, bytes) in &self.chunks {
            w.u64(offset);
            offset += bytes;
        }
        w.close();
    }
}

/// The file type: ISO base media, playable as MP4 with H.264.
pub(crate) fn write_ftyp(w: &mut Boxes) {
    w.open(b"ftyp");
    w.bytes(b"isom");
    w.u32(0x200);
    for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
        w.bytes(brand);
    }
    w.close();
}

/// The handler: a video track.
pub(crate) fn write_hdlr(w: &mut Boxes) {
    w.open_full(b"hdlr", 0, 0);
    w.u32(0);
    w.bytes(b"vide");
    w.bytes(&[0; 12]);
    w.bytes(b"VideoHandler\0");
    w.close();
}

/// The video media header and a data reference saying the media is in this file.
pub(crate) fn write_vmhd_and_dinf(w: &mut Boxes) {
    w.open_full(b"vmhd", 0, 1);
    w.bytes(&[0; 8]);
    w.close();
    write_dinf(w);
}

/// A data reference saying the media is in this file.
pub(crate) fn write_dinf(w: &mut Boxes) {
    w.open(b"dinf");
    w.open_full(b"dref", 0, 0);
    w.u32(1);
    w.open_full(b"url ", 0, 1);
    w.close();
    w.close();
    w.close();
}

fn push_run<T: PartialEq + Copy>(runs: &mut Vec<(u32, T)>, value: T) {
    match runs.last_mut() {
        Some((count, v)) if *v == value => *count += 1,
        _ => runs.push((1, value)),
    }
}

/// Writes ISO BMFF boxes: sizes are filled in when a box is closed.
#[derive(Default)]
pub(crate) struct Boxes {
    out: Vec<u8>,
    /// Bytes written (or counted).
    len: usize,
    /// Counts only: nothing is stored.
    counting: bool,
    open: Vec<usize>,
}

/// Sizes per block of [`TrackTable`]'s sample sizes.
const SIZE_BLOCK: usize = 1 << 16;

impl Boxes {
    /// A writer that only counts the bytes it would write.
    fn counting() -> Boxes {
        Boxes {
            counting: true,
            ..Boxes::default()
        }
    }

    /// A writer into a buffer of `len` bytes.
    fn with_capacity(len: usize) -> Boxes {
        Boxes {
            out: Vec::with_capacity(len),
            ..Boxes::default()
        }
    }

    /// The bytes written.
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.out
    }

    pub(crate) fn open(&mut self, kind: &[u8; 4]) {
        self.open.push(self.len);
        self.u32(0);
        self.bytes(kind);
    }

    pub(crate) fn open_full(&mut self, kind: &[u8; 4], version: u8, flags: u32) {
        self.open(kind);
        self.u32((u32::from(version) << 24) | (flags & 0x00ff_ffff));
    }

    pub(crate) fn close(&mut self) {
        // Opened and closed in pairs by this module only.
        if let Some(start) = self.open.pop() {
            let size = (self.len - start) as u32;
            if !self.counting {
                self.out[start..start + 4].copy_from_slice(&size.to_be_bytes());
            }
        }
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        if !self.counting {
            self.out.extend_from_slice(b);
        }
        self.len += b.len();
    }

    pub(crate) fn u16(&mut self, v: u16) {
        self.bytes(&v.to_be_bytes());
    }

    pub(crate) fn u32(&mut self, v: u32) {
        self.bytes(&v.to_be_bytes());
    }

    pub(crate) fn u64(&mut self, v: u64) {
        self.bytes(&v.to_be_bytes());
    }

    pub(crate) fn matrix(&mut self) {
        for v in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
            self.u32(v);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::super::track::{moov_extent, video_track, TrackLimits};
    use super::*;

    /// A minimal `stsd` box, for tables written in tests.
    pub(crate) fn sample_description() -> Vec<u8> {
        let mut b = Boxes::default();
        b.open_full(b"stsd", 0, 0);
        b.u32(0);
        b.close();
        b.out
    }

    /// The header of ten samples, and the length of the file it heads.
    fn ten_samples() -> (Vec<u8>, u64) {
        let mut table = TrackTable::new(90_000, 320, 180, sample_description());
        for i in 0..10u32 {
            table.push(100 + i, 9_000, 0, i % 5 == 0, i == 0 || i == 6);
        }
        let header = table.header();
        let len = header.len() as u64 + table.media_bytes();
        (header, len)
    }

    fn limits(file_len: u64) -> TrackLimits {
        TrackLimits::for_object(file_len, 1_000)
    }

    /// A `co64` offset of 2^64 - 10 (finding 8) is refused, not added up: no overflow in
    /// any build, and the error says which sample lies where.
    #[test]
    fn a_chunk_offset_near_the_end_of_u64_is_refused() {
        let (mut header, len) = ten_samples();
        let at = header
            .windows(4)
            .position(|w| w == b"co64")
            .expect("a co64 box");
        // Type, version and flags, entry count: the first offset follows.
        header[at + 12..at + 20].copy_from_slice(&(u64::MAX - 9).to_be_bytes());
        let (start, end) = moov_extent(&header).expect("valid").expect("moov");
        let refused = video_track(&header[start..end], limits(len)).expect_err("refused");
        assert!(
            refused.to_string().contains("lies outside the object"),
            "{refused}"
        );
    }

    /// A uniform `stsz` of 16 million samples (finding 2) is refused before anything is
    /// allocated for it.
    #[test]
    fn a_uniform_sample_size_cannot_claim_millions_of_samples() {
        let (mut header, len) = ten_samples();
        let at = header
            .windows(4)
            .position(|w| w == b"stsz")
            .expect("an stsz box");
        header[at + 8..at + 12].copy_from_slice(&1u32.to_be_bytes());
        header[at + 12..at + 16].copy_from_slice(&16_000_000u32.to_be_bytes());
        let (start, end) = moov_extent(&header).expect("valid").expect("moov");
        let refused = video_track(&header[start..end], limits(len)).expect_err("refused");
        assert!(
            refused.to_string().contains("stsz: 16000000 samples"),
            "{refused}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2_000))]

        /// Whatever bytes of a header are changed, reading it never panics, and a track
        /// it accepts has every sample inside the file and no more samples than allowed.
        #[test]
        fn a_damaged_header_is_read_or_refused_never_trusted(
            edits in proptest::collection::vec((0usize..4096, proptest::num::u8::ANY), 1..12),
            cut in 0usize..4096,
        ) {
            let (mut header, len) = ten_samples();
            for (at, byte) in edits {
                let at = at % header.len();
                header[at] = byte;
            }
            header.truncate(cut.max(8).min(header.len()));
            if let Ok(Some((start, end))) = moov_extent(&header) {
                if end <= header.len() {
                    if let Ok(track) = video_track(&header[start..end], limits(len)) {
                        proptest::prop_assert!(track.samples.len() <= limits(len).max_samples);
                        for sample in &track.samples {
                            proptest::prop_assert!(sample.offset + u64::from(sample.size) <= len);
                        }
                    }
                }
            }
        }

        /// Random bytes are never a panic either.
        #[test]
        fn random_bytes_are_read_or_refused(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = moov_extent(&bytes);
            let _ = video_track(&bytes, limits(1 << 20));
            let _ = crate::mp4::parse_header(&bytes);
        }
    }

    /// A table written and read back gives the same samples, laid out chunk by chunk.
    #[test]
    fn what_is_written_reads_back() {
        let stsd = {
            let mut b = Boxes::default();
            b.open_full(b"stsd", 0, 0);
            b.u32(0);
            b.close();
            b.out
        };
        let mut table = TrackTable::new(90_000, 320, 180, stsd);
        for i in 0..10u32 {
            table.push(100 + i, 9_000, 0, i % 5 == 0, i == 0 || i == 6);
        }
        table.extend_last(45_000);
        let header = table.header();
        let (start, end) = moov_extent(&header).expect("valid").expect("moov");
        let track = video_track(
            &header[start..end],
            TrackLimits::for_object(u64::MAX, 60_000),
        )
        .expect("a video track");
        assert_eq!(track.timescale, 90_000);
        assert_eq!((track.width, track.height), (320, 180));
        assert_eq!(track.samples.len(), 10);
        let data = header.len() as u64;
        assert_eq!(track.samples[0].offset, data);
        let first_six: u64 = (0..6).map(|i| 100 + i).sum();
        assert_eq!(track.samples[6].offset, data + first_six);
        assert_eq!(track.samples[9].duration, 54_000);
        assert_eq!(
            track.samples.iter().filter(|s| s.sync).count(),
            2,
            "keyframes 1 and 6"
        );
        assert_eq!(table.media_bytes(), (0..10).map(|i| 100 + i).sum::<u64>());
    }
}
