//! Dot-product kernels for exact search, with the instruction set chosen at run time.
//!
//! Scores are a matrix product `queries x tile^T`. Both operands are packed into panels so that
//! one micro-kernel call computes an `MR x NR` block of scores from registers: queries are packed
//! `[d][MR]` (a scalar broadcast per step), database rows `[d][NR]` (a vector load per step),
//! float16 rows being widened to float32 while packing. Every path accumulates each score in
//! float32 over `d` in increasing order, one fused or unfused multiply-add at a time, so paths
//! differ only in rounding of the individual steps (FMA or not), never in what is summed.
//!
//! Paths: AVX-512F, AVX2+FMA (with F16C for widening, through the `half` crate), and a portable
//! scalar one. Shipped builds never assume a target CPU: detection happens at run time.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::store::DType;

pub mod int8;
pub mod peak;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

/// An instruction-set path for the float32 kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Simd {
    Avx512,
    Avx2,
    Scalar,
}

impl Simd {
    /// The fastest path this CPU supports.
    pub fn detect() -> Simd {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Simd::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Simd::Avx2;
            }
        }
        Simd::Scalar
    }

    /// Whether this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            Simd::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Simd::Avx512 => is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Simd::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    pub fn parse(name: &str) -> Option<Simd> {
        match name {
            "avx512" => Some(Simd::Avx512),
            "avx2" => Some(Simd::Avx2),
            "scalar" => Some(Simd::Scalar),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512",
            Simd::Avx2 => "avx2",
            Simd::Scalar => "scalar",
        }
    }

    /// Queries per micro-kernel block.
    pub fn mr(self) -> usize {
        match self {
            Simd::Avx512 => x86_sizes::AVX512_MR,
            Simd::Avx2 => x86_sizes::AVX2_MR,
            Simd::Scalar => scalar::MR,
        }
    }

    /// Database rows per micro-kernel block.
    pub fn nr(self) -> usize {
        match self {
            Simd::Avx512 => x86_sizes::AVX512_NR,
            Simd::Avx2 => x86_sizes::AVX2_NR,
            Simd::Scalar => scalar::NR,
        }
    }

    /// Computes the `mr() x nr()` block `out[i * ldo + j] = sum_d a[d * mr + i] * b[d * nr + j]`.
    ///
    /// `a` and `b` hold at least `dim * mr()` and `dim * nr()` values; `ldo >= nr()`.
    #[inline]
    pub fn block(self, a: &[f32], b: &[f32], dim: usize, out: &mut [f32], ldo: usize) {
        let (mr, nr) = (self.mr(), self.nr());
        assert!(a.len() >= dim * mr && b.len() >= dim * nr && ldo >= nr && out.len() >= (mr - 1) * ldo + nr);
        self.require();
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the lengths and the CPU features are checked above (feature detection is
            // cached by std: one atomic load).
            Simd::Avx512 => unsafe { x86::block_avx512(a.as_ptr(), b.as_ptr(), dim, out.as_mut_ptr(), ldo) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Simd::Avx2 => unsafe { x86::block_avx2(a.as_ptr(), b.as_ptr(), dim, out.as_mut_ptr(), ldo) },
            _ => scalar::block(a, b, dim, out, ldo),
        }
    }

    /// Panics (before any unsafe code runs) when this CPU lacks the path's features.
    #[inline]
    fn require(self) {
        assert!(
            self.supported(),
            "the {} path needs CPU features this machine lacks",
            self.name()
        );
    }

    /// Column `i` of `block`: `out[j] = sum_d a[d * mr + i] * b[d * nr + j]`, computed with the
    /// same operations in the same order as `block`, hence bit-identical to its row `i`.
    #[inline]
    pub fn column(self, a: &[f32], i: usize, b: &[f32], dim: usize, out: &mut [f32]) {
        let (mr, nr) = (self.mr(), self.nr());
        assert!(i < mr && a.len() >= dim * mr && b.len() >= dim * nr && out.len() >= nr);
        self.require();
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `block`.
            Simd::Avx512 => unsafe { x86::column_avx512(a.as_ptr().add(i), b.as_ptr(), dim, out.as_mut_ptr()) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `block`.
            Simd::Avx2 => unsafe { x86::column_avx2(a.as_ptr().add(i), b.as_ptr(), dim, out.as_mut_ptr()) },
            _ => scalar::column(a, i, b, dim, out),
        }
    }

    /// `column` for several (query `i`, panel) jobs; `out` holds `nr()` values per job. Jobs run
    /// four at a time where the path allows, so that eight independent accumulator chains hide
    /// the latency that bounds a single column.
    pub fn columns(self, a: &[f32], jobs: &[(usize, &[f32])], dim: usize, out: &mut [f32]) {
        let (mr, nr) = (self.mr(), self.nr());
        assert!(out.len() >= jobs.len() * nr && a.len() >= dim * mr);
        let mut rest = jobs;
        let mut o = 0;
        #[cfg(target_arch = "x86_64")]
        if self == Simd::Avx512 && self.supported() {
            while rest.len() >= 4 {
                let (four, tail) = rest.split_at(4);
                assert!(four.iter().all(|(i, b)| *i < mr && b.len() >= dim * nr));
                let ai = [four[0].0, four[1].0, four[2].0, four[3].0].map(|i| a[i..].as_ptr());
                let bs = [four[0].1, four[1].1, four[2].1, four[3].1].map(|b| b.as_ptr());
                // SAFETY: job indices and panel lengths checked above, CPU features just before.
                unsafe { x86::columns4_avx512(ai, bs, dim, out[o..o + 4 * nr].as_mut_ptr()) };
                rest = tail;
                o += 4 * nr;
            }
        }
        for (i, b) in rest {
            self.column(a, *i, b, dim, &mut out[o..o + nr]);
            o += nr;
        }
    }
}

/// Block sizes, visible on every architecture so that `mr`/`nr` stay total functions.
mod x86_sizes {
    pub const AVX512_MR: usize = 8;
    pub const AVX512_NR: usize = 32;
    pub const AVX2_MR: usize = 6;
    pub const AVX2_NR: usize = 16;
}

/// Packs `nq` float32 query rows into blocks of `mr`: block `b` holds `[d][mr]`, zero padded.
pub fn pack_queries(queries: &[f32], nq: usize, dim: usize, mr: usize) -> Vec<f32> {
    let blocks = nq.div_ceil(mr);
    let mut out = vec![0f32; blocks * dim * mr];
    for q in 0..nq {
        let (b, i) = (q / mr, q % mr);
        let panel = &mut out[b * dim * mr..(b + 1) * dim * mr];
        for (d, &v) in queries[q * dim..(q + 1) * dim].iter().enumerate() {
            panel[d * mr + i] = v;
        }
    }
    out
}

/// Widens and packs `rows` consecutive little-endian rows from `bytes` into panels of `nr`
/// rows laid out `[d][nr]`, zero padded, reusing `out` and the scratch row buffers. `visit`
/// sees each widened row (the int8 path quantizes it there, without widening twice).
#[allow(clippy::too_many_arguments)]
pub fn pack_rows(
    bytes: &[u8],
    dtype: DType,
    rows: usize,
    dim: usize,
    nr: usize,
    out: &mut Vec<f32>,
    scratch: &mut RowScratch,
    mut visit: impl FnMut(usize, &[f32]),
) {
    let panels = rows.div_ceil(nr);
    // every lane of every panel is written below, so the buffer needs no clearing between tiles
    out.resize(panels * dim * nr, 0.0);
    let row_bytes = dim * dtype.size();
    for p in 0..panels {
        let (r0, n) = (p * nr, nr.min(rows - p * nr));
        let panel = &mut out[p * dim * nr..(p + 1) * dim * nr];
        let rows_of = (0..n).map(|j| (&bytes[(r0 + j) * row_bytes..(r0 + j + 1) * row_bytes], dtype));
        pack_panel(rows_of, dim, nr, panel, scratch, |j, row| visit(r0 + j, row));
    }
}

/// Widens up to `nr` rows (their little-endian bytes and type, from anywhere) into one panel
/// `[d][nr]`, zero padded; `visit(j, row)` sees the `j`-th widened row.
pub fn pack_panel<'a>(
    rows: impl Iterator<Item = (&'a [u8], DType)>,
    dim: usize,
    nr: usize,
    panel: &mut [f32],
    scratch: &mut RowScratch,
    mut visit: impl FnMut(usize, &[f32]),
) {
    scratch.f32s.resize(nr * dim, 0.0);
    scratch.f16s.resize(dim, f16::ZERO);
    // widen the rows (row-major), then write them transposed, one d at a time, so that the
    // writes run along the panel instead of striding across it
    let mut n = 0;
    for (j, (src, dtype)) in rows.enumerate() {
        assert!(j < nr, "a panel holds at most {nr} rows");
        let dst = &mut scratch.f32s[j * dim..(j + 1) * dim];
        widen(src, dtype, dst, &mut scratch.f16s);
        visit(j, dst);
        n = j + 1;
    }
    let rows_f32 = &scratch.f32s[..n * dim];
    for (d, lanes) in panel[..dim * nr].chunks_exact_mut(nr).enumerate() {
        for (j, lane) in lanes[..n].iter_mut().enumerate() {
            *lane = rows_f32[j * dim + d];
        }
        lanes[n..].fill(0.0);
    }
}

/// `q . x` for one row `x` given as its little-endian bytes of `dtype`, the float16 values
/// widened on the fly (for rescoring single rows, where the block kernels would need a
/// transpose per row). Vectorised with partial sums; AVX-512 or AVX2+F16C+FMA at run time.
pub fn dot_row(q: &[f32], x: &[u8], dtype: DType) -> f32 {
    assert_eq!(x.len(), q.len() * dtype.size());
    #[cfg(all(target_arch = "x86_64", target_endian = "little"))]
    if dtype == DType::F16 && is_x86_feature_detected!("f16c") {
        if Simd::Avx512.supported() {
            // SAFETY: features just detected; `x` holds `q.len()` float16 values (asserted).
            return unsafe { x86::dot_f16_avx512(q.as_ptr(), x.as_ptr(), q.len()) };
        }
        if Simd::Avx2.supported() {
            // SAFETY: as above.
            return unsafe { x86::dot_f16_avx2(q.as_ptr(), x.as_ptr(), q.len()) };
        }
    }
    let mut row = vec![0f32; q.len()];
    widen(x, dtype, &mut row, &mut vec![f16::ZERO; q.len()]);
    q.iter().zip(&row).map(|(a, b)| a * b).sum()
}

/// One little-endian row of `dtype` values as float32.
pub(crate) fn widen(src: &[u8], dtype: DType, dst: &mut [f32], f16s: &mut [f16]) {
    match dtype {
        DType::F16 => {
            #[cfg(target_endian = "little")]
            if (src.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f16>()) {
                // SAFETY: `f16` is a transparent u16; the bytes are little-endian u16 values
                // on a little-endian machine, aligned (checked) and `dst.len()` of them.
                let halves = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<f16>(), dst.len()) };
                halves.convert_to_f32_slice(dst);
                return;
            }
            for (h, c) in f16s.iter_mut().zip(src.chunks_exact(2)) {
                *h = f16::from_bits(u16::from_le_bytes([c[0], c[1]]));
            }
            f16s.convert_to_f32_slice(dst);
        }
        DType::F32 => {
            for (f, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *f = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
    }
}

/// Per-thread buffers for `pack_rows`.
#[derive(Default)]
pub struct RowScratch {
    f16s: Vec<f16>,
    f32s: Vec<f32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    #[test]
    fn every_path_matches_a_plain_dot_product() {
        let mut seed = 7;
        for &dim in &[1usize, 3, 16, 17, 100] {
            for simd in [Simd::Scalar, Simd::Avx2, Simd::Avx512] {
                if !simd.supported() {
                    continue;
                }
                let (mr, nr) = (simd.mr(), simd.nr());
                let nq = mr + 1;
                let rows = nr + 3;
                let q: Vec<f32> = (0..nq * dim).map(|_| lcg(&mut seed)).collect();
                let x: Vec<f32> = (0..rows * dim).map(|_| lcg(&mut seed)).collect();
                let xb: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
                let a = pack_queries(&q, nq, dim, mr);
                let mut b = Vec::new();
                pack_rows(
                    &xb,
                    DType::F32,
                    rows,
                    dim,
                    nr,
                    &mut b,
                    &mut RowScratch::default(),
                    |_, _| {},
                );
                let mut out = vec![0f32; mr * nr];
                for qb in 0..nq.div_ceil(mr) {
                    for p in 0..rows.div_ceil(nr) {
                        simd.block(&a[qb * dim * mr..], &b[p * dim * nr..], dim, &mut out, nr);
                        for i in 0..mr {
                            for j in 0..nr {
                                let (qi, rj) = (qb * mr + i, p * nr + j);
                                let want = if qi < nq && rj < rows {
                                    (0..dim).map(|d| q[qi * dim + d] * x[rj * dim + d]).sum::<f32>()
                                } else {
                                    0.0
                                };
                                let got = out[i * nr + j];
                                assert!(
                                    (got - want).abs() <= 1e-5 * dim as f32,
                                    "{simd:?} d={dim} ({qi},{rj}) {got} vs {want}"
                                );
                                let mut col = vec![0f32; nr];
                                simd.column(&a[qb * dim * mr..], i, &b[p * dim * nr..], dim, &mut col);
                                assert_eq!(col[j].to_bits(), got.to_bits(), "column differs from block");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn float16_rows_are_widened_exactly() {
        let vals = [0.5f32, -1.25, 3.0, 0.099_975_586, 65504.0, -0.0];
        let bytes: Vec<u8> = vals
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
            .collect();
        let mut out = Vec::new();
        pack_rows(
            &bytes,
            DType::F16,
            2,
            3,
            4,
            &mut out,
            &mut RowScratch::default(),
            |_, _| {},
        );
        // row r, dim d lands at d * nr + r
        for r in 0..2 {
            for d in 0..3 {
                assert_eq!(out[d * 4 + r], vals[r * 3 + d]);
            }
        }
        assert_eq!(out[2], 0.0); // padding lane
    }
}
