//! Exact rescoring of shortlists: the float32 dot products of each query with its candidate
//! rows, read from the store (float16 widened exactly). Each score is one vectorised dot
//! product, so it equals exact search's score of the same row up to float32 rounding (the two
//! sum in different orders), not always to the bit.
//!
//! Reads are batched and sorted: the union of all shortlisted rows is announced to the kernel
//! in row order (runs of nearby rows merged) before any is read, and each query reads its rows
//! in increasing order. With a database on disk this turns random reads into sorted ones.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::kernels::{dot, widen_row, RowScratch};
use crate::search::{resolve_threads, Control};
use crate::store::Database;
use crate::topk::{Hit, TopK};

/// Rows closer than this are announced as one run.
const GAP: usize = 64;

/// Rescored lists of some queries: (query, its best hits).
type Ranked = Vec<(usize, Vec<Hit>)>;

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
    let next = AtomicUsize::new(0);
    let threads = resolve_threads(threads).min(nq.max(1));
    let parts: Vec<Result<Ranked>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    let mut scratch = RowScratch::default();
                    let mut row = vec![0f32; dim];
                    loop {
                        let q = next.fetch_add(1, Ordering::Relaxed);
                        if q >= nq {
                            return Ok(done);
                        }
                        if control.cancel.load(Ordering::Relaxed) {
                            return Err(Error::Cancelled);
                        }
                        let query = &queries[q * dim..(q + 1) * dim];
                        let mut rows = lists[q].clone();
                        rows.sort_unstable();
                        let mut top = TopK::new(k);
                        for r in rows {
                            let (bytes, dtype) = db.row(r as usize);
                            widen_row(bytes, dtype, &mut row, &mut scratch);
                            let s = dot(query, &row);
                            if s >= top.threshold() {
                                top.push(s, r);
                            }
                        }
                        done.push((q, top.into_sorted()));
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
    let mut hits = vec![Vec::new(); nq];
    for part in parts {
        for (q, h) in part? {
            hits[q] = h;
        }
    }
    Ok(hits)
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
