//! x86-64 kernels: AVX-512F (8 queries x 32 rows, 16 accumulators) and AVX2+FMA
//! (6 queries x 16 rows, 12 accumulators). Register blocking keeps every accumulator in a
//! register so each step is two vector loads, MR broadcasts and 2*MR fused multiply-adds.

use std::arch::x86_64::*;

use super::x86_sizes::{AVX2_MR, AVX2_NR, AVX512_MR, AVX512_NR};

/// # Safety
/// The CPU must support AVX-512F; `a` must hold `dim * 8` values, `b` `dim * 32`, `out` rows of `ldo >= 32` values, 8 of them.
#[target_feature(enable = "avx512f")]
pub unsafe fn block_avx512(a: *const f32, b: *const f32, dim: usize, out: *mut f32, ldo: usize) {
    const MR: usize = AVX512_MR;
    const NR: usize = AVX512_NR;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for d in 0..dim {
        // SAFETY: d < dim, so every offset stays within the lengths the caller guarantees.
        let b0 = _mm512_loadu_ps(b.add(d * NR));
        let b1 = _mm512_loadu_ps(b.add(d * NR + 16));
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(d * MR + i));
            row[0] = _mm512_fmadd_ps(av, b0, row[0]);
            row[1] = _mm512_fmadd_ps(av, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: out holds MR rows of ldo >= NR values.
        _mm512_storeu_ps(out.add(i * ldo), row[0]);
        _mm512_storeu_ps(out.add(i * ldo + 16), row[1]);
    }
}

/// # Safety
/// The CPU must support AVX2 and FMA; `a` must hold `dim * 6` values, `b` `dim * 16`, `out` rows of `ldo >= 16` values, 6 of them.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn block_avx2(a: *const f32, b: *const f32, dim: usize, out: *mut f32, ldo: usize) {
    const MR: usize = AVX2_MR;
    const NR: usize = AVX2_NR;
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for d in 0..dim {
        // SAFETY: d < dim, so every offset stays within the lengths the caller guarantees.
        let b0 = _mm256_loadu_ps(b.add(d * NR));
        let b1 = _mm256_loadu_ps(b.add(d * NR + 8));
        for (i, row) in acc.iter_mut().enumerate() {
            let av = _mm256_set1_ps(*a.add(d * MR + i));
            row[0] = _mm256_fmadd_ps(av, b0, row[0]);
            row[1] = _mm256_fmadd_ps(av, b1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: out holds MR rows of ldo >= NR values.
        _mm256_storeu_ps(out.add(i * ldo), row[0]);
        _mm256_storeu_ps(out.add(i * ldo + 8), row[1]);
    }
}

/// One query (at stride 8 from `a`) against a 32-row panel, as in `block_avx512`.
///
/// # Safety
/// The CPU must support AVX-512F; `a` must hold `dim * 8` values from its start, `b` `dim * 32`,
/// `out` 32.
#[target_feature(enable = "avx512f")]
pub unsafe fn column_avx512(a: *const f32, b: *const f32, dim: usize, out: *mut f32) {
    let (mut c0, mut c1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    for d in 0..dim {
        // SAFETY: d < dim, within the caller's lengths.
        let av = _mm512_set1_ps(*a.add(d * AVX512_MR));
        c0 = _mm512_fmadd_ps(av, _mm512_loadu_ps(b.add(d * AVX512_NR)), c0);
        c1 = _mm512_fmadd_ps(av, _mm512_loadu_ps(b.add(d * AVX512_NR + 16)), c1);
    }
    _mm512_storeu_ps(out, c0);
    _mm512_storeu_ps(out.add(16), c1);
}

/// One query (at stride 6 from `a`) against a 16-row panel, as in `block_avx2`.
///
/// # Safety
/// The CPU must support AVX2 and FMA; `a` must hold `dim * 6` values from its start, `b`
/// `dim * 16`, `out` 16.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn column_avx2(a: *const f32, b: *const f32, dim: usize, out: *mut f32) {
    let (mut c0, mut c1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
    for d in 0..dim {
        // SAFETY: d < dim, within the caller's lengths.
        let av = _mm256_set1_ps(*a.add(d * AVX2_MR));
        c0 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b.add(d * AVX2_NR)), c0);
        c1 = _mm256_fmadd_ps(av, _mm256_loadu_ps(b.add(d * AVX2_NR + 8)), c1);
    }
    _mm256_storeu_ps(out, c0);
    _mm256_storeu_ps(out.add(8), c1);
}

/// Four independent `column_avx512` jobs at once (query pointers at stride 8, 32-row panels);
/// each job's lanes see exactly the operations of `block_avx512`.
///
/// # Safety
/// The CPU must support AVX-512F; each `a[j]` must hold `dim * 8` values from its start, each
/// `b[j]` `dim * 32`, `out` 128.
#[target_feature(enable = "avx512f")]
pub unsafe fn columns4_avx512(a: [*const f32; 4], b: [*const f32; 4], dim: usize, out: *mut f32) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 4];
    for d in 0..dim {
        for j in 0..4 {
            // SAFETY: d < dim, within the caller's lengths.
            let av = _mm512_set1_ps(*a[j].add(d * AVX512_MR));
            acc[j][0] = _mm512_fmadd_ps(av, _mm512_loadu_ps(b[j].add(d * AVX512_NR)), acc[j][0]);
            acc[j][1] = _mm512_fmadd_ps(av, _mm512_loadu_ps(b[j].add(d * AVX512_NR + 16)), acc[j][1]);
        }
    }
    for (j, c) in acc.iter().enumerate() {
        _mm512_storeu_ps(out.add(j * 32), c[0]);
        _mm512_storeu_ps(out.add(j * 32 + 16), c[1]);
    }
}

/// `q . x` for `dim` float32 `q` and float16 `x` (raw little-endian bytes), 64 partial sums.
///
/// # Safety
/// AVX-512F available; `q` holds `dim` floats and `x` `2 * dim` bytes.
#[target_feature(enable = "avx512f,f16c")]
pub unsafe fn dot_f16_avx512(q: *const f32, x: *const u8, dim: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut d = 0;
    while d + 64 <= dim {
        for (h, a) in acc.iter_mut().enumerate() {
            let xs = _mm512_cvtph_ps(_mm256_loadu_si256(x.add(2 * (d + 16 * h)) as *const __m256i));
            *a = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(d + 16 * h)), xs, *a);
        }
        d += 64;
    }
    while d + 16 <= dim {
        let xs = _mm512_cvtph_ps(_mm256_loadu_si256(x.add(2 * d) as *const __m256i));
        acc[0] = _mm512_fmadd_ps(_mm512_loadu_ps(q.add(d)), xs, acc[0]);
        d += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    _mm512_reduce_add_ps(sum) + dot_f16_tail(q, x, d, dim)
}

/// As `dot_f16_avx512` with 8-wide vectors.
///
/// # Safety
/// AVX2, FMA and F16C available; `q` holds `dim` floats and `x` `2 * dim` bytes.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn dot_f16_avx2(q: *const f32, x: *const u8, dim: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut d = 0;
    while d + 32 <= dim {
        for (h, a) in acc.iter_mut().enumerate() {
            let xs = _mm256_cvtph_ps(_mm_loadu_si128(x.add(2 * (d + 8 * h)) as *const __m128i));
            *a = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(d + 8 * h)), xs, *a);
        }
        d += 32;
    }
    let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    lanes.iter().sum::<f32>() + dot_f16_tail(q, x, d, dim)
}

/// The dimensions `from..dim` of the float16 dot product, one at a time.
#[inline(always)]
unsafe fn dot_f16_tail(q: *const f32, x: *const u8, from: usize, dim: usize) -> f32 {
    (from..dim)
        .map(|d| *q.add(d) * half::f16::from_bits(u16::from_le_bytes([*x.add(2 * d), *x.add(2 * d + 1)])).to_f32())
        .sum()
}
