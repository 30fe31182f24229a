//! Int8 approximate scores with a rigorous error bound, for exact search at int8 speed.
//!
//! Each database row `x` is quantized on the fly with its own scale `s = max|x_i| / 127` to codes
//! `c` (so `x = s c + e`), each query `q` once to `q = t u + f`. The integer product `I = u . c` is
//! exact, and the approximate score `t s I` differs from the real `q . x` by
//! `q . e + f . (s c)`, which Cauchy-Schwarz bounds by `|q| |e| + |f| |s c|`. Adding the rounding
//! error of the float32 score itself (at most `gamma_d |q| |x|` for `d` sequential fused
//! multiply-adds) and of these few float operations gives, per pair,
//!
//! `bound = |q| E_x + |f| H_x`, with `E_x = (|e| + (gamma_d + 32u) |x|)(1 + 1e-3)`, `H_x = |s c|(1 + 1e-3)`
//!
//! (`u = 2^-24`; the factor 1e-3 dwarfs the rounding of the bound's own arithmetic). A row whose
//! `t s I + bound` is below a query's current k-th exact score cannot enter its top k; every other
//! row is rescored exactly with the float32 kernels, so results are identical to the float32 path.
//!
//! Codes use VNNI's unsigned x signed product: query codes are stored `u + 128` (in 1..=255) and
//! `128 * sum(c)` is subtracted afterwards. Query codes are laid out `[block][d/4][MR][4]`, row
//! codes `[panel][d/4][NR][4]`, so one 32-bit broadcast carries 4 dims. Integer sums are exact,
//! so these blocks need not match the float32 kernels' order.

use super::Simd;

/// Queries per int8 block.
pub const MR: usize = 8;
/// Rows per int8 panel (and per bit mask of `panel_masks`).
pub const NR: usize = 32;

const U: f64 = 1.0 / (1u64 << 24) as f64;
const ROUNDER: f32 = 12_582_912.0;
/// Relative inflation of the bound terms (see the module docs).
const SLACK: f64 = 1.0 + 1e-3;

/// Which int8 kernel computes the approximate scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Kernel {
    /// AVX-512 VNNI, the whole 8 x 32 block in registers: with the AVX-512 float32 path.
    Vnni512,
    /// AVX-VNNI (256-bit, for CPUs without AVX-512), the block in four 4 x 16 parts.
    AvxVnni,
    /// Plain loops.
    Scalar,
}

impl Int8Kernel {
    /// The fastest int8 kernel to go with the float32 path `simd`, if any beats float32 alone.
    pub fn detect(simd: Simd) -> Option<Int8Kernel> {
        let candidates: &[Int8Kernel] = match simd {
            Simd::Avx512 => &[Int8Kernel::Vnni512, Int8Kernel::AvxVnni],
            Simd::Avx2 => &[Int8Kernel::AvxVnni],
            Simd::Scalar => &[],
        };
        candidates.iter().copied().find(|k| k.supported())
    }

    /// Whether this CPU can run the kernel.
    pub fn supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::Vnni512 => is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vnni"),
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::AvxVnni => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni"),
            Int8Kernel::Scalar => true,
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Panics (before any unsafe code runs) when this CPU lacks the kernel's features.
    fn require(self) {
        assert!(
            self.supported(),
            "the {} kernel needs CPU features this machine lacks",
            self.name()
        );
    }

    pub fn name(self) -> &'static str {
        match self {
            Int8Kernel::Vnni512 => "avx512-vnni",
            Int8Kernel::AvxVnni => "avx-vnni",
            Int8Kernel::Scalar => "scalar",
        }
    }

    /// `out[i * ldo + j] = sum_t a[t][i] . b[t][j]` (4 bytes each, `a` unsigned, `b` signed) over
    /// `d4` steps, for the `MR x NR` block.
    #[inline]
    pub fn block(self, a: &[u8], b: &[i8], d4: usize, out: &mut [i32], ldo: usize) {
        let (mr, nr) = (MR, NR);
        assert!(a.len() >= d4 * mr * 4 && b.len() >= d4 * nr * 4 && ldo >= nr && out.len() >= (mr - 1) * ldo + nr);
        self.require();
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: lengths, block sizes and CPU features checked just above.
            Int8Kernel::Vnni512 => unsafe { vnni::block(a.as_ptr(), b.as_ptr(), d4, out.as_mut_ptr(), ldo) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Int8Kernel::AvxVnni => unsafe { vnni::block_avx(a.as_ptr(), b.as_ptr(), d4, out.as_mut_ptr(), ldo) },
            _ => {
                for i in 0..mr {
                    for j in 0..nr {
                        let mut acc = 0i32;
                        for t in 0..d4 {
                            let (qa, xb) = (&a[(t * mr + i) * 4..][..4], &b[(t * nr + j) * 4..][..4]);
                            for l in 0..4 {
                                acc += qa[l] as i32 * xb[l] as i32;
                            }
                        }
                        out[i * ldo + j] = acc;
                    }
                }
            }
        }
    }
}

/// The largest dimension whose integer products cannot overflow i32 (255 * 127 * d < 2^31).
pub const MAX_DIM: usize = 60_000;

fn gamma(dim: usize) -> f64 {
    let n = dim as f64 * U;
    n / (1.0 - n) + 32.0 * U
}

/// Quantized queries: codes in blocks of `mr` plus, per query, the scale and the norms.
pub struct Queries {
    pub codes: Vec<u8>,
    pub scale: Vec<f32>,
    /// |q|, rounded up.
    pub norm: Vec<f32>,
    /// |f| (the quantization residual), rounded up.
    pub resid: Vec<f32>,
}

/// Rows per quantized code step (4 bytes per 32-bit lane).
pub fn d4(dim: usize) -> usize {
    dim.div_ceil(4)
}

pub fn quantize_queries(queries: &[f32], nq: usize, dim: usize, mr: usize) -> Queries {
    let steps = d4(dim);
    let blocks = nq.div_ceil(mr);
    let mut codes = vec![128u8; blocks * steps * mr * 4];
    let (mut scale, mut norm, mut resid) = (vec![0f32; nq], vec![0f32; nq], vec![0f32; nq]);
    for q in 0..nq {
        let row = &queries[q * dim..(q + 1) * dim];
        let (b, i) = (q / mr, q % mr);
        let maxabs = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        let t = if maxabs > 0.0 { maxabs / 127.0 } else { 0.0 };
        let (mut n2, mut f2) = (0f64, 0f64);
        for (d, &v) in row.iter().enumerate() {
            let u = if t > 0.0 {
                (v / t).round().clamp(-127.0, 127.0)
            } else {
                0.0
            };
            codes[((b * steps + d / 4) * mr + i) * 4 + d % 4] = (u as i32 + 128) as u8;
            let f = v as f64 - t as f64 * u as f64;
            n2 += v as f64 * v as f64;
            f2 += f * f;
        }
        scale[q] = t;
        norm[q] = round_up(n2.sqrt() * SLACK);
        resid[q] = round_up(f2.sqrt() * SLACK);
    }
    Queries {
        codes,
        scale,
        norm,
        resid,
    }
}

/// Quantized rows of one tile: codes in panels of `nr` plus per-row terms of the bound.
#[derive(Default)]
pub struct Tile {
    pub codes: Vec<i8>,
    pub scale: Vec<f32>,
    /// 128 * sum(c), subtracted from the unsigned-by-signed products.
    pub offset: Vec<i32>,
    /// E_x of the module docs (infinite for a row holding NaN or Inf: always rescored).
    pub e: Vec<f32>,
    /// H_x of the module docs.
    pub h: Vec<f32>,
}

impl Tile {
    /// Prepares for `rows` rows (rounded up to whole panels of `nr`; padding rows are zero).
    pub fn reset(&mut self, rows: usize, dim: usize, nr: usize) {
        let padded = rows.div_ceil(nr) * nr;
        self.codes.clear();
        self.codes.resize(padded * d4(dim) * 4, 0);
        for v in [&mut self.scale, &mut self.e, &mut self.h] {
            v.clear();
            v.resize(padded, 0.0);
        }
        self.offset.clear();
        self.offset.resize(padded, 0);
    }

    /// Quantizes row `r` (its float32 values) into the tile.
    ///
    /// This runs for every database row, so the arithmetic is written as 16 independent lanes
    /// (it vectorises) and compiled for AVX-512 where the CPU has it. The norms are summed in
    /// float32; their relative rounding error (at most `gamma_d`) is covered by inflating them by
    /// `1 + 2 gamma_d` before rounding up.
    pub fn set_row(&mut self, r: usize, row: &[f32], nr: usize, scratch: &mut Vec<i8>) {
        let dim = row.len();
        let steps = d4(dim);
        let (p, lane) = (r / nr, r % nr);
        scratch.clear();
        scratch.resize(steps * 4, 0);
        let Some(Sums {
            scale: s,
            sum,
            x2,
            e2,
            h2,
        }) = quantize(row, &mut scratch[..dim])
        else {
            // NaN or Inf: no bound holds, so the row is always rescored exactly
            self.scale[r] = 0.0;
            self.offset[r] = 0;
            self.e[r] = f32::INFINITY;
            self.h[r] = 0.0;
            return;
        };
        let codes = &mut self.codes[p * steps * nr * 4..(p + 1) * steps * nr * 4];
        for (t, quad) in scratch.chunks_exact(4).enumerate() {
            codes[(t * nr + lane) * 4..(t * nr + lane) * 4 + 4].copy_from_slice(quad);
        }
        // `s * c` and `v - s c` are each rounded once: their errors (a few u relative to |x|)
        // are covered by the 32u term of gamma; float32 summation by the 2 gamma_d inflation
        let g = gamma(dim);
        let total = |a: f64| a.sqrt() * (1.0 + 2.0 * g);
        self.scale[r] = s;
        self.offset[r] = 128 * sum;
        self.e[r] = round_up((total(e2) + g * total(x2)) * SLACK);
        self.h[r] = round_up(total(h2) * SLACK);
    }
}

/// Quantizes one row into `codes` with its own scale: returns `(scale, sum of the codes)`, or
/// None when the row holds NaN or Inf. The SQ8 codes of `quant` are this, stored.
pub fn encode_row(row: &[f32], codes: &mut [i8]) -> Option<(f32, i32)> {
    quantize(row, codes).map(|s| (s.scale, s.sum))
}

/// What quantizing one row gives: its scale, the sum of its codes and the squared norms of the
/// row, its residual and its quantized value (float32 lane sums, added up in f64).
pub(crate) struct Sums {
    pub scale: f32,
    pub sum: i32,
    pub x2: f64,
    pub e2: f64,
    pub h2: f64,
}

/// `quantize` for the progressive codes' blocks.
pub(crate) fn quantize_block(row: &[f32], codes: &mut [i8]) -> Option<Sums> {
    quantize(row, codes)
}

/// Quantizes `row` into `codes` (same length); None when the row holds NaN or Inf.
fn quantize(row: &[f32], codes: &mut [i8]) -> Option<Sums> {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
        // SAFETY: the features were just detected.
        return unsafe { quantize_avx512(row, codes) };
    }
    quantize_lanes(row, codes)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn quantize_avx512(row: &[f32], codes: &mut [i8]) -> Option<Sums> {
    quantize_lanes(row, codes)
}

#[inline(always)]
fn quantize_lanes(row: &[f32], codes: &mut [i8]) -> Option<Sums> {
    const L: usize = 16;
    let (mut big, mut finite) = ([0f32; L], true);
    let mut head = row.chunks_exact(L);
    for ch in &mut head {
        for l in 0..L {
            big[l] = big[l].max(ch[l].abs());
            finite &= ch[l].is_finite();
        }
    }
    for &v in head.remainder() {
        big[0] = big[0].max(v.abs());
        finite &= v.is_finite();
    }
    if !finite {
        return None;
    }
    let maxabs = big.iter().fold(0f32, |m, &v| m.max(v));
    // a row of subnormals (127 / maxabs overflows) gets zero codes: its residual is the row,
    // which the bound covers all the same
    let (s, inv) = match 127.0 / maxabs {
        inv if maxabs > 0.0 && inv.is_finite() => (maxabs / 127.0, inv),
        _ => (0.0, 0.0),
    };
    let (mut sum, mut x2, mut e2, mut h2) = ([0i32; L], [0f32; L], [0f32; L], [0f32; L]);
    let mut one = |l: usize, v: f32, out: &mut i8| {
        // round to nearest even by the 1.5 * 2^23 trick: |v * inv| <= 127, and unlike `round`
        // it compiles to plain vector adds
        let c = (v * inv + ROUNDER) - ROUNDER;
        // SAFETY: `c` is a whole number in -127..=127 (`|v * inv| <= 127` up to rounding, all
        // finite); the checked cast would not vectorise
        let ci: i32 = unsafe { c.to_int_unchecked() };
        *out = ci as i8;
        let xh = s * c;
        let e = v - xh;
        sum[l] += ci;
        x2[l] += v * v;
        e2[l] += e * e;
        h2[l] += xh * xh;
    };
    let split = row.len() / L * L;
    for (vals, out) in row[..split].chunks_exact(L).zip(codes[..split].chunks_exact_mut(L)) {
        for l in 0..L {
            one(l, vals[l], &mut out[l]);
        }
    }
    for (j, (&v, out)) in row[split..].iter().zip(&mut codes[split..]).enumerate() {
        one(j, v, out);
    }
    let f64sum = |a: [f32; L]| a.iter().map(|&v| v as f64).sum::<f64>();
    Some(Sums {
        scale: s,
        sum: sum.iter().sum(),
        x2: f64sum(x2),
        e2: f64sum(e2),
        h2: f64sum(h2),
    })
}

/// The smallest float32 not below `v` (for bound terms computed in f64).
fn round_up(v: f64) -> f32 {
    let f = v as f32;
    if (f as f64) < v {
        f32::from_bits(f.to_bits() + 1)
    } else {
        f
    }
}

/// What the rows of a panel must reach, per query of a block, to need exact scores: `dense[i]`
/// for every row, and the lower `sparse[i]` for the rows of the mask `kept` (those held by a
/// database that keeps a subset of the rows, whose k-th score is lower).
#[derive(Clone, Copy, Debug)]
pub struct Thresholds {
    pub dense: [f32; MR],
    pub sparse: [f32; MR],
    pub kept: u32,
}

impl Int8Kernel {
    /// For the `MR` queries of block `qb` (codes `a`) against panel `p` of `tile`: which rows
    /// may reach each query's thresholds (bit `j` of `masks[i]` for row `p * NR + j`, query
    /// `qb * MR + i`). A NaN bound (a zero query against an infinite one) counts as a yes. The
    /// masks of padding queries (past the last query) mean nothing.
    #[inline]
    pub fn panel_masks<'a>(
        self,
        a: &[u8],
        queries: &Queries,
        qb: usize,
        tile: &'a Tile,
        p: usize,
        thresholds: &Thresholds,
    ) -> [u32; MR] {
        let d4 = tile.codes.len() / (tile.scale.len() * 4);
        let b = &tile.codes[p * d4 * NR * 4..(p + 1) * d4 * NR * 4];
        let first = p * NR;
        let whole = |v: &'a [f32]| -> &'a [f32; NR] { v[first..first + NR].try_into().expect("a whole panel") };
        let panel = Panel {
            offset: tile.offset[first..first + NR].try_into().expect("a whole panel"),
            scale: whole(&tile.scale),
            e: whole(&tile.e),
            h: whole(&tile.h),
        };
        let query: [[f32; 3]; MR] = std::array::from_fn(|i| {
            let q = (qb * MR + i).min(queries.scale.len() - 1);
            [queries.scale[q], queries.norm[q], queries.resid[q]]
        });
        let mut masks = [0u32; MR];
        let mut raw = [0i32; MR * NR];
        assert!(a.len() >= d4 * MR * 4);
        self.require();
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: lengths and CPU features checked just above.
            Int8Kernel::Vnni512 => unsafe {
                vnni::panel_masks(a.as_ptr(), b.as_ptr(), d4, &mut raw, &mut masks, |raw, i| {
                    vnni::upper_bounds_reach(&panel, raw, query[i], thresholds, i)
                })
            },
            #[cfg(target_arch = "x86_64")]
            Int8Kernel::AvxVnni => {
                self.block(a, b, d4, &mut raw, NR);
                // SAFETY: the kernel is supported (checked above), so AVX2 is available.
                unsafe { vnni::reach_avx2(&panel, &raw, &query, thresholds, &mut masks) };
            }
            _ => {
                self.block(a, b, d4, &mut raw, NR);
                for (i, (mask, raw)) in masks.iter_mut().zip(raw.chunks_exact(NR)).enumerate() {
                    *mask = panel.reach(raw.try_into().expect("NR values"), query[i], thresholds, i);
                }
            }
        }
        masks
    }
}

/// The terms of one panel's rows in the bound.
struct Panel<'a> {
    offset: &'a [i32; NR],
    scale: &'a [f32; NR],
    e: &'a [f32; NR],
    h: &'a [f32; NR],
}

impl Panel<'_> {
    /// `t s I + |q| E_x + |f| H_x` per row: each row's highest possible exact score for the
    /// query of products `raw` and terms `[t, |q|, |f|]`.
    #[inline(always)]
    fn upper_bounds(&self, raw: &[i32; NR], [t, nq, nf]: [f32; 3]) -> [f32; NR] {
        std::array::from_fn(|j| {
            let approx = (raw[j] - self.offset[j]) as f32 * (t * self.scale[j]);
            approx + nq * self.e[j] + nf * self.h[j]
        })
    }

    /// Which rows' upper bounds reach query `i`'s thresholds (or are NaN), as a mask.
    #[inline(always)]
    fn reach(&self, raw: &[i32; NR], query: [f32; 3], thresholds: &Thresholds, i: usize) -> u32 {
        let (mut dense, mut sparse) = (0u32, 0u32);
        for (j, &v) in self.upper_bounds(raw, query).iter().enumerate() {
            dense |= ((v >= thresholds.dense[i] || v.is_nan()) as u32) << j;
            sparse |= ((v >= thresholds.sparse[i]) as u32) << j;
        }
        dense | (sparse & thresholds.kept)
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{Panel, Thresholds, MR, NR};

    /// The block of `a` (`MR` queries) and `b` (a panel), then `mask(products of query i, i)`
    /// for each query: one function, so that the bound tests are compiled for AVX-512 and
    /// inlined with the products still hot.
    ///
    /// # Safety
    /// As `block`; `mask` may assume AVX-512F.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn panel_masks(
        a: *const u8,
        b: *const i8,
        d4: usize,
        raw: &mut [i32; MR * NR],
        masks: &mut [u32; MR],
        mask: impl Fn(&[i32; NR], usize) -> u32,
    ) {
        block(a, b, d4, raw.as_mut_ptr(), NR);
        for (i, (m, raw)) in masks.iter_mut().zip(raw.chunks_exact(NR)).enumerate() {
            *m = mask(raw.try_into().expect("NR values"), i);
        }
    }

    /// `Panel::reach` 16 rows at a time (the same float operations in the same order).
    ///
    /// # Safety
    /// AVX-512F available.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn upper_bounds_reach(
        panel: &Panel,
        raw: &[i32; NR],
        [t, nq, nf]: [f32; 3],
        thresholds: &Thresholds,
        i: usize,
    ) -> u32 {
        let (mut dense, mut sparse) = (0u32, 0u32);
        for half in 0..NR / 16 {
            let at = half * 16;
            // SAFETY: `at + 16 <= NR`, the length of every array.
            let raw = _mm512_loadu_si512(raw.as_ptr().add(at) as *const _);
            let offset = _mm512_loadu_si512(panel.offset.as_ptr().add(at) as *const _);
            let ts = _mm512_mul_ps(_mm512_set1_ps(t), _mm512_loadu_ps(panel.scale.as_ptr().add(at)));
            let approx = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(raw, offset)), ts);
            let e = _mm512_mul_ps(_mm512_set1_ps(nq), _mm512_loadu_ps(panel.e.as_ptr().add(at)));
            let h = _mm512_mul_ps(_mm512_set1_ps(nf), _mm512_loadu_ps(panel.h.as_ptr().add(at)));
            let upper = _mm512_add_ps(_mm512_add_ps(approx, e), h);
            // not-less-than, unordered: true where upper >= threshold or upper is NaN
            let d = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(upper, _mm512_set1_ps(thresholds.dense[i]));
            let s = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(upper, _mm512_set1_ps(thresholds.sparse[i]));
            dense |= (d as u32) << at;
            sparse |= (s as u32) << at;
        }
        dense | (sparse & thresholds.kept)
    }

    /// # Safety
    /// AVX-512F and AVX-512 VNNI available; `a` holds `d4 * 8 * 4` bytes, `b` `d4 * 32 * 4`, `out`
    /// 8 rows of `ldo >= 32` values.
    /// `Panel::reach` for each query of a block, compiled for AVX2.
    ///
    /// # Safety
    /// AVX2 available.
    #[target_feature(enable = "avx2")]
    pub unsafe fn reach_avx2(
        panel: &Panel,
        raw: &[i32; MR * NR],
        query: &[[f32; 3]; MR],
        thresholds: &Thresholds,
        masks: &mut [u32; MR],
    ) {
        for (i, (mask, raw)) in masks.iter_mut().zip(raw.chunks_exact(NR)).enumerate() {
            *mask = panel.reach(raw.try_into().expect("NR values"), query[i], thresholds, i);
        }
    }

    /// As `block` with 256-bit AVX-VNNI: 16 registers hold a 4 x 16 part of the block at a
    /// time, so the panel's codes are read four times (from L1).
    ///
    /// # Safety
    /// AVX2 and AVX-VNNI available; lengths as for `block`.
    #[target_feature(enable = "avx2,avxvnni")]
    pub unsafe fn block_avx(a: *const u8, b: *const i8, d4: usize, out: *mut i32, ldo: usize) {
        for part in 0..4 {
            let (q0, r0) = (part / 2 * 4, part % 2 * 16);
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            for t in 0..d4 {
                // SAFETY: t < d4: inside both code arrays.
                let b0 = _mm256_loadu_si256(b.add(t * 128 + r0 * 4) as *const _);
                let b1 = _mm256_loadu_si256(b.add(t * 128 + r0 * 4 + 32) as *const _);
                for (i, row) in acc.iter_mut().enumerate() {
                    let av = _mm256_set1_epi32((a.add((t * 8 + q0 + i) * 4) as *const i32).read_unaligned());
                    row[0] = _mm256_dpbusd_avx_epi32(row[0], av, b0);
                    row[1] = _mm256_dpbusd_avx_epi32(row[1], av, b1);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                // SAFETY: out holds 8 rows of ldo >= 32 values.
                _mm256_storeu_si256(out.add((q0 + i) * ldo + r0) as *mut _, row[0]);
                _mm256_storeu_si256(out.add((q0 + i) * ldo + r0 + 8) as *mut _, row[1]);
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn block(a: *const u8, b: *const i8, d4: usize, out: *mut i32, ldo: usize) {
        let mut acc = [[_mm512_setzero_si512(); 2]; 8];
        for t in 0..d4 {
            // SAFETY: t < d4: inside both code arrays.
            let b0 = _mm512_loadu_si512(b.add(t * 128) as *const _);
            let b1 = _mm512_loadu_si512(b.add(t * 128 + 64) as *const _);
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32((a.add((t * 8 + i) * 4) as *const i32).read_unaligned());
                row[0] = _mm512_dpbusd_epi32(row[0], av, b0);
                row[1] = _mm512_dpbusd_epi32(row[1], av, b1);
            }
        }
        for (i, row) in acc.iter().enumerate() {
            // SAFETY: out holds 8 rows of ldo >= 32 values.
            _mm512_storeu_si512(out.add(i * ldo) as *mut _, row[0]);
            _mm512_storeu_si512(out.add(i * ldo + 16) as *mut _, row[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_and_the_bound_holds() {
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let (mr, nr) = (MR, NR);
        for &dim in &[1usize, 5, 64, 131] {
            let q: Vec<f32> = (0..mr * dim).map(|_| rnd()).collect();
            let x: Vec<f32> = (0..nr * dim).map(|_| rnd() * 3.0).collect();
            let qs = quantize_queries(&q, mr, dim, mr);
            let mut tile = Tile::default();
            tile.reset(nr, dim, nr);
            for r in 0..nr {
                tile.set_row(r, &x[r * dim..(r + 1) * dim], nr, &mut Vec::new());
            }
            let steps = d4(dim);
            let mut want = vec![0i32; mr * nr];
            Int8Kernel::Scalar.block(&qs.codes, &tile.codes, steps, &mut want, nr);
            for k in [Int8Kernel::Vnni512, Int8Kernel::AvxVnni]
                .into_iter()
                .filter(|k| k.supported())
            {
                let mut got = vec![0i32; mr * nr];
                k.block(&qs.codes, &tile.codes, steps, &mut got, nr);
                assert_eq!(got, want, "{}", k.name());
            }
            for i in 0..mr {
                for j in 0..nr {
                    let exact: f64 = (0..dim).map(|d| q[i * dim + d] as f64 * x[j * dim + d] as f64).sum();
                    let approx = (want[i * nr + j] - tile.offset[j]) as f64 * qs.scale[i] as f64 * tile.scale[j] as f64;
                    let bound = qs.norm[i] as f64 * tile.e[j] as f64 + qs.resid[i] as f64 * tile.h[j] as f64;
                    assert!((exact - approx).abs() <= bound, "d={dim} {exact} {approx} {bound}");
                    // the row test must say yes for a threshold at the exact score (query i's,
                    // the others' at +-inf), whichever kernel runs it
                    // and a sparse threshold counts for the kept rows only
                    let mut dense = [f32::NEG_INFINITY; MR];
                    dense[i] = exact as f32;
                    dense[(i + 1) % MR] = f32::INFINITY;
                    let mut sparse = [f32::INFINITY; MR];
                    sparse[(i + 1) % MR] = f32::NEG_INFINITY;
                    let kept = 1u32 << j | 1 << (31 - j);
                    let thresholds = Thresholds { dense, sparse, kept };
                    let scalar = Int8Kernel::Scalar.panel_masks(&qs.codes, &qs, 0, &tile, 0, &thresholds);
                    assert!(scalar[i] >> j & 1 == 1 && scalar[(i + 3) % MR] == u32::MAX);
                    assert!(scalar[(i + 1) % MR] == kept);
                    for k in [Int8Kernel::Vnni512, Int8Kernel::AvxVnni]
                        .into_iter()
                        .filter(|k| k.supported())
                    {
                        assert_eq!(k.panel_masks(&qs.codes, &qs, 0, &tile, 0, &thresholds), scalar);
                    }
                }
            }
        }
    }
}
