//! Exact inner-product search of many queries against a database of memory-mapped shards.
//!
//! One pass over the database serves all queries: threads claim chunks of rows in increasing
//! order from a shared counter and run every query block against each tile of a chunk while it
//! is hot in cache. Each thread keeps its own top-k per query (no locks on the hot path) and
//! tells the others what it learnt through a few atomics (`Shared`); partial results are merged
//! at the end. After a chunk its pages are dropped from the resident set, so memory stays
//! bounded whatever the database size: about
//! `threads * (tiers * Q * 1.5k * 16 bytes + CHUNK_ROWS * row bytes)` plus the packed queries.
//!
//! Where the CPU has AVX-512 VNNI, an int8 first pass (`kernels::int8`) scores each tile
//! approximately with a rigorous per-pair error bound, and only the (query, row) pairs whose
//! bound may still reach the query's k-th exact score are scored in float32, one pair at a time
//! from the stored row. Every float32 kernel sums in the same canonical order (`kernels`), so a
//! pair scored alone has the same bits as in a block: results are identical to the plain path.
//! Until each query has a k-th score (the first ~k rows), and while most pairs would need
//! rescoring anyway, a thread scores whole blocks in float32 instead.
//!
//! Several tiers (prefixes and subsets of the database) can be answered by the same pass.
//! The caller observes progress through `Control::done_rows` and stops the work by setting
//! `Control::cancel`; workers look at it after every tile (a few milliseconds of work).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::kernels::int8::{self, Int8Kernel};
use crate::kernels::{pack_queries, padded, prefetch, widen, widen_tile, Simd};
use crate::store::Database;
use crate::topk::TopK;

/// Rows a thread claims at once (its pages are released together), at most and at least.
const CHUNK_ROWS: usize = 16384;
const MIN_CHUNK_ROWS: usize = 1024;
/// The int8 pass pays off while fewer (query, row) pairs than this need exact rescoring (one
/// rescored pair costs about four times what the float32 block kernel spends per pair, the int8
/// pass a fifth of it); above it (the first tiles, small databases) a thread scores in float32
/// and retries the int8 pass every `PROBE_EVERY` tiles, as thresholds only rise.
const MAX_RESCORED: f64 = 0.2;
const PROBE_EVERY: usize = 64;
/// Rows widened and quantized together, while they stay in L2 (a multiple of the int8 panel
/// and of every path's `nr`).
const TILE_ROWS: usize = 128;

/// Shared state between the search and whoever watches it.
#[derive(Default)]
pub struct Control {
    pub done_rows: AtomicU64,
    pub cancel: AtomicBool,
}

pub struct SearchOptions<'a> {
    pub k: usize,
    /// Worker threads; 0 means all cores.
    pub threads: usize,
    /// Forces an instruction-set path; `None` picks the fastest.
    pub simd: Option<Simd>,
    /// The databases to answer, all from the same pass. Empty means one tier: every row.
    pub tiers: Vec<Tier<'a>>,
    /// The approximate int8 first pass: `Auto` uses it where the CPU has a fast int8 kernel.
    pub int8: Int8Choice,
}

/// One database answered by a search: the rows `r < rows` with `keep[r]` (when given). Several
/// tiers (positives + the first 1M distractors, the mini-ILIAS subset, all...) share one pass:
/// each row is scored once and offered to every tier that holds it.
#[derive(Clone, Copy, Debug)]
pub struct Tier<'a> {
    pub rows: usize,
    pub keep: Option<&'a [bool]>,
}

/// Whether exact search takes the int8 first pass (results are identical either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Choice {
    /// The fastest exact path of this CPU.
    Auto,
    /// Plain float32 scoring of every row.
    Off,
    /// The int8 pass with a given kernel (the scalar one runs anywhere: for tests).
    Force(Int8Kernel),
}

/// The k best rows per tier and query: `scores` and `indices` are `(tiers, nq, k)` row-major;
/// when fewer than `k` rows can be returned (a tier holds fewer), the rest holds `-inf` and `-1`.
pub struct Neighbors {
    pub scores: Vec<f32>,
    pub indices: Vec<i64>,
    pub k: usize,
    pub stats: Stats,
}

/// What the search did, for benchmarks and curious users.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub simd: Option<Simd>,
    pub int8: Option<Int8Kernel>,
    /// (query, row) pairs scored by the float32 block kernel only (warm-up, or the plain path).
    pub float_pairs: u64,
    /// (query, row) pairs scored by the int8 pass...
    pub int8_pairs: u64,
    /// ...of which rescored exactly in float32.
    pub rescored_pairs: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.float_pairs += o.float_pairs;
        self.int8_pairs += o.int8_pairs;
        self.rescored_pairs += o.rescored_pairs;
    }
}

pub fn resolve_threads(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    } else {
        threads
    }
}

/// Checks the arguments of a search; the errors name the argument at fault.
pub fn validate(db: &Database, queries: &[f32], nq: usize, opts: &SearchOptions) -> Result<()> {
    let dim = db.dim;
    if queries.len() != nq * dim {
        return Err(Error::invalid(format!(
            "queries: {} values do not form {nq} rows of the database's dimension {dim}",
            queries.len()
        )));
    }
    if let Some(pos) = queries.iter().position(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "queries: row {} holds a non-finite value (NaN or Inf) at column {}",
            pos / dim,
            pos % dim
        )));
    }
    if db.rows == 0 {
        return Err(Error::invalid("the database is empty (0 rows)"));
    }
    if opts.k == 0 {
        return Err(Error::invalid("k must be at least 1"));
    }
    if opts.k > db.rows {
        return Err(Error::invalid(format!(
            "k = {} is larger than the database ({} rows)",
            opts.k, db.rows
        )));
    }
    for (t, tier) in opts.tiers.iter().enumerate() {
        if tier.rows == 0 || tier.rows > db.rows {
            return Err(Error::invalid(format!(
                "tiers[{t}]: {} rows, expected 1 to the database's {}",
                tier.rows, db.rows
            )));
        }
        if let Some(keep) = tier.keep {
            if keep.len() != db.rows {
                return Err(Error::invalid(format!(
                    "keep: {} flags for a database of {} rows",
                    keep.len(),
                    db.rows
                )));
            }
        }
    }
    if let Some(s) = opts.simd {
        if !s.supported() {
            return Err(Error::invalid(format!(
                "simd: this CPU cannot run the {} path",
                s.name()
            )));
        }
    }
    Ok(())
}

/// Searches `nq` float32 queries (row-major, `nq x db.dim`) against the whole database.
pub fn search(db: &Database, queries: &[f32], nq: usize, opts: &SearchOptions, control: &Control) -> Result<Neighbors> {
    validate(db, queries, nq, opts)?;
    let simd = opts.simd.unwrap_or_else(Simd::detect);
    let dim = db.dim;
    let int8 = match opts.int8 {
        _ if dim > int8::MAX_DIM => None,
        Int8Choice::Auto => Int8Kernel::detect(simd),
        Int8Choice::Off => None,
        Int8Choice::Force(k) => Some(k),
    };
    let packed = pack_queries(queries, nq, dim, simd.mr());
    let quantized = int8.map(|_| int8::quantize_queries(queries, nq, dim, int8::MR));
    let all = [Tier {
        rows: db.rows,
        keep: None,
    }];
    let tiers = if opts.tiers.is_empty() {
        &all[..]
    } else {
        &opts.tiers[..]
    };
    // work items: (shard, first row, end row), in database order; they shrink towards the end
    // (a share of what is left per thread) so that threads finish together
    let wanted = resolve_threads(opts.threads);
    let mut chunks = Vec::new();
    let mut left = db.rows;
    for (s, shard) in db.shards.iter().enumerate() {
        let mut r = 0;
        while r < shard.rows {
            let size = (left / (4 * wanted)).clamp(MIN_CHUNK_ROWS, CHUNK_ROWS);
            let end = (r + size).min(shard.rows);
            chunks.push((s, r, end));
            left -= end - r;
            r = end;
        }
    }
    let next = AtomicUsize::new(0);
    let threads = wanted.min(chunks.len().max(1));
    let plan = Plan {
        simd,
        int8,
        quantized: quantized.as_ref(),
        packed: &packed,
        nq,
        tiers,
        shared: Shared::new(nq * tiers.len(), threads),
    };

    let partials: Vec<Result<(Vec<TopK>, Stats)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|me| {
                let (plan, chunks, next) = (&plan, &chunks, &next);
                scope.spawn(move || worker(db, plan, opts, me, chunks, next, control))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("internal error: a search thread panicked")))
            })
            .collect()
    });
    let mut stats = Stats {
        simd: Some(simd),
        int8,
        ..Stats::default()
    };
    let mut parts = Vec::new();
    for part in partials {
        let (part, part_stats) = part?;
        stats.add(&part_stats);
        parts.push(part);
    }
    let nt = tiers.len();
    let merged = crate::topk::merge(parts).unwrap_or_else(|| (0..nq * nt).map(|_| TopK::new(opts.k)).collect());

    // workers keep [query][tier]; the result is [tier][query]
    let k = opts.k;
    let mut scores = vec![f32::NEG_INFINITY; nt * nq * k];
    let mut indices = vec![-1i64; nt * nq * k];
    for (qt, top) in merged.into_iter().enumerate() {
        let out = ((qt % nt) * nq + qt / nt) * k;
        for (j, (s, i)) in top.into_sorted().into_iter().enumerate() {
            scores[out + j] = s;
            indices[out + j] = i as i64;
        }
    }
    Ok(Neighbors {
        scores,
        indices,
        k,
        stats,
    })
}

/// What every worker shares: the kernels and the prepared queries.
struct Plan<'a> {
    simd: Simd,
    int8: Option<Int8Kernel>,
    quantized: Option<&'a int8::Queries>,
    packed: &'a [f32],
    nq: usize,
    tiers: &'a [Tier<'a>],
    shared: Shared,
}

/// What the threads tell each other about every (query, tier) list, so that each prunes with
/// what all have seen, not only with its own top k.
struct Shared {
    threads: usize,
    /// A score the final k-th is known to reach (as `key`): the highest k-th score of any
    /// thread, or the lowest of the threads' `TopK::share_score`, whichever is higher. No row
    /// below it can be in the final top k.
    floors: Vec<AtomicU32>,
    /// Per list, then thread: that thread's `TopK::share_score` (as `key`).
    shares: Vec<AtomicU32>,
}

impl Shared {
    fn new(lists: usize, threads: usize) -> Shared {
        let unknown = || AtomicU32::new(key(f32::NEG_INFINITY));
        Shared {
            threads,
            floors: (0..lists).map(|_| unknown()).collect(),
            shares: (0..lists * threads).map(|_| unknown()).collect(),
        }
    }

    /// A top k for one list of thread: it tracks the score that `threads` disjoint parts
    /// must each reach `k / threads` times.
    fn top(&self, k: usize) -> TopK {
        TopK::sharing(k, k.div_ceil(self.threads))
    }

    #[inline]
    fn floor(&self, list: usize) -> f32 {
        unkey(self.floors[list].load(Ordering::Relaxed))
    }

    /// Shares what thread `me`'s top k of `list` learnt since it had `before` (its threshold
    /// and share score then).
    #[inline]
    fn publish(&self, list: usize, me: usize, top: &TopK, before: (f32, f32)) {
        if top.threshold() > before.0 {
            self.floors[list].fetch_max(key(top.threshold()), Ordering::Relaxed);
        }
        if top.share_score() > before.1 {
            let shares = &self.shares[list * self.threads..(list + 1) * self.threads];
            shares[me].store(key(top.share_score()), Ordering::Relaxed);
            let lowest = shares.iter().map(|s| s.load(Ordering::Relaxed)).min().unwrap_or(0);
            self.floors[list].fetch_max(lowest, Ordering::Relaxed);
        }
    }
}

/// An f32 as a u32 that orders like it (for the atomic `fetch_max` of shared thresholds).
pub(crate) fn key(v: f32) -> u32 {
    let b = v.to_bits();
    if b >> 31 == 1 {
        !b
    } else {
        b | 0x8000_0000
    }
}

pub(crate) fn unkey(k: u32) -> f32 {
    f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
}

fn worker(
    db: &Database,
    plan: &Plan,
    opts: &SearchOptions,
    me: usize,
    chunks: &[(usize, usize, usize)],
    next: &AtomicUsize,
    control: &Control,
) -> Result<(Vec<TopK>, Stats)> {
    let (dim, nq, simd) = (db.dim, plan.nq, plan.simd);
    let dp = padded(dim);
    let (mr, nr) = (simd.mr(), simd.nr());
    let tiers = plan.tiers;
    let nt = tiers.len();
    // [query][tier], so that one query's tiers are one contiguous slice
    let mut tops: Vec<TopK> = (0..nq * nt).map(|_| plan.shared.top(opts.k)).collect();
    let mut stats = Stats::default();
    let (mut tile, mut widened, mut f16s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut codes, mut code_scratch) = (int8::Tile::default(), Vec::new());
    // scores of one query block against one tile: [mr][TILE_ROWS]
    let mut block_scores = vec![0f32; mr * TILE_ROWS];
    let (mut jobs, mut pending) = (Vec::<(usize, usize)>::new(), Vec::new());
    let mut job_scores = Vec::new();
    let (mut rescored_share, mut tiles_done, mut warm) = (0.0f64, 0usize, false);
    // a forced int8 pass (tests) stays on from the first row; the automatic one waits until
    // every query has a threshold and steps aside while it does not pay
    let adaptive = opts.int8 == Int8Choice::Auto;

    loop {
        let c = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(s, lo, hi)) = chunks.get(c) else {
            break;
        };
        let shard = &db.shards[s];
        shard.prefetch(lo, hi);
        let base = db.starts[s];
        let mut t0 = lo;
        while t0 < hi {
            if control.cancel.load(Ordering::Relaxed) {
                return Err(Error::Cancelled);
            }
            let t1 = (t0 + TILE_ROWS).min(hi);
            let rows = t1 - t0;
            let first = base + t0;
            let query_tops =
                |tops: &[TopK], q: usize| threshold(&tops[q * nt..(q + 1) * nt], &plan.shared, q, tiers, first);
            if adaptive && plan.int8.is_some() && !warm {
                // until their top-k buffers first fill (the first ~k rows), every score is computed
                warm = (0..nq).all(|q| query_tops(&tops, q) > f32::NEG_INFINITY);
            }
            let int8_pass = match (plan.int8, plan.quantized) {
                (Some(kernel), Some(qs))
                    if !adaptive || (warm && (rescored_share < MAX_RESCORED || tiles_done % PROBE_EVERY == 0)) =>
                {
                    Some((kernel, qs))
                }
                _ => None,
            };
            tiles_done += 1;
            let bytes = shard.row_bytes(t0, t1);
            let row_bytes = bytes.len() / rows;
            let offer_to = |tops: &mut [TopK], q: usize, scores: &[f32], first: usize| {
                offer(
                    &mut tops[q * nt..(q + 1) * nt],
                    &plan.shared,
                    (q, me),
                    tiers,
                    scores,
                    first,
                )
            };
            let Some((kernel, qs)) = int8_pass else {
                widen_tile(bytes, shard.dtype, dim, nr, &mut tile, &mut f16s);
                for qb in 0..nq.div_ceil(mr) {
                    let a = &plan.packed[qb * mr * dp..(qb + 1) * mr * dp];
                    for rb in 0..rows.div_ceil(nr) {
                        let b = &tile[rb * nr * dp..(rb + 1) * nr * dp];
                        simd.block(a, b, dp, &mut block_scores[rb * nr..], TILE_ROWS);
                    }
                    let live = mr.min(nq - qb * mr);
                    stats.float_pairs += (live * rows) as u64;
                    for i in 0..live {
                        offer_to(
                            &mut tops,
                            qb * mr + i,
                            &block_scores[i * TILE_ROWS..i * TILE_ROWS + rows],
                            first,
                        );
                    }
                }
                t0 = t1;
                continue;
            };
            codes.reset(rows, dim, int8::NR);
            widened.resize(dim, 0.0);
            for (r, stored) in bytes.chunks_exact(row_bytes).enumerate() {
                widen(stored, shard.dtype, &mut widened, &mut f16s);
                codes.set_row(r, &widened, int8::NR, &mut code_scratch);
            }
            // the int8 pass: approximate scores of whole panels, then exact scores of the rows
            // whose bound may still reach their query's threshold, for one query block at a time
            let steps = int8::d4(dim);
            let panels = rows.div_ceil(int8::NR);
            let (before, pairs) = (stats.rescored_pairs, (nq * rows) as u64);
            let row = |r: usize| &bytes[r * row_bytes..(r + 1) * row_bytes];
            let mut rescore = |jobs: &[(usize, usize)], tops: &mut [TopK]| {
                let pairs: Vec<(&[f32], &[u8])> = jobs
                    .iter()
                    .map(|&(q, r)| (&plan.packed[q * dp..(q + 1) * dp], row(r)))
                    .collect();
                job_scores.resize(jobs.len(), 0.0);
                simd.dots(&pairs, shard.dtype, &mut job_scores);
                for (&(q, r), s) in jobs.iter().zip(&job_scores) {
                    offer_to(tops, q, std::slice::from_ref(s), first + r);
                }
            };
            pending.clear();
            for qb in 0..nq.div_ceil(int8::MR) {
                let qcodes = &qs.codes[qb * steps * int8::MR * 4..(qb + 1) * steps * int8::MR * 4];
                let live = qb * int8::MR..((qb + 1) * int8::MR).min(nq);
                tops[live.start * nt..live.end * nt].iter().for_each(TopK::prefetch);
                jobs.clear();
                for p in 0..panels {
                    let thresholds = std::array::from_fn(|i| {
                        let q = qb * int8::MR + i;
                        if live.contains(&q) {
                            query_tops(&tops, q)
                        } else {
                            f32::INFINITY
                        }
                    });
                    let masks = kernel.panel_masks(qcodes, qs, qb, &codes, p, &thresholds);
                    let valid = (rows - p * int8::NR).min(int8::NR);
                    let real = if valid == int8::NR {
                        u32::MAX
                    } else {
                        (1u32 << valid) - 1
                    };
                    for (q, mask) in live.clone().zip(masks) {
                        let mut mask = mask & real;
                        while mask != 0 {
                            jobs.push((q, p * int8::NR + mask.trailing_zeros() as usize));
                            mask &= mask - 1;
                        }
                    }
                }
                stats.rescored_pairs += jobs.len() as u64;
                // a software pipeline: this block's query rows come into cache (from L3 or
                // memory: rescoring is sparse) while the previous block's pairs are rescored
                let needed = jobs.iter().fold(0u32, |m, &(q, _)| m | 1 << (q - live.start));
                for i in (0..int8::MR).filter(|i| needed >> i & 1 == 1) {
                    let q = live.start + i;
                    prefetch(&plan.packed[q * dp..(q + 1) * dp]);
                }
                rescore(&pending, &mut tops);
                std::mem::swap(&mut pending, &mut jobs);
            }
            rescore(&pending, &mut tops);
            stats.int8_pairs += pairs;
            rescored_share = (stats.rescored_pairs - before) as f64 / pairs as f64;
            t0 = t1;
        }
        shard.release(lo, hi);
        control.done_rows.fetch_add((hi - lo) as u64, Ordering::Relaxed);
    }
    Ok((tops, stats))
}

/// The lowest threshold among the tiers of query `q` (`tops[t]` is its top k in tier `t`) that
/// still hold rows from `first` on: a score below it is of no use to any of them. Infinite when
/// no tier holds such rows.
#[inline]
fn threshold(tops: &[TopK], shared: &Shared, q: usize, tiers: &[Tier], first: usize) -> f32 {
    let nt = tiers.len();
    tops.iter()
        .zip(tiers)
        .enumerate()
        .filter(|(_, (_, tier))| tier.rows > first)
        .map(|(t, (top, _))| top.threshold().max(shared.floor(q * nt + t)))
        .fold(f32::INFINITY, f32::min)
}

/// Offers query `q`'s scores (found by thread `me`) for consecutive rows starting at global row
/// `first` to each of its tiers, and shares what its top-k lists learnt.
#[inline]
fn offer(tops: &mut [TopK], shared: &Shared, (q, me): (usize, usize), tiers: &[Tier], scores: &[f32], first: usize) {
    let nt = tiers.len();
    for (t, (top, tier)) in tops.iter_mut().zip(tiers).enumerate() {
        let end = tier.rows.saturating_sub(first).min(scores.len());
        if end == 0 {
            continue;
        }
        let list = q * nt + t;
        let before = (top.threshold(), top.share_score());
        offer_one(top, &scores[..end], first, tier.keep, shared.floor(list));
        shared.publish(list, me, top, before);
    }
}

/// After the first tiles almost no score reaches the threshold, so groups of 16 are tested
/// with a branch-free comparison (which compiles to one vector compare) before any work.
/// `floor`: a score the final k-th score is known to reach (rows below it are skipped).
#[inline]
pub(crate) fn offer_one(top: &mut TopK, scores: &[f32], first: usize, keep: Option<&[bool]>, floor: f32) {
    const GROUP: usize = 16;
    let mut threshold = top.threshold().max(floor);
    for (g, group) in scores.chunks(GROUP).enumerate() {
        if !group.iter().fold(false, |any, &s| any | (s >= threshold)) {
            continue;
        }
        for (j, &s) in group.iter().enumerate() {
            if s >= threshold {
                let row = first + g * GROUP + j;
                if keep.is_none_or(|k| k[row]) {
                    top.push(s, row as u64);
                    threshold = top.threshold().max(floor);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{key, unkey};

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
}
