//! Micro-benchmark of the machine's own arithmetic peak, so that benchmarks can quote the
//! fraction of it they reach (CPUs differ between machines; a fixed number would mislead).
//! Many independent register-resident FMA chains: no memory traffic, no dependency stalls.

use super::Simd;

/// Float32 multiply-add peak in GFLOP/s over `threads` threads (each running ~`millis`).
pub fn fp32_peak_gflops(simd: Simd, threads: usize, millis: u64) -> f64 {
    assert!(
        simd.supported(),
        "the {} path needs CPU features this machine lacks",
        simd.name()
    );
    on_threads(threads, move || spin(simd, millis))
}

/// Int8 multiply-add peak (AVX-512 VNNI) in GOP/s (2 ops per multiply-add), if the CPU has it.
pub fn int8_peak_gops(threads: usize, millis: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    return where_detected(is_x86_feature_detected!("avx512vnni"), x86_peak::vnni, threads, millis);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, millis);
        None
    }
}

/// Int8 multiply-add peak of AVX2's `maddubs` in GOP/s (2 ops per multiply-add), if the CPU
/// has AVX2: unsigned by signed byte pairs summed to 16 bits, widened to 32 by a `madd` with
/// ones and accumulated, as the progressive stages' kernel does without VNNI.
pub fn maddubs_peak_gops(threads: usize, millis: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    return where_detected(is_x86_feature_detected!("avx2"), x86_peak::maddubs, threads, millis);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, millis);
        None
    }
}

/// Bfloat16 dot-product peak (AVX512_BF16, 2 flops per product) in GFLOP/s, if the CPU has it.
/// For comparison only: the int8 pass is twice as fast where both exist, so no bf16 pass is run.
pub fn bf16_peak_gflops(threads: usize, millis: u64) -> Option<f64> {
    #[cfg(target_arch = "x86_64")]
    return where_detected(is_x86_feature_detected!("avx512bf16"), x86_peak::bf16, threads, millis);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (threads, millis);
        None
    }
}

/// The rate of `kernel` (it returns the operations of a call of `iters`), run for about
/// `millis` on each of `threads` threads, when `detected` (the CPU has its features).
#[cfg(target_arch = "x86_64")]
fn where_detected(detected: bool, kernel: unsafe fn(usize) -> f64, threads: usize, millis: u64) -> Option<f64> {
    // SAFETY: the kernel runs only where its features were detected.
    detected.then(|| on_threads(threads, move || for_millis(millis, || unsafe { kernel(1 << 16) })))
}

/// The sum of what `step` returns, called again and again for about `millis`.
fn for_millis(millis: u64, mut step: impl FnMut() -> f64) -> f64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(millis);
    let mut total = 0f64;
    while std::time::Instant::now() < deadline {
        total += step();
    }
    total
}

fn on_threads(threads: usize, work: impl Fn() -> f64 + Send + Sync + Copy) -> f64 {
    let threads = crate::parallel::resolve_threads(threads.min(crate::parallel::MAX_THREADS)).unwrap_or(1);
    let start = std::time::Instant::now();
    // the kernels cannot fail; a panicked thread (a bug) measures nothing
    let ops = crate::parallel::map(0..threads, |_| Ok(work())).map_or(0.0, |ops| ops.iter().sum());
    ops / start.elapsed().as_secs_f64() / 1e9
}

fn spin(simd: Simd, millis: u64) -> f64 {
    const ITERS: usize = 1 << 16;
    let mut sink = 0f32;
    let flops = for_millis(millis, || {
        let (f, v) = match simd {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `fp32_peak_gflops` checked that the CPU supports the path.
            Simd::Avx512 => unsafe { x86_peak::avx512(ITERS) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Simd::Avx2 => unsafe { x86_peak::avx2(ITERS) },
            _ => scalar_peak(ITERS),
        };
        sink += v;
        f
    });
    std::hint::black_box(sink);
    flops
}

fn scalar_peak(iters: usize) -> (f64, f32) {
    let mut acc = [1f32; 16];
    let m = std::hint::black_box(0.999_999f32);
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = *a * m + 1e-7; // unfused, as in the scalar kernel
        }
    }
    ((iters * 16 * 2) as f64, acc.iter().sum())
}

#[cfg(target_arch = "x86_64")]
mod x86_peak {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iters: usize) -> (f64, f32) {
        let m = _mm512_set1_ps(std::hint::black_box(0.999_999));
        let c = _mm512_set1_ps(1e-7);
        let mut acc = [_mm512_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        let s: f32 = acc.iter().map(|&a| _mm512_reduce_add_ps(a)).sum();
        ((iters * 12 * 16 * 2) as f64, s)
    }

    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn vnni(iters: usize) -> f64 {
        let a = _mm512_set1_epi8(std::hint::black_box(3));
        let b = _mm512_set1_epi8(std::hint::black_box(-2));
        let mut acc = [_mm512_setzero_si512(); 12];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm512_dpbusd_epi32(*c, a, b);
            }
        }
        std::hint::black_box(acc);
        (iters * 12 * 64 * 2) as f64
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn maddubs(iters: usize) -> f64 {
        let ones = _mm256_set1_epi16(1);
        let mut a = _mm256_set1_epi8(std::hint::black_box(3));
        let mut b: [__m256i; 8] = std::array::from_fn(|j| _mm256_set1_epi8(std::hint::black_box(-2 - j as i8)));
        let mut acc = [_mm256_setzero_si256(); 2];
        for _ in 0..iters {
            // an empty asm that "changes" the inputs: no product can be hoisted out of the loop
            // or shared, and it costs no instruction (8 products in flight, as in the kernel)
            std::arch::asm!(
                "/* {0} {1} {2} {3} {4} {5} {6} {7} {8} */",
                inout(ymm_reg) a, inout(ymm_reg) b[0], inout(ymm_reg) b[1], inout(ymm_reg) b[2], inout(ymm_reg) b[3],
                inout(ymm_reg) b[4], inout(ymm_reg) b[5], inout(ymm_reg) b[6], inout(ymm_reg) b[7],
                options(pure, nomem, nostack)
            );
            for (j, &b) in b.iter().enumerate() {
                acc[j % 2] = _mm256_add_epi32(acc[j % 2], _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), ones));
            }
        }
        std::hint::black_box(acc);
        (iters * 8 * 32 * 2) as f64
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn bf16(iters: usize) -> f64 {
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(std::hint::black_box(0.5)), _mm512_set1_ps(0.25));
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..iters {
            for c in acc.iter_mut() {
                *c = _mm512_dpbf16_ps(*c, a, a);
            }
        }
        std::hint::black_box(acc);
        (iters * 12 * 32 * 2) as f64
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2(iters: usize) -> (f64, f32) {
        let m = _mm256_set1_ps(std::hint::black_box(0.999_999));
        let c = _mm256_set1_ps(1e-7);
        let mut acc = [_mm256_set1_ps(1.0); 12];
        for _ in 0..iters {
            for a in acc.iter_mut() {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let mut buf = [0f32; 8];
        let mut s = 0f32;
        for a in acc {
            _mm256_storeu_ps(buf.as_mut_ptr(), a);
            s += buf.iter().sum::<f32>();
        }
        ((iters * 12 * 8 * 2) as f64, s)
    }
}
