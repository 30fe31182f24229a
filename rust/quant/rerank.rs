//! Exact rescoring of shortlists: the float32 scores of each query's candidate rows, computed
//! by the exact search's own kernels (same operations, same order), so that a returned score is
//! bit-identical to the one exact search gives the same row.
//!
//! Reads are batched and sorted: the union of all shortlisted rows is announced to the kernel
//! in row order (runs of nearby rows merged) before any is read, and each query reads its rows
//! in increasing order. With a database on disk this turns random reads into sorted ones.

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::error::{Error, Result};
use crate::kernels::{pack_panel, pack_queries, RowScratch, Simd};
use crate::search::{resolve_threads, Control};
use crate::store::Database;
use crate::topk::{Hit, TopK};

/// Rows closer than this are announced as one run.
const GAP: usize = 64;
/// Panels packed at once for one query (the kernels score four (query, panel) jobs together).
const BATCH: usize = 4;

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
    let simd = Simd::detect();
    let (mr, nr) = (simd.mr(), simd.nr());
    prefetch(db, lists);
    let packed = pack_queries(queries, nq, dim, mr);
    let blocks = nq.div_ceil(mr);
    let next = AtomicUsize::new(0);
    let threads = resolve_threads(threads).min(blocks.max(1));
    let parts: Vec<Result<Ranked>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut done = Vec::new();
                    let mut scratch = RowScratch::default();
                    let mut panels = vec![0f32; BATCH * dim * nr];
                    let mut out = vec![0f32; BATCH * nr];
                    loop {
                        let b = next.fetch_add(1, Ordering::Relaxed);
                        if b >= blocks {
                            return Ok(done);
                        }
                        if control.cancel.load(Ordering::Relaxed) {
                            return Err(Error::Cancelled);
                        }
                        let a = &packed[b * dim * mr..(b + 1) * dim * mr];
                        for (q, list) in lists.iter().enumerate().take(((b + 1) * mr).min(nq)).skip(b * mr) {
                            let mut rows = list.clone();
                            rows.sort_unstable();
                            let mut top = TopK::new(k);
                            for batch in rows.chunks(BATCH * nr) {
                                let groups: Vec<&[u64]> = batch.chunks(nr).collect();
                                for (g, group) in groups.iter().enumerate() {
                                    let it = group.iter().map(|&r| db.row(r as usize));
                                    pack_panel(it, dim, nr, &mut panels[g * dim * nr..], &mut scratch, |_, _| {});
                                }
                                let jobs: Vec<(usize, &[f32])> = (0..groups.len())
                                    .map(|g| (q - b * mr, &panels[g * dim * nr..(g + 1) * dim * nr]))
                                    .collect();
                                simd.columns(a, &jobs, dim, &mut out);
                                for (g, group) in groups.iter().enumerate() {
                                    for (j, &r) in group.iter().enumerate() {
                                        let s = out[g * nr + j];
                                        if s >= top.threshold() {
                                            top.push(s, r);
                                        }
                                    }
                                }
                            }
                            done.push((q, top.into_sorted()));
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
