//! Exact rescoring of shortlists: the float32 dot products of each query with its candidate
//! rows, read from the store (float16 converted exactly), by exact search's single-pair kernel:
//! each score has the bits exact search gives the same row.
//!
//! The work goes by blocks of rows, not by query: the (query, row) pairs of all shortlists are
//! bucketed by blocks of 1,024 rows, whose float16 data stays in cache while every query that
//! listed some of them scores them (queries in turn, each loaded once per block). Rows are thus
//! read from memory or disk once, in increasing order, and announced to the kernel beforehand.

use crate::error::Result;
use crate::kernels::{pack_queries, Simd};
use crate::parallel::{claims, resolve_threads, Control};
use crate::store::{DType, Database};
use crate::topk::{Hit, TopK};

/// Rows per bucket (their float16 data stays in cache while the bucket's pairs are scored).
const BUCKET_ROWS: usize = 1024;
/// Buckets a thread claims at once.
const CLAIM: usize = 16;
/// Pairs scored per call of the single-pair kernel.
const BATCH: usize = 64;

/// A pair is `(query << 40) | row`.
fn query_of(pair: u64) -> usize {
    (pair >> 40) as usize
}

fn row_of(pair: u64) -> usize {
    (pair & ((1 << 40) - 1)) as usize
}

/// The `k` best of each query's `lists[q]` rows by exact score, in rank order.
pub fn rerank(
    db: &Database,
    queries: &[f32],
    lists: &[Vec<u64>],
    k: usize,
    threads: usize,
    control: &Control,
) -> Result<Vec<Vec<Hit>>> {
    let (dim, nq) = (db.dim, lists.len());
    // pairs bucketed by row block (a counting sort): `(query << 40) | row`; filled query by
    // query, so each bucket lists its pairs in query order already
    let buckets = db.rows.div_ceil(BUCKET_ROWS);
    let mut starts = vec![0usize; buckets + 1];
    for &r in lists.iter().flatten() {
        starts[r as usize / BUCKET_ROWS + 1] += 1;
    }
    for b in 0..buckets {
        starts[b + 1] += starts[b];
    }
    let mut fill = starts.clone();
    let mut pairs = vec![0u64; starts[buckets]];
    for (q, list) in lists.iter().enumerate() {
        for &r in list {
            let b = r as usize / BUCKET_ROWS;
            pairs[fill[b]] = (q as u64) << 40 | r;
            fill[b] += 1;
        }
    }
    prefetch(db, &pairs, &starts);
    let fresh = |_: usize| -> Vec<TopK> { (0..nq).map(|_| TopK::new(k)).collect() };
    let simd = Simd::detect();
    let packed = pack_queries(queries, nq, dim, 1);
    let parts = claims(buckets, CLAIM, threads, control, fresh, |tops, lo, hi| {
        // batches of pairs whose rows share a type (shards may differ)
        let mut batch: Vec<(usize, usize, &[u8])> = Vec::with_capacity(BATCH);
        let mut batch_type = None;
        for &p in &pairs[starts[lo]..starts[hi]] {
            let (bytes, dtype) = db.row(row_of(p));
            if let Some(t) = batch_type.filter(|&t| t != dtype || batch.len() == BATCH) {
                score(simd, &packed, &batch, t, tops);
                batch.clear();
            }
            batch_type = Some(dtype);
            batch.push((query_of(p), row_of(p), bytes));
        }
        if let Some(t) = batch_type {
            score(simd, &packed, &batch, t, tops);
        }
        Ok(())
    })?;
    crate::topk::merge_sorted(parts, k, nq, resolve_threads(threads)?)
}

/// Scores `(query, row, its bytes)` pairs of rows of type `dtype` and offers them to their
/// queries' top k.
fn score(simd: Simd, packed: &[f32], batch: &[(usize, usize, &[u8])], dtype: DType, tops: &mut [TopK]) {
    let dp = packed.len() / tops.len();
    let refs: Vec<(&[f32], &[u8])> = batch
        .iter()
        .map(|&(q, _, x)| (&packed[q * dp..(q + 1) * dp], x))
        .collect();
    let mut scores = [0f32; BATCH];
    simd.dots(&refs, dtype, &mut scores);
    for (&(q, r, _), &s) in batch.iter().zip(&scores) {
        if s >= tops[q].threshold() {
            tops[q].push(s, r as u64);
        }
    }
}

/// Announces the rows of every bucket (from its lowest listed row to its highest) to the
/// kernel, in row order, before any is read.
fn prefetch(db: &Database, pairs: &[u64], starts: &[usize]) {
    for bucket in starts.windows(2).map(|w| &pairs[w[0]..w[1]]) {
        let rows = bucket.iter().map(|&p| row_of(p));
        let (lo, hi) = rows.fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r), hi.max(r + 1)));
        let mut r = lo;
        while r < hi {
            let (shard, local) = db.locate(r);
            let n = (shard.rows - local).min(hi - r);
            shard.prefetch(local, local + n);
            r += n;
        }
    }
}
