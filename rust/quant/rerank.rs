//! Exact rescoring of shortlists: the float32 dot products of each query with its candidate
//! rows, read from the store (float16 widened exactly). Each score is one vectorised dot
//! product, so it equals exact search's score of the same row up to float32 rounding (the two
//! sum in different orders), not always to the bit.
//!
//! The work goes by blocks of rows, not by query: the (query, row) pairs of all shortlists are
//! bucketed by blocks of 1,024 rows, whose float16 data stays in cache while every query that
//! listed some of them scores them (queries in turn, each loaded once per block). Rows are thus
//! read from memory or disk once, in increasing order, and announced to the kernel beforehand.

use super::claims;
use crate::error::Result;
use crate::kernels::dot_row;
use crate::search::Control;
use crate::store::Database;
use crate::topk::{Hit, TopK};

/// Rows per bucket (their float16 data stays in cache while the bucket's pairs are scored).
const BUCKET_ROWS: usize = 1024;
/// Buckets a thread claims at once.
const CLAIM: usize = 16;

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
    let fresh = || -> Vec<TopK> { (0..nq).map(|_| TopK::new(k)).collect() };
    let parts = claims(buckets, CLAIM, threads, control, fresh, |tops, lo, hi| {
        for &pair in &pairs[starts[lo]..starts[hi]] {
            let (q, r) = ((pair >> 40) as usize, pair & ((1 << 40) - 1));
            let (bytes, dtype) = db.row(r as usize);
            let s = dot_row(&queries[q * dim..(q + 1) * dim], bytes, dtype);
            if s >= tops[q].threshold() {
                tops[q].push(s, r);
            }
        }
        Ok(())
    })?;
    Ok(crate::topk::merge_sorted(
        parts,
        k,
        nq,
        crate::search::resolve_threads(threads),
    ))
}

/// Announces the rows of every bucket (from its lowest listed row to its highest) to the
/// kernel, in row order, before any is read.
fn prefetch(db: &Database, pairs: &[u64], starts: &[usize]) {
    for bucket in starts.windows(2).map(|w| &pairs[w[0]..w[1]]) {
        let rows = bucket.iter().map(|&p| (p & ((1 << 40) - 1)) as usize);
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
