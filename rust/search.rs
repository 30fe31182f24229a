//! Exact inner-product search of many queries against a database of memory-mapped shards.
//!
//! One pass over the database serves all queries: threads claim chunks of rows in increasing
//! order from a shared counter, widen each tile of a chunk to float32 panels once, and run every
//! query block against it while it is hot in cache. Each thread keeps its own top-k per query
//! (no locks on the hot path); partial results are merged at the end. After a chunk its pages are
//! dropped from the resident set, so memory stays bounded whatever the database size:
//! about `threads * (Q * 2k * 16 bytes + CHUNK_ROWS * row bytes)` plus the packed queries.
//!
//! The caller observes progress through `Control::done_rows` and stops the work by setting
//! `Control::cancel`; workers look at it after every tile (a few milliseconds of work).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::kernels::{pack_queries, pack_rows, RowScratch, Simd};
use crate::store::Database;
use crate::topk::TopK;

/// Rows a thread claims at once (its pages are released together).
const CHUNK_ROWS: usize = 16384;
/// Rows widened and packed together; sized so the packed tile stays in L2 (a multiple of
/// every path's `nr`).
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
    /// When given, only rows `r` with `keep[r]` can be returned.
    pub keep: Option<&'a [bool]>,
}

/// The k best rows per query: `scores` and `indices` are `(nq, k)` row-major; when fewer than
/// `k` rows can be returned (a filter keeps fewer), the rest holds `-inf` and index `-1`.
pub struct Neighbors {
    pub scores: Vec<f32>,
    pub indices: Vec<i64>,
    pub k: usize,
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
        return Err(Error::invalid(format!("k = {} is larger than the database ({} rows)", opts.k, db.rows)));
    }
    if let Some(keep) = opts.keep {
        if keep.len() != db.rows {
            return Err(Error::invalid(format!(
                "keep: {} flags for a database of {} rows",
                keep.len(),
                db.rows
            )));
        }
    }
    if let Some(s) = opts.simd {
        if !s.supported() {
            return Err(Error::invalid(format!("simd: this CPU cannot run the {} path", s.name())));
        }
    }
    Ok(())
}

/// Searches `nq` float32 queries (row-major, `nq x db.dim`) against the whole database.
pub fn search(db: &Database, queries: &[f32], nq: usize, opts: &SearchOptions, control: &Control) -> Result<Neighbors> {
    validate(db, queries, nq, opts)?;
    let simd = opts.simd.unwrap_or_else(Simd::detect);
    let dim = db.dim;
    let packed = pack_queries(queries, nq, dim, simd.mr());

    // work items: (shard, first row, end row), in database order
    let mut chunks = Vec::new();
    for (s, shard) in db.shards.iter().enumerate() {
        let mut r = 0;
        while r < shard.rows {
            let end = (r + CHUNK_ROWS).min(shard.rows);
            chunks.push((s, r, end));
            r = end;
        }
    }
    let next = AtomicUsize::new(0);
    let threads = resolve_threads(opts.threads).min(chunks.len().max(1));

    let partials: Vec<Result<Vec<TopK>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| scope.spawn(|| worker(db, &packed, nq, simd, opts, &chunks, &next, control)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err(Error::invalid("internal error: a search thread panicked"))))
            .collect()
    });
    let mut merged: Option<Vec<TopK>> = None;
    for part in partials {
        let part = part?;
        merged = Some(match merged {
            None => part,
            Some(mut acc) => {
                for (a, p) in acc.iter_mut().zip(part) {
                    a.absorb(p);
                }
                acc
            }
        });
    }
    let merged = merged.unwrap_or_else(|| (0..nq).map(|_| TopK::new(opts.k)).collect());

    let k = opts.k;
    let mut scores = vec![f32::NEG_INFINITY; nq * k];
    let mut indices = vec![-1i64; nq * k];
    for (q, top) in merged.into_iter().enumerate() {
        for (j, (s, i)) in top.into_sorted().into_iter().enumerate() {
            scores[q * k + j] = s;
            indices[q * k + j] = i as i64;
        }
    }
    Ok(Neighbors { scores, indices, k })
}

#[allow(clippy::too_many_arguments)]
fn worker(
    db: &Database,
    packed: &[f32],
    nq: usize,
    simd: Simd,
    opts: &SearchOptions,
    chunks: &[(usize, usize, usize)],
    next: &AtomicUsize,
    control: &Control,
) -> Result<Vec<TopK>> {
    let dim = db.dim;
    let (mr, nr) = (simd.mr(), simd.nr());
    let qblocks = nq.div_ceil(mr);
    let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(opts.k)).collect();
    let mut tile = Vec::new();
    let mut scratch = RowScratch::default();
    // scores of one query block against one tile: [mr][TILE_ROWS]
    let mut tile_scores = vec![0f32; mr * TILE_ROWS];

    loop {
        let c = next.fetch_add(1, Ordering::Relaxed);
        let Some(&(s, lo, hi)) = chunks.get(c) else { break };
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
            pack_rows(shard.row_bytes(t0, t1), shard.dtype, rows, dim, nr, &mut tile, &mut scratch);
            let panels = rows.div_ceil(nr);
            for qb in 0..qblocks {
                let a = &packed[qb * dim * mr..(qb + 1) * dim * mr];
                for p in 0..panels {
                    let b = &tile[p * dim * nr..(p + 1) * dim * nr];
                    simd.block(a, b, dim, &mut tile_scores[p * nr..], TILE_ROWS);
                }
                for i in 0..mr.min(nq - qb * mr) {
                    let top = &mut tops[qb * mr + i];
                    let row = &tile_scores[i * TILE_ROWS..i * TILE_ROWS + rows];
                    offer(top, row, base + t0, opts.keep);
                }
            }
            t0 = t1;
        }
        shard.release(lo, hi);
        control.done_rows.fetch_add((hi - lo) as u64, Ordering::Relaxed);
    }
    Ok(tops)
}

/// Offers one query's scores for consecutive rows starting at global row `first`.
///
/// After the first tiles almost no score reaches the threshold, so groups of 16 are tested
/// with a branch-free comparison (which compiles to one vector compare) before any work.
#[inline]
fn offer(top: &mut TopK, scores: &[f32], first: usize, keep: Option<&[bool]>) {
    const GROUP: usize = 16;
    let mut threshold = top.threshold();
    for (g, group) in scores.chunks(GROUP).enumerate() {
        if !group.iter().fold(false, |any, &s| any | (s >= threshold)) {
            continue;
        }
        for (j, &s) in group.iter().enumerate() {
            if s >= threshold {
                let row = first + g * GROUP + j;
                if keep.is_none_or(|k| k[row]) {
                    top.push(s, row as u64);
                    threshold = top.threshold();
                }
            }
        }
    }
}
