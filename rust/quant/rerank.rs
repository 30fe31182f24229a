//! Exact rescoring of shortlists: the float32 dot products of each query with its candidate
//! rows, read from the store (float16 widened exactly). Each score is one vectorised dot
//! product, so it equals exact search's score of the same row up to float32 rounding (the two
//! sum in different orders), not always to the bit.
//!
//! The work goes in row order, not query order: the (row, query) pairs of all shortlists are
//! bucketed by blocks of rows, and each row is read and widened once for every query that
//! listed it (a row sits in ~10-20 shortlists). Rows are read once, in increasing order, and
//! announced to the kernel beforehand; the queries stay in cache.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::kernels::{dot, widen_row, RowScratch};
use crate::search::{resolve_threads, Control};
use crate::store::Database;
use crate::topk::{Hit, TopK};

/// Rows closer than this are announced as one run.
const GAP: usize = 64;
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
    prefetch(db, lists);
    // pairs bucketed by row block (a counting sort): `(row << 32) | query`
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
            pairs[fill[b]] = r << 32 | q as u64;
            fill[b] += 1;
        }
    }
    let next = AtomicUsize::new(0);
    let claims = buckets.div_ceil(CLAIM);
    let threads = resolve_threads(threads).min(claims.max(1));
    let parts: Vec<Result<Vec<TopK>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
                    let mut scratch = RowScratch::default();
                    let mut row = vec![0f32; dim];
                    let mut mine = Vec::new();
                    loop {
                        let c = next.fetch_add(1, Ordering::Relaxed);
                        if c >= claims {
                            return Ok(tops);
                        }
                        if control.cancel.load(Ordering::Relaxed) {
                            return Err(Error::Cancelled);
                        }
                        for b in c * CLAIM..((c + 1) * CLAIM).min(buckets) {
                            mine.clear();
                            mine.extend_from_slice(&pairs[starts[b]..starts[b + 1]]);
                            mine.sort_unstable();
                            let mut last = u64::MAX;
                            for &pair in &mine {
                                let (r, q) = (pair >> 32, (pair & 0xffff_ffff) as usize);
                                if r != last {
                                    let (bytes, dtype) = db.row(r as usize);
                                    widen_row(bytes, dtype, &mut row, &mut scratch);
                                    last = r;
                                }
                                let s = dot(&queries[q * dim..(q + 1) * dim], &row);
                                if s >= tops[q].threshold() {
                                    tops[q].push(s, r);
                                }
                            }
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::invalid("internal error: a rescoring thread panicked")))
            })
            .collect()
    });
    let mut merged: Option<Vec<TopK>> = None;
    for part in parts {
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
    Ok(merged.unwrap_or_default().into_iter().map(TopK::into_sorted).collect())
}

/// Announces every shortlisted row to the kernel, in row order, as runs of nearby rows.
fn prefetch(db: &Database, lists: &[Vec<u64>]) {
    let mut rows: Vec<usize> = lists.iter().flatten().map(|&r| r as usize).collect();
    rows.sort_unstable();
    rows.dedup();
    let mut i = 0;
    while i < rows.len() {
        let (shard, start) = db.locate(rows[i]);
        let shard_end = rows[i] - start + shard.rows;
        let mut j = i + 1;
        while j < rows.len() && rows[j] < shard_end && rows[j] - rows[j - 1] <= GAP {
            j += 1;
        }
        shard.prefetch(start, start + rows[j - 1] - rows[i] + 1);
        i = j;
    }
}
