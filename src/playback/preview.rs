//! A preview of an instant: the keyframe at or before it, alone in a one-frame MP4. A
//! browser decodes it as it decodes any video, so the server needs no image library.

use super::footage::{Footage, Tracks};
use crate::destination::Destination;
use crate::domain::{EpochMs, TimestampSource};
use crate::error::{Error, Result, Retryability};
use crate::ledger::Ledger;
use crate::mp4::writer::TrackTable;

/// No camera's keyframe is larger: a sample table claiming more is not read whole.
const MAX_KEYFRAME_BYTES: u32 = 32 << 20;

/// A one-frame MP4.
pub struct Preview {
    /// The file.
    pub bytes: Vec<u8>,
    /// Wall time of the frame.
    pub frame_ms: EpochMs,
}

/// The keyframe at or before `at` in the fragment holding it, as a one-frame MP4;
/// `None` when no archived fragment holds `at`.
pub async fn preview(
    ledger: &dyn Ledger,
    destination: &Destination,
    stream: &str,
    source: TimestampSource,
    at: EpochMs,
) -> Result<Option<Preview>> {
    let footage = Footage::of_range(ledger, destination, stream, source, at, at + 1).await?;
    let Some(placed) = footage.placed.last() else {
        return Ok(None);
    };
    let fragment = footage.fragment(placed);
    let mut tracks = Tracks::new(1);
    let object = tracks.get(&footage, destination, placed.object).await?;
    let samples = object.samples_of(placed.index);
    let Some(base) = samples.first().map(|s| s.dts) else {
        return Ok(None);
    };
    let keyframe = samples
        .iter()
        .filter(|s| s.sync)
        .take_while(|s| fragment.start_ms + object.track.ms(s.dts - base) as i64 <= at)
        .last()
        .or_else(|| samples.iter().find(|s| s.sync));
    let Some(keyframe) = keyframe.copied() else {
        return Ok(None);
    };
    let key = &footage.objects[placed.object].key;
    if keyframe.size > MAX_KEYFRAME_BYTES {
        return Err(Error::Clip {
            key: key.clone(),
            message: format!("a keyframe of {} bytes is not previewed", keyframe.size),
            retry: Retryability::Permanent,
        });
    }
    let track = &object.track;
    let mut table = TrackTable::new(
        track.timescale,
        track.width,
        track.height,
        track.sample_description.clone(),
    );
    table.push(keyframe.size, keyframe.duration.max(1), 0, true, true);
    let mut bytes = table.header();
    let frame = destination
        .read_range(key, keyframe.offset, u64::from(keyframe.size))
        .await?
        .collect()
        .await?;
    if frame.len() != keyframe.size as usize {
        return Err(Error::Clip {
            key: key.clone(),
            message: "the object ends inside a keyframe: `kvs-archiver verify` checks it".into(),
            retry: Retryability::Permanent,
        });
    }
    bytes.extend_from_slice(&frame);
    Ok(Some(Preview {
        bytes,
        frame_ms: fragment.start_ms + track.ms(keyframe.dts - base) as i64,
    }))
}
