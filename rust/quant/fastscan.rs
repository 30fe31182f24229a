//! 4-bit product-quantization scan with the lookup tables held in SIMD registers.
//!
//! With 16 centroids per subquantizer, a query's table for one subquantizer is 16 values: as
//! bytes it fits one 128-bit lane, and a byte shuffle (`pshufb`) looks up 16 codes at once.
//! Tables are rounded to `u8` with one scale per query (`T ~ min_g + delta * t`), so a row's
//! score is `bias + delta * (sum of its m bytes)`, summed in 16-bit lanes (at most 256
//! subquantizers keep the sum below 2^16). Codes come in blocks of 32 rows: per subquantizer
//! 16 bytes, byte `j` holding row `j` in its low nibble and row `j + 16` in its high one, so one
//! 32-byte load serves two subquantizers (AVX2) and a 64-byte load four (AVX-512).

use super::file::{CodesFile, Kind};
use super::pq::{tables, BLOCK};
use super::{offer, Scan};
use crate::topk::TopK;

/// Blocks scored per query before moving to the next query (their codes stay in L1/L2).
const TILE_BLOCKS: usize = 16;

pub struct FastScan<'a> {
    codes: &'a [u8],
    /// `[q][m_even][16]` quantized tables.
    luts: Vec<u8>,
    bias: Vec<f32>,
    delta: Vec<f32>,
    m_even: usize,
    path: Path,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Avx512,
    Avx2,
    Scalar,
}

impl Path {
    fn detect() -> Path {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx2") {
                return Path::Avx512;
            }
            if is_x86_feature_detected!("avx2") {
                return Path::Avx2;
            }
        }
        Path::Scalar
    }
}

impl<'a> FastScan<'a> {
    pub fn new(file: &'a CodesFile, queries: &[f32], nq: usize) -> FastScan<'a> {
        let Kind::Pq { m, .. } = file.header.kind else {
            unreachable!()
        };
        let (t, _, ksub) = tables(file, queries, nq);
        let m_even = m.next_multiple_of(2);
        let mut luts = vec![0u8; nq * m_even * 16];
        let (mut bias, mut delta) = (vec![0f32; nq], vec![0f32; nq]);
        for q in 0..nq {
            let rows = &t[q * m * ksub..(q + 1) * m * ksub];
            let mins: Vec<f32> = rows
                .chunks(ksub)
                .map(|r| r.iter().copied().fold(f32::INFINITY, f32::min))
                .collect();
            let range = rows
                .chunks(ksub)
                .zip(&mins)
                .map(|(r, mn)| r.iter().copied().fold(f32::NEG_INFINITY, f32::max) - mn)
                .fold(0f32, f32::max);
            let d = if range > 0.0 { range / 255.0 } else { 1.0 };
            for (g, (r, mn)) in rows.chunks(ksub).zip(&mins).enumerate() {
                for (c, &v) in r.iter().enumerate() {
                    luts[(q * m_even + g) * 16 + c] = ((v - mn) / d).round().clamp(0.0, 255.0) as u8;
                }
            }
            bias[q] = mins.iter().sum();
            delta[q] = d;
        }
        FastScan {
            codes: file.bytes(1),
            luts,
            bias,
            delta,
            m_even,
            path: Path::detect(),
        }
    }

    /// The 16-bit table sums of the 32 rows of one block for one query.
    #[inline]
    fn sums(&self, block: &[u8], lut: &[u8], out: &mut [u16; BLOCK]) {
        assert!(block.len() == self.m_even * 16 && lut.len() == block.len());
        match self.path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: features detected in `Path::detect`, lengths asserted above.
            Path::Avx512 => unsafe { x86::sums_avx512(block.as_ptr(), lut.as_ptr(), self.m_even / 2, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Path::Avx2 => unsafe { x86::sums_avx2(block.as_ptr(), lut.as_ptr(), self.m_even / 2, out) },
            _ => sums_scalar(block, lut, out),
        }
    }
}

fn sums_scalar(block: &[u8], lut: &[u8], out: &mut [u16; BLOCK]) {
    out.fill(0);
    for (codes, table) in block.chunks_exact(16).zip(lut.chunks_exact(16)) {
        for (j, &b) in codes.iter().enumerate() {
            out[j] += table[(b & 15) as usize] as u16;
            out[j + 16] += table[(b >> 4) as usize] as u16;
        }
    }
}

impl Scan for FastScan<'_> {
    fn scan(&self, lo: usize, hi: usize, tops: &mut [TopK], keep: Option<&[bool]>) {
        let block_bytes = self.m_even * 16;
        let (first, blocks) = (lo / BLOCK, (hi - lo).div_ceil(BLOCK));
        let mut sums = [0u16; BLOCK];
        let mut scores = [0f32; BLOCK];
        for tile in (0..blocks).step_by(TILE_BLOCKS) {
            for (q, top) in tops.iter_mut().enumerate() {
                let lut = &self.luts[q * block_bytes..(q + 1) * block_bytes];
                let (bias, delta) = (self.bias[q], self.delta[q]);
                for b in first + tile..first + (tile + TILE_BLOCKS).min(blocks) {
                    self.sums(&self.codes[b * block_bytes..(b + 1) * block_bytes], lut, &mut sums);
                    let r0 = b * BLOCK;
                    let n = BLOCK.min(hi - r0);
                    for (s, &v) in scores.iter_mut().zip(&sums) {
                        *s = bias + delta * v as f32;
                    }
                    offer(top, &scores[..n], r0, keep);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Adds the even bytes and the odd bytes of `v` (as 16-bit lanes) to two accumulators.
    macro_rules! split_add {
        ($even:expr, $odd:expr, $v:expr, $and:ident, $srli:ident, $add:ident, $mask:expr) => {
            $even = $add($even, $and($v, $mask));
            $odd = $add($odd, $srli::<8>($v));
        };
    }

    /// Final sums from four 256-bit accumulators (low-nibble rows even/odd, high-nibble rows
    /// even/odd), each holding in lane 0 and lane 1 partial sums of the same 8 rows.
    #[inline(always)]
    unsafe fn finish(acc: [__m256i; 4], out: &mut [u16; 32]) {
        for (h, pair) in acc.chunks(2).enumerate() {
            for (parity, &a) in pair.iter().enumerate() {
                let mut v = [0u16; 16];
                _mm256_storeu_si256(v.as_mut_ptr() as *mut __m256i, a);
                for e in 0..8 {
                    out[h * 16 + 2 * e + parity] = v[e].wrapping_add(v[8 + e]);
                }
            }
        }
    }

    /// # Safety
    /// AVX2 available; `codes` and `lut` hold `pairs * 32` bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sums_avx2(codes: *const u8, lut: *const u8, pairs: usize, out: &mut [u16; 32]) {
        let nib = _mm256_set1_epi8(0x0f);
        let low = _mm256_set1_epi16(0x00ff);
        let mut acc = [_mm256_setzero_si256(); 4];
        for p in 0..pairs {
            let c = _mm256_loadu_si256(codes.add(p * 32) as *const __m256i);
            let l = _mm256_loadu_si256(lut.add(p * 32) as *const __m256i);
            let vlo = _mm256_shuffle_epi8(l, _mm256_and_si256(c, nib));
            let vhi = _mm256_shuffle_epi8(l, _mm256_and_si256(_mm256_srli_epi16::<4>(c), nib));
            split_add!(
                acc[0],
                acc[1],
                vlo,
                _mm256_and_si256,
                _mm256_srli_epi16,
                _mm256_add_epi16,
                low
            );
            split_add!(
                acc[2],
                acc[3],
                vhi,
                _mm256_and_si256,
                _mm256_srli_epi16,
                _mm256_add_epi16,
                low
            );
        }
        finish(acc, out);
    }

    /// # Safety
    /// AVX-512BW and AVX2 available; `codes` and `lut` hold `pairs * 32` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub unsafe fn sums_avx512(codes: *const u8, lut: *const u8, pairs: usize, out: &mut [u16; 32]) {
        let nib = _mm512_set1_epi8(0x0f);
        let low = _mm512_set1_epi16(0x00ff);
        let mut wide = [_mm512_setzero_si512(); 4];
        let quads = pairs / 2;
        for p in 0..quads {
            let c = _mm512_loadu_si512(codes.add(p * 64) as *const _);
            let l = _mm512_loadu_si512(lut.add(p * 64) as *const _);
            let vlo = _mm512_shuffle_epi8(l, _mm512_and_si512(c, nib));
            let vhi = _mm512_shuffle_epi8(l, _mm512_and_si512(_mm512_srli_epi16::<4>(c), nib));
            split_add!(
                wide[0],
                wide[1],
                vlo,
                _mm512_and_si512,
                _mm512_srli_epi16,
                _mm512_add_epi16,
                low
            );
            split_add!(
                wide[2],
                wide[3],
                vhi,
                _mm512_and_si512,
                _mm512_srli_epi16,
                _mm512_add_epi16,
                low
            );
        }
        // fold the two 256-bit halves (subquantizers 4p, 4p+1 and 4p+2, 4p+3) together
        let mut acc = wide.map(|w| _mm256_add_epi16(_mm512_castsi512_si256(w), _mm512_extracti64x4_epi64::<1>(w)));
        if pairs % 2 == 1 {
            let mut tail = [_mm256_setzero_si256(); 4];
            sums_pair(codes.add(quads * 64), lut.add(quads * 64), &mut tail);
            for (a, t) in acc.iter_mut().zip(tail) {
                *a = _mm256_add_epi16(*a, t);
            }
        }
        finish(acc, out);
    }

    #[inline(always)]
    unsafe fn sums_pair(codes: *const u8, lut: *const u8, acc: &mut [__m256i; 4]) {
        let nib = _mm256_set1_epi8(0x0f);
        let low = _mm256_set1_epi16(0x00ff);
        let c = _mm256_loadu_si256(codes as *const __m256i);
        let l = _mm256_loadu_si256(lut as *const __m256i);
        let vlo = _mm256_shuffle_epi8(l, _mm256_and_si256(c, nib));
        let vhi = _mm256_shuffle_epi8(l, _mm256_and_si256(_mm256_srli_epi16::<4>(c), nib));
        split_add!(
            acc[0],
            acc[1],
            vlo,
            _mm256_and_si256,
            _mm256_srli_epi16,
            _mm256_add_epi16,
            low
        );
        split_add!(
            acc[2],
            acc[3],
            vhi,
            _mm256_and_si256,
            _mm256_srli_epi16,
            _mm256_add_epi16,
            low
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_sums_equal_scalar_sums() {
        let mut seed = 5u64;
        let mut byte = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 56) as u8
        };
        for m_even in [2usize, 4, 6, 64, 96, 256] {
            let block: Vec<u8> = (0..m_even * 16).map(|_| byte()).collect();
            let lut: Vec<u8> = (0..m_even * 16).map(|_| byte()).collect();
            let mut want = [0u16; 32];
            sums_scalar(&block, &lut, &mut want);
            for path in [Path::Avx2, Path::Avx512] {
                if Path::detect() == Path::Scalar || (path == Path::Avx512 && Path::detect() != Path::Avx512) {
                    continue;
                }
                let scan = FastScan {
                    codes: &[],
                    luts: vec![],
                    bias: vec![],
                    delta: vec![],
                    m_even,
                    path,
                };
                let mut got = [0u16; 32];
                scan.sums(&block, &lut, &mut got);
                assert_eq!(got, want, "m = {m_even}");
            }
        }
    }
}
