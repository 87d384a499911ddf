//! The planner: sorted fragments in, chunks out. Pure, so its invariants are proven by
//! property tests: every fragment lands in exactly one chunk, every chunk is within every
//! cap, fragments sharing a start timestamp are never split.
//!
//! Fragments are fed in ascending order, one window of a ListFragments listing at a time,
//! so memory holds one window and the open chunk, not the whole range.

use crate::domain::{ChunkKind, ChunkPlan, EpochMs, Fragment};

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
    count: u32,
    bytes: u64,
    fragments: Vec<Fragment>,
}

impl OpenChunk {
    fn close(self) -> ChunkPlan {
        ChunkPlan::of(ChunkKind::Clip, self.fragments)
    }
}

/// Packs fragments into chunks greedily.
#[derive(Debug)]
pub struct Packer {
    limits: ChunkLimits,
    open: Option<OpenChunk>,
    /// Fragments sharing the start timestamp of the group being collected.
    group: Vec<Fragment>,
    /// GetClip keeps one fragment of those sharing a producer timestamp (the oldest
    /// ingested): the others go to a Matroska chunk of their own.
    separate_equal_timestamps: bool,
    /// Number of the last fragment pushed: a repeated listing is skipped.
    last_number: Option<String>,
}

impl Packer {
    /// An empty packer that closes chunks at `limits`.
    pub fn new(limits: ChunkLimits) -> Self {
        Packer {
            limits,
            open: None,
            group: Vec::new(),
            separate_equal_timestamps: false,
            last_number: None,
        }
    }

    /// For producer timestamps, which GetClip de-duplicates.
    pub fn separating_equal_timestamps(mut self, separate: bool) -> Self {
        self.separate_equal_timestamps = separate;
        self
    }

    /// Adds the next fragment; `out` receives any chunk this closes. Fragments must come
    /// in [`Fragment::order`]; a fragment equal to the previous one (same number) is a
    /// duplicate listing and is skipped.
    pub fn push(&mut self, fragment: Fragment, out: &mut Vec<ChunkPlan>) {
        if self.last_number.as_deref() == Some(fragment.number.as_str()) {
            return;
        }
        self.last_number = Some(fragment.number.clone());
        if self
            .group
            .last()
            .is_some_and(|last| last.start_ms != fragment.start_ms)
        {
            self.flush_group(out);
        }
        self.group.push(fragment);
    }

    /// Start of the last fragment pushed and not yet closed into a chunk.
    pub fn last_start(&self) -> Option<EpochMs> {
        self.group.last().map(|f| f.start_ms).or_else(|| {
            self.open
                .as_ref()
                .and_then(|o| o.fragments.last())
                .map(|f| f.start_ms)
        })
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
        let mut group = std::mem::take(&mut self.group);
        if self.separate_equal_timestamps && group.len() > 1 {
            // Listed in ingestion order within the group: the first is what GetClip keeps.
            let rest = group.split_off(1);
            out.push(ChunkPlan::of(ChunkKind::Mkv, rest));
        }
        if let Some(open) = &self.open {
            if !self.limits.admits(open, &group) {
                if let Some(done) = self.open.take() {
                    out.push(done.close());
                }
            }
        }
        let open = self.open.get_or_insert_with(|| OpenChunk {
            start_ms: group[0].start_ms,
            count: 0,
            bytes: 0,
            fragments: Vec::new(),
        });
        for f in group {
            open.count += 1;
            open.bytes += f.size_bytes;
            open.fragments.push(f);
        }
    }
}

/// What the ledger already holds around a window being planned.
#[derive(Debug, Default, Clone)]
pub struct Holdings {
    /// Fragment numbers some chunk holds.
    pub held: std::collections::HashSet<String>,
    /// GetClip ranges of clip chunks reaching into the window: `(start, end, archived)`.
    pub ranges: Vec<(EpochMs, EpochMs, bool)>,
    /// Ranges of chunks planned before fragments were recorded: everything in them counts
    /// as held.
    pub legacy: Vec<(EpochMs, EpochMs)>,
}

impl Holdings {
    fn range_of(&self, ms: EpochMs) -> Option<(EpochMs, EpochMs, bool)> {
        self.ranges
            .iter()
            .copied()
            .find(|(a, b, _)| *a <= ms && ms <= *b)
    }
}

/// What [`plan_window`] did with each listed fragment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WindowCounts {
    /// Already in a chunk.
    pub held: u64,
    /// Inside the range of a chunk not archived yet: its GetClip will take them.
    pub left_to_their_range: u64,
    /// Listed after the range around them was archived: late chunks of their own.
    pub late: u64,
}

/// Plans one window of sorted, de-duplicated fragments around what the ledger holds.
///
/// Every listed fragment that no chunk holds ends up in exactly one new chunk, or is left
/// to the not-yet-fetched chunk whose GetClip range contains it: new clip chunks never
/// reach over a held fragment or into another chunk's range; a fragment inside an archived
/// range becomes a late chunk whose one-millisecond GetClip range selects it alone, or a
/// Matroska chunk when another fragment shares that millisecond.
pub fn plan_window(
    packer: &mut Packer,
    fragments: &[Fragment],
    holdings: &Holdings,
    out: &mut Vec<ChunkPlan>,
) -> WindowCounts {
    let mut counts = WindowCounts::default();
    for (i, f) in fragments.iter().enumerate() {
        let in_legacy = holdings
            .legacy
            .iter()
            .any(|(a, b)| *a <= f.start_ms && f.start_ms <= *b);
        if holdings.held.contains(&f.number) || in_legacy {
            counts.held += 1;
            packer.cut(out);
            continue;
        }
        match holdings.range_of(f.start_ms) {
            None => {
                // A new chunk never reaches over another chunk's range, even one whose
                // fragments are no longer listed (expired).
                if let Some(last) = packer.last_start() {
                    let between = |a: EpochMs| last < a && a <= f.start_ms;
                    if holdings.ranges.iter().any(|(a, _, _)| between(*a))
                        || holdings.legacy.iter().any(|(a, _)| between(*a))
                    {
                        packer.cut(out);
                    }
                }
                packer.push(f.clone(), out)
            }
            Some((_, _, false)) => {
                counts.left_to_their_range += 1;
                packer.cut(out);
            }
            Some((_, _, true)) => {
                counts.late += 1;
                packer.cut(out);
                let shares_its_millisecond = fragments.iter().enumerate().any(|(j, g)| {
                    j != i && g.start_ms >= f.start_ms && g.start_ms <= f.start_ms + 1
                });
                let kind = if shares_its_millisecond {
                    ChunkKind::Mkv
                } else {
                    ChunkKind::Late
                };
                out.push(ChunkPlan::of(kind, vec![f.clone()]));
            }
        }
    }
    counts
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
            server_ms: start_ms,
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

    /// Plans `visible` first (all archived), then everything, as a daemon pass does after
    /// late fragments were listed. Returns all chunks of both rounds.
    fn two_rounds(
        all: &[Fragment],
        late: &[bool],
        limits: ChunkLimits,
        producer: bool,
    ) -> (Vec<ChunkPlan>, Vec<ChunkPlan>) {
        let visible: Vec<Fragment> = all
            .iter()
            .zip(late)
            .filter(|(_, l)| !**l)
            .map(|(f, _)| f.clone())
            .collect();
        let mut first = Vec::new();
        let mut packer = Packer::new(limits).separating_equal_timestamps(producer);
        plan_window(&mut packer, &visible, &Holdings::default(), &mut first);
        packer.finish(&mut first);
        let holdings = Holdings {
            held: first
                .iter()
                .flat_map(|c| c.fragments.iter().map(|f| f.number.clone()))
                .collect(),
            ranges: first
                .iter()
                .filter(|c| c.kind == ChunkKind::Clip)
                .map(|c| {
                    let (a, b) = c.clip_range();
                    (a, b, true)
                })
                .collect(),
            legacy: Vec::new(),
        };
        let mut second = Vec::new();
        let mut packer = Packer::new(limits).separating_equal_timestamps(producer);
        plan_window(&mut packer, all, &holdings, &mut second);
        packer.finish(&mut second);
        (first, second)
    }

    proptest! {
        #[test]
        fn late_fragments_among_archived_ones_land_in_exactly_one_object(
            frags in arb_fragments(),
            late_mask in proptest::collection::vec(proptest::bool::weighted(0.2), 700),
            producer in proptest::bool::ANY,
            max_fragments in 1u32..=200,
        ) {
            let limits = ChunkLimits { max_fragments, max_bytes: 90_000_000, clip_duration_ms: 600_000 };
            let late = &late_mask[..frags.len()];
            // Fragment numbers grow with ingestion: a late fragment's is above all others.
            let mut frags = frags;
            for (i, (f, l)) in frags.iter_mut().zip(late).enumerate() {
                if *l {
                    f.number = format!("9{:046}", 1_000_000 + i);
                }
            }
            let mut sorted = frags.clone();
            sorted.sort_by(Fragment::order);
            let first_late = format!("9{:046}", 1_000_000);
            let late_sorted: Vec<bool> = sorted.iter().map(|f| f.number >= first_late).collect();
            let frags = sorted;
            let (first, second) = two_rounds(&frags, &late_sorted, limits, producer);
            let visible: Vec<Fragment> = frags.iter().zip(&late_sorted).filter(|(_, l)| !**l).map(|(f, _)| f.clone()).collect();
            let chunks: Vec<ChunkPlan> = first.iter().chain(&second).cloned().collect();
            for f in &frags {
                let holders = chunks.iter().filter(|c| c.fragments.iter().any(|g| g.number == f.number)).count();
                prop_assert_eq!(holders, 1, "fragment {} held by {} chunks", &f.number, holders);
            }
            // What each GetClip returns, when it is fetched, is exactly the chunk's fragments:
            // its range selects no other chunk's fragment (KVS keeps the oldest of equal
            // producer timestamps). First-round chunks are fetched before the late media.
            let fetched = first.iter().map(|c| (c, &visible)).chain(second.iter().map(|c| (c, &frags)));
            for (c, frags) in fetched.filter(|(c, _)| c.kind != ChunkKind::Mkv) {
                let (a, b) = c.clip_range();
                let mut selected: Vec<&Fragment> = frags.iter().filter(|f| a <= f.start_ms && f.start_ms <= b).collect();
                if producer {
                    selected.dedup_by(|x, y| x.start_ms == y.start_ms);
                }
                let mut got: Vec<&str> = selected.iter().map(|f| f.number.as_str()).collect();
                let mut want: Vec<&str> = c.fragments.iter().map(|f| f.number.as_str()).collect();
                got.sort_unstable();
                want.sort_unstable();
                prop_assert_eq!(got, want, "{:?} chunk at {}", c.kind, c.start_ms);
            }
        }
    }

    #[test]
    fn a_late_fragment_inside_a_range_not_archived_yet_is_left_to_that_range() {
        let all: Vec<_> = (0..5).map(|i| frag(i, i as i64 * 2000, 1)).collect();
        let holdings = Holdings {
            held: ["0", "1", "3", "4"]
                .iter()
                .map(|i| all[i.parse::<usize>().unwrap_or(0)].number.clone())
                .collect(),
            ranges: vec![(0, 8000, false)],
            legacy: Vec::new(),
        };
        let mut out = Vec::new();
        let mut packer = Packer::new(LIMITS);
        let counts = plan_window(&mut packer, &all, &holdings, &mut out);
        packer.finish(&mut out);
        assert!(out.is_empty(), "no new chunk: {out:?}");
        assert_eq!(counts.left_to_their_range, 1);
    }
}
