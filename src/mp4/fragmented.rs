//! Fragmented MP4 for HLS: an initialization segment (`ftyp`, and a `moov` whose sample
//! tables are empty) and media segments (`moof` with one `trun`, then `mdat`), remuxed
//! from an archived object's samples without decoding them.

use super::track::{Sample, VideoTrack};
use super::writer::{write_hdlr, write_vmhd_and_dinf, Boxes};

/// `ftyp` and `moov` for `track`'s codec, picture size and timescale.
pub fn init_segment(track: &VideoTrack) -> Vec<u8> {
    let mut w = Boxes::default();
    w.open(b"ftyp");
    w.bytes(b"iso6");
    w.u32(0);
    for brand in [b"iso6", b"isom", b"avc1", b"mp41"] {
        w.bytes(brand);
    }
    w.close();
    w.open(b"moov");
    w.open_full(b"mvhd", 0, 0);
    w.u32(0);
    w.u32(0);
    w.u32(track.timescale);
    w.u32(0);
    w.u32(0x0001_0000);
    w.u16(0x0100);
    w.bytes(&[0; 10]);
    w.matrix();
    w.bytes(&[0; 24]);
    w.u32(2);
    w.close();
    w.open(b"trak");
    w.open_full(b"tkhd", 0, 3);
    w.u32(0);
    w.u32(0);
    w.u32(1);
    w.u32(0);
    w.u32(0);
    w.bytes(&[0; 8]);
    w.u32(0);
    w.u32(0);
    w.matrix();
    w.u32(track.width << 16);
    w.u32(track.height << 16);
    w.close();
    w.open(b"mdia");
    w.open_full(b"mdhd", 0, 0);
    w.u32(0);
    w.u32(0);
    w.u32(track.timescale);
    w.u32(0);
    w.u16(0x55c4);
    w.u16(0);
    w.close();
    write_hdlr(&mut w);
    w.open(b"minf");
    write_vmhd_and_dinf(&mut w);
    w.open(b"stbl");
    w.bytes(&track.sample_description);
    for kind in [b"stts", b"stsc", b"stco"] {
        w.open_full(kind, 0, 0);
        w.u32(0);
        w.close();
    }
    w.open_full(b"stsz", 0, 0);
    w.u32(0);
    w.u32(0);
    w.close();
    w.close(); // stbl
    w.close(); // minf
    w.close(); // mdia
    w.close(); // trak
    w.open(b"mvex");
    w.open_full(b"trex", 0, 0);
    w.u32(1);
    w.u32(1);
    w.u32(0);
    w.u32(0);
    w.u32(0);
    w.close();
    w.close(); // mvex
    w.close(); // moov
    w.into_bytes()
}

/// Sample flags: a keyframe depends on no other sample; any other frame does.
const SYNC_FLAGS: u32 = 0x0200_0000;
const NON_SYNC_FLAGS: u32 = 0x0101_0000;

/// `moof` and the `mdat` header of media segment `sequence`, whose first sample is
/// decoded at `base_dts` (the track's timescale): the samples' bytes follow, in order.
pub fn segment_header(sequence: u32, base_dts: u64, samples: &[Sample]) -> Vec<u8> {
    let media: u64 = samples.iter().map(|s| u64::from(s.size)).sum();
    let signed = samples.iter().any(|s| s.cts_offset != 0);
    let write = |data_offset: u32| {
        let mut w = Boxes::default();
        w.open(b"moof");
        w.open_full(b"mfhd", 0, 0);
        w.u32(sequence);
        w.close();
        w.open(b"traf");
        // The moof is the base of data offsets.
        w.open_full(b"tfhd", 0, 0x02_0000);
        w.u32(1);
        w.close();
        w.open_full(b"tfdt", 1, 0);
        w.u64(base_dts);
        w.close();
        let mut flags = 0x01 | 0x100 | 0x200 | 0x400;
        if signed {
            flags |= 0x800;
        }
        w.open_full(b"trun", u8::from(signed), flags);
        w.u32(samples.len() as u32);
        w.u32(data_offset);
        for sample in samples {
            w.u32(sample.duration);
            w.u32(sample.size);
            w.u32(if sample.sync {
                SYNC_FLAGS
            } else {
                NON_SYNC_FLAGS
            });
            if signed {
                w.u32(sample.cts_offset as u32);
            }
        }
        w.close(); // trun
        w.close(); // traf
        w.close(); // moof
        let mdat_header = if media + 8 > u64::from(u32::MAX) {
            w.u32(1);
            w.bytes(b"mdat");
            w.u64(media + 16);
            16
        } else {
            w.u32((media + 8) as u32);
            w.bytes(b"mdat");
            8
        };
        (w.into_bytes(), mdat_header)
    };
    // The data offset has a fixed size, so a first pass gives the moof's length.
    let (probe, mdat_header) = write(0);
    let moof_len = probe.len() - mdat_header;
    write((moof_len + mdat_header) as u32).0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_data_offset_points_past_the_mdat_header() {
        let samples: Vec<Sample> = (0..3)
            .map(|i| Sample {
                offset: 0,
                size: 10 + i,
                dts: u64::from(i) * 9_000,
                duration: 9_000,
                cts_offset: 0,
                sync: i == 0,
            })
            .collect();
        let header = segment_header(7, 90_000, &samples);
        let moof_len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        assert_eq!(&header[moof_len + 4..moof_len + 8], b"mdat");
        let trun = header
            .windows(4)
            .position(|w| w == b"trun")
            .expect("a trun");
        let offset = u32::from_be_bytes([
            header[trun + 12],
            header[trun + 13],
            header[trun + 14],
            header[trun + 15],
        ]);
        assert_eq!(offset as usize, header.len());
        let mdat_len = u32::from_be_bytes([
            header[moof_len],
            header[moof_len + 1],
            header[moof_len + 2],
            header[moof_len + 3],
        ]);
        assert_eq!(mdat_len, 8 + 10 + 11 + 12);
    }
}
