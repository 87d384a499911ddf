//! Progressive ("traditional") MP4 writer for GetClip: `ftyp`, `moov` with complete sample
//! tables, then one `mdat`.
//!
//! Every sample size is known before the first byte is sent (fragments are laid out
//! deterministically), so `moov` goes first and the body is streamed without buffering the
//! clip, as KVS does. Each fragment is one MP4 chunk, which keeps `stsc` and `co64` short.

use crate::media::{FragmentLayout, Gop, HEIGHT, WIDTH};
use bytes::{BufMut, Bytes, BytesMut};

/// Media timescale: the fixture's frame interval is whole milliseconds.
const TIMESCALE: u32 = 1000;

/// The fixed part of a clip: everything before the media bytes.
pub struct ClipHeader {
    /// `ftyp`, `moov` and the `mdat` header.
    pub bytes: Bytes,
    /// Bytes of media that follow the header in `mdat`.
    pub media_bytes: u64,
    /// The clip's duration.
    pub duration_ms: u64,
    /// Samples (frames) in the clip.
    pub sample_count: u64,
}

impl ClipHeader {
    /// The whole clip's length: header and media.
    pub fn total_len(&self) -> u64 {
        self.bytes.len() as u64 + self.media_bytes
    }
}

struct BoxWriter {
    buf: BytesMut,
    open: Vec<usize>,
}

impl BoxWriter {
    fn new() -> Self {
        BoxWriter {
            buf: BytesMut::with_capacity(64 * 1024),
            open: Vec::new(),
        }
    }

    fn begin(&mut self, kind: &[u8; 4]) {
        self.open.push(self.buf.len());
        self.buf.put_u32(0);
        self.buf.put_slice(kind);
    }

    fn begin_full(&mut self, kind: &[u8; 4], version: u8, flags: u32) {
        self.begin(kind);
        self.buf
            .put_u32((u32::from(version) << 24) | (flags & 0x00ff_ffff));
    }

    fn end(&mut self) {
        // Boxes are opened and closed by this module only, in matching pairs.
        let start = self.open.pop().expect("end() matches a begin()");
        let size = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&size.to_be_bytes());
    }
}

/// Builds the header of a clip made of `fragments`, in order.
pub fn clip_header(gop: &Gop, fragments: &[FragmentLayout]) -> ClipHeader {
    // co64 has a fixed size, so a first pass with zero offsets gives the header length.
    let probe = write_header(gop, fragments, 0);
    let data_start = probe.len() as u64;
    let bytes = write_header(gop, fragments, data_start);
    debug_assert_eq!(bytes.len() as u64, data_start);
    ClipHeader {
        bytes,
        media_bytes: fragments.iter().map(FragmentLayout::media_bytes).sum(),
        duration_ms: fragments.iter().map(duration_ms).sum(),
        sample_count: fragments.iter().map(|f| u64::from(f.frames)).sum(),
    }
}

fn duration_ms(f: &FragmentLayout) -> u64 {
    u64::from(f.frame_interval_ms) * u64::from(f.frames - 1) + u64::from(f.last_sample_ms)
}

/// The clip's boxes before the media: `ftyp`, then `moov` (one video track), then the
/// `mdat` header. `data_start` is where the media begins: this header's own length.
fn write_header(gop: &Gop, fragments: &[FragmentLayout], data_start: u64) -> Bytes {
    let duration: u64 = fragments.iter().map(duration_ms).sum();
    let media_bytes: u64 = fragments.iter().map(FragmentLayout::media_bytes).sum();
    let mut w = BoxWriter::new();
    write_ftyp(&mut w);
    w.begin(b"moov");
    write_mvhd(&mut w, duration);
    w.begin(b"trak");
    write_tkhd(&mut w, duration);
    w.begin(b"mdia");
    write_mdhd(&mut w, duration);
    write_hdlr(&mut w);
    w.begin(b"minf");
    write_vmhd(&mut w);
    write_dinf(&mut w);
    w.begin(b"stbl");
    write_stsd(&mut w, gop);
    write_stts(&mut w, fragments);
    write_stss(&mut w, fragments);
    write_stsc(&mut w, fragments);
    write_stsz(&mut w, fragments);
    write_co64(&mut w, fragments, data_start);
    w.end(); // stbl
    w.end(); // minf
    w.end(); // mdia
    w.end(); // trak
    w.end(); // moov
    write_mdat_header(&mut w, media_bytes);
    w.buf.freeze()
}

fn write_ftyp(w: &mut BoxWriter) {
    w.begin(b"ftyp");
    w.buf.put_slice(b"isom");
    w.buf.put_u32(0x200);
    for brand in [b"isom", b"iso2", b"avc1", b"mp41"] {
        w.buf.put_slice(brand);
    }
    w.end();
}

fn write_mvhd(w: &mut BoxWriter, duration: u64) {
    w.begin_full(b"mvhd", 1, 0);
    w.buf.put_u64(0); // creation_time
    w.buf.put_u64(0); // modification_time
    w.buf.put_u32(TIMESCALE);
    w.buf.put_u64(duration);
    w.buf.put_u32(0x0001_0000); // rate 1.0
    w.buf.put_u16(0x0100); // volume 1.0
    w.buf.put_slice(&[0; 10]);
    put_matrix(&mut w.buf);
    w.buf.put_slice(&[0; 24]); // pre_defined
    w.buf.put_u32(2); // next_track_ID
    w.end();
}

fn write_tkhd(w: &mut BoxWriter, duration: u64) {
    w.begin_full(b"tkhd", 1, 3); // enabled, in movie
    w.buf.put_u64(0);
    w.buf.put_u64(0);
    w.buf.put_u32(1); // track_ID
    w.buf.put_u32(0);
    w.buf.put_u64(duration);
    w.buf.put_slice(&[0; 8]);
    w.buf.put_u16(0); // layer
    w.buf.put_u16(0); // alternate_group
    w.buf.put_u16(0); // volume: video
    w.buf.put_u16(0);
    put_matrix(&mut w.buf);
    w.buf.put_u32(u32::from(WIDTH) << 16);
    w.buf.put_u32(u32::from(HEIGHT) << 16);
    w.end();
}

fn write_mdhd(w: &mut BoxWriter, duration: u64) {
    w.begin_full(b"mdhd", 1, 0);
    w.buf.put_u64(0);
    w.buf.put_u64(0);
    w.buf.put_u32(TIMESCALE);
    w.buf.put_u64(duration);
    w.buf.put_u16(0x55c4); // language "und"
    w.buf.put_u16(0);
    w.end();
}

fn write_hdlr(w: &mut BoxWriter) {
    w.begin_full(b"hdlr", 0, 0);
    w.buf.put_u32(0);
    w.buf.put_slice(b"vide");
    w.buf.put_slice(&[0; 12]);
    w.buf.put_slice(b"VideoHandler\0");
    w.end();
}

fn write_vmhd(w: &mut BoxWriter) {
    w.begin_full(b"vmhd", 0, 1);
    w.buf.put_slice(&[0; 8]);
    w.end();
}

fn write_dinf(w: &mut BoxWriter) {
    w.begin(b"dinf");
    w.begin_full(b"dref", 0, 0);
    w.buf.put_u32(1);
    w.begin_full(b"url ", 0, 1); // media in this file
    w.end();
    w.end();
    w.end();
}

fn write_stsz(w: &mut BoxWriter, fragments: &[FragmentLayout]) {
    w.begin_full(b"stsz", 0, 0);
    w.buf.put_u32(0); // sizes differ
    let samples: u64 = fragments.iter().map(|f| u64::from(f.frames)).sum();
    w.buf.put_u32(samples as u32);
    for f in fragments {
        for size in &f.sample_sizes {
            w.buf.put_u32(*size);
        }
    }
    w.end();
}

/// One chunk per fragment, at its offset in the file.
fn write_co64(w: &mut BoxWriter, fragments: &[FragmentLayout], data_start: u64) {
    w.begin_full(b"co64", 0, 0);
    w.buf.put_u32(fragments.len() as u32);
    // `data_start` is the length of everything before the media, the mdat header included.
    let mut offset = data_start;
    for f in fragments {
        w.buf.put_u64(offset);
        offset += f.media_bytes();
    }
    w.end();
}

/// The mdat header; its payload is streamed after it.
fn write_mdat_header(w: &mut BoxWriter, media_bytes: u64) {
    if mdat_header_len(media_bytes) == 16 {
        w.buf.put_u32(1);
        w.buf.put_slice(b"mdat");
        w.buf.put_u64(media_bytes + 16);
    } else {
        w.buf.put_u32((media_bytes + 8) as u32);
        w.buf.put_slice(b"mdat");
    }
}

fn mdat_header_len(media_bytes: u64) -> u64 {
    if media_bytes + 8 > u64::from(u32::MAX) {
        16
    } else {
        8
    }
}

fn put_matrix(buf: &mut BytesMut) {
    for v in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
        buf.put_u32(v);
    }
}

fn write_stsd(w: &mut BoxWriter, gop: &Gop) {
    w.begin_full(b"stsd", 0, 0);
    w.buf.put_u32(1);
    w.begin(b"avc1");
    w.buf.put_slice(&[0; 6]);
    w.buf.put_u16(1); // data_reference_index
    w.buf.put_slice(&[0; 16]);
    w.buf.put_u16(WIDTH);
    w.buf.put_u16(HEIGHT);
    w.buf.put_u32(0x0048_0000); // 72 dpi
    w.buf.put_u32(0x0048_0000);
    w.buf.put_u32(0);
    w.buf.put_u16(1); // frame_count
    let mut compressor = [0u8; 32];
    let name = b"kvs-emulator";
    compressor[0] = name.len() as u8;
    compressor[1..=name.len()].copy_from_slice(name);
    w.buf.put_slice(&compressor);
    w.buf.put_u16(0x0018);
    w.buf.put_i16(-1);
    w.begin(b"avcC");
    w.buf.put_u8(1);
    w.buf.put_slice(&gop.sps[1..4]); // profile, compatibility, level
    w.buf.put_u8(0xff); // 4-byte NAL lengths
    w.buf.put_u8(0xe1); // one SPS
    w.buf.put_u16(gop.sps.len() as u16);
    w.buf.put_slice(&gop.sps);
    w.buf.put_u8(1); // one PPS
    w.buf.put_u16(gop.pps.len() as u16);
    w.buf.put_slice(&gop.pps);
    w.end();
    w.end();
    w.end();
}

fn write_stts(w: &mut BoxWriter, fragments: &[FragmentLayout]) {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    let mut push = |count: u32, delta: u32| {
        if count == 0 {
            return;
        }
        match runs.last_mut() {
            Some((c, d)) if *d == delta => *c += count,
            _ => runs.push((count, delta)),
        }
    };
    for f in fragments {
        push(f.frames - 1, f.frame_interval_ms);
        push(1, f.last_sample_ms);
    }
    w.begin_full(b"stts", 0, 0);
    w.buf.put_u32(runs.len() as u32);
    for (count, delta) in runs {
        w.buf.put_u32(count);
        w.buf.put_u32(delta);
    }
    w.end();
}

fn write_stss(w: &mut BoxWriter, fragments: &[FragmentLayout]) {
    w.begin_full(b"stss", 0, 0);
    w.buf.put_u32(fragments.len() as u32);
    let mut sample = 1u32;
    for f in fragments {
        w.buf.put_u32(sample);
        sample += f.frames;
    }
    w.end();
}

fn write_stsc(w: &mut BoxWriter, fragments: &[FragmentLayout]) {
    let mut runs: Vec<(u32, u32)> = Vec::new(); // (first_chunk, samples_per_chunk)
    for (i, f) in fragments.iter().enumerate() {
        if runs.last().map(|(_, n)| *n) != Some(f.frames) {
            runs.push((i as u32 + 1, f.frames));
        }
    }
    w.begin_full(b"stsc", 0, 0);
    w.buf.put_u32(runs.len() as u32);
    for (first, per_chunk) in runs {
        w.buf.put_u32(first);
        w.buf.put_u32(per_chunk);
        w.buf.put_u32(1);
    }
    w.end();
}
