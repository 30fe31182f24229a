//! Bounded top-k per query with the reference's order: higher score first, and among equal
//! scores the larger global index first (what faiss on CPU produces, and what ILIAS expects).
//!
//! Each query keeps a buffer of candidates. Rows are offered only when they can still enter the
//! top k (`score >= threshold`); when the buffer reaches `1.5 k` it is cut back to the best `k`
//! in linear time and the threshold rises to the k-th score. This costs O(1) amortised per
//! accepted candidate, much less than a heap for the k of ILIAS (1,000 to 10,000). (A larger
//! buffer compacts less often but lets the threshold lag: exact search's int8 pass then rescores
//! more rows; 1.5 k measured best.) NaN scores never pass the threshold test, so they are never
//! returned.

use std::cmp::Ordering;

use crate::error::Result;

/// A candidate: score and global row index.
pub type Hit = (f32, u64);

/// Rank order: `Less` means `a` ranks before `b`. Compared as integers (`sort_key`), which
/// sorts several times faster than float comparisons.
#[inline]
pub fn rank_order(a: &Hit, b: &Hit) -> Ordering {
    sort_key(b).cmp(&sort_key(a))
}

/// An integer key ordered like (score, index) for non-NaN scores, with -0 equal to +0.
#[inline]
fn sort_key(h: &Hit) -> (u32, u64) {
    // adding +0 turns -0 into +0 and changes nothing else
    (key(h.0 + 0.0), h.1)
}

/// An f32 as a u32 that orders like it (for the atomic `fetch_max` of thresholds shared between
/// threads, and for sorting by integer comparisons).
#[inline]
pub(crate) fn key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// The f32 of a [`key`].
#[inline]
pub(crate) fn unkey(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

pub struct TopK {
    k: usize,
    hits: Vec<Hit>,
    threshold: f32,
    /// With `share = m < k`: at least `m` hits score `share_score` or more (see `sharing`).
    share: usize,
    share_score: f32,
}

impl TopK {
    pub fn new(k: usize) -> TopK {
        TopK {
            k,
            hits: Vec::new(),
            threshold: f32::NEG_INFINITY,
            share: k,
            share_score: f32::NEG_INFINITY,
        }
    }

    /// A top k that also tracks, at each compaction, the `m`-th best score it holds: when `T`
    /// threads each hold `m >= k / T` hits of disjoint rows at or above their own such score,
    /// the lowest of those `T` scores is a score the final k-th reaches. Threads share it so
    /// that each prunes with what all have seen, not only with its own k-th.
    pub fn sharing(k: usize, m: usize) -> TopK {
        TopK {
            share: m.clamp(1, k),
            ..TopK::new(k)
        }
    }

    /// The `m`-th best score of `sharing` (-inf until known).
    #[inline]
    pub fn share_score(&self) -> f32 {
        self.share_score
    }

    /// Scores below this cannot enter the top k.
    #[inline]
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    /// Asks the CPU to bring where the next hit goes into cache: pushes land in thousands of
    /// buffers, so each would otherwise wait for memory.
    #[inline]
    pub fn prefetch(&self) {
        crate::kernels::prefetch_line(self.hits.as_ptr().wrapping_add(self.hits.len()) as *const u8);
    }

    /// Offers a candidate that passed `score >= threshold()`.
    #[inline]
    pub fn push(&mut self, score: f32, index: u64) {
        self.hits.push((score, index));
        if self.hits.len() >= self.k + self.k.max(32) / 2 {
            self.compact();
        }
    }

    fn compact(&mut self) {
        if self.hits.len() > self.k {
            self.hits.select_nth_unstable_by(self.k - 1, rank_order);
            self.hits.truncate(self.k);
            // after the selection the k-th ranked hit sits at k-1: the lowest score kept
            self.threshold = self.hits[self.k - 1].0;
            if self.share < self.k {
                self.hits.select_nth_unstable_by(self.share - 1, rank_order);
                self.share_score = self.hits[self.share - 1].0;
            }
        }
    }

    /// The best `k` hits, in no particular order.
    pub fn into_best(mut self) -> Vec<Hit> {
        self.compact();
        self.hits
    }

    /// The best `k` hits in rank order.
    pub fn into_sorted(mut self) -> Vec<Hit> {
        self.hits.sort_unstable_by(rank_order);
        self.hits.truncate(self.k);
        self.hits
    }

    /// Offers the scores of consecutive rows from `first` (those with `keep[row]`, when given).
    /// After the first tiles of a pass almost no score reaches the threshold, so groups of 16
    /// are tested with a branch-free comparison (which compiles to one vector compare) before
    /// any work. `floor`: a score the final k-th score is known to reach (rows below it are
    /// skipped).
    #[inline]
    pub fn offer(&mut self, scores: &[f32], first: usize, keep: Option<&[bool]>, floor: f32) {
        const GROUP: usize = 16;
        let mut threshold = self.threshold().max(floor);
        for (g, group) in scores.chunks(GROUP).enumerate() {
            if !group.iter().fold(false, |any, &s| any | (s >= threshold)) {
                continue;
            }
            for (j, &s) in group.iter().enumerate() {
                if s >= threshold {
                    let row = first + g * GROUP + j;
                    if keep.is_none_or(|k| k[row]) {
                        self.push(s, row as u64);
                        threshold = self.threshold().max(floor);
                    }
                }
            }
        }
    }

    /// Merges this with another partial result of the same query.
    pub fn absorb(&mut self, other: TopK) {
        for (s, i) in other.hits {
            if s >= self.threshold {
                self.push(s, i);
            }
        }
    }
}

/// The best `k` of two partial results of one query over disjoint rows, in rank order: how the
/// parts of a search split over machines join (the tie order of a single search). Each part in
/// rank order, as every search returns it, costs one linear merge; a part in another order is
/// sorted first. NaN scores are dropped, as a search never returns them.
pub fn merge_parts(a: &[Hit], b: &[Hit], k: usize) -> Vec<Hit> {
    let ranked = |p: &[Hit]| -> Vec<Hit> {
        let mut p: Vec<Hit> = p.iter().copied().filter(|h| !h.0.is_nan()).collect();
        if p.windows(2).any(|w| rank_order(&w[0], &w[1]) == Ordering::Greater) {
            p.sort_unstable_by(rank_order);
        }
        p
    };
    let (a, b) = (ranked(a), ranked(b));
    let mut out = Vec::with_capacity(k.min(a.len() + b.len()));
    let (mut i, mut j) = (0, 0);
    while out.len() < k && (i < a.len() || j < b.len()) {
        if j == b.len() || (i < a.len() && rank_order(&a[i], &b[j]) != Ordering::Greater) {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out
}

/// Merges the per-thread partial results of the same lists (None when there are none).
pub fn merge(parts: impl IntoIterator<Item = Vec<TopK>>) -> Option<Vec<TopK>> {
    parts.into_iter().reduce(|mut acc, part| {
        for (a, p) in acc.iter_mut().zip(part) {
            a.absorb(p);
        }
        acc
    })
}

/// Merges the per-thread partial results (`parts[thread][list]`) of `lists` lists and sorts
/// each, the lists shared among `threads` threads (this runs after a search's pass, so it would
/// otherwise be a serial tail).
pub fn merge_sorted(parts: Vec<Vec<TopK>>, k: usize, lists: usize, threads: usize) -> Result<Vec<Vec<Hit>>> {
    let mut parts: Vec<_> = parts.into_iter().map(Vec::into_iter).collect();
    let mut groups: Vec<Vec<TopK>> = (0..lists)
        .map(|_| parts.iter_mut().filter_map(Iterator::next).collect())
        .collect();
    let mut out = vec![Vec::new(); lists];
    let per = lists.div_ceil(threads.max(1)).max(1);
    crate::parallel::map(groups.chunks_mut(per).zip(out.chunks_mut(per)), |(groups, out)| {
        for (group, out) in groups.iter_mut().zip(out) {
            let mut all = std::mem::take(group).into_iter();
            let mut top = all.next().unwrap_or_else(|| TopK::new(k));
            all.for_each(|other| top.absorb(other));
            *out = top.into_sorted();
        }
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reference(hits: &[Hit], k: usize) -> Vec<Hit> {
        let mut all: Vec<Hit> = hits.iter().copied().filter(|h| !h.0.is_nan()).collect();
        all.sort_by(rank_order);
        all.truncate(k);
        all
    }

    proptest! {
        #[test]
        fn equals_a_full_sort(scores in proptest::collection::vec(0u8..6, 0..400), k in 1usize..50, split in 0usize..400) {
            // few distinct values: many ties
            let hits: Vec<Hit> = scores.iter().enumerate().map(|(i, &s)| (s as f32, i as u64)).collect();
            let split = split.min(hits.len());
            let mut a = TopK::new(k);
            let mut b = TopK::new(k);
            for &(s, i) in &hits[..split] { if s >= a.threshold() { a.push(s, i); } }
            for &(s, i) in &hits[split..] { if s >= b.threshold() { b.push(s, i); } }
            b.absorb(a);
            let mut best = TopK::new(k);
            for &(s, i) in &hits { if s >= best.threshold() { best.push(s, i); } }
            let mut best = best.into_best();
            best.sort_by(rank_order);
            prop_assert_eq!(&best, &reference(&hits, k));
            // the shared score: at least m hits reach it
            let m = (k / 3).max(1);
            let mut shared = TopK::sharing(k, m);
            for (n, &(s, i)) in hits.iter().enumerate() {
                if s >= shared.threshold() {
                    shared.push(s, i);
                }
                let reach = hits[..=n].iter().filter(|h| h.0 >= shared.share_score()).count();
                prop_assert!(reach >= m || shared.share_score() == f32::NEG_INFINITY);
            }
            prop_assert_eq!(b.into_sorted(), reference(&hits, k));
        }
    }

    #[test]
    fn parts_merge_into_the_whole_list() {
        // equal scores across parts: the larger row first; -0 equal to +0 and kept as it is
        let a = [(1.0, 4), (0.0, 2), (f32::NEG_INFINITY, 8)];
        let b = [(1.0, 9), (-0.0, 7), (2.0, 1)];
        let got = merge_parts(&a, &b, 5);
        assert_eq!(got, vec![(2.0, 1), (1.0, 9), (1.0, 4), (-0.0, 7), (0.0, 2)]);
        assert!(got[3].0.is_sign_negative());
        assert_eq!(merge_parts(&a, &[], 5), a);
        // the same as one top k over both
        let mut top = TopK::new(4);
        for &(s, i) in a.iter().chain(&b) {
            if s >= top.threshold() {
                top.push(s, i);
            }
        }
        assert_eq!(merge_parts(&b, &a, 4), top.into_sorted());
    }

    #[test]
    fn keys_order_like_floats() {
        let v = [
            f32::NEG_INFINITY,
            -3.5,
            -1e-30,
            -0.0,
            0.0,
            1e-30,
            0.25,
            7.0,
            f32::INFINITY,
        ];
        for w in v.windows(2) {
            assert!(key(w[0]) <= key(w[1]), "{} {}", w[0], w[1]);
        }
        for x in v {
            assert_eq!(unkey(key(x)).to_bits(), x.to_bits());
        }
    }

    #[test]
    fn ties_put_the_larger_index_first_and_nan_is_dropped() {
        let mut z = TopK::new(3);
        for (s, i) in [(-0.0, 5), (0.0, 2), (-1.0, 9), (0.0, 7)] {
            z.push(s, i);
        }
        assert_eq!(z.into_sorted(), vec![(0.0, 7), (-0.0, 5), (0.0, 2)]);
        let mut t = TopK::new(3);
        for (s, i) in [(1.0, 0), (2.0, 1), (1.0, 2), (f32::NAN, 3), (1.0, 4)] {
            if s >= t.threshold() {
                t.push(s, i);
            }
        }
        assert_eq!(t.into_sorted(), vec![(2.0, 1), (1.0, 4), (1.0, 2)]);
    }
}
