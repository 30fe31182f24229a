//! Dot-product kernels for exact search, with the instruction set chosen at run time.
//!
//! Every score is summed in one canonical order, whichever kernel computes it: the dimensions
//! are split into 16 lanes (lane `l` holds dimensions `l, l + 16, l + 32, ...`, zero padded to
//! a multiple of 16), each lane accumulates its products in increasing order, one multiply-add
//! at a time, and the 16 lane sums are added by a fixed tree (`l + 8`, then `l + 4`, `l + 2`,
//! `l + 1`). A block kernel scoring `MR` queries against `NR` rows and a single-pair kernel
//! thus give the same bits for the same pair, which lets the int8 first pass of exact search
//! rescore single rows instead of whole blocks. Rows and queries are row-major float32, padded
//! to `padded(dim)` values.
//!
//! Paths: AVX-512F (fused multiply-adds), AVX2+FMA (each 16-lane vector as two halves: the same
//! operations, lane for lane, as AVX-512), and a portable scalar one (unfused: it rounds the
//! products, so its scores may differ from the others' in the last bits). Shipped builds never
//! assume a target CPU: detection happens at run time.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::error::{Error, Result};
use crate::store::DType;

pub mod int8;
pub mod peak;
mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

/// Lanes of the canonical summation order.
pub const LANES: usize = 16;

/// Values per padded row: `dim` rounded up to whole lanes.
pub fn padded(dim: usize) -> usize {
    dim.div_ceil(LANES) * LANES
}

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

    /// A `simd` option: `None` or "auto" (the fastest path: `None`), else a path's name.
    pub fn parse_option(option: Option<&str>) -> Result<Option<Simd>> {
        match option {
            None | Some("auto") => Ok(None),
            Some(name) => Simd::parse(name).map(Some).ok_or_else(|| {
                Error::invalid(format!(
                    "simd: unknown path {name:?} (expected auto, avx512, avx2 or scalar)"
                ))
            }),
        }
    }

    /// The path a `simd` option names (the fastest for `None` or "auto"), checked runnable here.
    pub fn runnable(option: Option<&str>) -> Result<Simd> {
        Simd::parse_option(option)?.map_or(Ok(Simd::detect()), Simd::checked)
    }

    /// This path, or an error when this CPU cannot run it.
    pub fn checked(self) -> Result<Simd> {
        if self.supported() {
            Ok(self)
        } else {
            Err(Error::invalid(format!(
                "simd: this CPU cannot run the {} path",
                self.name()
            )))
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Simd::Avx512 => "avx512",
            Simd::Avx2 => "avx2",
            Simd::Scalar => "scalar",
        }
    }

    /// Queries per block.
    pub fn mr(self) -> usize {
        match self {
            Simd::Avx512 => sizes::AVX512_MR,
            Simd::Avx2 => sizes::AVX2_MR,
            Simd::Scalar => sizes::SCALAR_MR,
        }
    }

    /// Database rows per block.
    pub fn nr(self) -> usize {
        match self {
            Simd::Avx512 => sizes::AVX512_NR,
            Simd::Avx2 => sizes::AVX2_NR,
            Simd::Scalar => sizes::SCALAR_NR,
        }
    }

    /// The `mr() x nr()` block `out[i * ldo + j] = a_i . b_j` of `mr()` query rows `a` and `nr()`
    /// database rows `b`, each `dp = padded(dim)` values long, summed in the canonical order.
    #[inline]
    pub fn block(self, a: &[f32], b: &[f32], dp: usize, out: &mut [f32], ldo: usize) {
        let (mr, nr) = (self.mr(), self.nr());
        assert!(dp.is_multiple_of(LANES) && a.len() >= mr * dp && b.len() >= nr * dp);
        assert!(ldo >= nr && out.len() >= (mr - 1) * ldo + nr);
        self.require();
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the lengths and the CPU features are checked above (feature detection is
            // cached by std: one atomic load).
            Simd::Avx512 => unsafe { x86::block_avx512(a.as_ptr(), b.as_ptr(), dp, out.as_mut_ptr(), ldo) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Simd::Avx2 => unsafe { x86::block_avx2(a.as_ptr(), b.as_ptr(), dp, out.as_mut_ptr(), ldo) },
            _ => scalar::block(a, b, dp, out, ldo),
        }
    }

    /// `out[p] = q_p . x_p` for independent pairs of a padded query row and a database row as
    /// stored (`dim` little-endian values of `dtype`, converted exactly as they are loaded),
    /// each bit-identical to what `block` gives for the same pair once the row is widened.
    /// Pairs run several at a time, so that independent accumulator chains hide the latency
    /// that bounds a single dot product; reading the stored row halves what a float16 pair
    /// pulls through the caches.
    pub fn dots(self, pairs: &[(&[f32], &[u8])], dtype: DType, out: &mut [f32]) {
        assert!(out.len() >= pairs.len());
        let Some(&(q0, x0)) = pairs.first() else {
            return;
        };
        let (dp, dim) = (q0.len(), x0.len() / dtype.size());
        assert!(dp == padded(dim) && pairs.iter().all(|(q, x)| q.len() == dp && x.len() == x0.len()));
        self.require();
        #[cfg(all(target_arch = "x86_64", target_endian = "little"))]
        if matches!(self, Simd::Avx512 | Simd::Avx2) && (dtype == DType::F32 || is_x86_feature_detected!("f16c")) {
            for (group, out) in pairs.chunks(DOTS).zip(out.chunks_mut(DOTS)) {
                // a short last group repeats its first pair (its extra results are dropped)
                let q = std::array::from_fn(|j| group.get(j).unwrap_or(&group[0]).0.as_ptr());
                let x = std::array::from_fn(|j| group.get(j).unwrap_or(&group[0]).1.as_ptr());
                let mut res = [0f32; DOTS];
                // SAFETY: every query holds `padded(dim)` values and every row `dim` values of
                // `dtype` (asserted), the CPU features checked above.
                unsafe {
                    match (self, dtype) {
                        (Simd::Avx512, DType::F16) => x86::dots_avx512::<true>(q, x, dim, &mut res),
                        (Simd::Avx512, DType::F32) => x86::dots_avx512::<false>(q, x, dim, &mut res),
                        (_, DType::F16) => x86::dots_avx2::<true>(q, x, dim, &mut res),
                        (_, DType::F32) => x86::dots_avx2::<false>(q, x, dim, &mut res),
                    }
                }
                out[..group.len()].copy_from_slice(&res[..group.len()]);
            }
            return;
        }
        let (mut row, mut f16s) = (vec![0f32; dp], vec![f16::ZERO; dim]);
        for ((q, x), o) in pairs.iter().zip(out) {
            widen(x, dtype, &mut row[..dim], &mut f16s);
            *o = scalar::dot(q, &row);
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
}

/// Pairs per call of the single-pair kernels.
const DOTS: usize = 8;

/// Block sizes, visible on every architecture so that `mr`/`nr` stay total functions.
mod sizes {
    /// 24 accumulators, 4 rows and one query in the 32 vector registers.
    pub const AVX512_MR: usize = 6;
    pub const AVX512_NR: usize = 4;
    /// 6 accumulators of two halves, 2 rows and one query (a half at a time) in 16 registers.
    pub const AVX2_MR: usize = 3;
    pub const AVX2_NR: usize = 2;
    pub const SCALAR_MR: usize = 2;
    pub const SCALAR_NR: usize = 2;
}

/// The fixed tree that adds the 16 lane sums of the canonical order (portable reference).
#[inline(always)]
pub(crate) fn reduce_lanes(acc: &[f32; LANES]) -> f32 {
    let h8: [f32; 8] = std::array::from_fn(|l| acc[l] + acc[l + 8]);
    let h4: [f32; 4] = std::array::from_fn(|l| h8[l] + h8[l + 4]);
    let h2: [f32; 2] = std::array::from_fn(|l| h4[l] + h4[l + 2]);
    h2[0] + h2[1]
}

/// Asks the CPU to bring the cache line holding `at` into cache: a hint, which never faults
/// whatever the address (it may point past the end of a buffer).
#[inline(always)]
pub fn prefetch_line(at: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch does not access memory architecturally; SSE is part of x86-64.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// `prefetch_line` for every line of `data`.
#[inline]
pub fn prefetch<T>(data: &[T]) {
    let bytes = data.as_ptr() as *const u8;
    for line in (0..std::mem::size_of_val(data)).step_by(64) {
        prefetch_line(bytes.wrapping_add(line));
    }
}

/// Packs `nq` float32 query rows into `nq.div_ceil(mr) * mr` padded rows (zero rows at the end).
pub fn pack_queries(queries: &[f32], nq: usize, dim: usize, mr: usize) -> Vec<f32> {
    let dp = padded(dim);
    let mut out = vec![0f32; nq.div_ceil(mr) * mr * dp];
    for (q, row) in queries.chunks_exact(dim).take(nq).enumerate() {
        out[q * dp..q * dp + dim].copy_from_slice(row);
    }
    out
}

/// Widens the consecutive little-endian rows in `bytes` into padded float32 rows, plus zero
/// rows up to a multiple of `nr`, reusing `out`.
pub fn widen_tile(bytes: &[u8], dtype: DType, dim: usize, nr: usize, out: &mut Vec<f32>, f16s: &mut Vec<f16>) {
    let (dp, row_bytes) = (padded(dim), dim * dtype.size());
    let rows = bytes.len() / row_bytes;
    out.resize(rows.div_ceil(nr) * nr * dp, 0.0);
    f16s.resize(dim, f16::ZERO);
    for (r, dst) in out.chunks_exact_mut(dp).enumerate() {
        if r < rows {
            widen(&bytes[r * row_bytes..(r + 1) * row_bytes], dtype, &mut dst[..dim], f16s);
            dst[dim..].fill(0.0);
        } else {
            dst.fill(0.0);
        }
    }
}
/// One little-endian row of `dtype` values as float32.
pub(crate) fn widen(src: &[u8], dtype: DType, dst: &mut [f32], f16s: &mut [f16]) {
    match dtype {
        DType::F16 => {
            #[cfg(all(target_arch = "x86_64", target_endian = "little"))]
            if Simd::Avx512.supported() {
                assert!(src.len() >= 2 * dst.len());
                // SAFETY: the feature was just detected; `src` holds `dst.len()` values (asserted).
                unsafe { x86::widen_f16_avx512(src.as_ptr(), dst) };
                return;
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_options_parse_once() {
        assert_eq!(Simd::parse_option(None).unwrap(), None);
        assert_eq!(Simd::parse_option(Some("auto")).unwrap(), None);
        assert_eq!(Simd::parse_option(Some("avx2")).unwrap(), Some(Simd::Avx2));
        let e = Simd::parse_option(Some("neon9")).unwrap_err().to_string();
        assert!(e.starts_with("simd: unknown path \"neon9\""), "{e}");
        assert_eq!(Simd::runnable(Some("scalar")).unwrap(), Simd::Scalar);
        assert_eq!(Simd::runnable(None).unwrap(), Simd::detect());
        for s in [Simd::Avx512, Simd::Avx2] {
            assert_eq!(Simd::runnable(Some(s.name())).is_ok(), s.supported());
        }
    }

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The canonical order written out plainly, fused like the vector paths.
    fn canonical(q: &[f32], x: &[f32]) -> f32 {
        let mut acc = [0f32; LANES];
        for (c, (qs, xs)) in q.chunks(LANES).zip(x.chunks(LANES)).enumerate() {
            let _ = c;
            for l in 0..qs.len() {
                acc[l] = qs[l].mul_add(xs[l], acc[l]);
            }
        }
        reduce_lanes(&acc)
    }

    /// `x` stored as little-endian `dtype` values.
    fn stored(x: &[f32], dtype: DType) -> Vec<u8> {
        match dtype {
            DType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => x
                .iter()
                .flat_map(|&v| f16::from_f32(v).to_bits().to_le_bytes())
                .collect(),
        }
    }

    #[test]
    fn every_path_follows_the_canonical_order() {
        let mut seed = 7;
        for &dim in &[1usize, 3, 16, 17, 100] {
            let dp = padded(dim);
            for (simd, dtype) in [Simd::Scalar, Simd::Avx2, Simd::Avx512]
                .into_iter()
                .flat_map(|s| [(s, DType::F32), (s, DType::F16)])
            {
                if !simd.supported() {
                    continue;
                }
                let (mr, nr) = (simd.mr(), simd.nr());
                let (nq, rows) = (mr + 1, nr + 3);
                let q: Vec<f32> = (0..nq * dim).map(|_| lcg(&mut seed)).collect();
                let x: Vec<f32> = (0..rows * dim).map(|_| lcg(&mut seed) * 100.0).collect();
                let xb = stored(&x, dtype);
                let row_bytes = dim * dtype.size();
                let a = pack_queries(&q, nq, dim, mr);
                let mut b = Vec::new();
                widen_tile(&xb, dtype, dim, nr, &mut b, &mut Vec::new());
                assert_eq!(b.len(), rows.div_ceil(nr) * nr * dp);
                let mut out = vec![0f32; mr * nr];
                for qb in 0..nq.div_ceil(mr) {
                    for p in 0..rows.div_ceil(nr) {
                        simd.block(&a[qb * mr * dp..], &b[p * nr * dp..], dp, &mut out, nr);
                        for i in 0..mr {
                            for j in 0..nr {
                                let (qi, rj) = (qb * mr + i, p * nr + j);
                                let (qr, xr) = (&a[qi * dp..(qi + 1) * dp], &b[rj * dp..(rj + 1) * dp]);
                                let got = out[i * nr + j];
                                let exact: f64 = qr.iter().zip(xr).map(|(&u, &v)| u as f64 * v as f64).sum();
                                assert!((got as f64 - exact).abs() <= 1e-4 * dim as f64, "{simd:?} d={dim}");
                                if simd != Simd::Scalar {
                                    assert_eq!(got.to_bits(), canonical(qr, xr).to_bits(), "{simd:?} d={dim}");
                                }
                                if rj < rows {
                                    let mut one = [0f32];
                                    simd.dots(&[(qr, &xb[rj * row_bytes..(rj + 1) * row_bytes])], dtype, &mut one);
                                    assert_eq!(one[0].to_bits(), got.to_bits(), "{simd:?} {dtype:?}: dots differs");
                                }
                            }
                        }
                    }
                }
                // many pairs at once (full groups and a short one) give the same bits
                let pairs: Vec<(&[f32], &[u8])> = (0..11)
                    .map(|t| (&a[(t % nq) * dp..][..dp], &xb[(t % rows) * row_bytes..][..row_bytes]))
                    .collect();
                let mut many = vec![0f32; pairs.len()];
                simd.dots(&pairs, dtype, &mut many);
                for (t, pair) in pairs.iter().enumerate() {
                    let mut one = [0f32];
                    simd.dots(std::slice::from_ref(pair), dtype, &mut one);
                    assert_eq!(many[t].to_bits(), one[0].to_bits());
                }
            }
        }
    }

    #[test]
    fn float16_widening_is_exact_for_every_value() {
        // all 65,536 bit patterns (NaN payloads aside), in rows of 35: whole vectors and tails
        let bits: Vec<u16> = (0..=u16::MAX).collect();
        let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
        let (mut out, mut f16s) = (vec![0f32; 35], vec![f16::ZERO; 35]);
        for (row, src) in bits.chunks_exact(35).zip(bytes.chunks_exact(70)) {
            widen(src, DType::F16, &mut out, &mut f16s);
            for (&b, &v) in row.iter().zip(&out) {
                let want = f16::from_bits(b).to_f32();
                assert!(
                    v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan()),
                    "{b:#06x}"
                );
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
        widen_tile(&bytes, DType::F16, 3, 4, &mut out, &mut Vec::new());
        let dp = padded(3);
        assert_eq!(out.len(), 4 * dp);
        for r in 0..2 {
            for d in 0..3 {
                assert_eq!(out[r * dp + d].to_bits(), vals[r * 3 + d].to_bits());
            }
            assert!(out[r * dp + 3..(r + 1) * dp].iter().all(|&v| v == 0.0));
        }
        assert!(out[2 * dp..].iter().all(|&v| v == 0.0)); // padding rows
    }
}
