//! Product quantization: the dimensions are cut into `m` groups of `dim / m`, each group
//! quantized to the nearest of `2^bits` centroids learned by k-means on a sample of the store.
//! The approximate score of a query is a sum of `m` table lookups, one per group: `q_g . c_g`.
//!
//! 8-bit codes are stored row-major (`m` bytes per row) and scanned with float tables; 4-bit
//! codes are stored in blocks of 32 rows for [`super::fastscan`].

use std::path::Path;

use super::file::{CodesFile, CodesWriter, Header, Kind};
use super::kmeans::{kmeans, Codebook, Rng};
use super::{for_chunks, widen_rows, Candidates, Scan};
use crate::error::{Error, Result};
use crate::parallel::{claims, Control};
use crate::store::Database;

/// How codebooks are trained.
#[derive(Clone, Copy, Debug)]
pub struct Training {
    pub threads: usize,
    /// Rows sampled for k-means (0: 64 per centroid, at least 16,384).
    pub sample: usize,
    pub iters: usize,
    pub seed: u64,
}

impl Default for Training {
    fn default() -> Self {
        Training {
            threads: 0,
            sample: 0,
            iters: 20,
            seed: 1234,
        }
    }
}

/// Rows per 4-bit block, and bytes per subquantizer in a block (two 4-bit codes per byte).
pub const BLOCK: usize = 32;

pub fn build(db: &Database, header: &Header, path: &Path, opts: &Training, control: &Control) -> Result<()> {
    let Kind::Pq { m, bits } = header.kind else {
        unreachable!("pq::build with {:?}", header.kind)
    };
    if bits == 4 && m > 256 {
        return Err(Error::invalid(format!(
            "pq{m}x4: at most 256 subquantizers (16-bit sums)"
        )));
    }
    let (dim, ksub) = (db.dim, 1usize << bits);
    let dsub = dim / m;
    let sample = if opts.sample == 0 {
        (64 * ksub).max(16384)
    } else {
        opts.sample
    };
    let rows = Rng::new(opts.seed).sample(db.rows, sample);
    let mut points = Vec::new();
    widen_rows(db, rows.iter().copied(), &mut points);
    let n = rows.len();

    // each subquantizer's k-means is independent: threads take them in turn
    let books = claims(
        m,
        1,
        opts.threads,
        control,
        |_| Vec::new(),
        |done, g, _| {
            let sub: Vec<f32> = (0..n)
                .flat_map(|r| &points[r * dim + g * dsub..r * dim + (g + 1) * dsub])
                .copied()
                .collect();
            let mut rng = Rng::new(opts.seed ^ (g as u64).wrapping_mul(0x9E37_79B9));
            done.push((g, kmeans(&sub, dsub, ksub, opts.iters, &mut rng)));
            Ok(())
        },
    )?;
    let mut centroids = vec![0f32; m * ksub * dsub];
    for (g, book) in books.into_iter().flatten() {
        centroids[g * ksub * dsub..(g + 1) * ksub * dsub].copy_from_slice(&book);
    }
    let writer = CodesWriter::create(path, header)?;
    writer.write(
        0,
        0,
        &centroids.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(),
    )?;
    let books: Vec<Codebook> = centroids.chunks(ksub * dsub).map(|c| Codebook::new(c, dsub)).collect();
    let m_even = m.next_multiple_of(2);
    for_chunks(db.rows, opts.threads, control, |lo, hi| {
        let mut widened = Vec::new();
        widen_rows(db, lo..hi, &mut widened);
        let mut codes = vec![0u8; (hi - lo) * m];
        let mut dist = Vec::new();
        for (x, code) in widened.chunks_exact(dim).zip(codes.chunks_exact_mut(m)) {
            for (g, (c, book)) in code.iter_mut().zip(&books).enumerate() {
                // NaN or Inf rows get some code; rescoring gives their exact score
                *c = book.nearest(&x[g * dsub..(g + 1) * dsub], &mut dist) as u8;
            }
        }
        if bits == 8 {
            return writer.write(1, lo * m, &codes);
        }
        // blocks of 32 rows: for subquantizer g, byte j holds row j (low nibble) and row j + 16
        let blocks = (hi - lo).div_ceil(BLOCK);
        let mut packed = vec![0u8; blocks * m_even * 16];
        for (r, code) in codes.chunks_exact(m).enumerate() {
            let (b, lane) = (r / BLOCK, r % BLOCK);
            for (g, &c) in code.iter().enumerate() {
                let byte = &mut packed[(b * m_even + g) * 16 + lane % 16];
                *byte |= if lane < 16 { c } else { c << 4 };
            }
        }
        writer.write(1, lo / BLOCK * m_even * 16, &packed)
    })?;
    writer.finish(opts.threads)
}

/// The float tables of all queries: `tables[q][g][c] = q_g . centroid_g[c]`.
pub fn tables(file: &CodesFile, queries: &[f32], nq: usize) -> (Vec<f32>, usize, usize) {
    let Kind::Pq { m, bits } = file.header.kind else {
        unreachable!()
    };
    let (dim, ksub) = (file.header.dim, 1usize << bits);
    let dsub = dim / m;
    let centroids: &[f32] = file.words(0);
    let mut out = vec![0f32; nq * m * ksub];
    for q in 0..nq {
        for g in 0..m {
            let x = &queries[q * dim + g * dsub..q * dim + (g + 1) * dsub];
            for c in 0..ksub {
                let cent = &centroids[(g * ksub + c) * dsub..(g * ksub + c + 1) * dsub];
                out[(q * m + g) * ksub + c] = cent.iter().zip(x).map(|(a, b)| a * b).sum();
            }
        }
    }
    (out, m, ksub)
}

/// Scans 8-bit codes with float tables.
pub struct PqScan<'a> {
    codes: &'a [u8],
    tables: Vec<f32>,
    m: usize,
}

/// Rows scored per query before moving to the next query (their codes stay in L1).
const TILE: usize = 256;

impl<'a> PqScan<'a> {
    pub fn new(file: &'a CodesFile, queries: &[f32], nq: usize) -> PqScan<'a> {
        let (tables, m, _) = tables(file, queries, nq);
        PqScan {
            codes: file.bytes(1),
            tables,
            m,
        }
    }
}

impl Scan for PqScan<'_> {
    fn scan(&self, lo: usize, hi: usize, found: &mut Candidates) {
        let m = self.m;
        let mut scores = [0f32; TILE];
        for t0 in (lo..hi).step_by(TILE) {
            let t1 = (t0 + TILE).min(hi);
            let codes = &self.codes[t0 * m..t1 * m];
            let n = t1 - t0;
            for (q, table) in self.tables.chunks_exact(m * 256).enumerate() {
                // subquantizer by subquantizer: the rows' sums are independent chains
                scores[..n].fill(0.0);
                for (g, t) in table.chunks_exact(256).enumerate() {
                    for (s, code) in scores[..n].iter_mut().zip(codes.chunks_exact(m)) {
                        *s += t[code[g] as usize];
                    }
                }
                found.offer(q, &scores[..n], t0);
            }
        }
    }
}
