//! A text track of wall-clock time (3GPP timed text, `tx3g`): one sample a second, each
//! the UTC time presented then, for players to show as subtitles. Its samples are all the
//! same size, so they are generated when read: nothing of them is held.

use super::writer::{write_dinf, Boxes};
use crate::domain::EpochMs;

/// `YYYY-MM-DD HH:MM:SS UTC`: the same length for years 1000 to 9999.
const TEXT_LEN: usize = 23;
/// A sample: the text's length (2 bytes), then the text.
pub const SAMPLE_BYTES: u64 = 2 + TEXT_LEN as u64;

/// The wall time at each instant of the presentation, and the samples that show it.
#[derive(Debug, Clone, Default)]
pub struct WallClockText {
    /// (presentation ms, wall time there), in presentation order: wall time runs on with
    /// the presentation from each anchor to the next (a gap joined makes a new anchor).
    anchors: Vec<(u64, EpochMs)>,
    /// How long the presentation lasts, in milliseconds.
    duration_ms: u64,
}

impl WallClockText {
    /// Text for a presentation of `duration_ms`, with the wall time at each anchor.
    pub fn new(mut anchors: Vec<(u64, EpochMs)>, duration_ms: u64) -> Self {
        anchors.sort_by_key(|(at, _)| *at);
        WallClockText {
            anchors,
            duration_ms,
        }
    }

    /// One sample a second, the last one shorter.
    pub fn samples(&self) -> u64 {
        self.duration_ms.div_ceil(1000)
    }

    /// Bytes of all samples.
    pub fn bytes(&self) -> u64 {
        self.samples() * SAMPLE_BYTES
    }

    /// The wall time at presentation time `at_ms`.
    pub fn wall_at(&self, at_ms: u64) -> EpochMs {
        let i = self.anchors.partition_point(|(pres, _)| *pres <= at_ms);
        match i.checked_sub(1).and_then(|i| self.anchors.get(i)) {
            Some((pres, wall)) => wall + (at_ms - pres) as i64,
            None => self.anchors.first().map_or(0, |(_, wall)| *wall),
        }
    }

    /// Sample `i`'s bytes.
    fn sample(&self, i: u64) -> [u8; SAMPLE_BYTES as usize] {
        let wall = self.wall_at(i * 1000);
        let text = chrono::DateTime::from_timestamp_millis(wall)
            .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
            .filter(|t| t.len() == TEXT_LEN)
            .unwrap_or_else(|| "????-??-?? ??:??:?? UTC".to_string());
        let mut out = [0u8; SAMPLE_BYTES as usize];
        out[..2].copy_from_slice(&(TEXT_LEN as u16).to_be_bytes());
        out[2..].copy_from_slice(text.as_bytes());
        out
    }

    /// `len` bytes of the samples from byte `from`.
    pub fn read(&self, from: u64, len: u64) -> Vec<u8> {
        let end = from.saturating_add(len).min(self.bytes());
        let mut out = Vec::with_capacity(end.saturating_sub(from) as usize);
        let mut at = from;
        while at < end {
            let i = at / SAMPLE_BYTES;
            let within = (at % SAMPLE_BYTES) as usize;
            let sample = self.sample(i);
            let take = ((end - at) as usize).min(sample.len() - within);
            out.extend_from_slice(&sample[within..within + take]);
            at += take as u64;
        }
        out
    }

    /// The track's `trak` box (track 2), its samples at `data_start` in the file;
    /// `movie_timescale` is the movie's (the video track's).
    pub(crate) fn write_trak(&self, w: &mut Boxes, movie_timescale: u32, data_start: u64) {
        let samples = self.samples() as u32;
        let movie_duration = self.duration_ms * u64::from(movie_timescale) / 1000;
        w.open(b"trak");
        w.open_full(b"tkhd", 1, 3);
        w.u64(0);
        w.u64(0);
        w.u32(2);
        w.u32(0);
        w.u64(movie_duration);
        w.bytes(&[0; 8]);
        w.u32(0); // layer, alternate group
        w.u32(0); // volume, reserved
        w.matrix();
        w.u32(0);
        w.u32(0);
        w.close();
        w.open(b"mdia");
        w.open_full(b"mdhd", 1, 0);
        w.u64(0);
        w.u64(0);
        w.u32(1000);
        w.u64(self.duration_ms);
        w.u16(0x55c4); // "und"
        w.u16(0);
        w.close();
        w.open_full(b"hdlr", 0, 0);
        w.u32(0);
        w.bytes(b"sbtl");
        w.bytes(&[0; 12]);
        w.bytes(b"WallClock\0");
        w.close();
        w.open(b"minf");
        w.open_full(b"nmhd", 0, 0);
        w.close();
        write_dinf(w);
        w.open(b"stbl");
        write_tx3g_description(w);
        w.open_full(b"stts", 0, 0);
        let last_ms = self.duration_ms - u64::from(samples.saturating_sub(1)) * 1000;
        if samples > 1 {
            w.u32(2);
            w.u32(samples - 1);
            w.u32(1000);
        } else {
            w.u32(1);
        }
        w.u32(1);
        w.u32(last_ms as u32);
        w.close();
        w.open_full(b"stsc", 0, 0);
        w.u32(1);
        w.u32(1);
        w.u32(samples);
        w.u32(1);
        w.close();
        w.open_full(b"stsz", 0, 0);
        w.u32(SAMPLE_BYTES as u32);
        w.u32(samples);
        w.close();
        w.open_full(b"co64", 0, 0);
        w.u32(1);
        w.u64(data_start);
        w.close();
        w.close(); // stbl
        w.close(); // minf
        w.close(); // mdia
        w.close(); // trak
    }
}

/// The `stsd` of a `tx3g` track: white sans-serif text, centred at the bottom.
fn write_tx3g_description(w: &mut Boxes) {
    w.open_full(b"stsd", 0, 0);
    w.u32(1);
    w.open(b"tx3g");
    w.bytes(&[0; 6]);
    w.u16(1); // data reference index
    w.u32(0); // display flags
    w.bytes(&[1, 0xff]); // centred, at the bottom
    w.bytes(&[0, 0, 0, 0]); // background
    w.bytes(&[0; 8]); // text box: the whole picture
    w.u16(0); // style: from character 0
    w.u16(0);
    w.u16(1); // font 1
    w.bytes(&[0, 18]); // plain, 18 pt
    w.bytes(&[0xff, 0xff, 0xff, 0xff]); // white
    w.open(b"ftab");
    w.u16(1);
    w.u16(1);
    w.bytes(&[10]);
    w.bytes(b"Sans-Serif");
    w.close();
    w.close(); // tx3g
    w.close(); // stsd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_time_runs_on_from_each_anchor() {
        let text = WallClockText::new(vec![(0, 1_000_000), (5_000, 9_000_000)], 7_500);
        assert_eq!(text.samples(), 8);
        assert_eq!(text.wall_at(2_000), 1_002_000);
        assert_eq!(text.wall_at(6_000), 9_001_000);
        let all = text.read(0, text.bytes());
        assert_eq!(all.len() as u64, 8 * SAMPLE_BYTES);
        assert_eq!(&all[2..25], b"1970-01-01 00:16:40 UTC");
        // Any slice of the samples is the same bytes as the whole.
        assert_eq!(text.read(30, 40), all[30..70].to_vec());
        assert_eq!(text.read(190, 1_000), all[190..].to_vec());
    }
}
