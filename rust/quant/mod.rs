//! Quantized search: compact codes of the database, scanned for a shortlist per query, whose
//! rows are then rescored exactly from the float16 store.
//!
//! - [`file`]: the codes file (versioned header, store fingerprint, validated sections).
//! - [`sq8`]: one int8 code per dimension and a per-row scale, scanned with the VNNI kernels.
//! - [`pq`]: product quantization (k-means in [`kmeans`]), 8-bit codes with float lookup tables
//!   or 4-bit codes scanned by [`fastscan`] with the lookup tables held in SIMD registers.
//! - [`rerank`]: exact float32 scores of the shortlisted rows, read in row order.
//!
//! All queries share one pass over the codes, as in exact search: threads claim chunks of rows
//! and keep a top list of `shortlist` approximate scores per query.

pub mod fastscan;
pub mod file;
pub mod kmeans;
pub mod pq;
pub mod progressive;
pub mod rerank;
pub mod sq8;

use std::sync::atomic::{AtomicU32, Ordering};

use crate::error::{Error, Result};
use crate::parallel::{claims, Control};
use crate::store::Database;
use crate::topk::{key, unkey, Hit, TopK};
pub use file::{CodesFile, Header, Kind};

/// Rows a thread claims at once (a multiple of every code layout's block of 32).
const CHUNK_ROWS: usize = 16384;

/// How a code kind scores a range of rows approximately for every query.
pub trait Scan: Sync {
    /// Offers the approximate scores of rows `lo..hi` (`lo` a multiple of 32) to `found`.
    fn scan(&self, lo: usize, hi: usize, found: &mut Candidates);
}

/// One thread's candidates: a top list per query, whose thresholds are shared with the other
/// threads (a row below any thread's k-th score cannot be in the final shortlist).
///
/// The lists hold rows counted from `first` (the first row of the range scanned): a range that
/// does not start on a block of 32 is scanned from the block's start, the rows before `first`
/// dropped, and `keep` covers the range only.
pub struct Candidates<'a> {
    pub tops: Vec<TopK>,
    floors: &'a [AtomicU32],
    keep: Option<&'a [bool]>,
    first: usize,
}

impl Candidates<'_> {
    /// The score a row must reach to enter query `q`'s list.
    #[inline]
    pub fn threshold(&self, q: usize) -> f32 {
        self.tops[q]
            .threshold()
            .max(unkey(self.floors[q].load(Ordering::Relaxed)))
    }

    /// Offers query `q`'s scores of consecutive rows from `first`.
    #[inline]
    pub fn offer(&mut self, q: usize, scores: &[f32], first: usize) {
        let skip = self.first.saturating_sub(first).min(scores.len());
        let floor = unkey(self.floors[q].load(Ordering::Relaxed));
        self.tops[q].offer(&scores[skip..], first + skip - self.first, self.keep, floor);
        self.publish(q);
    }

    /// Offers one row's score to query `q` (call `publish` after a batch).
    #[inline]
    pub fn push(&mut self, q: usize, score: f32, row: usize) {
        if row >= self.first && score >= self.threshold(q) && self.keep.is_none_or(|k| k[row - self.first]) {
            self.tops[q].push(score, (row - self.first) as u64);
        }
    }

    /// Shares query `q`'s threshold with the other threads (a plain load first: the shared
    /// value only needs a write, an atomic read-modify-write, when this thread's rose above it).
    #[inline]
    pub fn publish(&self, q: usize) {
        let mine = key(self.tops[q].threshold());
        if mine > self.floors[q].load(Ordering::Relaxed) {
            self.floors[q].fetch_max(mine, Ordering::Relaxed);
        }
    }
}

pub struct CodeSearch<'a> {
    pub k: usize,
    /// Candidates kept per query from the codes (at least `k`).
    pub shortlist: usize,
    /// Rescore the shortlist exactly (else the approximate scores are returned).
    pub rerank: bool,
    pub threads: usize,
    /// Only rows with `keep[r]` can be returned.
    pub keep: Option<&'a [bool]>,
}

/// What a quantized search returns: per query the `k` best `(score, row)`, and timings.
pub struct Found {
    pub hits: Vec<Vec<Hit>>,
    pub scan_seconds: f64,
    pub rerank_seconds: f64,
}

/// Searches `nq` float32 queries with the codes of `db`.
pub fn search(
    codes: &CodesFile,
    db: &Database,
    queries: &[f32],
    nq: usize,
    opts: &CodeSearch,
    control: &Control,
) -> Result<Found> {
    let h = &codes.header;
    if h.dim != db.dim || h.rows != db.rows {
        return Err(Error::format(
            &codes.path,
            format!(
                "codes of {} rows x {} dims do not belong to this database of {} rows x {} dims",
                h.rows, h.dim, db.rows, db.dim
            ),
        ));
    }
    if queries.len() != nq * db.dim || queries.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "queries: expected {nq} finite rows of dimension {}",
            db.dim
        )));
    }
    if opts.k == 0 || opts.k > db.rows {
        return Err(Error::invalid(format!(
            "k = {} must be between 1 and the database's {} rows",
            opts.k, db.rows
        )));
    }
    if let Some(keep) = opts.keep.filter(|k| k.len() != db.rows) {
        return Err(Error::invalid(format!(
            "keep: {} flags for a database of {} rows",
            keep.len(),
            db.rows
        )));
    }
    let shortlist = opts.shortlist.clamp(opts.k, db.rows);
    let t0 = std::time::Instant::now();
    // every section, from the page cache where the codes live: a few percent of the scan
    codes.verify(opts.threads)?;
    let scanner = scanner(codes, queries, nq)?;
    let tops = scan_all(&*scanner, 0..db.rows, nq, shortlist, opts.keep, opts.threads, control)?;
    let scan_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    let hits = if opts.rerank {
        let lists: Vec<Vec<u64>> = tops
            .into_iter()
            .map(|t| t.into_best().into_iter().map(|h| h.1).collect())
            .collect();
        rerank::rerank(db, queries, &lists, opts.k, opts.threads, control)?
    } else {
        tops.into_iter()
            .map(|t| {
                let mut best = TopK::new(opts.k);
                for (s, r) in t.into_best() {
                    if s >= best.threshold() {
                        best.push(s, r);
                    }
                }
                best.into_sorted()
            })
            .collect()
    };
    Ok(Found {
        hits,
        scan_seconds,
        rerank_seconds: t1.elapsed().as_secs_f64(),
    })
}

/// The scan of a codes file's kind (progressive codes have none: they serve exact search).
fn scanner<'a>(codes: &'a CodesFile, queries: &'a [f32], nq: usize) -> Result<Box<dyn Scan + 'a>> {
    Ok(match codes.header.kind {
        Kind::Sq8 => Box::new(sq8::Sq8Scan::new(codes, queries, nq)),
        Kind::Pq { bits: 8, .. } => Box::new(pq::PqScan::new(codes, queries, nq)),
        Kind::Pq { .. } => Box::new(fastscan::FastScan::new(codes, queries, nq)),
        Kind::Progressive { .. } => return Err(Error::format(
            &codes.path,
            "progressive codes serve exact search (`ilias search --method exact` or `progressive`), not a shortlist",
        )),
    })
}

/// The approximate shortlist of every query among the rows `rows` of the codes (those with
/// `keep[row - rows.start]`, when given), in rank order, as global rows. The rows of a whole
/// database split into ranges give, merged in rank order, exactly the shortlists of `search`:
/// a range's best `shortlist` hold every row of the whole's best that falls in it. The codes
/// are not verified here: a caller that splits the work checks them once (`CodesFile::verify`).
#[allow(clippy::too_many_arguments)] // the search's own arguments plus the range and its mask
pub fn shortlist(
    codes: &CodesFile,
    queries: &[f32],
    nq: usize,
    shortlist: usize,
    rows: std::ops::Range<usize>,
    keep: Option<&[bool]>,
    threads: usize,
    control: &Control,
) -> Result<Vec<Vec<Hit>>> {
    let h = &codes.header;
    if rows.start >= rows.end || rows.end > h.rows {
        return Err(Error::invalid(format!(
            "rows {}..{}: expected a non-empty range of the codes' {} rows",
            rows.start, rows.end, h.rows
        )));
    }
    if queries.len() != nq * h.dim || queries.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "queries: expected {nq} finite rows of dimension {}",
            h.dim
        )));
    }
    if let Some(keep) = keep.filter(|k| k.len() != rows.len()) {
        return Err(Error::invalid(format!(
            "keep: {} flags for a range of {} rows",
            keep.len(),
            rows.len()
        )));
    }
    if shortlist == 0 {
        return Err(Error::invalid("shortlist must be at least 1"));
    }
    let scanner = scanner(codes, queries, nq)?;
    let first = rows.start as u64;
    let tops = scan_all(&*scanner, rows, nq, shortlist, keep, threads, control)?;
    Ok(tops
        .into_iter()
        .map(|t| t.into_sorted().into_iter().map(|(s, r)| (s, r + first)).collect())
        .collect())
}

/// One pass over `rows`: threads claim chunks and keep their own top lists (of rows counted
/// from `rows.start`), merged at the end.
fn scan_all(
    scanner: &dyn Scan,
    rows: std::ops::Range<usize>,
    nq: usize,
    keep_n: usize,
    keep: Option<&[bool]>,
    threads: usize,
    control: &Control,
) -> Result<Vec<TopK>> {
    let floors: Vec<AtomicU32> = (0..nq).map(|_| AtomicU32::new(key(f32::NEG_INFINITY))).collect();
    let fresh = |_: usize| Candidates {
        tops: (0..nq).map(|_| TopK::new(keep_n)).collect(),
        floors: &floors,
        keep,
        first: rows.start,
    };
    // chunks start on blocks of 32 rows (every code layout's block), from the range's block
    let base = rows.start / 32 * 32;
    let parts = claims(rows.end - base, CHUNK_ROWS, threads, control, fresh, |found, lo, hi| {
        scanner.scan(base + lo, base + hi, found);
        control.advance(hi - lo);
        Ok(())
    })?;
    Ok(crate::topk::merge(parts.into_iter().map(|c| c.tops)).unwrap_or_default())
}

/// The given rows of the database as float32, row-major (for training and encoding).
pub(crate) fn widen_rows(db: &Database, rows: impl Iterator<Item = usize>, out: &mut Vec<f32>) {
    let dim = db.dim;
    let mut f16s = vec![half::f16::ZERO; dim];
    out.clear();
    for r in rows {
        let (bytes, dtype) = db.row(r);
        let at = out.len();
        out.resize(at + dim, 0.0);
        crate::kernels::widen(bytes, dtype, &mut out[at..], &mut f16s);
    }
}

/// `work(lo, hi)` over all rows in chunks, on `threads` threads, counting progress.
pub(crate) fn for_chunks(
    rows: usize,
    threads: usize,
    control: &Control,
    work: impl Fn(usize, usize) -> Result<()> + Sync,
) -> Result<()> {
    claims(
        rows,
        CHUNK_ROWS,
        threads,
        control,
        |_| (),
        |_, lo, hi| {
            work(lo, hi)?;
            control.advance(hi - lo);
            Ok(())
        },
    )
    .map(|_| ())
}

/// Builds the codes of `kind` for every row of `db` into `path`.
pub fn build(
    db: &Database,
    kind: Kind,
    path: &std::path::Path,
    fingerprint: &str,
    opts: &pq::Training,
    control: &Control,
) -> Result<()> {
    if fingerprint.len() > 128 {
        return Err(Error::invalid("fingerprint: at most 128 bytes"));
    }
    let header = Header {
        kind,
        dim: db.dim,
        rows: db.rows,
        fingerprint: fingerprint.to_string(),
        checksums: Vec::new(),
    };
    match kind {
        Kind::Sq8 => sq8::build(db, &header, path, opts.threads, control),
        Kind::Pq { m, .. } => {
            if !db.dim.is_multiple_of(m) {
                return Err(Error::invalid(format!(
                    "pq{m}: the dimension {} is not a multiple of {m} subquantizers",
                    db.dim
                )));
            }
            pq::build(db, &header, path, opts, control)
        }
        Kind::Progressive { .. } => Err(Error::invalid(
            "codes: progressive codes are built with their rotation (ilias.index.build_index)",
        )),
    }
}
