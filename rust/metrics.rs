//! AP@k with the official ILIAS semantics, over many queries at once.
//!
//! The reference evaluator sorts each returned list by descending score, keeps the first k and
//! calls sklearn's `average_precision_score`, rescaled by `found / min(k, |G|)`. Sklearn treats
//! equal scores as one threshold: every positive in a run of equal scores gets the precision
//! measured at the end of the run. We reproduce exactly that, in one linear pass per query.
//!
//! Input layout: one row per query, all rows of the same width `L` (the results' k):
//! - `scores` in f64. Results are stored as f32, and f32 -> f64 is exact, so tie groups are
//!   kept; the official JSON holds f64 values, which an f32 path could merge into false ties.
//! - `labels` in u8: [`NEGATIVE`], [`POSITIVE`] or [`SKIP`]. `SKIP` removes an item from the list
//!   before the top-k cut; it marks padding (fewer than L results) and, for the scale/clutter
//!   reports, the positives outside the evaluated group. The same score matrix thus serves every
//!   group, only the labels change.
//! - `n_positives`: |G| per query (the positives that count for this evaluation).
//!
//! Rows are independent, so threads take contiguous blocks of rows.
//!
//! The labels come from ids: [`positive_codes`] and [`used_codes`] give each returned id its
//! index among the positives (the ids as text from any source: the binding borrows them from
//! Python objects), [`label_ranks`] the items of lists in the official pickle layout.

use crate::error::{Error, Result};
use crate::parallel::resolve_threads;

/// A returned item that is not one of the query's positives.
pub const NEGATIVE: u8 = 0;
/// A returned item that is one of the query's positives.
pub const POSITIVE: u8 = 1;
/// An item that is not part of the list (padding, or a positive excluded from this evaluation).
pub const SKIP: u8 = 2;

/// The queries to evaluate: `rows` rows of `width` items each, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Lists<'a> {
    pub scores: &'a [f64],
    pub labels: &'a [u8],
    pub n_positives: &'a [u64],
    pub width: usize,
}

impl Lists<'_> {
    pub fn rows(&self) -> usize {
        self.n_positives.len()
    }

    fn validate(&self) -> Result<()> {
        let n = self.rows() * self.width;
        if self.scores.len() != n || self.labels.len() != n {
            return Err(Error::invalid(format!(
                "scores ({}) and labels ({}) must both hold rows x width = {} x {} values",
                self.scores.len(),
                self.labels.len(),
                self.rows(),
                self.width
            )));
        }
        Ok(())
    }
}

/// AP@k and oracle of each row, or the first problem found (bad label, non-finite score,
/// more positives found than `n_positives` says exist).
pub fn average_precision(lists: Lists<'_>, k: usize, threads: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    lists.validate()?;
    if k == 0 {
        return Err(Error::invalid("k must be at least 1"));
    }
    let rows = lists.rows();
    let mut ap = vec![0.0; rows];
    let mut oracle = vec![0.0; rows];
    let block = rows.div_ceil(resolve_threads(threads)?).max(1);
    let w = lists.width;
    let blocks = ap.chunks_mut(block).zip(oracle.chunks_mut(block)).enumerate();
    crate::parallel::map(blocks, |(b, (ap, oracle))| {
        let mut scratch = Vec::with_capacity(w);
        for (i, (ap, oracle)) in ap.iter_mut().zip(oracle.iter_mut()).enumerate() {
            let r = b * block + i;
            let row = r * w..(r + 1) * w;
            let labels = &lists.labels[row.clone()];
            (*ap, *oracle) = one_query(&lists.scores[row], |j| labels[j], lists.n_positives[r], k, &mut scratch)
                .map_err(|m| Error::invalid(format!("row {r}: {m}")))?;
        }
        Ok(())
    })?;
    Ok((ap, oracle))
}

/// The scale and clutter reports: AP@k of every row once per group of positives, in one pass.
///
/// For group `g`, the query's positives outside the group leave the list (before the top-k cut)
/// and `n_positives[g * rows + r]` is |G| within the group. `positive[i]` is the index of item
/// `i`'s positive (or negative), `member[g * n_pos_total + p]` whether positive `p` is in `g`.
/// Returns AP per group and row (`ap[g * rows + r]`; 0 where the group has no positive).
pub fn grouped_average_precision(
    lists: Lists<'_>,
    positive: &[i32],
    member: &[bool],
    groups: usize,
    k: usize,
    threads: usize,
) -> Result<Vec<f64>> {
    let rows = lists.rows() / groups.max(1);
    let (w, n_total) = (lists.width, member.len() / groups.max(1));
    if groups == 0 || lists.n_positives.len() != groups * rows || lists.scores.len() != rows * w {
        return Err(Error::invalid(
            "grouped lists: n_positives must hold groups x rows values",
        ));
    }
    if lists.labels.len() != rows * w || positive.len() != rows * w || member.len() != groups * n_total {
        return Err(Error::invalid(
            "grouped lists: labels, positive and member disagree in shape",
        ));
    }
    if positive.iter().any(|&p| p >= n_total as i32) {
        return Err(Error::invalid("grouped lists: a positive index is out of range"));
    }
    let block = rows.div_ceil(resolve_threads(threads)?).max(1);
    let mut out = vec![0.0; groups * rows];
    // rows are split between threads; each thread writes its rows of every group at the end
    let parts = crate::parallel::map(0..rows.div_ceil(block), |b| {
        let (lo, hi) = (b * block, ((b + 1) * block).min(rows));
        let mut scratch = Vec::with_capacity(w);
        let mut part = vec![0.0; groups * (hi - lo)];
        let mut row = Ranked::default();
        for r in lo..hi {
            let (labels, pos) = (&lists.labels[r * w..(r + 1) * w], &positive[r * w..(r + 1) * w]);
            let scores = &lists.scores[r * w..(r + 1) * w];
            // lists in rank order (the normal case) are read once for all groups
            let sorted = row.read(scores, labels, pos);
            for g in 0..groups {
                let n_pos = lists.n_positives[g * rows + r];
                if n_pos == 0 {
                    continue;
                }
                let inside = &member[g * n_total..(g + 1) * n_total];
                let ap = if sorted {
                    row.group_ap(inside, n_pos, k)
                } else {
                    let label = |j: usize| match labels[j] {
                        POSITIVE if !inside[pos[j] as usize] => SKIP,
                        l => l,
                    };
                    one_query(scores, label, n_pos, k, &mut scratch).map(|(ap, _)| ap)
                };
                part[g * (hi - lo) + r - lo] = ap.map_err(|m| Error::invalid(format!("row {r}, group {g}: {m}")))?;
            }
        }
        Ok(part)
    })?;
    for (b, part) in parts.into_iter().enumerate() {
        let (lo, n) = (b * block, part.len() / groups);
        for g in 0..groups {
            out[g * rows + lo..g * rows + lo + n].copy_from_slice(&part[g * n..(g + 1) * n]);
        }
    }
    Ok(out)
}

/// One list in rank order, reduced to what AP needs once positives may leave it: the scores
/// of the listed items (for the runs of ties) and where the positives are.
#[derive(Default)]
struct Ranked {
    scores: Vec<f64>,
    /// (position among the listed items, index of the positive)
    positives: Vec<(usize, i32)>,
}

impl Ranked {
    /// Reads a list; false when it is not in rank order or holds a bad label or score (the
    /// general path then handles it, errors included).
    fn read(&mut self, scores: &[f64], labels: &[u8], positive: &[i32]) -> bool {
        self.scores.clear();
        self.positives.clear();
        let mut prev = f64::INFINITY;
        for ((&s, &l), &p) in scores.iter().zip(labels).zip(positive) {
            match l {
                SKIP => continue,
                NEGATIVE | POSITIVE if s.is_finite() && s <= prev => {}
                _ => return false,
            }
            if l == POSITIVE {
                self.positives.push((self.scores.len(), p));
            }
            self.scores.push(s);
            prev = s;
        }
        true
    }

    /// AP@k of the list without the positives outside `inside`: the sum over runs of equal
    /// scores of (positives in the run) x (precision at the run's end), as `ranked_ap`, visiting
    /// only the positives. A positive that leaves moves every later item up one place.
    fn group_ap(&self, inside: &[bool], n_pos: u64, k: usize) -> std::result::Result<f64, String> {
        let kept = |p: i32| inside[p as usize];
        let in_list = self.positives.iter().filter(|&&(_, p)| kept(p)).count() as u64;
        if in_list > n_pos {
            return Err(format!(
                "{in_list} positives in the list but only {n_pos} exist (duplicate ids?)"
            ));
        }
        let (mut sum, mut tp, mut left) = (0.0, 0u64, 0usize);
        let mut i = 0;
        while i < self.positives.len() {
            let (at, p) = self.positives[i];
            if !kept(p) {
                left += 1;
                i += 1;
                continue;
            }
            if at - left >= k {
                break;
            }
            let s = self.scores[at];
            let end = at + self.scores[at..].iter().take_while(|&&v| v == s).count() - 1;
            // the run's positives: those kept and inside the cut count, the others leave
            let (mut new_in_run, mut left_in_run) = (0u64, 0usize);
            while i < self.positives.len() && self.positives[i].0 <= end {
                let (at, p) = self.positives[i];
                if kept(p) {
                    new_in_run += (at - left - left_in_run < k) as u64;
                } else {
                    left_in_run += 1;
                }
                i += 1;
            }
            left += left_in_run;
            tp += new_in_run;
            let seen = (end + 1 - left).min(k);
            sum += new_in_run as f64 * tp as f64 / seen as f64;
        }
        Ok(if tp == 0 {
            0.0
        } else {
            sum / (k as u64).min(n_pos) as f64
        })
    }
}

/// AP@k and oracle of one list. `scratch` is reused between calls to avoid an allocation per row.
fn one_query(
    scores: &[f64],
    label: impl Fn(usize) -> u8,
    n_pos: u64,
    k: usize,
    scratch: &mut Vec<(f64, bool)>,
) -> std::result::Result<(f64, f64), String> {
    let labels = (0..scores.len()).map(&label);
    // one pass checks the labels and scores, counts the positives and sees whether the listed
    // items already come in rank order (the normal case: no copy, no sort)
    let (mut in_list, mut sorted, mut prev) = (0u64, true, f64::INFINITY);
    for (&s, l) in scores.iter().zip(labels.clone()) {
        match l {
            SKIP => continue,
            NEGATIVE | POSITIVE => {}
            _ => return Err(format!("label {l} is not 0 (negative), 1 (positive) or 2 (skip)")),
        }
        if !s.is_finite() {
            return Err(format!("score {s} is not finite"));
        }
        in_list += (l == POSITIVE) as u64;
        sorted &= s <= prev;
        prev = s;
    }
    if in_list > n_pos {
        return Err(format!(
            "{in_list} positives in the list but only {n_pos} exist (duplicate ids?)"
        ));
    }
    let listed = scores
        .iter()
        .zip(labels)
        .filter(|&(_, l)| l != SKIP)
        .map(|(&s, l)| (s, l == POSITIVE));
    if sorted {
        return Ok(ranked_ap(listed, n_pos, k));
    }
    scratch.clear();
    scratch.extend(listed);
    // partial_cmp (not total_cmp) so that -0.0 and 0.0 stay one tie, as in numpy and sklearn;
    // the scores were checked finite above; sort_by is stable
    scratch.sort_by(|a, b| b.0.partial_cmp(&a.0).expect("finite scores"));
    Ok(ranked_ap(scratch.iter().copied(), n_pos, k))
}

/// AP@k and oracle of (score, is positive) items in rank order: every positive in a run of equal
/// scores gets the precision at the end of the run (sklearn's thresholds).
fn ranked_ap(items: impl Iterator<Item = (f64, bool)>, n_pos: u64, k: usize) -> (f64, f64) {
    let mut items = items.take(k).peekable();
    let (mut sum, mut tp, mut new_in_run, mut seen) = (0.0, 0u64, 0u64, 0usize);
    while let Some((s, pos)) = items.next() {
        seen += 1;
        tp += pos as u64;
        new_in_run += pos as u64;
        if items.peek().is_none_or(|next| next.0 != s) {
            sum += new_in_run as f64 * tp as f64 / seen as f64;
            new_in_run = 0;
        }
    }
    if tp == 0 {
        return (0.0, 0.0);
    }
    let ap = sum / (k as u64).min(n_pos) as f64;
    let oracle = tp as f64 / seen as f64 * k as f64 / n_pos as f64;
    (ap, oracle)
}

/// Positive ids -> their index, for labelling returned lists by id.
pub struct PositiveIndex {
    map: std::collections::HashMap<String, i32, std::hash::BuildHasherDefault<FxHasher>>,
    /// Every positive has the form `<instance>/pos/...`: an id without it is no positive, and
    /// needs no hashing (most retrieved ids are distractors).
    all_shaped: bool,
}

/// A fast non-cryptographic hasher (the multiply-rotate scheme of rustc's FxHash): the keys are
/// ids from our own files, and hashing millions of them is most of the cost of labelling results.
#[derive(Default)]
pub struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

/// What `PositiveIndex::lookup` returns for an id that is not a positive.
pub const NOT_POSITIVE: i32 = -1;

impl PositiveIndex {
    pub fn new(positives: Vec<String>) -> PositiveIndex {
        let all_shaped = positives.iter().all(|p| shaped(p));
        let map = positives.into_iter().enumerate().map(|(i, p)| (p, i as i32)).collect();
        PositiveIndex { map, all_shaped }
    }

    /// The index of `id` among the positives (or [`NOT_POSITIVE`]), and whether `id` is
    /// foreign: shaped like an ILIAS positive (`<instance>/pos/...`) without being one of these,
    /// so results of another dataset or version.
    #[inline]
    pub fn lookup(&self, id: &str) -> (i32, bool) {
        let is_shaped = shaped(id);
        if self.all_shaped && !is_shaped {
            return (NOT_POSITIVE, false);
        }
        let code = self.map.get(id).copied().unwrap_or(NOT_POSITIVE);
        (code, code == NOT_POSITIVE && is_shaped)
    }
}

/// Whether `id` has the form of an ILIAS positive: `<instance>/pos/...`.
#[inline]
fn shaped(id: &str) -> bool {
    id.split_once('/').is_some_and(|(_, rest)| rest.starts_with("pos/"))
}

/// The codes of database ids among the positives (see [`PositiveIndex::lookup`]), with the
/// foreign ones counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdCodes {
    /// Per id, its index among the positives or [`NOT_POSITIVE`].
    pub codes: Vec<i32>,
    /// Ids shaped like a positive without being one (results of another dataset or version)...
    pub foreign: usize,
    /// ...and the first of them.
    pub first_foreign: Option<String>,
}

impl IdCodes {
    #[inline]
    fn lookup(&mut self, index: &PositiveIndex, id: &str) -> i32 {
        let (code, is_foreign) = index.lookup(id);
        if is_foreign {
            self.foreign += 1;
            self.first_foreign.get_or_insert_with(|| id.to_string());
        }
        code
    }
}

/// The code of every id of `ids`. Each item is turned into its text by `text` (the binding
/// borrows it from a Python object); the first error of either stops the labelling.
pub fn positive_codes<T, E>(
    index: &PositiveIndex,
    ids: impl IntoIterator<Item = std::result::Result<T, E>>,
    text: impl Fn(&T) -> std::result::Result<&str, E>,
) -> std::result::Result<IdCodes, E> {
    let ids = ids.into_iter();
    let mut out = IdCodes {
        codes: Vec::with_capacity(ids.size_hint().0),
        ..IdCodes::default()
    };
    for id in ids {
        let code = out.lookup(index, text(&id?)?);
        out.codes.push(code);
    }
    Ok(out)
}

/// The codes of a table of `ids` database ids that ranked lists index (`ranks`, the official
/// pickle layout; -1 and out-of-range entries point nowhere): only the ids some list uses are
/// read (`text(i)`: the text of id `i`, or an error that stops the labelling), in table order;
/// the others get [`NOT_POSITIVE`].
pub fn used_codes<'a, E>(
    index: &PositiveIndex,
    ids: usize,
    ranks: &[i64],
    text: impl Fn(usize) -> std::result::Result<&'a str, E>,
) -> std::result::Result<IdCodes, E> {
    let mut used = vec![false; ids];
    for &r in ranks {
        if r >= 0 && (r as usize) < ids {
            used[r as usize] = true;
        }
    }
    let mut out = IdCodes {
        codes: vec![NOT_POSITIVE; ids],
        ..IdCodes::default()
    };
    for i in (0..ids).filter(|&i| used[i]) {
        out.codes[i] = out.lookup(index, text(i)?);
    }
    Ok(out)
}

/// What an item of a ranked list is, besides a positive's index: not a positive, or no item.
pub const EMPTY: i32 = -2;

/// Per item a code (or [`EMPTY`]); the first list holding an item twice, with the repeats in all.
pub type RankLabels = (Vec<i32>, Option<(usize, usize)>);

/// Labels of ranked lists in the official pickle layout, where each item is an index into one
/// table of database ids (`ranks`, `width` items per list, -1 for no item), given the code of
/// every id of the table (see [`PositiveIndex::lookup`]). Returns per item the code of its id, or
/// [`EMPTY`], and the first list that holds the same item twice with the number of repeats in
/// all lists. Lists are labelled on `threads` threads.
pub fn label_ranks(codes: &[i32], ranks: &[i64], width: usize, threads: usize) -> Result<RankLabels> {
    if let Some(&bad) = ranks.iter().find(|&&r| r < -1 || r >= codes.len() as i64) {
        return Err(Error::invalid(format!(
            "ranks: {bad} points outside the {} database ids",
            codes.len()
        )));
    }
    let width = width.max(1);
    let per = ranks.len().div_ceil(width).div_ceil(resolve_threads(threads)?).max(1) * width;
    // a repeat is an item already stamped with the current list's number
    let parts = crate::parallel::map(ranks.chunks(per), |block| {
        let labels: Vec<i32> = block
            .iter()
            .map(|&r| if r < 0 { EMPTY } else { codes[r as usize] })
            .collect();
        let (mut first, mut repeats, mut stamp) = (None, 0, vec![u32::MAX; codes.len()]);
        for (row, list) in block.chunks(width).enumerate() {
            let mut n = 0;
            for &r in list.iter().filter(|&&r| r >= 0) {
                n += (stamp[r as usize] == row as u32) as usize;
                stamp[r as usize] = row as u32;
            }
            if n > 0 {
                repeats += n;
                first.get_or_insert(row);
            }
        }
        Ok((labels, first, repeats))
    })?;
    let (mut positive, mut duplicate, mut repeats) = (Vec::with_capacity(ranks.len()), None, 0);
    for (b, (labels, first, n)) in parts.into_iter().enumerate() {
        positive.extend(labels);
        duplicate = duplicate.or(first.map(|row| b * per / width + row));
        repeats += n;
    }
    Ok((positive, duplicate.map(|row| (row, repeats))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(scores: &[f64], labels: &[u8], n_pos: u64, k: usize) -> (f64, f64) {
        let n = [n_pos];
        let lists = Lists {
            scores,
            labels,
            n_positives: &n,
            width: scores.len(),
        };
        let (ap, oracle) = average_precision(lists, k, 1).unwrap();
        (ap[0], oracle[0])
    }

    #[test]
    fn grouped_equals_relabelled_lists() {
        // 2 rows x 5 items; positives 0..3; groups: {0, 1} and {2}
        let scores = [0.9, 0.8, 0.8, 0.5, 0.1, 0.7, 0.6, 0.6, 0.3, 0.2];
        let labels = [1, 0, 1, 1, 2, 0, 1, 1, 0, 0];
        let positive = [0, -1, 1, 2, -1, -1, 2, 0, -1, -1];
        let member = [true, true, false, false, false, false, true, false];
        let n_pos = [2, 1, 1, 1]; // group 0: rows 0, 1; group 1: rows 0, 1
        let lists = Lists {
            scores: &scores,
            labels: &labels,
            n_positives: &n_pos,
            width: 5,
        };
        let got = grouped_average_precision(lists, &positive, &member, 2, 4, 1).unwrap();
        for (g, r) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
            let row: Vec<u8> = (0..5)
                .map(|j| {
                    let (l, p) = (labels[r * 5 + j], positive[r * 5 + j]);
                    if l == POSITIVE && !member[g * 4 + p as usize] {
                        SKIP
                    } else {
                        l
                    }
                })
                .collect();
            let (want, _) = run(&scores[r * 5..r * 5 + 5], &row, n_pos[g * 2 + r], 4);
            assert!(
                (got[g * 2 + r] - want).abs() < 1e-12,
                "group {g} row {r}: {} vs {want}",
                got[g * 2 + r]
            );
        }
    }

    #[test]
    fn positive_index() {
        let ix = PositiveIndex::new(vec!["a/pos/P0.jpg".into(), "b/pos/P1.jpg".into()]);
        assert_eq!(ix.lookup("b/pos/P1.jpg").0, 1);
        assert_eq!(ix.lookup("t.tar/key").0, NOT_POSITIVE);
        assert!(ix.lookup("c/pos/P9.jpg").1);
        assert!(!ix.lookup("t.tar/key").1);
    }

    #[test]
    fn ids_are_labelled_and_foreign_ones_counted() {
        let ix = PositiveIndex::new(vec!["a/pos/P0.jpg".into(), "b/pos/P1.jpg".into()]);
        let ids = ["t.tar/k1", "b/pos/P1.jpg", "x/pos/X.jpg", "a/pos/P0.jpg", "y/pos/Y.jpg"];
        let got = positive_codes(&ix, ids.iter().map(Ok::<_, String>), |s| Ok(*s)).unwrap();
        assert_eq!(got.codes, [NOT_POSITIVE, 1, NOT_POSITIVE, 0, NOT_POSITIVE]);
        assert_eq!((got.foreign, got.first_foreign.as_deref()), (2, Some("x/pos/X.jpg")));
        // an error of the iterator or of the text stops the labelling with it
        let items = [Ok("a/pos/P0.jpg"), Err("bad item".to_string()), Ok("b/pos/P1.jpg")];
        assert_eq!(positive_codes(&ix, items, |s| Ok(*s)), Err("bad item".to_string()));
        let no_text = positive_codes(&ix, [Ok::<_, String>(7)], |_| Err("not text".to_string()));
        assert_eq!(no_text, Err("not text".to_string()));
        assert_eq!(
            positive_codes(&ix, [], |s: &&str| Ok::<_, ()>(*s)).unwrap(),
            IdCodes::default()
        );
    }

    #[test]
    fn only_the_ids_that_lists_use_are_read() {
        let ix = PositiveIndex::new(vec!["a/pos/P0.jpg".into(), "b/pos/P1.jpg".into()]);
        // entry 2 is not text: reading it would fail, but no list uses it
        let table = [
            Some("z/pos/Z.jpg"),
            Some("b/pos/P1.jpg"),
            None,
            Some("a/pos/P0.jpg"),
            Some("q/pos/Q.jpg"),
        ];
        let text = |i: usize| table[i].ok_or("read an unused id");
        let got = used_codes(&ix, table.len(), &[3, -1, 1, 0, 1, 9], text).unwrap();
        assert_eq!(got.codes, [NOT_POSITIVE, 1, NOT_POSITIVE, 0, NOT_POSITIVE]);
        assert_eq!((got.foreign, got.first_foreign.as_deref()), (1, Some("z/pos/Z.jpg")));
        assert_eq!(used_codes(&ix, table.len(), &[2], text), Err("read an unused id"));
        // the codes then label the lists
        let (labels, duplicate) = label_ranks(&got.codes, &[3, 1, -1, 0, 0, 4], 3, 2).unwrap();
        assert_eq!(labels, [0, 1, EMPTY, NOT_POSITIVE, NOT_POSITIVE, NOT_POSITIVE]);
        assert_eq!(duplicate, Some((1, 1)));
    }

    #[test]
    fn worked_example_of_the_spec() {
        let scores = [0.9, 0.8, 0.8, 0.6, 0.5, 0.4];
        let labels = [1, 1, 0, 0, 0, 1];
        let (ap, oracle) = run(&scores, &labels, 4, 6);
        assert!((ap - (1.0 + 2.0 / 3.0 + 0.5) / 3.0 * 0.75).abs() < 1e-12);
        assert!((ap - 0.5417).abs() < 5e-5);
        assert!((oracle - 0.5 * 6.0 / 4.0).abs() < 1e-12);
    }

    #[test]
    fn skip_removes_before_the_cut_and_unsorted_input_is_sorted_stably() {
        // the skipped item would otherwise take the last slot of the top 2
        let (ap, _) = run(&[0.9, 0.8, 0.7], &[1, SKIP, 1], 2, 2);
        assert_eq!(ap, 1.0);
        let (ap, _) = run(&[0.1, 0.9], &[1, 0], 1, 1);
        assert_eq!(ap, 0.0);
    }

    #[test]
    fn nothing_found_and_bad_input() {
        assert_eq!(run(&[0.5, 0.4], &[0, 0], 3, 10), (0.0, 0.0));
        let n = [1];
        let bad = |s: &[f64], l: &[u8]| {
            average_precision(
                Lists {
                    scores: s,
                    labels: l,
                    n_positives: &n,
                    width: s.len(),
                },
                5,
                1,
            )
            .is_err()
        };
        assert!(bad(&[f64::NAN], &[0]));
        assert!(bad(&[0.1], &[7]));
        assert!(bad(&[0.2, 0.1], &[1, 1]));
        assert!(!bad(&[f64::NAN], &[SKIP]));
    }

    /// Sklearn's definition spelled out naively: precision at every distinct threshold.
    fn reference(scores: &[f64], labels: &[u8], n_pos: u64, k: usize) -> f64 {
        let mut items: Vec<(f64, bool)> = scores
            .iter()
            .zip(labels)
            .filter(|x| *x.1 != SKIP)
            .map(|(&s, &l)| (s, l == POSITIVE))
            .collect();
        items.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        items.truncate(k);
        let mut thresholds: Vec<f64> = items.iter().map(|x| x.0).collect();
        thresholds.dedup();
        let mut ap = 0.0;
        let mut seen = 0;
        for t in thresholds {
            let above: Vec<_> = items.iter().filter(|x| x.0 >= t).collect();
            let tp = above.iter().filter(|x| x.1).count();
            ap += (tp - seen) as f64 * tp as f64 / above.len() as f64;
            seen = tp;
        }
        if seen == 0 {
            0.0
        } else {
            ap / (k as u64).min(n_pos) as f64
        }
    }

    proptest! {
        #[test]
        fn groups_of_a_ranked_list_agree_with_the_general_path(
            items in prop::collection::vec((0u8..5, 0u8..3, 0u8..4), 0..60),
            keep in prop::collection::vec(any::<bool>(), 4),
            k in 1usize..40,
        ) {
            // scores in rank order with many ties; labels 0, 1, 2; each positive one of 4
            let mut sorted: Vec<(u8, u8, u8)> = items;
            sorted.sort_by_key(|t| std::cmp::Reverse(t.0));
            let scores: Vec<f64> = sorted.iter().map(|t| t.0 as f64 / 4.0).collect();
            let labels: Vec<u8> = sorted.iter().map(|t| t.1).collect();
            let positive: Vec<i32> = sorted.iter().map(|t| if t.1 == POSITIVE { t.2 as i32 } else { -1 }).collect();
            let kept = labels.iter().zip(&positive).filter(|&(&l, &p)| l == POSITIVE && keep[p as usize]).count() as u64;
            let n_pos = kept + 2;
            let mut row = Ranked::default();
            prop_assert!(row.read(&scores, &labels, &positive));
            let fast = row.group_ap(&keep, n_pos, k).unwrap();
            let label = |j: usize| match labels[j] {
                POSITIVE if !keep[positive[j] as usize] => SKIP,
                l => l,
            };
            let (general, _) = one_query(&scores, label, n_pos, k, &mut Vec::new()).unwrap();
            prop_assert!((fast - general).abs() < 1e-12, "{} vs {}", fast, general);
        }

        #[test]
        fn agrees_with_the_naive_definition(
            rows in prop::collection::vec(prop::collection::vec((0u8..6, 0u8..3), 0..40), 1..20),
            extra in 0u64..5,
            k in 1usize..50,
            threads in 0usize..4,
        ) {
            let width = rows.iter().map(Vec::len).max().unwrap();
            let mut scores = vec![0.0; rows.len() * width];
            let mut labels = vec![SKIP; rows.len() * width];
            let mut n_pos = vec![];
            for (r, row) in rows.iter().enumerate() {
                for (i, &(s, l)) in row.iter().enumerate() {
                    scores[r * width + i] = s as f64 / 5.0; // few distinct values: many ties
                    labels[r * width + i] = l;
                }
                n_pos.push(row.iter().filter(|x| x.1 == POSITIVE).count() as u64 + extra);
            }
            let lists = Lists { scores: &scores, labels: &labels, n_positives: &n_pos, width };
            let (ap, _) = average_precision(lists, k, threads).unwrap();
            for r in 0..rows.len() {
                let row = r * width..(r + 1) * width;
                let want = reference(&scores[row.clone()], &labels[row], n_pos[r], k);
                prop_assert!((ap[r] - want).abs() < 1e-12, "row {}: {} vs {}", r, ap[r], want);
            }
        }
    }
}
