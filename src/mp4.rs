//! Reads the header of a progressive MP4 (as GetClip returns it) to tell whether a clip is
//! whole: how long it plays, how many video samples it has, and how many bytes the file
//! must have. `moov` comes before `mdat` in such files, so the check happens before any
//! byte is uploaded.
//!
//! [`track`] reads a video track sample by sample and [`writer`] writes one, for
//! `export`, which joins archived objects without decoding them.

pub mod fragmented;
pub mod text;
pub mod track;
pub mod writer;

/// What the header says about the clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClipHeader {
    /// Movie duration in milliseconds (`mvhd`).
    pub duration_ms: u64,
    /// Samples of the first video track (`stsz` of the `vide` track).
    pub video_samples: u64,
    /// Bytes the whole file must have: up to the end of `mdat`.
    pub total_len: u64,
}

/// Why a file cannot be read as an MP4 clip.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mp4Error {
    /// The boxes do not describe an MP4; what is wrong.
    #[error("not an MP4: {0}")]
    Malformed(String),
    /// `mdat` comes before `moov`: the header cannot be read before the media.
    #[error("moov does not precede mdat: not a progressive MP4")]
    NotProgressive,
}

/// Parses `prefix`, the first bytes of a clip. `Ok(None)`: more bytes are needed.
pub fn parse_header(prefix: &[u8]) -> Result<Option<ClipHeader>, Mp4Error> {
    let mut pos = 0usize;
    let mut moov: Option<(u64, u64)> = None;
    while let Some((kind, header_len, size)) = box_at(prefix, pos)? {
        if pos == 0
            && !matches!(
                &kind,
                b"ftyp" | b"moov" | b"free" | b"skip" | b"wide" | b"mdat"
            )
        {
            return Err(Mp4Error::Malformed(format!(
                "starts with {:?}, not an MP4 box",
                String::from_utf8_lossy(&kind)
            )));
        }
        // A hostile size (up to 2^64) must not overflow: it only means "more bytes".
        let end = usize::try_from(size)
            .ok()
            .and_then(|size| pos.checked_add(size));
        match &kind {
            b"moov" => {
                let Some(end) = end.filter(|end| *end <= prefix.len()) else {
                    return Ok(None);
                };
                moov = Some(parse_moov(&prefix[pos + header_len..end])?);
            }
            b"mdat" => {
                let Some((duration_ms, video_samples)) = moov else {
                    return Err(Mp4Error::NotProgressive);
                };
                let total_len = (pos as u64)
                    .checked_add(size)
                    .ok_or_else(|| Mp4Error::Malformed(format!("mdat size {size} overflows")))?;
                return Ok(Some(ClipHeader {
                    duration_ms,
                    video_samples,
                    total_len,
                }));
            }
            _ => {}
        }
        match end {
            Some(end) if end <= prefix.len() => pos = end,
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// The box at `pos`: (type, header length, size). `None` if its header is not all there.
pub(crate) fn box_at(data: &[u8], pos: usize) -> Result<Option<([u8; 4], usize, u64)>, Mp4Error> {
    if pos + 8 > data.len() {
        return Ok(None);
    }
    let size32 = u32::from_be_bytes([data[pos], data[pos + 1], data[pos + 2], data[pos + 3]]);
    let kind = [data[pos + 4], data[pos + 5], data[pos + 6], data[pos + 7]];
    if !kind.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        return Err(Mp4Error::Malformed(format!(
            "box type {kind:?} at byte {pos}"
        )));
    }
    let (header_len, size) = match size32 {
        1 => {
            if pos + 16 > data.len() {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&data[pos + 8..pos + 16]);
            (16, u64::from_be_bytes(b))
        }
        0 => return Err(Mp4Error::Malformed("box extends to end of file".into())),
        n => (8, u64::from(n)),
    };
    if size < header_len as u64 {
        return Err(Mp4Error::Malformed(format!(
            "box size {size} at byte {pos}"
        )));
    }
    Ok(Some((kind, header_len, size)))
}

/// A child box: its type and its body.
pub(crate) type Child<'a> = ([u8; 4], &'a [u8]);

pub(crate) fn children(data: &[u8]) -> Result<Vec<Child<'_>>, Mp4Error> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < data.len() {
        let Some((kind, header_len, size)) = box_at(data, pos)? else {
            return Err(Mp4Error::Malformed("truncated box inside moov".into()));
        };
        let end = pos
            .checked_add(size as usize)
            .filter(|e| *e <= data.len())
            .ok_or_else(|| Mp4Error::Malformed("box overruns its parent".into()))?;
        out.push((kind, &data[pos + header_len..end]));
        pos = end;
    }
    Ok(out)
}

pub(crate) fn be_u32(data: &[u8], at: usize) -> Result<u32, Mp4Error> {
    data.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| Mp4Error::Malformed("short box".into()))
}

pub(crate) fn be_u64(data: &[u8], at: usize) -> Result<u64, Mp4Error> {
    Ok((u64::from(be_u32(data, at)?) << 32) | u64::from(be_u32(data, at + 4)?))
}

fn parse_moov(moov: &[u8]) -> Result<(u64, u64), Mp4Error> {
    let mut duration_ms = None;
    let mut video_samples = None;
    for (kind, body) in children(moov)? {
        match &kind {
            b"mvhd" => {
                let (timescale, duration) = if body.first() == Some(&1) {
                    (be_u32(body, 20)?, be_u64(body, 24)?)
                } else {
                    (be_u32(body, 12)?, u64::from(be_u32(body, 16)?))
                };
                if timescale == 0 {
                    return Err(Mp4Error::Malformed("mvhd timescale is 0".into()));
                }
                duration_ms = Some(duration.saturating_mul(1000) / u64::from(timescale));
            }
            b"trak" if video_samples.is_none() => video_samples = video_track_samples(body)?,
            _ => {}
        }
    }
    match (duration_ms, video_samples) {
        (Some(d), Some(s)) => Ok((d, s)),
        (None, _) => Err(Mp4Error::Malformed("no mvhd".into())),
        (_, None) => Err(Mp4Error::Malformed("no video track".into())),
    }
}

fn video_track_samples(trak: &[u8]) -> Result<Option<u64>, Mp4Error> {
    let Some((_, mdia)) = children(trak)?.into_iter().find(|(k, _)| k == b"mdia") else {
        return Ok(None);
    };
    let mdia = children(mdia)?;
    let is_video = mdia
        .iter()
        .any(|(k, body)| k == b"hdlr" && body.get(8..12) == Some(b"vide"));
    if !is_video {
        return Ok(None);
    }
    let Some((_, minf)) = mdia.iter().find(|(k, _)| k == b"minf") else {
        return Ok(None);
    };
    let Some((_, stbl)) = children(minf)?.into_iter().find(|(k, _)| k == b"stbl") else {
        return Ok(None);
    };
    for (kind, body) in children(stbl)? {
        match &kind {
            b"stsz" => return Ok(Some(u64::from(be_u32(body, 8)?))),
            b"stz2" => return Ok(Some(u64::from(be_u32(body, 8)?))),
            _ => {}
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip() -> Vec<u8> {
        let end = chrono::Utc::now() - chrono::Duration::seconds(60);
        let mut spec =
            kvs_emulator::StreamSpec::historical("cam", end - chrono::Duration::seconds(10), end);
        spec.fragment_durations_ms = vec![2000];
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let emu = kvs_emulator::Emulator::start(kvs_emulator::EmulatorConfig {
                streams: vec![spec],
                ..Default::default()
            })
            .await
            .expect("emulator");
            emu.clip_bytes("cam", 0, i64::MAX).concat()
        })
    }

    #[test]
    fn reads_duration_samples_and_length_of_a_clip() {
        let bytes = clip();
        let header = parse_header(&bytes).expect("valid").expect("complete");
        assert_eq!(header.duration_ms, 10_000);
        assert_eq!(header.video_samples, 100);
        assert_eq!(header.total_len, bytes.len() as u64);
        assert_eq!(parse_header(&bytes[..100]), Ok(None), "needs more bytes");
        assert!(parse_header(b"<html>not found</html>").is_err());
    }

    fn real_header() -> &'static [u8] {
        static CLIP: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        CLIP.get_or_init(|| {
            let bytes = clip();
            let header = parse_header(&bytes)
                .ok()
                .flatten()
                .map_or(0, |h| h.total_len);
            // The header and a little media: what the check ever sees.
            let moov_end = bytes.len().min(64 * 1024).min(header as usize);
            bytes[..moov_end].to_vec()
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096)) {
            let _ = parse_header(&bytes);
        }

        #[test]
        fn hostile_sizes_and_damaged_headers_never_panic(
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 0..8),
            size_at in proptest::prelude::any::<usize>(),
            size in proptest::prelude::prop_oneof![
                proptest::prelude::Just(u64::MAX),
                proptest::prelude::Just(u64::from(u32::MAX)),
                proptest::prelude::Just(0u64),
                proptest::prelude::Just(1u64),
                proptest::prelude::any::<u64>(),
            ],
            cut in proptest::prelude::any::<usize>(),
        ) {
            let mut bytes = real_header().to_vec();
            for (at, value) in flips {
                let at = at % bytes.len();
                bytes[at] ^= value;
            }
            // A 64-bit box size (size field 1, then the size) at a random offset.
            let at = size_at % bytes.len().saturating_sub(16).max(1);
            if at + 16 <= bytes.len() {
                bytes[at..at + 4].copy_from_slice(&1u32.to_be_bytes());
                bytes[at + 8..at + 16].copy_from_slice(&size.to_be_bytes());
            }
            bytes.truncate(cut % (bytes.len() + 1));
            if let Ok(Some(header)) = parse_header(&bytes) {
                proptest::prop_assert!(header.total_len >= 8);
            }
        }
    }
}
