//! Progressive codes for exact search: int8 codes of rotated rows in dimension blocks, read a
//! block at a time while a rigorous bound still lets a (query, row) pair reach the top k.
//!
//! Built once from a database with an orthogonal rotation `R` (the principal axes of the
//! database's second moment, learned on a sample: most of a real embedding's energy then sits
//! in its first dimensions). Per row `x`, `y = R x` (float32, the canonical block kernel) is
//! split at the stage boundaries `b_1 < ... < b_S`. Its first `HEAD` values (the leading axes,
//! which hold most of its magnitude, the shared mean direction of CLIP-like embeddings above
//! all) are kept in float32 and scored exactly; every block `y_j` after them gets its own scale
//! and int8 codes (`y_j = s_j c_j + e_j`), and per stage `s` the row keeps
//! `E_s >= |e_{<=s}|`, `H_s >= |s c_{<=s}|` and `T_s >= |y_{>s}|` (the tail, to the last
//! dimension). A query `q` is rotated once (`a = R q`, in f64, rounded to float32) and its
//! blocks quantized to 7-bit codes (`a_j = t_j u_j + f_j`, `|u| <= 63`, so that the AVX2
//! `maddubs` product never saturates). After stage `s`, by Cauchy-Schwarz on each part,
//!
//! `q . x <= a_h . y_h + sum_{j<=s} t_j s_j (u_j . c_j) + |a_{<=s}| E_s + |f_{<=s}| H_s + |a_{>s}| T_s + |q| G_x`
//!
//! (`a_h . y_h`: the head in float32; `a_{<=s}` the quantized part up to `b_s`)
//!
//! where `G_x = (gamma_d + 64u + eta) |x|` covers the float32 rounding of the exact score
//! (`gamma_d`), of this bound's own arithmetic (`64u`: a few roundings of terms each below
//! `|q| |x|`) and of the rotation itself (`eta`: `R` is orthogonal only up to `|R^T R - I|`,
//! and `y`, `a` carry the rounding of their computation; all computed at build time).
//! Every term is rounded up and inflated by `1 + 1e-3`. A pair whose bound falls below the
//! query's current k-th exact score cannot enter its top k; the pairs that pass the last stage
//! are scored exactly from the float16 store by exact search's single-pair kernel, so results
//! are those of the float32 path, bit for bit.
//!
//! Layout (sections of the codes file): parameters and `R`; the codes, stage after stage (a
//! stage reads only its own bytes): the first stage in the int8 kernel's panels of 32 rows
//! `[panel][w/4][32][4]`, as it scores every pair block by block, the later stages row by row
//! `[row][w]`, as they score only the pairs that survive, one at a time, from contiguous codes;
//! the terms, stage after stage, `[panel][6][32]` float32 (scale, code sum, E, H, T, G), then
//! the heads `[panel][HEAD][32]`; one `store::block_hash` per row, so that a search that reads
//! a row of the store (to rescore it) checks it without reading the others. Rows are numbered
//! per shard, each shard padded to whole blocks of 128, as exact search's tiles are.

use std::path::Path;

use super::file::{CodesFile, CodesWriter, Header, Kind};
use crate::error::{Error, Result};
use crate::kernels::int8::{self, Int8Kernel, MR, NR};
use crate::kernels::{pack_queries, padded, widen_tile, Simd};
use crate::parallel::{claims, Control};
use crate::store::{block_hash, Database, CHECK_ROWS};

/// At most this many stages; boundaries are multiples of `STEP`, blocks at most `MAX_WIDTH`
/// wide (integer products stay exact in float32: 63 * 127 * 1024 < 2^24).
pub const MAX_STAGES: usize = 4;
pub const STEP: usize = 32;
pub const MAX_WIDTH: usize = 1024;
/// float32 words before the rotation in the parameters section.
pub const PARAM_WORDS: usize = 64;
const MAX_META: usize = PARAM_WORDS - 7;
/// Terms per row and stage: scale, code sum (i32 bits), E, H, T, G.
pub const TERMS: usize = 6;
/// The first rotated dimensions, kept in float32 and scored exactly: the leading principal
/// axes (a shared mean direction above all) hold most of a row's magnitude, and a block scale
/// set by them would quantize the rest of the first block coarsely.
pub const HEAD: usize = 8;
/// What the progressive pass costs, in units of one product of the first stage's block kernel
/// (per pair and dimension); measured on the 1M x 768 bench data with AVX2 (perf profiles and
/// timed builds of several boundaries). The build's planner (`ilias.index`) chooses the stages
/// with it and the search uses it to step aside for float32 where the pass does not pay (the
/// first rows, before the thresholds rise).
#[derive(Clone, Copy, Debug)]
pub struct Costs {
    /// Per pair of the first stage: its bound, on top of its products.
    pub mask: f64,
    /// Per pair entering a later stage, scored on its own from the row's contiguous codes (its
    /// terms out of cache, a branch), plus `pair_dim` per dimension.
    pub pair: f64,
    pub pair_dim: f64,
    /// Per dimension of a pair rescored exactly from the float16 store (the row, the float32
    /// query and its top-k list come from cache or memory).
    pub rescore: f64,
    /// Per dimension of a pair of the float32 block kernel (FMA against `maddubs`; the VNNI
    /// kernels widen the gap).
    pub float: f64,
}

pub const COSTS: Costs = Costs {
    mask: 64.0,
    pair: 1500.0,
    pair_dim: 4.0,
    rescore: 16.0,
    float: 2.7,
};

impl Costs {
    /// The work of `entered[j]` pairs entering stages of `widths`, then `rescored` pairs of
    /// `dim` dimensions rescored: counted by the search, expected shares of a pair by the
    /// build's planner.
    pub fn work(&self, entered: &[f64], widths: &[usize], rescored: f64, dim: usize) -> f64 {
        let stages: f64 = entered
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(j, (&n, &w))| {
                let per = if j == 0 {
                    w as f64 + self.mask
                } else {
                    self.pair + self.pair_dim * w as f64
                };
                n * per
            })
            .sum();
        stages + rescored * self.rescore * dim as f64
    }
}

/// Query codes: `u + QOFF` with `|u| <= QMAX`.
const QMAX: f64 = 63.0;
pub const QOFF: i32 = 64;

const U: f64 = 1.0 / (1u64 << 24) as f64;
const SLACK: f64 = 1.0 + 1e-3;

/// `n u / (1 - n u)` plus the 32u of a few more roundings (as `int8::gamma`).
fn gamma(n: usize) -> f64 {
    let v = n as f64 * U;
    v / (1.0 - v) + 32.0 * U
}

/// The smallest float32 not below `v`.
fn round_up(v: f64) -> f32 {
    let f = v as f32;
    if (f as f64) < v {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f
    }
}

/// Section sizes of a progressive codes file.
pub fn sections(dim: usize, stages: usize, depth: usize, blocks: usize) -> Option<Vec<usize>> {
    let rows = blocks.checked_mul(CHECK_ROWS)?;
    Some(vec![
        (PARAM_WORDS + dim.checked_mul(dim)?) * 4,
        rows.checked_mul(depth.checked_sub(HEAD)?)?,
        rows.checked_mul((stages * TERMS + HEAD) * 4)?,
        rows.checked_mul(8)?,
    ])
}

/// Which int8 kernel computes the stage products (all give the same integers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StageKernel {
    Vnni512,
    AvxVnni,
    /// AVX2 `maddubs` (7-bit query codes never saturate its 16-bit pair sums).
    Avx2,
    Scalar,
}

impl StageKernel {
    /// The fastest kernel that goes with the float32 path `simd`.
    pub fn for_simd(simd: Simd) -> StageKernel {
        let candidates: &[StageKernel] = match simd {
            Simd::Avx512 => &[StageKernel::Vnni512, StageKernel::AvxVnni, StageKernel::Avx2],
            Simd::Avx2 => &[StageKernel::AvxVnni, StageKernel::Avx2],
            Simd::Scalar => &[],
        };
        candidates
            .iter()
            .copied()
            .find(|k| k.supported())
            .unwrap_or(StageKernel::Scalar)
    }

    pub fn supported(self) -> bool {
        match self {
            StageKernel::Vnni512 => Int8Kernel::Vnni512.supported(),
            StageKernel::AvxVnni => Int8Kernel::AvxVnni.supported(),
            #[cfg(target_arch = "x86_64")]
            StageKernel::Avx2 => is_x86_feature_detected!("avx2"),
            StageKernel::Scalar => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StageKernel::Vnni512 => "avx512-vnni",
            StageKernel::AvxVnni => "avx-vnni",
            StageKernel::Avx2 => "avx2",
            StageKernel::Scalar => "scalar",
        }
    }

    fn require(self) {
        assert!(
            self.supported(),
            "the {} stage kernel needs CPU features this machine lacks",
            self.name()
        );
    }

    /// The `MR x NR` integer products of query codes `a` (`[d4][MR][4]`, at most 127) and a
    /// panel `b` (`[d4][NR][4]`).
    pub fn block(self, a: &[u8], b: &[i8], d4: usize, out: &mut [i32; MR * NR]) {
        assert!(a.len() >= d4 * MR * 4 && b.len() >= d4 * NR * 4);
        self.require();
        match self {
            StageKernel::Vnni512 => Int8Kernel::Vnni512.block(a, b, d4, out, NR),
            StageKernel::AvxVnni => Int8Kernel::AvxVnni.block(a, b, d4, out, NR),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: lengths asserted above, AVX2 checked by `require`.
            StageKernel::Avx2 => unsafe { avx2::block(a.as_ptr(), b.as_ptr(), d4, out) },
            _ => Int8Kernel::Scalar.block(a, b, d4, out, NR),
        }
    }

    /// `sum a[i] b[i]` over one row's codes of a later stage, `a` at most 127.
    pub fn dot(self, a: &[u8], b: &[i8]) -> i32 {
        assert!(a.len() == b.len());
        self.require();
        let plain = |a: &[u8], b: &[i8]| a.iter().zip(b).map(|(&x, &y)| x as i32 * y as i32).sum::<i32>();
        match self {
            #[cfg(target_arch = "x86_64")]
            StageKernel::Vnni512 | StageKernel::AvxVnni | StageKernel::Avx2 => {
                let split = a.len() / 32 * 32;
                // SAFETY: both hold at least `split` bytes, a multiple of 32; AVX2 is available
                // on every x86 kernel but the scalar one (`require`).
                let head = unsafe { avx2::dot(a.as_ptr(), b.as_ptr(), split) };
                head + plain(&a[split..], &b[split..])
            }
            _ => plain(a, b),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// # Safety
    /// AVX2 available; `a` holds `d4 * MR * 4` bytes (each at most 127), `b` `d4 * NR * 4`.
    #[target_feature(enable = "avx2")]
    pub unsafe fn block(a: *const u8, b: *const i8, d4: usize, out: &mut [i32; MR * NR]) {
        let ones = _mm256_set1_epi16(1);
        for part in 0..4 {
            let (q0, r0) = (part / 2 * 4, part % 2 * 16);
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            for t in 0..d4 {
                // SAFETY: t < d4: inside both code arrays.
                let b0 = _mm256_loadu_si256(b.add(t * NR * 4 + r0 * 4) as *const _);
                let b1 = _mm256_loadu_si256(b.add(t * NR * 4 + r0 * 4 + 32) as *const _);
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32((a.add((t * MR + q0 + i) * 4) as *const i32).read_unaligned());
                    // u8 <= 127 times i8: pair sums within +-32,258, no saturation
                    let p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b0), ones);
                    let p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(av, b1), ones);
                    row[0] = _mm256_add_epi32(row[0], p0);
                    row[1] = _mm256_add_epi32(row[1], p1);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                // SAFETY: `out` holds MR rows of NR values; r0 + 16 <= NR.
                _mm256_storeu_si256(out.as_mut_ptr().add((q0 + i) * NR + r0) as *mut _, row[0]);
                _mm256_storeu_si256(out.as_mut_ptr().add((q0 + i) * NR + r0 + 8) as *mut _, row[1]);
            }
        }
    }

    /// # Safety
    /// AVX2 available; `a` and `b` hold `n` bytes, `n` a multiple of 32, `a` at most 127.
    #[target_feature(enable = "avx2")]
    pub unsafe fn dot(a: *const u8, b: *const i8, n: usize) -> i32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        for c in (0..n).step_by(32) {
            // SAFETY: c + 32 <= n.
            let va = _mm256_loadu_si256(a.add(c) as *const _);
            let vb = _mm256_loadu_si256(b.add(c) as *const _);
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(va, vb), ones));
        }
        let s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b01_00_11_10));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0b10_11_00_01));
        _mm_cvtsi128_si32(s)
    }
}

/// The rotation's error terms: `eta` such that `|q . x - (R q)~ . (R x)~| <= eta |q| |x|` for
/// the computed (rounded) rotations, from `|R R^T - I|_F` and `|R|_F` (computed in f64).
pub fn rotation_slack(r: &[f32], dim: usize) -> f64 {
    let (mut off2, mut fro2) = (0f64, 0f64);
    for i in 0..dim {
        let ri = &r[i * dim..(i + 1) * dim];
        fro2 += ri.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        for j in i..dim {
            let rj = &r[j * dim..(j + 1) * dim];
            let dot: f64 = ri.iter().zip(rj).map(|(&a, &b)| a as f64 * b as f64).sum();
            let v = dot - if i == j { 1.0 } else { 0.0 };
            off2 += if i == j { v * v } else { 2.0 * v * v };
        }
    }
    // f64 rounding of these sums (relative d 2^-53 of sums near 1): far below the 1e-9 added
    let e = off2.sqrt() + 1e-9;
    let fro = fro2.sqrt() * (1.0 + 1e-9);
    let sigma = (1.0 + e).sqrt();
    // rows: the float32 block kernel (16 lanes of dp/16 fused or rounded products, a 4-level
    // tree), then Cauchy-Schwarz per output: |y - R x| <= gamma_m |R|_F |x|
    let rho_x = gamma(padded(dim) / 16 + 6) * fro;
    // queries: f64 sums rounded once to float32
    let rho_q = 1.01 * U * (sigma + rho_x) + dim as f64 * 2f64.powi(-52) * fro;
    (e + rho_q * (sigma + rho_x) + sigma * (1.0 + rho_q) * rho_x + rho_q * rho_x) * 1.01
}

/// What the parameters section says.
#[derive(Clone, Debug)]
pub struct Params {
    pub bounds: Vec<usize>,
    pub eta: f32,
    /// What the build measured (for reports): see `ilias.index`.
    pub meta: Vec<f32>,
}

impl Params {
    pub fn read(file: &CodesFile) -> Result<Params> {
        let w: &[f32] = file.words(0);
        let bad = |m: &str| Error::format(&file.path, format!("corrupt progressive parameters: {m}"));
        let stages = w[0] as usize;
        if stages == 0 || stages > MAX_STAGES {
            return Err(bad("stages"));
        }
        let bounds: Vec<usize> = w[1..1 + stages].iter().map(|&v| v as usize).collect();
        let n_meta = w[6] as usize;
        if n_meta > MAX_META || check_bounds(&bounds, file.header.dim).is_err() {
            return Err(bad("boundaries"));
        }
        Ok(Params {
            bounds,
            eta: w[5],
            meta: w[7..7 + n_meta].to_vec(),
        })
    }
}

fn check_bounds(bounds: &[usize], dim: usize) -> Result<()> {
    let ok = !bounds.is_empty()
        && bounds.len() <= MAX_STAGES
        && bounds.iter().all(|b| b.is_multiple_of(STEP))
        && bounds.last().is_some_and(|&b| b <= dim)
        && bounds
            .iter()
            .scan(0, |prev, &b| {
                let w = b.checked_sub(*prev);
                *prev = b;
                Some(w)
            })
            .all(|w| w.is_some_and(|w| w > 0 && w <= MAX_WIDTH));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "boundaries: {bounds:?} must be 1 to {MAX_STAGES} increasing multiples of {STEP}, at most {dim} (the dimension), blocks at most {MAX_WIDTH} wide"
        )))
    }
}

/// Per shard, the index of its first block of 128 rows among all shards' blocks.
fn block_starts(db: &Database) -> (Vec<usize>, usize) {
    let mut at = 0;
    let starts = db
        .shards
        .iter()
        .map(|s| {
            let b = at;
            at += s.rows.div_ceil(CHECK_ROWS);
            b
        })
        .collect();
    (starts, at)
}

/// Builds progressive codes of every row of `db` into `path`, with the rotation `rotation`
/// (`dim x dim`, row `i` the `i`-th axis) and the stage `bounds`; `meta` is recorded as is.
#[allow(clippy::too_many_arguments)]
pub fn build(
    db: &Database,
    path: &Path,
    fingerprint: &str,
    rotation: &[f32],
    bounds: &[usize],
    meta: &[f32],
    threads: usize,
    control: &Control,
) -> Result<()> {
    let dim = db.dim;
    if fingerprint.len() > 128 {
        return Err(Error::invalid("fingerprint: at most 128 bytes"));
    }
    if rotation.len() != dim * dim || rotation.iter().any(|v| !v.is_finite()) {
        return Err(Error::invalid(format!(
            "rotation: expected {dim} x {dim} finite values, got {}",
            rotation.len()
        )));
    }
    check_bounds(bounds, dim)?;
    if meta.len() > MAX_META {
        return Err(Error::invalid(format!("meta: at most {MAX_META} values")));
    }
    let eta = rotation_slack(rotation, dim);
    if eta.is_nan() || eta >= 0.01 {
        return Err(Error::invalid(format!(
            "rotation: not orthogonal (|R R^T - I| gives a slack of {eta:.3e})"
        )));
    }
    let (starts, blocks) = block_starts(db);
    let stages = bounds.len();
    let depth = bounds[stages - 1];
    let header = Header {
        kind: Kind::Progressive { stages, depth, blocks },
        dim,
        rows: db.rows,
        fingerprint: fingerprint.to_string(),
        checksums: Vec::new(),
    };
    let writer = CodesWriter::create(path, &header)?;
    let mut params = vec![0f32; PARAM_WORDS];
    params[0] = stages as f32;
    for (p, &b) in params[1..].iter_mut().zip(bounds) {
        *p = b as f32;
    }
    params[5] = round_up(eta);
    params[6] = meta.len() as f32;
    params[7..7 + meta.len()].copy_from_slice(meta);
    params.extend_from_slice(rotation);
    writer.write(0, 0, &params.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())?;

    let simd = Simd::detect();
    let packed = pack_queries(rotation, dim, dim, simd.mr());
    // work items: up to 16 blocks of one shard
    let items: Vec<(usize, usize)> = db
        .shards
        .iter()
        .enumerate()
        .flat_map(|(s, sh)| (0..sh.rows.div_ceil(CHECK_ROWS)).step_by(16).map(move |b| (s, b)))
        .collect();
    let g_all = gamma(dim) + 64.0 * U + eta;
    let total_rows = blocks * CHECK_ROWS;
    claims(
        items.len(),
        1,
        threads,
        control,
        |_| (Vec::new(), Vec::new(), Vec::new(), Vec::new()),
        |(wide, f16s, out, y), i, _| {
            let (s, b0) = items[i];
            let shard = &db.shards[s];
            let b1 = (b0 + 16).min(shard.rows.div_ceil(CHECK_ROWS));
            let (dp, mr, nr) = (padded(dim), simd.mr(), simd.nr());
            let rows_here = (b1 - b0) * CHECK_ROWS;
            let first = (starts[s] + b0) * CHECK_ROWS;
            let mut codes: Vec<Vec<u8>> = (0..stages).map(|j| vec![0u8; rows_here * width(bounds, j)]).collect();
            let mut terms: Vec<Vec<f32>> = (0..stages).map(|_| vec![0f32; rows_here * TERMS]).collect();
            let mut head = vec![0f32; rows_here * HEAD];
            let mut hashes = vec![0u8; rows_here * 8];
            for b in b0..b1 {
                let (lo, hi) = (b * CHECK_ROWS, ((b + 1) * CHECK_ROWS).min(shard.rows));
                let bytes = shard.row_bytes(lo, hi);
                for r in lo..hi {
                    let at = (r - b0 * CHECK_ROWS) * 8;
                    hashes[at..at + 8].copy_from_slice(&block_hash(shard.row_bytes(r, r + 1), r as u64).to_le_bytes());
                }
                widen_tile(bytes, shard.dtype, dim, nr, wide, f16s);
                let n = hi - lo;
                out.resize(mr * CHECK_ROWS, 0f32);
                y.resize(n * dim, 0f32);
                for qb in 0..dim.div_ceil(mr) {
                    let a = &packed[qb * mr * dp..(qb + 1) * mr * dp];
                    for rb in 0..n.div_ceil(nr) {
                        simd.block(
                            a,
                            &wide[rb * nr * dp..(rb + 1) * nr * dp],
                            dp,
                            &mut out[rb * nr..],
                            CHECK_ROWS,
                        );
                    }
                    for i in 0..mr.min(dim - qb * mr) {
                        for r in 0..n {
                            y[r * dim + qb * mr + i] = out[i * CHECK_ROWS + r];
                        }
                    }
                }
                for r in 0..n {
                    let at = (b - b0) * CHECK_ROWS + r;
                    let xnorm = wide[r * dp..r * dp + dim]
                        .iter()
                        .map(|&v| v as f64 * v as f64)
                        .sum::<f64>()
                        .sqrt();
                    encode(
                        &y[r * dim..(r + 1) * dim],
                        xnorm,
                        g_all,
                        bounds,
                        at,
                        &mut codes,
                        &mut terms,
                        &mut head,
                    );
                }
            }
            for j in 0..stages {
                writer.write(
                    1,
                    total_rows * (bounds_before(bounds, j) - HEAD) + first * width(bounds, j),
                    &codes[j],
                )?;
                let tb: Vec<u8> = terms[j].iter().flat_map(|v| v.to_le_bytes()).collect();
                writer.write(2, (total_rows * j + first) * TERMS * 4, &tb)?;
            }
            let hb: Vec<u8> = head.iter().flat_map(|v| v.to_le_bytes()).collect();
            writer.write(2, (total_rows * stages * TERMS + first * HEAD) * 4, &hb)?;
            writer.write(3, first * 8, &hashes)?;
            // as a search does: the rows read are dropped from the resident set (else it grows
            // to the whole store)
            shard.release(b0 * CHECK_ROWS, (b1 * CHECK_ROWS).min(shard.rows));
            control.advance((b1 * CHECK_ROWS).min(shard.rows) - b0 * CHECK_ROWS);
            Ok(())
        },
    )?;
    writer.finish(threads)
}

/// Where stage `j`'s quantized block starts (the first after the float32 head).
fn bounds_before(bounds: &[usize], j: usize) -> usize {
    if j == 0 {
        HEAD
    } else {
        bounds[j - 1]
    }
}

fn width(bounds: &[usize], j: usize) -> usize {
    bounds[j] - bounds_before(bounds, j)
}

/// Codes and terms of one rotated row `y` (of norm `xnorm` before rotation) at row `at` of a
/// work item (a whole number of panels): the first stage's codes in panels `[panel][w/4][32][4]`,
/// the later stages' `[row][w]`, terms `[panel][TERMS][32]`.
#[allow(clippy::too_many_arguments)]
fn encode(
    y: &[f32],
    xnorm: f64,
    g_all: f64,
    bounds: &[usize],
    at: usize,
    codes: &mut [Vec<u8>],
    terms: &mut [Vec<f32>],
    head: &mut [f32],
) {
    let (p, lane) = (at / NR, at % NR);
    let mut block = vec![0i8; MAX_WIDTH];
    let (mut e2, mut h2) = (0f64, 0f64);
    let mut tail2: f64 = y[bounds[0]..].iter().map(|&v| v as f64 * v as f64).sum();
    let ytot = y.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
    let finite = xnorm.is_finite() && y.iter().all(|v| v.is_finite());
    for (c, &v) in y[..HEAD].iter().enumerate() {
        head[(p * HEAD + c) * NR + lane] = if finite { v } else { 0.0 };
    }
    for j in 0..bounds.len() {
        let (lo, w) = (bounds_before(bounds, j), width(bounds, j));
        if j > 0 {
            tail2 -= y[lo..bounds[j]].iter().map(|&v| v as f64 * v as f64).sum::<f64>();
        }
        let t = &mut terms[j][p * TERMS * NR..(p + 1) * TERMS * NR];
        let sums = if finite {
            int8::quantize_block(&y[lo..lo + w], &mut block[..w])
        } else {
            None
        };
        let Some(sm) = sums else {
            // NaN or Inf: no bound holds, the row is rescored whenever a query meets it
            t[lane] = 0.0;
            t[NR + lane] = 0.0;
            t[2 * NR + lane] = f32::INFINITY;
            for f in 3..TERMS {
                t[f * NR + lane] = 0.0;
            }
            continue;
        };
        let g = gamma(w);
        let infl = 1.0 + 2.0 * g;
        // the residual as computed, plus the rounding of computing it (<= 4u |y_j|)
        let e = sm.e2.sqrt() * infl + 4.0 * U * sm.x2.sqrt() * infl;
        e2 += e * e;
        h2 += sm.h2 * infl * infl;
        if j == 0 {
            let c = &mut codes[0][p * w * NR..(p + 1) * w * NR];
            for (d4, quad) in block[..w].chunks_exact(4).enumerate() {
                for (l, &v) in quad.iter().enumerate() {
                    c[(d4 * NR + lane) * 4 + l] = v as u8;
                }
            }
        } else {
            codes[j][at * w..(at + 1) * w]
                .iter_mut()
                .zip(&block[..w])
                .for_each(|(c, &v)| *c = v as u8);
        }
        t[lane] = sm.scale;
        t[NR + lane] = f32::from_bits(sm.sum as u32);
        t[2 * NR + lane] = round_up(e2.sqrt() * SLACK);
        t[3 * NR + lane] = round_up(h2.sqrt() * SLACK);
        // the tail: a difference of sums can lose a little; 1e-6 of |y| covers it
        t[4 * NR + lane] = round_up((tail2.max(0.0).sqrt() + 1e-6 * ytot) * SLACK);
        t[5 * NR + lane] = round_up(g_all * xnorm * SLACK);
    }
}

/// Progressive codes opened for a search of `db`.
pub struct Progressive<'a> {
    pub params: Params,
    pub kernel: StageKernel,
    file: Option<&'a CodesFile>,
    /// From the first row (tests, `--method progressive`), else only where it pays.
    pub forced: bool,
    pub rotation: &'a [f32],
    codes: &'a [u8],
    terms: &'a [f32],
    hashes: &'a [u8],
    /// Per shard, its first block among all blocks.
    pub block_starts: Vec<usize>,
    rows: usize,
}

impl<'a> Progressive<'a> {
    pub fn open(file: &'a CodesFile, db: &Database, kernel: StageKernel, forced: bool) -> Result<Progressive<'a>> {
        let h = &file.header;
        let (starts, blocks) = block_starts(db);
        let Kind::Progressive { blocks: b, .. } = h.kind else {
            return Err(Error::format(
                &file.path,
                format!("{} codes are not progressive codes", h.kind.name()),
            ));
        };
        if h.dim != db.dim || h.rows != db.rows || b != blocks {
            return Err(Error::format(
                &file.path,
                format!(
                    "codes of {} rows x {} dims do not belong to this database of {} rows x {} dims",
                    h.rows, h.dim, db.rows, db.dim
                ),
            ));
        }
        if !kernel.supported() {
            return Err(Error::invalid(format!(
                "this CPU cannot run the {} kernel",
                kernel.name()
            )));
        }
        let params = Params::read(file)?;
        let words: &[f32] = file.words(0);
        Ok(Progressive {
            params,
            kernel,
            file: Some(file),
            forced,
            rotation: &words[PARAM_WORDS..],
            codes: file.bytes(1),
            terms: file.words(2),
            hashes: file.bytes(3),
            block_starts: starts,
            rows: blocks * CHECK_ROWS,
        })
    }

    pub fn stages(&self) -> usize {
        self.params.bounds.len()
    }

    pub fn width(&self, j: usize) -> usize {
        width(&self.params.bounds, j)
    }

    /// Stage `j`'s codes of panel `p` (a global panel of 32 padded rows): `[w/4][32][4]` for the
    /// first stage, `[32][w]` for the others.
    #[inline]
    pub fn panel_codes(&self, j: usize, p: usize) -> &[i8] {
        let w = self.width(j);
        let at = self.rows * (bounds_before(&self.params.bounds, j) - HEAD) + p * w * NR;
        as_i8(&self.codes[at..at + w * NR])
    }

    /// Stage `j`'s terms of panel `p`: `[TERMS][32]`.
    #[inline]
    pub fn panel_terms(&self, j: usize, p: usize) -> &[f32] {
        let at = (self.rows * j + p * NR) * TERMS;
        &self.terms[at..at + TERMS * NR]
    }

    /// Drops the codes, terms and hashes of padded rows `lo..hi` from the resident set.
    pub fn release(&self, lo: usize, hi: usize) {
        let Some(file) = self.file else {
            return;
        };
        for j in 0..self.stages() {
            let (w, at) = (
                self.width(j),
                self.rows * (bounds_before(&self.params.bounds, j) - HEAD),
            );
            file.release(1, at + lo * w, at + hi * w);
            file.release(2, (self.rows * j + lo) * TERMS * 4, (self.rows * j + hi) * TERMS * 4);
        }
        let at = self.rows * self.stages() * TERMS * 4;
        file.release(2, at + lo * HEAD * 4, at + hi * HEAD * 4);
        file.release(3, lo * 8, hi * 8);
    }

    /// The float32 head of panel `p`: `[HEAD][32]`.
    #[inline]
    pub fn panel_head(&self, p: usize) -> &[f32] {
        let at = self.rows * self.stages() * TERMS + p * HEAD * NR;
        &self.terms[at..at + HEAD * NR]
    }

    /// The recorded hash of padded row `r` (`store::block_hash` of the row, with its row number
    /// in its shard as index).
    pub fn row_hash(&self, r: usize) -> u64 {
        u64::from_le_bytes(self.hashes[r * 8..r * 8 + 8].try_into().expect("8 bytes"))
    }

    /// Rotates and quantizes the queries (on `threads` threads).
    pub fn queries(&self, queries: &[f32], nq: usize, threads: usize, control: &Control) -> Result<StageQueries> {
        let dim = self.rotation.len().max(1).isqrt();
        let bounds = &self.params.bounds;
        let stages = bounds.len();
        let parts = claims(
            nq,
            64,
            threads,
            control,
            |_| Vec::new(),
            |out: &mut Vec<(usize, Vec<f32>)>, lo, hi| {
                for q in lo..hi {
                    let x = &queries[q * dim..(q + 1) * dim];
                    let a: Vec<f32> = self
                        .rotation
                        .chunks_exact(dim)
                        .map(|r| {
                            let mut acc = [0f64; 4];
                            let mut it = r.chunks_exact(4).zip(x.chunks_exact(4));
                            for (rr, xx) in &mut it {
                                for l in 0..4 {
                                    acc[l] += rr[l] as f64 * xx[l] as f64;
                                }
                            }
                            let tail: f64 = r[dim / 4 * 4..]
                                .iter()
                                .zip(&x[dim / 4 * 4..])
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum();
                            (acc[0] + acc[1] + acc[2] + acc[3] + tail) as f32
                        })
                        .collect();
                    out.push((q, a));
                }
                Ok(())
            },
        )?;
        let blocks = nq.div_ceil(MR);
        let mut sq = StageQueries {
            first: vec![QOFF as u8; blocks * self.width(0) * MR],
            rows: (0..stages).map(|j| vec![QOFF as u8; nq * self.width(j)]).collect(),
            head: vec![[0f32; HEAD]; nq],
            consts: vec![[[0f32; 4]; MAX_STAGES]; nq],
            scale: vec![[0f32; MAX_STAGES]; nq],
            norm: vec![0f32; nq],
        };
        for (q, a) in parts.into_iter().flatten() {
            let x = &queries[q * dim..(q + 1) * dim];
            sq.norm[q] = round_up(x.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt() * SLACK);
            let total: f64 = a.iter().map(|&v| v as f64 * v as f64).sum();
            let head2: f64 = a[..HEAD].iter().map(|&v| v as f64 * v as f64).sum();
            sq.head[q].copy_from_slice(&a[..HEAD]);
            let (mut lo2, mut f2) = (0f64, 0f64);
            for j in 0..stages {
                let (b0, w) = (bounds_before(bounds, j), self.width(j));
                let block = &a[b0..b0 + w];
                let maxabs = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let t = (maxabs as f64 / QMAX) as f32;
                let inv = if t > 0.0 && (1.0 / t as f64).is_finite() {
                    1.0 / t as f64
                } else {
                    0.0
                };
                for (d, &v) in block.iter().enumerate() {
                    let u = (v as f64 * inv).round().clamp(-QMAX, QMAX);
                    let code = (u as i32 + QOFF) as u8;
                    let (b, i) = (q / MR, q % MR);
                    if j == 0 {
                        sq.first[((b * (w / 4) + d / 4) * MR + i) * 4 + d % 4] = code;
                    }
                    sq.rows[j][q * w + d] = code;
                    // exact in f64: t has 24 bits, u 7
                    let f = v as f64 - t as f64 * u;
                    f2 += f * f;
                    lo2 += v as f64 * v as f64;
                }
                sq.scale[q][j] = t;
                let hi2 = (total - head2 - lo2).max(0.0);
                sq.consts[q][j] = [
                    round_up(lo2.sqrt() * SLACK),
                    round_up(f2.sqrt() * SLACK),
                    round_up((hi2.sqrt() + 1e-6 * total.sqrt()) * SLACK),
                    sq.norm[q],
                ];
            }
        }
        Ok(sq)
    }
}

/// Rotated, quantized queries: the first stage's codes in the int8 kernel's blocks
/// `[block][w/4][MR][4]`, every stage's by query `[q][w]`; per query and stage the scale and
/// `[|a_<=s|, |f_<=s|, |a_>s|, |q|]`.
pub struct StageQueries {
    pub first: Vec<u8>,
    pub rows: Vec<Vec<u8>>,
    /// The rotated query's first `HEAD` values (scored exactly in float32).
    pub head: Vec<[f32; HEAD]>,
    pub consts: Vec<[[f32; 4]; MAX_STAGES]>,
    pub scale: Vec<[f32; MAX_STAGES]>,
    pub norm: Vec<f32>,
}

/// The upper bound of one pair after a stage: `partial + |a_<=s| E + |f_<=s| H + |a_>s| T + |q| G`.
#[inline(always)]
pub fn bound(partial: f32, c: [f32; 4], e: f32, h: f32, t: f32, g: f32) -> f32 {
    partial + c[0] * e + c[1] * h + c[2] * t + c[3] * g
}

fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: u8 and i8 have the same size and alignment and every bit pattern is valid.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<i8>(), b.len()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row's codes of the first stage, out of its panel (`[w/4][32][4]`).
    fn gather(panel: &[i8], lane: usize, out: &mut [i8]) {
        for (d4, quad) in out.chunks_exact_mut(4).enumerate() {
            quad.copy_from_slice(&panel[(d4 * NR + lane) * 4..(d4 * NR + lane) * 4 + 4]);
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn stage_kernels_agree_without_saturating() {
        let mut seed = 7u64;
        let kernels = [StageKernel::Vnni512, StageKernel::AvxVnni, StageKernel::Avx2];
        for d4 in [1usize, 8, 32, 64] {
            for extreme in [false, true] {
                let a: Vec<u8> = (0..d4 * MR * 4)
                    .map(|_| {
                        if extreme {
                            127
                        } else {
                            (64.0 + 63.0 * lcg(&mut seed)).round() as u8
                        }
                    })
                    .collect();
                let b: Vec<i8> = (0..d4 * NR * 4)
                    .map(|i| {
                        if extreme {
                            if i % 3 == 0 {
                                -127
                            } else {
                                127
                            }
                        } else {
                            (127.0 * lcg(&mut seed)).round() as i8
                        }
                    })
                    .collect();
                let mut want = [0i32; MR * NR];
                StageKernel::Scalar.block(&a, &b, d4, &mut want);
                for k in kernels.into_iter().filter(|k| k.supported()) {
                    let mut got = [0i32; MR * NR];
                    k.block(&a, &b, d4, &mut got);
                    assert_eq!(got, want, "{}", k.name());
                }
                let w = d4 * 4;
                if w.is_multiple_of(32) {
                    let mut row = vec![0i8; w];
                    for lane in [0, 5, 31] {
                        gather(&b, lane, &mut row);
                        let qa: Vec<u8> = (0..w).map(|d| a[(d / 4 * MR + 3) * 4 + d % 4]).collect();
                        for k in kernels
                            .into_iter()
                            .chain([StageKernel::Scalar])
                            .filter(|k| k.supported())
                        {
                            assert_eq!(k.dot(&qa, &row), want[3 * NR + lane], "{}", k.name());
                        }
                    }
                }
            }
        }
    }

    /// A random orthogonal matrix (Gram-Schmidt in f64), as float32.
    fn orthogonal(dim: usize, seed: &mut u64) -> Vec<f32> {
        let mut m: Vec<Vec<f64>> = (0..dim).map(|_| (0..dim).map(|_| lcg(seed) as f64).collect()).collect();
        for i in 0..dim {
            for j in 0..i {
                let (done, rest) = m.split_at_mut(i);
                let d: f64 = rest[0].iter().zip(&done[j]).map(|(a, b)| a * b).sum();
                rest[0].iter_mut().zip(&done[j]).for_each(|(a, b)| *a -= d * b);
            }
            let n = m[i].iter().map(|v| v * v).sum::<f64>().sqrt();
            m[i].iter_mut().for_each(|v| *v /= n);
        }
        m.into_iter().flatten().map(|v| v as f32).collect()
    }

    #[test]
    fn the_rotation_slack_is_small_for_orthogonal_matrices_and_large_otherwise() {
        let mut seed = 11u64;
        let r = orthogonal(64, &mut seed);
        let eta = rotation_slack(&r, 64);
        assert!(eta > 0.0 && eta < 1e-4, "{eta}");
        let mut bad = r.clone();
        bad[5] += 0.01;
        assert!(rotation_slack(&bad, 64) > 0.009);
    }

    #[test]
    fn every_stage_bound_holds() {
        // the bound after every stage is at least the exact score (f64), with rows of very
        // different norms, sparse rows, zero rows and a zero query
        let mut seed = 5u64;
        let dim = 96;
        let r = orthogonal(dim, &mut seed);
        let eta = rotation_slack(&r, dim);
        let bounds = [32usize, 64, 96];
        let n = 64;
        let mut x: Vec<f32> = (0..n * dim).map(|_| lcg(&mut seed)).collect();
        for (i, row) in x.chunks_exact_mut(dim).enumerate() {
            let scale = 10f32.powi(i as i32 % 7 - 3);
            row.iter_mut().for_each(|v| *v *= scale);
            if i % 9 == 0 {
                row.iter_mut().skip(3).for_each(|v| *v = 0.0);
            }
        }
        x[5 * dim..6 * dim].fill(0.0);
        let nq = 9;
        let mut q: Vec<f32> = (0..nq * dim).map(|_| lcg(&mut seed)).collect();
        q[..dim].fill(0.0);
        // encode rows as the build does
        let mut codes: Vec<Vec<u8>> = (0..bounds.len()).map(|j| vec![0u8; n * width(&bounds, j)]).collect();
        let mut terms: Vec<Vec<f32>> = bounds.iter().map(|_| vec![0f32; n * TERMS]).collect();
        let mut head = vec![0f32; n * HEAD];
        let g_all = gamma(dim) + 64.0 * U + eta;
        let simd = Simd::detect();
        let packed = pack_queries(&r, dim, dim, simd.mr());
        for (i, row) in x.chunks_exact(dim).enumerate() {
            let mut padded_row = vec![0f32; padded(dim) * simd.nr()];
            padded_row[..dim].copy_from_slice(row);
            let mut y = vec![0f32; dim];
            let mut out = vec![0f32; simd.mr() * simd.nr()];
            for qb in 0..dim.div_ceil(simd.mr()) {
                simd.block(
                    &packed[qb * simd.mr() * padded(dim)..],
                    &padded_row,
                    padded(dim),
                    &mut out,
                    simd.nr(),
                );
                for k in 0..simd.mr().min(dim - qb * simd.mr()) {
                    y[qb * simd.mr() + k] = out[k * simd.nr()];
                }
            }
            let xn = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt();
            encode(&y, xn, g_all, &bounds, i, &mut codes, &mut terms, &mut head);
        }
        // queries as a search prepares them
        let file_less = Progressive {
            params: Params {
                bounds: bounds.to_vec(),
                eta: eta as f32,
                meta: vec![],
            },
            kernel: StageKernel::Scalar,
            file: None,
            forced: true,
            rotation: &r,
            codes: &[],
            terms: &[],
            hashes: &[],
            block_starts: vec![],
            rows: 0,
        };
        let sq = file_less.queries(&q, nq, 1, &Control::default()).unwrap();
        let mut row_codes = [0i8; 32];
        for qi in 0..nq {
            for xi in 0..n {
                let exact: f64 = (0..dim).map(|d| q[qi * dim + d] as f64 * x[xi * dim + d] as f64).sum();
                let (p, lane) = (xi / NR, xi % NR);
                let mut partial = 0f32;
                for c in 0..HEAD {
                    partial += sq.head[qi][c] * head[(p * HEAD + c) * NR + lane];
                }
                for j in 0..bounds.len() {
                    let w = width(&bounds, j);
                    if j == 0 {
                        gather(
                            as_i8(&codes[0][p * w * NR..(p + 1) * w * NR]),
                            lane,
                            &mut row_codes[..w],
                        );
                    } else {
                        row_codes[..w].copy_from_slice(as_i8(&codes[j][xi * w..(xi + 1) * w]));
                    }
                    let qa: Vec<u8> = sq.rows[j][qi * w..(qi + 1) * w].to_vec();
                    if j == 0 {
                        let qb: Vec<u8> = (0..w)
                            .map(|d| sq.first[((qi / MR * (w / 4) + d / 4) * MR + qi % MR) * 4 + d % 4])
                            .collect();
                        assert_eq!(qa, qb);
                    }
                    let row_codes = &row_codes[..w];
                    let t = &terms[j][p * TERMS * NR..];
                    let raw = StageKernel::Scalar.dot(&qa, row_codes) - QOFF * t[NR + lane].to_bits() as i32;
                    partial += raw as f32 * (sq.scale[qi][j] * t[lane]);
                    let ub = bound(
                        partial,
                        sq.consts[qi][j],
                        t[2 * NR + lane],
                        t[3 * NR + lane],
                        t[4 * NR + lane],
                        t[5 * NR + lane],
                    );
                    assert!(ub as f64 >= exact, "q{qi} x{xi} stage {j}: {ub} < {exact}");
                    // and not absurdly loose at the last stage (all dims read)
                    if j == 2 {
                        let qn = sq.norm[qi] as f64;
                        let xn = (0..dim).map(|d| (x[xi * dim + d] as f64).powi(2)).sum::<f64>().sqrt();
                        assert!(ub as f64 - exact <= 0.1 * qn * xn + 1e-30, "loose: {ub} vs {exact}");
                    }
                }
            }
        }
    }
}
