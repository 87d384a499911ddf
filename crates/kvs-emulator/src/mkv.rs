//! Matroska as GetMediaForFragmentList returns it: an EBML header, one Segment of unknown
//! size with the track (H.264, `avcC` as codec private data) and one Cluster per fragment,
//! each frame a SimpleBlock. Timecodes are the fragments' producer timestamps in ms, as
//! KVS writes them.

use crate::media::{Gop, HEIGHT, WIDTH};
use crate::stream::Fragment;
use bytes::{BufMut, Bytes, BytesMut};

/// An element with a known size: ID bytes, an 8-byte size, the payload.
fn element(id: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(id.len() + 8 + payload.len());
    out.extend_from_slice(id);
    out.push(0x01); // 8-byte size vint
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes()[1..]);
    out.extend_from_slice(payload);
    out
}

fn uint(id: &[u8], value: u64) -> Vec<u8> {
    element(id, &value.to_be_bytes())
}

fn avc_config(gop: &Gop) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_u8(1);
    b.put_slice(&gop.sps[1..4]);
    b.put_u8(0xff);
    b.put_u8(0xe1);
    b.put_u16(gop.sps.len() as u16);
    b.put_slice(&gop.sps);
    b.put_u8(1);
    b.put_u16(gop.pps.len() as u16);
    b.put_slice(&gop.pps);
    b.to_vec()
}

/// The whole Matroska body for `fragments`, in the order given.
pub fn media_bytes(gop: &Gop, fragments: &[Fragment]) -> Vec<Bytes> {
    let ebml = element(
        &[0x1a, 0x45, 0xdf, 0xa3],
        &[
            uint(&[0x42, 0x86], 1),
            uint(&[0x42, 0xf7], 1),
            uint(&[0x42, 0xf2], 4),
            uint(&[0x42, 0xf3], 8),
            element(&[0x42, 0x82], b"matroska"),
            uint(&[0x42, 0x87], 4),
            uint(&[0x42, 0x85], 2),
        ]
        .concat(),
    );
    let info = element(
        &[0x15, 0x49, 0xa9, 0x66],
        &[
            uint(&[0x2a, 0xd7, 0xb1], 1_000_000),
            element(&[0x4d, 0x80], b"kvs-emulator"),
            element(&[0x57, 0x41], b"kvs-emulator"),
        ]
        .concat(),
    );
    let video = element(
        &[0xe0],
        &[
            uint(&[0xb0], u64::from(WIDTH)),
            uint(&[0xba], u64::from(HEIGHT)),
        ]
        .concat(),
    );
    let track = element(
        &[0xae],
        &[
            uint(&[0xd7], 1),
            uint(&[0x73, 0xc5], 1),
            uint(&[0x83], 1),
            element(&[0x86], b"V_MPEG4/ISO/AVC"),
            element(&[0x63, 0xa2], &avc_config(gop)),
            video,
        ]
        .concat(),
    );
    let tracks = element(&[0x16, 0x54, 0xae, 0x6b], &track);
    let mut head = ebml;
    // Segment of unknown size: KVS streams it.
    head.extend_from_slice(&[
        0x18, 0x53, 0x80, 0x67, 0x01, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    ]);
    head.extend_from_slice(&info);
    head.extend_from_slice(&tracks);
    let mut out = vec![Bytes::from(head)];
    for f in fragments {
        let data: Vec<u8> = gop
            .fragment_chunks(&f.layout, &f.number)
            .iter()
            .flat_map(|c| c.iter().copied())
            .collect();
        let mut cluster = uint(&[0xe7], f.producer_ms.max(0) as u64);
        let mut offset = 0usize;
        for (i, size) in f.layout.sample_sizes.iter().enumerate() {
            let size = *size as usize;
            let Some(frame) = data.get(offset..offset + size) else {
                break;
            };
            offset += size;
            let mut block = Vec::with_capacity(size + 4);
            block.push(0x81); // track 1
            let at = i as u32 * f.layout.frame_interval_ms;
            block.extend_from_slice(&(at as i16).to_be_bytes());
            block.push(if i == 0 { 0x80 } else { 0x00 }); // keyframe flag on the IDR
            block.extend_from_slice(frame);
            cluster.extend_from_slice(&element(&[0xa3], &block));
        }
        out.push(Bytes::from(element(&[0x1f, 0x43, 0xb6, 0x75], &cluster)));
    }
    out
}
