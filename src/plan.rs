//! The planner: sorted fragments in, chunks out. Pure, so its invariants are proven by
//! property tests: every fragment lands in exactly one chunk, every chunk is within every
//! cap, fragments sharing a start timestamp are never split.
//!
//! Fragments are fed in ascending order, one window of a ListFragments listing at a time,
//! so memory holds one window and the open chunk, not the whole range.

use crate::domain::{ChunkPlan, EpochMs, Fragment};

/// GetClip's hard caps and our own limits for one clip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    /// At most this many fragments (GetClip returns only the first 200).
    pub max_fragments: u32,
    /// At most this many bytes of `FragmentSizeInBytes` (GetClip returns only the first
    /// 100 MB, and MP4 packaging differs from the listed sizes).
    pub max_bytes: u64,
    /// Chunks never cross a multiple of this since the epoch, so objects align to
    /// wall-clock boundaries and every planner cuts the same chunks. Must be under 24 h.
    pub clip_duration_ms: u64,
}

impl ChunkLimits {
    /// A chunk of one fragment is always allowed: a fragment cannot be split.
    fn admits(&self, open: &OpenChunk, group: &[Fragment]) -> bool {
        let count = open.count + group.len() as u32;
        let bytes = open.bytes + group.iter().map(|f| f.size_bytes).sum::<u64>();
        count <= self.max_fragments
            && bytes <= self.max_bytes
            && self.slot(open.start_ms) == self.slot(group[0].start_ms)
    }

    fn slot(&self, ms: EpochMs) -> i64 {
        ms.div_euclid(self.clip_duration_ms.max(1) as i64)
    }
}

#[derive(Debug)]
struct OpenChunk {
    start_ms: EpochMs,
    end_ms: EpochMs,
    count: u32,
    bytes: u64,
    duration_ms: u64,
    first: String,
    last: String,
}

impl OpenChunk {
    fn close(self) -> ChunkPlan {
        ChunkPlan {
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            fragment_count: self.count,
            bytes: self.bytes,
            duration_ms: self.duration_ms,
            first_fragment: self.first,
            last_fragment: self.last,
        }
    }
}

/// Packs fragments into chunks greedily.
#[derive(Debug)]
pub struct Packer {
    limits: ChunkLimits,
    open: Option<OpenChunk>,
    /// Fragments sharing the start timestamp of the group being collected.
    group: Vec<Fragment>,
}

impl Packer {
    pub fn new(limits: ChunkLimits) -> Self {
        Packer {
            limits,
            open: None,
            group: Vec::new(),
        }
    }

    /// Adds the next fragment; `out` receives any chunk this closes. Fragments must come
    /// in [`Fragment::order`]; a fragment equal to the previous one (same number) is a
    /// duplicate listing and is skipped.
    pub fn push(&mut self, fragment: Fragment, out: &mut Vec<ChunkPlan>) {
        if let Some(last) = self.group.last() {
            if last.number == fragment.number {
                return;
            }
            if last.start_ms != fragment.start_ms {
                self.flush_group(out);
            }
        } else if let Some(open) = &self.open {
            if open.last == fragment.number {
                return;
            }
        }
        self.group.push(fragment);
    }

    /// Closes the open chunk before a fragment that must not join it (one that is
    /// already archived): the chunk's range must not reach over it.
    pub fn cut(&mut self, out: &mut Vec<ChunkPlan>) {
        self.flush_group(out);
        if let Some(open) = self.open.take() {
            out.push(open.close());
        }
    }

    /// Closes everything: the end of the planned range.
    pub fn finish(mut self, out: &mut Vec<ChunkPlan>) {
        self.cut(out);
    }

    fn flush_group(&mut self, out: &mut Vec<ChunkPlan>) {
        if self.group.is_empty() {
            return;
        }
        let group = std::mem::take(&mut self.group);
        if let Some(open) = &self.open {
            if !self.limits.admits(open, &group) {
                if let Some(done) = self.open.take() {
                    out.push(done.close());
                }
            }
        }
        let open = self.open.get_or_insert_with(|| OpenChunk {
            start_ms: group[0].start_ms,
            end_ms: group[0].start_ms,
            count: 0,
            bytes: 0,
            duration_ms: 0,
            first: group[0].number.clone(),
            last: String::new(),
        });
        for f in group {
            open.end_ms = f.start_ms;
            open.count += 1;
            open.bytes += f.size_bytes;
            open.duration_ms += f.duration_ms;
            open.last = f.number;
        }
    }
}

/// Plans a whole sorted list at once (tests, and re-planning one chunk).
pub fn plan_all(fragments: &[Fragment], limits: ChunkLimits) -> Vec<ChunkPlan> {
    let mut packer = Packer::new(limits);
    let mut out = Vec::new();
    for f in fragments {
        packer.push(f.clone(), &mut out);
    }
    packer.finish(&mut out);
    out
}

/// Sorts a window of listed fragments and drops repeated listings of one fragment.
pub fn sort_and_dedup(fragments: &mut Vec<Fragment>) {
    fragments.sort_by(Fragment::order);
    fragments.dedup_by(|a, b| a.number == b.number);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frag(i: u64, start_ms: i64, size: u64) -> Fragment {
        Fragment {
            number: format!("9{i:046}"),
            start_ms,
            duration_ms: 2000,
            size_bytes: size,
        }
    }

    const LIMITS: ChunkLimits = ChunkLimits {
        max_fragments: 190,
        max_bytes: 90_000_000,
        clip_duration_ms: 600_000,
    };

    #[test]
    fn two_second_fragments_fill_ten_minute_slots() {
        let frags: Vec<_> = (0..900).map(|i| frag(i, i as i64 * 2000, 20_000)).collect();
        let chunks = plan_all(&frags, LIMITS);
        // 300 fragments per 10 minutes exceed 190: each slot splits in two.
        assert_eq!(chunks.len(), 6);
        assert_eq!(chunks[0].fragment_count, 190);
        assert_eq!(chunks[1].fragment_count, 110);
        assert_eq!(chunks[1].end_ms, 598_000);
        assert_eq!(chunks[2].start_ms, 600_000);
    }

    #[test]
    fn the_byte_cap_binds_for_large_fragments() {
        let frags: Vec<_> = (0..100)
            .map(|i| frag(i, i as i64 * 4000, 1_500_000))
            .collect();
        let chunks = plan_all(&frags, LIMITS);
        assert!(chunks.iter().all(|c| c.bytes <= 90_000_000));
        assert_eq!(chunks[0].fragment_count, 60);
    }

    #[test]
    fn a_cut_keeps_chunks_from_reaching_over_archived_fragments() {
        let mut packer = Packer::new(LIMITS);
        let mut out = Vec::new();
        packer.push(frag(0, 0, 1), &mut out);
        packer.push(frag(1, 2000, 1), &mut out);
        packer.cut(&mut out);
        packer.push(frag(3, 6000, 1), &mut out);
        packer.finish(&mut out);
        assert_eq!(out.len(), 2);
        assert_eq!((out[0].start_ms, out[0].end_ms), (0, 2000));
        assert_eq!((out[1].start_ms, out[1].end_ms), (6000, 6000));
        assert_eq!(out[1].clip_range(), (6000, 6001));
    }

    fn arb_fragments() -> impl Strategy<Value = Vec<Fragment>> {
        // Steps of 0 make fragments that share a start timestamp.
        proptest::collection::vec((0i64..25_000, 1u64..3_000_000), 1..700).prop_map(|steps| {
            let mut t = 1_795_564_800_000i64;
            steps
                .into_iter()
                .enumerate()
                .map(|(i, (step, size))| {
                    t += if step < 2_000 { 0 } else { step };
                    frag(i as u64, t, size)
                })
                .collect()
        })
    }

    proptest! {
        #[test]
        fn every_fragment_is_in_exactly_one_chunk_within_the_caps(
            frags in arb_fragments(),
            max_fragments in 1u32..=200,
            max_bytes in 3_000_000u64..=100_000_000,
            clip_minutes in 1u64..=1439,
        ) {
            let limits = ChunkLimits { max_fragments, max_bytes, clip_duration_ms: clip_minutes * 60_000 };
            let chunks = plan_all(&frags, limits);
            // Exactly once: each fragment's start lies in exactly one chunk's clip range.
            for f in &frags {
                let holders = chunks.iter().filter(|c| {
                    let (a, b) = c.clip_range();
                    a <= f.start_ms && f.start_ms <= b
                }).count();
                prop_assert_eq!(holders, 1, "fragment at {} in {} chunks", f.start_ms, holders);
            }
            prop_assert_eq!(chunks.iter().map(|c| c.fragment_count as usize).sum::<usize>(), frags.len());
            for c in &chunks {
                let (a, b) = c.clip_range();
                prop_assert!(b - a < 24 * 3_600_000, "under 24 h");
                let single_group = frags.iter().filter(|f| f.start_ms >= a && f.start_ms <= b)
                    .all(|f| f.start_ms == c.start_ms);
                if !single_group {
                    prop_assert!(c.fragment_count <= max_fragments);
                    prop_assert!(c.bytes <= max_bytes);
                    prop_assert_eq!(limits.slot(c.start_ms), limits.slot(c.end_ms));
                }
            }
            for pair in chunks.windows(2) {
                prop_assert!(pair[0].clip_range().1 < pair[1].start_ms, "chunks are disjoint and ordered");
            }
        }
    }
}
