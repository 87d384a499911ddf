//! The H.264 media every emulated fragment is made of.
//!
//! A fragment is a prefix of one committed 20 s GOP (`fixtures/gop.h264`): its first sample
//! is the IDR frame, so every fragment decodes on its own, as a camera's fragments do. Two
//! NAL units are added per fragment:
//! - an SEI "user data unregistered" message whose UUID is [`MARKER_UUID`] and whose payload
//!   is the fragment number in ASCII, so a test can tell which fragments a stored MP4 holds;
//! - a filler-data NAL unit that pads the fragment to its stream's size target.
//!
//! Samples are kept in the MP4 ("AVCC") form: each NAL unit is preceded by its 4-byte
//! big-endian length. Fixture frames are shared `Bytes` slices, so serving a clip copies
//! nothing but the small per-fragment marker and filler headers.

use bytes::{BufMut, Bytes, BytesMut};
use std::sync::{Arc, OnceLock, RwLock};

/// The committed GOP, Annex B byte stream (regenerate with `fixtures/make-fixture.sh`).
const FIXTURE: &[u8] = include_bytes!("../fixtures/gop.h264");

/// Frame interval of the fixture (10 fps), which is also the sample duration in clips.
pub const FRAME_INTERVAL_MS: u32 = 100;
/// Picture size of the fixture, written into `tkhd` and the `avc1` sample entry.
pub const WIDTH: u16 = 320;
/// Picture height of the fixture.
pub const HEIGHT: u16 = 180;

/// UUID of the SEI marker. Printable ASCII without zero bytes, so it needs no emulation
/// prevention and a plain byte search finds it in any container.
pub const MARKER_UUID: &[u8; 16] = b"KVSEMU-FRAGMENT:";

/// Filler NAL units: length prefix (4) + header (1) + trailing bits (1).
const FILLER_OVERHEAD: u64 = 6;

/// Estimated Matroska overhead KVS counts in `FragmentSizeInBytes` beyond the media itself:
/// a cluster header per fragment and a SimpleBlock header per frame.
const MKV_FRAGMENT_OVERHEAD: u64 = 96;
const MKV_FRAME_OVERHEAD: u64 = 12;

/// Parsed fixture: parameter sets for `avcC`, and the frames in AVCC form.
pub struct Gop {
    /// The fixture's sequence parameter set, NAL header included.
    pub sps: Bytes,
    /// The fixture's picture parameter set, NAL header included.
    pub pps: Bytes,
    /// All frames, each `[len:4][nal]`, back to back.
    avcc: Bytes,
    /// `frame_end[i]`: offset in `avcc` where frame `i` ends.
    frame_end: Vec<usize>,
    /// A run of 0xFF bytes that filler NAL units are cut from; grows on demand.
    filler: RwLock<Bytes>,
}

/// How one fragment is laid out as MP4 samples.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FragmentLayout {
    /// Frames (samples) in the fragment.
    pub frames: u32,
    /// Milliseconds between frames: every sample lasts this, the last one excepted.
    pub frame_interval_ms: u32,
    /// Duration of the last sample.
    pub last_sample_ms: u32,
    /// Bytes of the filler NAL payload (0: no filler NAL unit).
    pub filler_payload: u64,
    /// Size of every sample in bytes, in order.
    pub sample_sizes: Vec<u32>,
}

impl FragmentLayout {
    /// Bytes of media: every sample, as the clip's `mdat` holds them.
    pub fn media_bytes(&self) -> u64 {
        self.sample_sizes.iter().map(|s| u64::from(*s)).sum()
    }

    /// What ListFragments reports as `FragmentSizeInBytes`: media plus container overhead.
    pub fn reported_size(&self) -> u64 {
        self.media_bytes() + MKV_FRAGMENT_OVERHEAD + MKV_FRAME_OVERHEAD * u64::from(self.frames)
    }
}

/// The committed fixture GOP, parsed once per process.
pub fn gop() -> &'static Arc<Gop> {
    static GOP: OnceLock<Arc<Gop>> = OnceLock::new();
    GOP.get_or_init(|| Arc::new(Gop::parse(FIXTURE)))
}

fn annex_b_nal_units(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 3 <= data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i + 3);
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut units = Vec::with_capacity(starts.len());
    for (k, &start) in starts.iter().enumerate() {
        let mut end = starts.get(k + 1).map_or(data.len(), |next| next - 3);
        // A 4-byte start code leaves one zero byte at the end of the previous unit.
        while end > start && data[end - 1] == 0 {
            end -= 1;
        }
        units.push(&data[start..end]);
    }
    units
}

impl Gop {
    fn parse(annex_b: &[u8]) -> Gop {
        let mut sps = Bytes::new();
        let mut pps = Bytes::new();
        let mut avcc = BytesMut::new();
        let mut frame_end = Vec::new();
        for nal in annex_b_nal_units(annex_b) {
            match nal[0] & 0x1f {
                7 => sps = Bytes::copy_from_slice(nal),
                8 => pps = Bytes::copy_from_slice(nal),
                // One slice per frame in the fixture (x264 default), so a VCL NAL is a frame.
                1 | 5 => {
                    avcc.put_u32(nal.len() as u32);
                    avcc.put_slice(nal);
                    frame_end.push(avcc.len());
                }
                // x264's own SEI (encoder settings) and anything else are dropped.
                _ => {}
            }
        }
        assert!(
            !sps.is_empty() && !pps.is_empty() && !frame_end.is_empty(),
            "fixtures/gop.h264 must hold an SPS, a PPS and frames"
        );
        Gop {
            sps,
            pps,
            avcc: avcc.freeze(),
            frame_end,
            filler: RwLock::new(Bytes::new()),
        }
    }

    /// Frames in the fixture GOP.
    pub fn frame_count(&self) -> u32 {
        self.frame_end.len() as u32
    }

    fn frame_size(&self, i: usize) -> u32 {
        let start = if i == 0 { 0 } else { self.frame_end[i - 1] };
        (self.frame_end[i] - start) as u32
    }

    /// Lays out a fragment of `duration_ms` padded up to `size_target` media bytes, a
    /// frame every [`FRAME_INTERVAL_MS`].
    pub fn layout(&self, duration_ms: u32, size_target: u64, number_len: usize) -> FragmentLayout {
        self.layout_at(duration_ms, size_target, number_len, FRAME_INTERVAL_MS)
    }

    /// [`Gop::layout`] with a frame every `interval_ms`.
    pub fn layout_at(
        &self,
        duration_ms: u32,
        size_target: u64,
        number_len: usize,
        interval_ms: u32,
    ) -> FragmentLayout {
        let interval_ms = interval_ms.max(1);
        let max_frames = self.frame_count();
        let frames = duration_ms.div_ceil(interval_ms).clamp(1, max_frames);
        let last_sample_ms = duration_ms
            .saturating_sub(interval_ms * (frames - 1))
            .max(1);
        let mut sample_sizes: Vec<u32> = (0..frames as usize).map(|i| self.frame_size(i)).collect();
        sample_sizes[0] += marker_len(number_len) as u32;
        let natural: u64 = sample_sizes.iter().map(|s| u64::from(*s)).sum();
        let filler_payload = if size_target > natural + FILLER_OVERHEAD {
            size_target - natural - FILLER_OVERHEAD
        } else {
            0
        };
        if filler_payload > 0 {
            let last = sample_sizes.len() - 1;
            sample_sizes[last] += (filler_payload + FILLER_OVERHEAD) as u32;
        }
        FragmentLayout {
            frames,
            frame_interval_ms: interval_ms,
            last_sample_ms,
            filler_payload,
            sample_sizes,
        }
    }

    /// The media bytes of one fragment, as a few shared chunks in sample order.
    pub fn fragment_chunks(&self, layout: &FragmentLayout, number: &str) -> Vec<Bytes> {
        let mut chunks = Vec::with_capacity(4);
        chunks.push(marker_nal(number));
        chunks.push(
            self.avcc
                .slice(0..self.frame_end[layout.frames as usize - 1]),
        );
        if layout.filler_payload > 0 {
            let payload = layout.filler_payload as usize;
            let mut header = BytesMut::with_capacity(5);
            header.put_u32((payload + 2) as u32);
            header.put_u8(0x0c); // nal_unit_type 12: filler data
            chunks.push(header.freeze());
            chunks.push(self.filler_run(payload));
            chunks.push(Bytes::from_static(&[0x80])); // rbsp_trailing_bits
        }
        chunks
    }

    fn filler_run(&self, len: usize) -> Bytes {
        if let Ok(run) = self.filler.read() {
            if run.len() >= len {
                return run.slice(0..len);
            }
        }
        let mut run = match self.filler.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if run.len() < len {
            *run = Bytes::from(vec![0xff; len.next_power_of_two()]);
        }
        run.slice(0..len)
    }
}

fn marker_len(number_len: usize) -> usize {
    // [len:4][nal header][payload type][payload size][uuid:16][number][trailing bits]
    4 + 1 + 1 + 1 + 16 + number_len + 1
}

/// The SEI NAL unit (with its length prefix) that names a fragment.
fn marker_nal(number: &str) -> Bytes {
    let payload_size = 16 + number.len();
    debug_assert!(
        payload_size < 255,
        "fragment numbers are at most 128 digits"
    );
    let mut nal = BytesMut::with_capacity(marker_len(number.len()));
    nal.put_u32((marker_len(number.len()) - 4) as u32);
    nal.put_u8(0x06); // nal_unit_type 6: SEI
    nal.put_u8(5); // payloadType 5: user_data_unregistered
    nal.put_u8(payload_size as u8);
    nal.put_slice(MARKER_UUID);
    nal.put_slice(number.as_bytes());
    nal.put_u8(0x80);
    nal.freeze()
}

/// Fragment numbers found in `data` (an MP4, MKV or raw stream) in order of appearance.
pub fn scan_markers(data: &[u8]) -> Vec<String> {
    let mut found = Vec::new();
    let mut rest = data;
    while let Some(pos) = find(rest, MARKER_UUID) {
        let after = &rest[pos + MARKER_UUID.len()..];
        let digits = after.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 {
            found.push(String::from_utf8_lossy(&after[..digits]).into_owned());
        }
        rest = &after[digits..];
    }
    found
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixture_is_one_gop_of_200_frames() {
        let gop = gop();
        assert_eq!(gop.frame_count(), 200);
        assert_eq!(gop.sps[0] & 0x1f, 7);
        assert_eq!(gop.pps[0] & 0x1f, 8);
        assert_eq!(gop.avcc[4] & 0x1f, 5, "first frame is an IDR");
    }

    #[test]
    fn layout_pads_to_target_and_chunks_match_sizes() {
        let number = "9".repeat(47);
        let layout = gop().layout(2_000, 20_000, number.len());
        assert_eq!(layout.frames, 20);
        assert_eq!(layout.media_bytes(), 20_000);
        let chunks = gop().fragment_chunks(&layout, &number);
        let total: usize = chunks.iter().map(Bytes::len).sum();
        assert_eq!(total as u64, layout.media_bytes());
        let joined: Vec<u8> = chunks.concat();
        assert_eq!(scan_markers(&joined), vec![number]);
    }

    #[test]
    fn odd_durations_shorten_the_last_sample() {
        let layout = gop().layout(1_550, 0, 47);
        assert_eq!(layout.frames, 16);
        assert_eq!(layout.last_sample_ms, 50);
        assert_eq!(layout.filler_payload, 0);
    }
}
