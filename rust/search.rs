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
//!
//! Integrity for free: every tile is one checksum block of its shard (`store::CHECK_ROWS`
//! rows), hashed just before it is scored (the hash loads it into cache for the scoring); each worker sums the
//! block hashes per shard, and a shard whose sum differs from the checksum its manifest
//! recorded is an error at the end, so no result comes from data that changed.

use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::kernels::int8::{self, Int8Kernel};
use crate::kernels::{pack_queries, padded, prefetch, widen, widen_tile, Simd};
use crate::parallel::{resolve_threads, Control};
use crate::quant::progressive::{self, Progressive, StageKernel, StageQueries, COSTS, MAX_STAGES, QOFF};
use crate::store::{block_hash, DType, Database, CHECK_ROWS};
use crate::topk::{key, unkey, TopK};

/// Rows a thread claims at once (its pages are released together), at most and at least.
const CHUNK_ROWS: usize = 16384;
const MIN_CHUNK_ROWS: usize = 1024;
/// The int8 pass pays off while fewer (query, row) pairs than this need exact rescoring (one
/// rescored pair costs about four times what the float32 block kernel spends per pair, the int8
/// pass a fifth of it); above it (the first tiles, small databases) a thread scores in float32
/// and retries the int8 pass every `PROBE_EVERY` tiles, as thresholds only rise.
const MAX_RESCORED: f64 = 0.2;
const PROBE_EVERY: usize = 64;
/// How many rescored pairs ahead their top-k lists are prefetched.
const PREFETCH_AHEAD: usize = 8;
/// The progressive pass pays while its work (`progressive::Costs`) stays under that of scoring
/// every pair in float32.
const MAX_PROGRESSIVE_WORK: f64 = 1.0;
/// Rows widened and quantized together, while they stay in L2 (a multiple of the int8 panel
/// and of every path's `nr`). A tile is one checksum block of its shard: `chunks` starts and
/// ends work items only at multiples of it (or at the shard's end), so the tiles of a chunk
/// are whole blocks, each hashed once by the one thread that scores it.
const TILE_ROWS: usize = CHECK_ROWS;
const _: () = assert!(TILE_ROWS <= 128);
const _: () = assert!(
    TILE_ROWS.is_multiple_of(32) && MIN_CHUNK_ROWS.is_multiple_of(TILE_ROWS) && CHUNK_ROWS.is_multiple_of(TILE_ROWS)
);

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
    /// Progressive codes of the database: their pass replaces the int8 one (forced, or where
    /// it pays).
    pub progressive: Option<&'a Progressive<'a>>,
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

impl Int8Choice {
    /// The choice a search's `method` names: "exact" (the fastest exact path), "float32"
    /// (plain), "int8" (the int8 pass from the first row, with the kernel that goes with the
    /// float32 path `simd` names, else with this CPU's best) or "int8-scalar" (the portable
    /// kernel). `simd` is the option as given; one that names no path is left for
    /// [`Simd::parse_option`] to report.
    pub fn parse(method: &str, simd: Option<&str>) -> Result<Int8Choice> {
        Ok(match method {
            "exact" => Int8Choice::Auto,
            "float32" => Int8Choice::Off,
            "int8-scalar" => Int8Choice::Force(Int8Kernel::Scalar),
            "int8" => Int8Choice::Force(
                simd.and_then(Simd::parse)
                    .and_then(Int8Kernel::detect)
                    .or_else(|| Int8Kernel::detect(Simd::detect()))
                    .ok_or_else(|| {
                        Error::invalid(
                            "method: \"int8\" needs AVX-512 VNNI or AVX-VNNI, which this CPU lacks (try int8-scalar)",
                        )
                    })?,
            ),
            other => {
                return Err(Error::invalid(format!(
                    "method: unknown {other:?} (expected exact, float32, int8 or int8-scalar)"
                )))
            }
        })
    }
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
    /// ...of which rescored exactly in float32 (with the progressive pass too).
    pub rescored_pairs: u64,
    /// The progressive pass: its kernel, the pairs entering each stage, the bytes of codes it
    /// read (panels of each stage that some query block needed) and of the store (tiles scored
    /// in float32 or holding a rescored row).
    pub stages: Option<StageKernel>,
    pub stage_pairs: [u64; MAX_STAGES],
    pub codes_bytes: u64,
    pub store_bytes: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.float_pairs += o.float_pairs;
        self.int8_pairs += o.int8_pairs;
        self.rescored_pairs += o.rescored_pairs;
        for (a, b) in self.stage_pairs.iter_mut().zip(o.stage_pairs) {
            *a += b;
        }
        self.codes_bytes += o.codes_bytes;
        self.store_bytes += o.store_bytes;
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
    if let Int8Choice::Force(kernel) = opts.int8 {
        if !kernel.supported() {
            return Err(Error::invalid(format!(
                "int8: this CPU cannot run the {} kernel",
                kernel.name()
            )));
        }
    }
    if let Some(s) = opts.simd {
        s.checked()?;
    }
    Ok(())
}

/// Searches `nq` float32 queries (row-major, `nq x db.dim`) against the whole database.
pub fn search(db: &Database, queries: &[f32], nq: usize, opts: &SearchOptions, control: &Control) -> Result<Neighbors> {
    validate(db, queries, nq, opts)?;
    let simd = opts.simd.unwrap_or_else(Simd::detect);
    let dim = db.dim;
    let int8 = match opts.int8 {
        _ if dim > int8::MAX_DIM || opts.progressive.is_some() => None,
        Int8Choice::Auto => Int8Kernel::detect(simd),
        Int8Choice::Off => None,
        Int8Choice::Force(k) => Some(k),
    };
    let packed = pack_queries(queries, nq, dim, simd.mr());
    let stage_queries = match opts.progressive {
        Some(p) => Some(p.queries(queries, nq, opts.threads, control)?),
        None => None,
    };
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
    let wanted = resolve_threads(opts.threads)?;
    let sizes: Vec<usize> = db.shards.iter().map(|s| s.rows).collect();
    let chunks = chunks(&sizes, wanted);
    let threads = wanted.min(chunks.len().max(1));
    let plan = Plan {
        dim,
        k: opts.k,
        simd,
        int8: int8.zip(quantized.as_ref()),
        adaptive: opts.int8 == Int8Choice::Auto,
        prog: opts.progressive.zip(stage_queries.as_ref()),
        packed: &packed,
        nq,
        tiers,
        shared: Shared::new(nq * tiers.len(), threads),
        shards: db.shards.len(),
    };

    // the `threads` workers claim chunks in database order
    let workers = crate::parallel::claims(
        chunks.len(),
        1,
        threads,
        control,
        |me| Worker::new(&plan, me),
        |worker, c, _| worker.chunk(db, chunks[c], control),
    )?;
    let mut stats = Stats {
        simd: Some(simd),
        int8,
        stages: opts.progressive.map(|p| p.kernel),
        ..Stats::default()
    };
    if let Some(s) = workers.iter().find_map(|w| w.bad) {
        return Err(db.shards[s].mismatch());
    }
    let mut parts = Vec::with_capacity(workers.len());
    let mut sums = vec![0u64; db.shards.len()];
    for worker in workers {
        stats.add(&worker.stats);
        parts.push(worker.tops);
        for (sum, w) in sums.iter_mut().zip(&worker.sums) {
            *sum = sum.wrapping_add(*w);
        }
    }
    // every block of every shard was hashed exactly once, by whichever thread scored it (the
    // progressive pass instead checks each block it reads against the hash its codes recorded)
    if let Some(bad) = db
        .shards
        .iter()
        .zip(&sums)
        .find(|(s, &sum)| plan.prog.is_none() && s.expected.is_some_and(|e| e != sum))
    {
        return Err(bad.0.mismatch());
    }
    let nt = tiers.len();
    let merged = crate::topk::merge_sorted(parts, opts.k, nq * nt, threads)?;

    // workers keep [query][tier]; the result is [tier][query]
    let k = opts.k;
    let mut scores = vec![f32::NEG_INFINITY; nt * nq * k];
    let mut indices = vec![-1i64; nt * nq * k];
    for (qt, hits) in merged.into_iter().enumerate() {
        let out = ((qt % nt) * nq + qt / nt) * k;
        for (j, (s, i)) in hits.into_iter().enumerate() {
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

/// The work items of `threads` threads over shards of `sizes` rows: (shard, first row, end row),
/// in database order. They shrink towards the end (a share of what is left per thread) so that
/// threads finish together. Invariant (the checksums rely on it): an item starts at a multiple
/// of `CHECK_ROWS` and ends at one or at its shard's end, so it covers whole blocks of one shard.
fn chunks(sizes: &[usize], threads: usize) -> Vec<(usize, usize, usize)> {
    let mut chunks = Vec::new();
    let mut left: usize = sizes.iter().sum();
    for (s, &rows) in sizes.iter().enumerate() {
        let mut r = 0;
        while r < rows {
            let size = (left / (4 * threads)).clamp(MIN_CHUNK_ROWS, CHUNK_ROWS) / CHECK_ROWS * CHECK_ROWS;
            let end = (r + size).min(rows);
            chunks.push((s, r, end));
            left -= end - r;
            r = end;
        }
    }
    chunks
}

/// What every worker shares: the kernels and the prepared queries.
struct Plan<'a> {
    dim: usize,
    k: usize,
    simd: Simd,
    /// The int8 kernel and the queries it reads, when the int8 pass may run...
    int8: Option<(Int8Kernel, &'a int8::Queries)>,
    /// ...by itself where it pays (else from the first row: tests).
    adaptive: bool,
    /// The progressive codes and the queries their stages read.
    prog: Option<(&'a Progressive<'a>, &'a StageQueries)>,
    packed: &'a [f32],
    nq: usize,
    tiers: &'a [Tier<'a>],
    shared: Shared,
    /// Shards of the database (workers sum block hashes per shard).
    shards: usize,
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

/// Consecutive rows of one shard, as stored: `count` rows of `dtype`, the first at global row
/// `first`.
struct Rows<'a> {
    bytes: &'a [u8],
    dtype: DType,
    count: usize,
    first: usize,
    /// Its shard, its block in the shard, and among all shards' blocks (progressive codes).
    shard: usize,
    local_block: usize,
    block: usize,
}

impl Rows<'_> {
    fn row(&self, r: usize) -> &[u8] {
        let size = self.bytes.len() / self.count;
        &self.bytes[r * size..(r + 1) * size]
    }
}

/// One thread's share of a search: its top k of every (query, tier) list, what it did, and its
/// scratch space.
struct Worker<'a> {
    plan: &'a Plan<'a>,
    me: usize,
    /// [query][tier], so that one query's tiers are one contiguous slice.
    tops: Vec<TopK>,
    stats: Stats,
    /// Whether every query has a k-th score (the automatic int8 pass waits for it).
    warm: bool,
    /// The share of the pairs of the last int8 tile that needed rescoring, and the tiles seen.
    rescored_share: f64,
    tiles: usize,
    scratch: Scratch,
    /// Per shard, the wrapping sum of the hashes of the blocks this thread scored.
    sums: Vec<u64>,
    /// A shard one of whose blocks differs from the hash the progressive codes recorded.
    bad: Option<usize>,
}

/// Buffers reused from tile to tile.
#[derive(Default)]
struct Scratch {
    /// The tile widened to padded float32 rows (float32 path).
    tile: Vec<f32>,
    /// Scores of one query block against the tile: `[mr][TILE_ROWS]`.
    block_scores: Vec<f32>,
    /// One widened row, and float16 staging for `widen`.
    row: Vec<f32>,
    f16s: Vec<half::f16>,
    /// The tile's int8 codes and terms, and one row's codes.
    codes: int8::Tile,
    row_codes: Vec<i8>,
    /// Per int8 panel of the tile, the rows that tiers keeping a subset hold.
    kept: Vec<u32>,
    /// (query, row in tile) pairs to rescore: this query block's, the previous one's.
    jobs: Vec<(usize, usize)>,
    pending: Vec<(usize, usize)>,
    job_scores: Vec<f32>,
}

impl<'a> Worker<'a> {
    fn new(plan: &'a Plan<'a>, me: usize) -> Worker<'a> {
        let lists = plan.nq * plan.tiers.len();
        Worker {
            plan,
            me,
            tops: (0..lists).map(|_| plan.shared.top(plan.k)).collect(),
            stats: Stats::default(),
            warm: false,
            rescored_share: 0.0,
            tiles: 0,
            sums: vec![0; plan.shards],
            bad: None,
            scratch: Scratch {
                block_scores: vec![0f32; plan.simd.mr() * TILE_ROWS],
                ..Scratch::default()
            },
        }
    }

    /// Scores the rows `lo..hi` of shard `s` tile by tile, then drops their pages from the
    /// resident set.
    fn chunk(&mut self, db: &Database, (s, lo, hi): (usize, usize, usize), control: &Control) -> Result<()> {
        let shard = &db.shards[s];
        if self.plan.prog.is_some() {
            // the stages read the codes; the store only for the rows rescored
            shard.sparse(lo, hi);
        } else {
            shard.prefetch(lo, hi);
        }
        for t0 in (lo..hi).step_by(TILE_ROWS) {
            if control.cancelled() {
                return Err(Error::Cancelled);
            }
            let t1 = (t0 + TILE_ROWS).min(hi);
            let bytes = shard.row_bytes(t0, t1);
            if shard.expected.is_some() && self.plan.prog.is_none() {
                // before scoring: the hash brings the tile's rows into L2 (192 KiB at 768-d
                // float16), where widening finds them; after scoring they would have been
                // pushed out by the queries streaming through the int8 pass
                self.sums[s] = self.sums[s].wrapping_add(block_hash(bytes, (t0 / CHECK_ROWS) as u64));
            }
            self.tile(&Rows {
                bytes,
                dtype: shard.dtype,
                count: t1 - t0,
                first: db.starts[s] + t0,
                shard: s,
                local_block: t0 / CHECK_ROWS,
                block: self.plan.prog.map_or(0, |(p, _)| p.block_starts[s]) + t0 / CHECK_ROWS,
            });
        }
        shard.release(lo, hi);
        if let Some((pr, _)) = self.plan.prog {
            let first = pr.block_starts[s] * CHECK_ROWS;
            pr.release(first + lo, first + hi);
        }
        control.advance(hi - lo);
        Ok(())
    }

    /// Scores a tile with the int8 pass where it pays (a forced pass always runs, from the
    /// first row), else with the float32 block kernel.
    fn tile(&mut self, rows: &Rows) {
        let plan = self.plan;
        if let Some((pr, sq)) = plan.prog {
            if !pr.forced && !self.warm {
                self.warm = (0..plan.nq).all(|q| threshold(&self.tops, plan, q, rows.first) > f32::NEG_INFINITY);
            }
            let pays = pr.forced
                || (self.warm
                    && (self.rescored_share < MAX_PROGRESSIVE_WORK || self.tiles.is_multiple_of(PROBE_EVERY)));
            self.tiles += 1;
            if pays {
                self.progressive_tile(rows, pr, sq);
            } else if self.verify(rows, pr, all_rows(rows.count)) {
                self.float_tile(rows);
            }
            return;
        }
        if plan.adaptive && plan.int8.is_some() && !self.warm {
            // until their top-k buffers first fill (the first ~k rows), every score is computed
            self.warm = (0..plan.nq).all(|q| threshold(&self.tops, plan, q, rows.first) > f32::NEG_INFINITY);
        }
        let pays = self.warm && (self.rescored_share < MAX_RESCORED || self.tiles.is_multiple_of(PROBE_EVERY));
        self.tiles += 1;
        match plan.int8 {
            Some((kernel, qs)) if !plan.adaptive || pays => self.int8_tile(rows, kernel, qs),
            _ => self.float_tile(rows),
        }
    }

    fn float_tile(&mut self, rows: &Rows) {
        let Worker {
            plan,
            me,
            tops,
            stats,
            scratch: s,
            ..
        } = self;
        let (simd, nq, dim) = (plan.simd, plan.nq, plan.dim);
        let (mr, nr, dp) = (simd.mr(), simd.nr(), padded(dim));
        widen_tile(rows.bytes, rows.dtype, dim, nr, &mut s.tile, &mut s.f16s);
        for qb in 0..nq.div_ceil(mr) {
            let a = &plan.packed[qb * mr * dp..(qb + 1) * mr * dp];
            for rb in 0..rows.count.div_ceil(nr) {
                let b = &s.tile[rb * nr * dp..(rb + 1) * nr * dp];
                simd.block(a, b, dp, &mut s.block_scores[rb * nr..], TILE_ROWS);
            }
            let live = mr.min(nq - qb * mr);
            stats.float_pairs += (live * rows.count) as u64;
            for i in 0..live {
                let scores = &s.block_scores[i * TILE_ROWS..i * TILE_ROWS + rows.count];
                offer(tops, plan, (qb * mr + i, *me), scores, rows.first);
            }
        }
    }

    /// Checks the rows `wanted` (a bit per row of the tile) against the hashes the progressive
    /// codes recorded, before they are read for scores: false (and the shard noted) when one
    /// differs. Only these rows are read from the store.
    fn verify(&mut self, rows: &Rows, pr: &Progressive, wanted: u128) -> bool {
        let mut m = wanted;
        while m != 0 {
            let r = m.trailing_zeros() as usize;
            m &= m - 1;
            let row = rows.row(r);
            self.stats.store_bytes += row.len() as u64;
            let local = rows.local_block * CHECK_ROWS + r;
            if block_hash(row, local as u64) != pr.row_hash(rows.block * CHECK_ROWS + r) {
                self.bad.get_or_insert(rows.shard);
                return false;
            }
        }
        true
    }

    /// The progressive pass over a tile: stage 1 for every (query, row) pair, panel by panel
    /// and query block by query block; each later stage only for the pairs that survive, one
    /// at a time from the row's contiguous codes; the survivors of the last stage scored
    /// exactly from the stored rows, as the int8 pass does.
    fn progressive_tile(&mut self, rows: &Rows, pr: &Progressive, sq: &StageQueries) {
        let plan = self.plan;
        let (nq, dim) = (plan.nq, plan.dim);
        let (mr, nr) = (int8::MR, int8::NR);
        let stages = pr.stages();
        let panel0 = rows.block * (CHECK_ROWS / nr);
        let widths: [usize; MAX_STAGES] = std::array::from_fn(|j| if j < stages { pr.width(j) } else { 0 });
        let before = self.stats;
        kept_masks(rows, plan, &mut self.scratch.kept);
        let Worker {
            tops,
            stats,
            scratch: s,
            ..
        } = self;
        s.jobs.clear();
        let mut read = [0u128; MAX_STAGES];
        let mut raw = [0i32; int8::MR * int8::NR];
        let mut partial = [[0f32; int8::NR]; int8::MR];
        for qb in 0..nq.div_ceil(mr) {
            let live = qb * mr..((qb + 1) * mr).min(nq);
            let n_live = live.len();
            let limits: [(f32, f32); int8::MR] = std::array::from_fn(|i| match qb * mr + i {
                q if live.contains(&q) => thresholds(tops, plan, q, rows.first),
                _ => (f32::INFINITY, f32::INFINITY),
            });
            let mut survivors = [0u128; int8::MR];
            for (p, &kept) in s.kept.iter().enumerate() {
                let gp = panel0 + p;
                let valid = (rows.count - p * nr).min(nr);
                let real = if valid == nr { u32::MAX } else { (1u32 << valid) - 1 };
                let w = widths[0];
                pr.kernel.block(
                    &sq.first[qb * w * mr..(qb + 1) * w * mr],
                    pr.panel_codes(0, gp),
                    w / 4,
                    &mut raw,
                );
                stats.stage_pairs[0] += (n_live * valid) as u64;
                let terms = pr.panel_terms(0, gp);
                let head = pr.panel_head(gp);
                let mut masks = [0u32; int8::MR];
                for (i, q) in live.clone().enumerate() {
                    let r: &[i32; int8::NR] = raw[i * nr..(i + 1) * nr].try_into().expect("NR values");
                    head_scores_fast(&sq.head[q], head, &mut partial[i]);
                    masks[i] = real
                        & stage_mask_fast(
                            r,
                            terms,
                            sq.scale[q][0],
                            sq.consts[q][0],
                            limits[i],
                            kept,
                            &mut partial[i],
                        );
                }
                for (j, &w) in widths.iter().enumerate().take(stages).skip(1) {
                    let count: u32 = masks.iter().map(|m| m.count_ones()).sum();
                    if count == 0 {
                        break;
                    }
                    stats.stage_pairs[j] += count as u64;
                    let (codes, terms) = (pr.panel_codes(j, gp), pr.panel_terms(j, gp));
                    for (i, q) in live.clone().enumerate() {
                        let (mut m, t, c) = (masks[i], sq.scale[q][j], sq.consts[q][j]);
                        read[j] |= (m as u128) << (p * nr);
                        let a = &sq.rows[j][q * w..(q + 1) * w];
                        while m != 0 {
                            let b = m.trailing_zeros() as usize;
                            m &= m - 1;
                            let dot = pr.kernel.dot(a, &codes[b * w..(b + 1) * w]);
                            let sum = terms[nr + b].to_bits() as i32;
                            let v = partial[i][b] + (dot - QOFF * sum) as f32 * (t * terms[b]);
                            partial[i][b] = v;
                            let ub = progressive::bound(
                                v,
                                c,
                                terms[2 * nr + b],
                                terms[3 * nr + b],
                                terms[4 * nr + b],
                                terms[5 * nr + b],
                            );
                            let thr = if kept >> b & 1 == 1 {
                                limits[i].0.min(limits[i].1)
                            } else {
                                limits[i].0
                            };
                            if !(ub >= thr || ub.is_nan()) {
                                masks[i] &= !(1 << b);
                            }
                        }
                    }
                }
                for (i, &m) in masks.iter().enumerate() {
                    survivors[i] |= (m as u128) << (p * nr);
                }
            }
            // by query: a query's rows of the tile are rescored one after another, while its
            // float32 row stays in L1
            for (q, &m) in live.clone().zip(&survivors) {
                let mut m = m;
                while m != 0 {
                    s.jobs.push((q, m.trailing_zeros() as usize));
                    m &= m - 1;
                }
            }
        }
        // the first stage reads whole panels, the later ones the terms of the panels holding a
        // row they score and the codes of those rows
        for (j, &rows_read) in read.iter().enumerate().take(stages) {
            let (panels, codes) = if j == 0 {
                let panels = if nq == 0 { 0 } else { s.kept.len() };
                (panels, panels * nr * widths[0])
            } else {
                let panels = (0..s.kept.len())
                    .filter(|p| (rows_read >> (p * nr)) as u32 != 0)
                    .count();
                (panels, rows_read.count_ones() as usize * widths[j])
            };
            stats.codes_bytes += (codes + panels * nr * progressive::TERMS * 4) as u64;
        }
        let pairs = (nq * rows.count) as u64;
        stats.rescored_pairs += s.jobs.len() as u64;
        let entered: [f64; MAX_STAGES] = std::array::from_fn(|j| (stats.stage_pairs[j] - before.stage_pairs[j]) as f64);
        let work = COSTS.work(&entered[..stages], &widths[..stages], s.jobs.len() as f64, dim);
        self.rescored_share = work / (pairs as f64 * dim as f64 * COSTS.float);
        let wanted = self.scratch.jobs.iter().fold(0u128, |m, &(_, r)| m | 1 << r);
        if wanted == 0 || !self.verify(rows, pr, wanted) {
            return;
        }
        let Worker {
            me, tops, scratch: s, ..
        } = self;
        rescore(tops, plan, *me, rows, &s.jobs, &mut s.job_scores);
    }

    /// The int8 pass: approximate scores of whole panels, then exact scores of the pairs whose
    /// bound may still reach their query's threshold, one query block at a time.
    fn int8_tile(&mut self, rows: &Rows, kernel: Int8Kernel, qs: &int8::Queries) {
        let Worker {
            plan,
            me,
            tops,
            stats,
            scratch: s,
            ..
        } = self;
        let (nq, dim, dp) = (plan.nq, plan.dim, padded(plan.dim));
        let (mr, nr) = (int8::MR, int8::NR);
        s.codes.reset(rows.count, dim, nr);
        s.row.resize(dim, 0.0);
        for r in 0..rows.count {
            widen(rows.row(r), rows.dtype, &mut s.row, &mut s.f16s);
            s.codes.set_row(r, &s.row, nr, &mut s.row_codes);
        }
        kept_masks(rows, plan, &mut s.kept);
        let steps = int8::d4(dim);
        let before = stats.rescored_pairs;
        s.pending.clear();
        for qb in 0..nq.div_ceil(mr) {
            let qcodes = &qs.codes[qb * steps * mr * 4..(qb + 1) * steps * mr * 4];
            let live = qb * mr..((qb + 1) * mr).min(nq);
            let nt = plan.tiers.len();
            tops[live.start * nt..live.end * nt].iter().for_each(TopK::prefetch);
            s.jobs.clear();
            let limits: [(f32, f32); int8::MR] = std::array::from_fn(|i| match qb * mr + i {
                q if live.contains(&q) => thresholds(tops, plan, q, rows.first),
                _ => (f32::INFINITY, f32::INFINITY),
            });
            for (p, &kept) in s.kept.iter().enumerate() {
                let thresholds = int8::Thresholds {
                    dense: limits.map(|l| l.0),
                    sparse: limits.map(|l| l.1),
                    kept,
                };
                let masks = kernel.panel_masks(qcodes, qs, qb, &s.codes, p, &thresholds);
                let valid = (rows.count - p * nr).min(nr);
                let real = if valid == nr { u32::MAX } else { (1u32 << valid) - 1 };
                for (q, mask) in live.clone().zip(masks) {
                    let mut mask = mask & real;
                    while mask != 0 {
                        s.jobs.push((q, p * nr + mask.trailing_zeros() as usize));
                        mask &= mask - 1;
                    }
                }
            }
            stats.rescored_pairs += s.jobs.len() as u64;
            // a software pipeline: this block's query rows come into cache (from L3 or memory:
            // rescoring is sparse) while the previous block's pairs are rescored
            let needed = s.jobs.iter().fold(0u32, |m, &(q, _)| m | 1 << (q - live.start));
            for q in live.filter(|q| needed >> (q - qb * mr) & 1 == 1) {
                prefetch(&plan.packed[q * dp..(q + 1) * dp]);
            }
            rescore(tops, plan, *me, rows, &s.pending, &mut s.job_scores);
            std::mem::swap(&mut s.pending, &mut s.jobs);
        }
        rescore(tops, plan, *me, rows, &s.pending, &mut s.job_scores);
        let pairs = (nq * rows.count) as u64;
        stats.int8_pairs += pairs;
        self.rescored_share = (stats.rescored_pairs - before) as f64 / pairs as f64;
    }
}

/// A mask of the first `count` rows of a tile.
fn all_rows(count: usize) -> u128 {
    if count >= 128 {
        u128::MAX
    } else {
        (1u128 << count) - 1
    }
}

/// Per int8 panel of the tile, the rows held by some tier that keeps a subset (they answer to its
/// lower threshold; the other rows only to the tiers that hold every row).
fn kept_masks(rows: &Rows, plan: &Plan, kept: &mut Vec<u32>) {
    let nr = int8::NR;
    kept.clear();
    kept.extend((0..rows.count.div_ceil(nr)).map(|p| {
        let held = |j: usize| {
            let row = rows.first + p * nr + j;
            let keeps = |t: &Tier| t.keep.is_some_and(|k| row < t.rows && k[row]);
            p * nr + j < rows.count && plan.tiers.iter().any(keeps)
        };
        (0..nr).fold(0u32, |m, j| m | (held(j) as u32) << j)
    }));
}

/// One stage's bound for one query against a panel: adds the stage's partial scores (products
/// `raw`, terms `[TERMS][32]`, the query's scale `t` and constants `c`) to `partial` (which
/// starts with the float32 head's scores) and says
/// which rows may still reach the thresholds `(dense, sparse)` (the sparse one for `kept` rows;
/// a NaN bound counts as a yes).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn stage_mask(
    raw: &[i32; int8::NR],
    terms: &[f32],
    t: f32,
    c: [f32; 4],
    (dense, sparse): (f32, f32),
    kept: u32,
    partial: &mut [f32; int8::NR],
) -> u32 {
    let nr = int8::NR;
    let terms: &[f32; progressive::TERMS * int8::NR] = terms.try_into().expect("a panel's terms");
    let mut mask = 0u32;
    for j in 0..nr {
        let sum = terms[nr + j].to_bits() as i32;
        let add = (raw[j] - QOFF * sum) as f32 * (t * terms[j]);
        let p = partial[j] + add;
        partial[j] = p;
        let ub = progressive::bound(
            p,
            c,
            terms[2 * nr + j],
            terms[3 * nr + j],
            terms[4 * nr + j],
            terms[5 * nr + j],
        );
        let thr = if kept >> j & 1 == 1 { dense.min(sparse) } else { dense };
        mask |= ((ub >= thr || ub.is_nan()) as u32) << j;
    }
    mask
}

/// `head_scores` compiled for AVX2 where the CPU has it (the same operations, unfused).
fn head_scores_fast(a: &[f32; progressive::HEAD], head: &[f32], out: &mut [f32; int8::NR]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        unsafe fn avx2(a: &[f32; progressive::HEAD], head: &[f32], out: &mut [f32; int8::NR]) {
            head_scores(a, head, out)
        }
        // SAFETY: AVX2 was just detected.
        return unsafe { avx2(a, head, out) };
    }
    head_scores(a, head, out)
}

/// The float32 scores of a query's head `a` against a panel's heads `[HEAD][32]`.
#[inline(always)]
fn head_scores(a: &[f32; progressive::HEAD], head: &[f32], out: &mut [f32; int8::NR]) {
    let nr = int8::NR;
    out.fill(0.0);
    for (c, &v) in a.iter().enumerate() {
        for (o, &h) in out.iter_mut().zip(&head[c * nr..(c + 1) * nr]) {
            *o += v * h;
        }
    }
}

/// `stage_mask` compiled for AVX2 where the CPU has it (the same float operations: no fused
/// multiply-adds are formed).
#[allow(clippy::too_many_arguments)]
fn stage_mask_fast(
    raw: &[i32; int8::NR],
    terms: &[f32],
    t: f32,
    c: [f32; 4],
    limits: (f32, f32),
    kept: u32,
    partial: &mut [f32; int8::NR],
) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        #[target_feature(enable = "avx2")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn avx2(
            raw: &[i32; int8::NR],
            terms: &[f32],
            t: f32,
            c: [f32; 4],
            limits: (f32, f32),
            kept: u32,
            partial: &mut [f32; int8::NR],
        ) -> u32 {
            stage_mask(raw, terms, t, c, limits, kept, partial)
        }
        // SAFETY: AVX2 was just detected.
        return unsafe { avx2(raw, terms, t, c, limits, kept, partial) };
    }
    stage_mask(raw, terms, t, c, limits, kept, partial)
}

/// Scores the (query, row in tile) pairs `jobs` exactly, from the stored rows, and offers them.
fn rescore(tops: &mut [TopK], plan: &Plan, me: usize, rows: &Rows, jobs: &[(usize, usize)], scores: &mut Vec<f32>) {
    let dp = padded(plan.dim);
    let pairs: Vec<(&[f32], &[u8])> = jobs
        .iter()
        .map(|&(q, r)| (&plan.packed[q * dp..(q + 1) * dp], rows.row(r)))
        .collect();
    scores.resize(jobs.len(), 0.0);
    plan.simd.dots(&pairs, rows.dtype, scores);
    // the pairs' queries are many and their top-k lists far apart in memory: each list's next
    // slot comes into cache a few offers ahead
    let nt = plan.tiers.len();
    for (n, (&(q, r), s)) in jobs.iter().zip(scores.iter()).enumerate() {
        if let Some(&(ahead, _)) = jobs.get(n + PREFETCH_AHEAD) {
            tops[ahead * nt..(ahead + 1) * nt].iter().for_each(TopK::prefetch);
        }
        offer(tops, plan, (q, me), std::slice::from_ref(s), rows.first + r);
    }
}

/// The lowest threshold among the tiers of query `q` that still hold rows from `first` on: a
/// score below it is of no use to any of them. Infinite when no tier holds such rows.
#[inline]
fn threshold(tops: &[TopK], plan: &Plan, q: usize, first: usize) -> f32 {
    let (dense, sparse) = thresholds(tops, plan, q, first);
    dense.min(sparse)
}

/// `threshold` over the tiers that hold every row (up to their end), then over those that keep
/// a subset: a row that no such subset holds answers only to the first.
#[inline]
fn thresholds(tops: &[TopK], plan: &Plan, q: usize, first: usize) -> (f32, f32) {
    let nt = plan.tiers.len();
    let (mut dense, mut sparse) = (f32::INFINITY, f32::INFINITY);
    for (t, (top, tier)) in tops[q * nt..(q + 1) * nt].iter().zip(plan.tiers).enumerate() {
        if tier.rows > first {
            let v = top.threshold().max(plan.shared.floor(q * nt + t));
            let side = if tier.keep.is_some() { &mut sparse } else { &mut dense };
            *side = side.min(v);
        }
    }
    (dense, sparse)
}

/// Offers query `q`'s scores (found by thread `me`) for consecutive rows starting at global row
/// `first` to each of its tiers, and shares what its top-k lists learnt.
#[inline]
fn offer(tops: &mut [TopK], plan: &Plan, (q, me): (usize, usize), scores: &[f32], first: usize) {
    let nt = plan.tiers.len();
    for (t, (top, tier)) in tops[q * nt..(q + 1) * nt].iter_mut().zip(plan.tiers).enumerate() {
        let end = tier.rows.saturating_sub(first).min(scores.len());
        if end == 0 {
            continue;
        }
        let list = q * nt + t;
        let before = (top.threshold(), top.share_score());
        top.offer(&scores[..end], first, tier.keep, plan.shared.floor(list));
        plan.shared.publish(list, me, top, before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_into_choices() {
        assert_eq!(Int8Choice::parse("exact", None).unwrap(), Int8Choice::Auto);
        assert_eq!(Int8Choice::parse("float32", Some("avx2")).unwrap(), Int8Choice::Off);
        let scalar = Int8Choice::parse("int8-scalar", None).unwrap();
        assert_eq!(scalar, Int8Choice::Force(Int8Kernel::Scalar));
        // "int8" forces the CPU's int8 kernel, or says that it has none
        match Int8Choice::parse("int8", Some("no such path")) {
            Ok(Int8Choice::Force(k)) => assert!(k.supported() && k != Int8Kernel::Scalar),
            Ok(other) => panic!("{other:?}"),
            Err(e) => assert!(e.to_string().contains("int8-scalar"), "{e}"),
        }
        let e = Int8Choice::parse("int4", None).unwrap_err().to_string();
        assert!(e.starts_with("method: unknown \"int4\""), "{e}");
    }

    #[test]
    fn work_items_cover_whole_checksum_blocks_of_one_shard() {
        let mut seed = 12345u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (seed >> 33) % n
        };
        for case in 0..200 {
            let sizes: Vec<usize> = (0..1 + next(6))
                .map(|_| next(if case % 2 == 0 { 3000 } else { 300_000 }) as usize)
                .collect();
            let threads = 1 + next(16) as usize;
            let items = chunks(&sizes, threads);
            let mut at = vec![0usize; sizes.len()];
            for &(s, lo, hi) in &items {
                assert!(lo < hi && hi <= sizes[s], "{sizes:?} {threads}: ({s}, {lo}, {hi})");
                assert_eq!(lo % CHECK_ROWS, 0, "{sizes:?} {threads}: ({s}, {lo}, {hi})");
                assert!(
                    hi % CHECK_ROWS == 0 || hi == sizes[s],
                    "{sizes:?} {threads}: ({s}, {lo}, {hi})"
                );
                assert_eq!(at[s], lo, "items of a shard in order, without gaps");
                at[s] = hi;
            }
            assert_eq!(at, sizes, "every row once");
        }
    }
}
