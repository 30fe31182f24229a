//! x86-64 kernels in the canonical order of `super`: AVX-512F (6 queries x 4 rows, 24
//! accumulators of 16 lanes) and AVX2+FMA (3 x 2, each 16-lane accumulator as two halves). Each
//! step of 16 dimensions loads the block's rows and queries once and does one fused
//! multiply-add per (query, row) pair; the lane sums are added by the canonical tree at the end.

use std::arch::x86_64::*;

use super::sizes::{AVX2_MR, AVX2_NR, AVX512_MR, AVX512_NR};
use super::{DOTS, LANES};

/// The canonical tree over the 16 lanes given as two halves (lanes 0-7, 8-15).
#[inline(always)]
unsafe fn reduce_halves(lo: __m256, hi: __m256) -> f32 {
    let s8 = _mm256_add_ps(lo, hi);
    let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
}

#[inline(always)]
unsafe fn reduce512(v: __m512) -> f32 {
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    reduce_halves(_mm512_castps512_ps256(v), hi)
}

/// # Safety
/// The CPU must support AVX-512F; `a` must hold 6 rows of `dp` values, `b` 4, `out` 6 rows of
/// `ldo >= 4` values; `dp` is a multiple of 16.
#[target_feature(enable = "avx512f,avx2")]
pub unsafe fn block_avx512(a: *const f32, b: *const f32, dp: usize, out: *mut f32, ldo: usize) {
    const MR: usize = AVX512_MR;
    const NR: usize = AVX512_NR;
    let mut acc = [_mm512_setzero_ps(); MR * NR];
    let mut c = 0;
    while c < dp {
        // SAFETY: c < dp, so every offset stays within the lengths the caller guarantees.
        let x: [__m512; NR] = std::array::from_fn(|j| _mm512_loadu_ps(b.add(j * dp + c)));
        for i in 0..MR {
            let q = _mm512_loadu_ps(a.add(i * dp + c));
            for j in 0..NR {
                acc[i * NR + j] = _mm512_fmadd_ps(q, x[j], acc[i * NR + j]);
            }
        }
        c += LANES;
    }
    let mut sums = [0f32; MR * NR];
    reduce512_many(&acc, &mut sums);
    for i in 0..MR {
        for j in 0..NR {
            // SAFETY: out holds MR rows of ldo >= NR values.
            *out.add(i * ldo + j) = sums[i * NR + j];
        }
    }
}

/// `reduce512` of each vector, kept out of line so that the kernel's register allocation sees
/// only its loop.
#[inline(never)]
#[target_feature(enable = "avx512f,avx2")]
unsafe fn reduce512_many(acc: &[__m512], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acc) {
        *o = reduce512(*a);
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `a` must hold 2 rows of `dp` values, `b` 2, `out` 2 rows
/// of `ldo >= 2` values; `dp` is a multiple of 16.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn block_avx2(a: *const f32, b: *const f32, dp: usize, out: *mut f32, ldo: usize) {
    const MR: usize = AVX2_MR;
    const NR: usize = AVX2_NR;
    // [query][row][half], flat (see `block_avx512`)
    let mut acc = [_mm256_setzero_ps(); MR * NR * 2];
    let mut c = 0;
    while c < dp {
        for h in 0..2 {
            // SAFETY: c + 8 h + 8 <= dp, within the caller's lengths.
            let x: [__m256; NR] = std::array::from_fn(|j| _mm256_loadu_ps(b.add(j * dp + c + 8 * h)));
            for i in 0..MR {
                let q = _mm256_loadu_ps(a.add(i * dp + c + 8 * h));
                for j in 0..NR {
                    acc[(i * NR + j) * 2 + h] = _mm256_fmadd_ps(q, x[j], acc[(i * NR + j) * 2 + h]);
                }
            }
        }
        c += LANES;
    }
    let mut sums = [0f32; MR * NR];
    reduce_halves_many(&acc, &mut sums);
    for i in 0..MR {
        for j in 0..NR {
            // SAFETY: out holds MR rows of ldo >= NR values.
            *out.add(i * ldo + j) = sums[i * NR + j];
        }
    }
}

/// `reduce_halves` of each pair of vectors, out of line (see `reduce512_many`).
#[inline(never)]
#[target_feature(enable = "avx2,fma")]
unsafe fn reduce_halves_many(acc: &[__m256], out: &mut [f32]) {
    for (o, a) in out.iter_mut().zip(acc.chunks_exact(2)) {
        *o = reduce_halves(a[0], a[1]);
    }
}

/// `DOTS` independent pairs `q[p] . x[p]` of padded queries and rows as stored (`dim` float16
/// values when `F16`, else float32), lane for lane as in `block_avx512`.
///
/// # Safety
/// The CPU must support AVX-512F (and F16C for `F16`); every `q[p]` must hold `padded(dim)`
/// values, every `x[p]` `dim` values.
#[target_feature(enable = "avx512f,avx2,f16c")]
pub unsafe fn dots_avx512<const F16: bool>(
    q: [*const f32; DOTS],
    x: [*const u8; DOTS],
    dim: usize,
    out: &mut [f32; DOTS],
) {
    let mut acc = [_mm512_setzero_ps(); DOTS];
    let whole = dim / LANES * LANES;
    let mut c = 0;
    while c < whole {
        for p in 0..DOTS {
            // SAFETY: c + 16 <= dim, within the caller's lengths.
            let xv = load16::<F16>(x[p], c);
            acc[p] = _mm512_fmadd_ps(_mm512_loadu_ps(q[p].add(c)), xv, acc[p]);
        }
        c += LANES;
    }
    if whole < dim {
        // the last partial step, from the row's tail copied into zeroed space
        for p in 0..DOTS {
            let tail = Tail::<F16>::copy(x[p], whole, dim);
            acc[p] = _mm512_fmadd_ps(_mm512_loadu_ps(q[p].add(c)), load16::<F16>(tail.ptr(), 0), acc[p]);
        }
    }
    reduce512_many(&acc, out);
}

/// As `dots_avx512` with each 16-lane accumulator as two halves, lane for lane as `block_avx2`.
///
/// # Safety
/// The CPU must support AVX2 and FMA (and F16C for `F16`); every `q[p]` must hold
/// `padded(dim)` values, every `x[p]` `dim` values.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dots_avx2<const F16: bool>(
    q: [*const f32; DOTS],
    x: [*const u8; DOTS],
    dim: usize,
    out: &mut [f32; DOTS],
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; DOTS];
    let whole = dim / LANES * LANES;
    let mut c = 0;
    let step = |acc: &mut [[__m256; 2]; DOTS], p: usize, qp: *const f32, xp: *const u8| {
        for (h, a) in acc[p].iter_mut().enumerate() {
            // SAFETY: 8 values from `8 h` on, within what the callers pass.
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(qp.add(8 * h)), load8::<F16>(xp, 8 * h), *a);
        }
    };
    while c < whole {
        for p in 0..DOTS {
            // SAFETY: c + 16 <= dim, within the caller's lengths.
            step(&mut acc, p, q[p].add(c), x[p].add(c * elem::<F16>()));
        }
        c += LANES;
    }
    if whole < dim {
        for p in 0..DOTS {
            let tail = Tail::<F16>::copy(x[p], whole, dim);
            step(&mut acc, p, q[p].add(c), tail.ptr());
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = reduce_halves(a[0], a[1]);
    }
}

/// `dst.len()` little-endian float16 values from `src`, widened (exactly) 16 at a time.
///
/// # Safety
/// The CPU must support AVX-512F; `src` must hold `2 * dst.len()` bytes.
#[target_feature(enable = "avx512f,avx2")]
pub unsafe fn widen_f16_avx512(src: *const u8, dst: &mut [f32]) {
    let whole = dst.len() / LANES * LANES;
    for c in (0..whole).step_by(LANES) {
        // SAFETY: c + 16 <= dst.len(), within both lengths.
        _mm512_storeu_ps(dst.as_mut_ptr().add(c), load16::<true>(src, c));
    }
    for (d, v) in dst.iter_mut().enumerate().skip(whole) {
        *v = half::f16::from_bits(u16::from_le_bytes([*src.add(2 * d), *src.add(2 * d + 1)])).to_f32();
    }
}

/// Bytes per stored value.
const fn elem<const F16: bool>() -> usize {
    if F16 {
        2
    } else {
        4
    }
}

/// Values `c..c + 16` of a stored row, as float32.
#[inline(always)]
unsafe fn load16<const F16: bool>(x: *const u8, c: usize) -> __m512 {
    if F16 {
        _mm512_cvtph_ps(_mm256_loadu_si256(x.add(2 * c) as *const __m256i))
    } else {
        _mm512_loadu_ps(x.add(4 * c) as *const f32)
    }
}

/// Values `c..c + 8` of a stored row, as float32.
#[inline(always)]
unsafe fn load8<const F16: bool>(x: *const u8, c: usize) -> __m256 {
    if F16 {
        _mm256_cvtph_ps(_mm_loadu_si128(x.add(2 * c) as *const __m128i))
    } else {
        _mm256_loadu_ps(x.add(4 * c) as *const f32)
    }
}

/// The last `dim - from` (< 16) stored values of a row, zero padded to 16.
struct Tail<const F16: bool>([u8; 64]);

impl<const F16: bool> Tail<F16> {
    #[inline(always)]
    unsafe fn copy(x: *const u8, from: usize, dim: usize) -> Self {
        let mut t = [0u8; 64];
        let e = elem::<F16>();
        std::ptr::copy_nonoverlapping(x.add(from * e), t.as_mut_ptr(), (dim - from) * e);
        Tail(t)
    }

    fn ptr(&self) -> *const u8 {
        self.0.as_ptr()
    }
}
