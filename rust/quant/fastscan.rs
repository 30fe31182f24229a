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
use super::{Candidates, Scan};

/// Blocks scored per query before moving to the next query (their codes stay in L1/L2).
const TILE_BLOCKS: usize = 320;

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

    /// The 16-bit table sums of the 32 rows of one block for a group of `G` queries (their
    /// tables `luts`). Returns per query the mask of rows whose sum reaches `mins[i]`; `out[i]`
    /// is written only when that mask is not empty. After the first blocks most blocks hold no
    /// candidate and cost no more than their sums; the codes are loaded and split once for the
    /// group.
    #[inline]
    fn sums<const G: usize>(
        &self,
        block: &[u8],
        luts: [&[u8]; G],
        mins: [u16; G],
        out: &mut [[u16; BLOCK]; G],
    ) -> [u32; G] {
        assert!(block.len() == self.m_even * 16 && luts.iter().all(|l| l.len() == block.len()));
        let ptrs = luts.map(|l| l.as_ptr());
        match self.path {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: features detected in `Path::detect`, lengths asserted above.
            Path::Avx512 => unsafe { x86::sums_avx512(block.as_ptr(), ptrs, self.m_even / 2, mins, out) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Path::Avx2 => unsafe { x86::sums_avx2(block.as_ptr(), ptrs, self.m_even / 2, mins, out) },
            _ => std::array::from_fn(|i| sums_scalar(block, luts[i], mins[i], &mut out[i])),
        }
    }

    /// Scores `blocks` for the `G` queries from `q0`.
    fn scan_group<const G: usize>(&self, blocks: std::ops::Range<usize>, hi: usize, q0: usize, found: &mut Candidates) {
        let block_bytes = self.m_even * 16;
        let luts: [&[u8]; G] = std::array::from_fn(|i| &self.luts[(q0 + i) * block_bytes..(q0 + i + 1) * block_bytes]);
        let (bias, delta) = (&self.bias[q0..q0 + G], &self.delta[q0..q0 + G]);
        let mut mins: [u16; G] = std::array::from_fn(|i| min_sum(found.threshold(q0 + i), bias[i], delta[i]));
        let mut sums = [[0u16; BLOCK]; G];
        for b in blocks {
            let reached = self.sums(
                &self.codes[b * block_bytes..(b + 1) * block_bytes],
                luts,
                mins,
                &mut sums,
            );
            for (i, &mask) in reached.iter().enumerate().filter(|(_, &m)| m != 0) {
                let r0 = b * BLOCK;
                let mut bits = mask;
                while bits != 0 {
                    let j = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    // padding rows of the last block are not rows
                    if r0 + j < hi {
                        found.push(q0 + i, bias[i] + delta[i] * sums[i][j] as f32, r0 + j);
                    }
                }
                found.publish(q0 + i);
                mins[i] = min_sum(found.threshold(q0 + i), bias[i], delta[i]);
            }
        }
    }
}

fn sums_scalar(block: &[u8], lut: &[u8], min: u16, out: &mut [u16; BLOCK]) -> u32 {
    out.fill(0);
    for (codes, table) in block.chunks_exact(16).zip(lut.chunks_exact(16)) {
        for (j, &b) in codes.iter().enumerate() {
            out[j] += table[(b & 15) as usize] as u16;
            out[j + 16] += table[(b >> 4) as usize] as u16;
        }
    }
    out.iter()
        .enumerate()
        .fold(0, |m, (j, &v)| m | ((v >= min) as u32) << j)
}

/// The smallest table sum whose score `bias + delta * sum` may reach `threshold` (one step of
/// slack covers the rounding of the score).
#[inline]
fn min_sum(threshold: f32, bias: f32, delta: f32) -> u16 {
    let steps = ((threshold - bias) / delta).floor() - 1.0;
    if steps.is_nan() {
        0
    } else {
        steps.clamp(0.0, u16::MAX as f32) as u16
    }
}

/// Queries scored together against each block of codes.
const GROUP: usize = 2;

impl Scan for FastScan<'_> {
    fn scan(&self, lo: usize, hi: usize, found: &mut Candidates) {
        let (first, blocks) = (lo / BLOCK, (hi - lo).div_ceil(BLOCK));
        for tile in (0..blocks).step_by(TILE_BLOCKS) {
            let range = first + tile..first + (tile + TILE_BLOCKS).min(blocks);
            let whole = self.bias.len() / GROUP * GROUP;
            for q0 in (0..whole).step_by(GROUP) {
                self.scan_group::<GROUP>(range.clone(), hi, q0, found);
            }
            for q0 in whole..self.bias.len() {
                self.scan_group::<1>(range.clone(), hi, q0, found);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Final sums of one query from four 256-bit accumulators: the low-nibble rows as 16-bit
    /// words (even row + 256 x odd row, wrapping), their odd rows, and the same for the
    /// high-nibble rows; lane 0 and lane 1 hold partial sums of the same rows. Written to `out`
    /// in row order only when one reaches `min`.
    #[inline(always)]
    unsafe fn finish(acc: [__m256i; 4], min: u16, out: &mut [u16; 32]) -> u32 {
        let t = acc.map(|a| _mm_add_epi16(_mm256_castsi256_si128(a), _mm256_extracti128_si256::<1>(a)));
        // even rows: the words minus 256 x the odd rows (exact: every true sum is below 2^16)
        let lo_even = _mm_sub_epi16(t[0], _mm_slli_epi16::<8>(t[1]));
        let hi_even = _mm_sub_epi16(t[2], _mm_slli_epi16::<8>(t[3]));
        let top = _mm_max_epu16(_mm_max_epu16(lo_even, t[1]), _mm_max_epu16(hi_even, t[3]));
        // lanes where v >= min: max(v, min) == v
        let floor = _mm_set1_epi16(min as i16);
        let reach = |v: __m128i| _mm_cmpeq_epi16(_mm_max_epu16(v, floor), v);
        if _mm_movemask_epi8(reach(top)) == 0 {
            return 0;
        }
        let rows = [
            _mm_unpacklo_epi16(lo_even, t[1]),
            _mm_unpackhi_epi16(lo_even, t[1]),
            _mm_unpacklo_epi16(hi_even, t[3]),
            _mm_unpackhi_epi16(hi_even, t[3]),
        ];
        let o = out.as_mut_ptr() as *mut __m128i;
        for (i, &r) in rows.iter().enumerate() {
            _mm_storeu_si128(o.add(i), r);
        }
        // one bit per row: the 16-bit compare results narrowed to bytes
        let low = _mm_movemask_epi8(_mm_packs_epi16(reach(rows[0]), reach(rows[1]))) as u32;
        let high = _mm_movemask_epi8(_mm_packs_epi16(reach(rows[2]), reach(rows[3]))) as u32;
        low | high << 16
    }

    /// One pair of subquantizers (32 bytes of codes, already split into nibbles) for one query.
    #[inline(always)]
    unsafe fn pair256(lo: __m256i, hi: __m256i, lut: *const u8, acc: &mut [__m256i; 4]) {
        let l = _mm256_loadu_si256(lut as *const __m256i);
        let (vlo, vhi) = (_mm256_shuffle_epi8(l, lo), _mm256_shuffle_epi8(l, hi));
        acc[0] = _mm256_add_epi16(acc[0], vlo);
        acc[1] = _mm256_add_epi16(acc[1], _mm256_srli_epi16::<8>(vlo));
        acc[2] = _mm256_add_epi16(acc[2], vhi);
        acc[3] = _mm256_add_epi16(acc[3], _mm256_srli_epi16::<8>(vhi));
    }

    #[inline(always)]
    unsafe fn split256(codes: *const u8) -> (__m256i, __m256i) {
        let nib = _mm256_set1_epi8(0x0f);
        let c = _mm256_loadu_si256(codes as *const __m256i);
        (
            _mm256_and_si256(c, nib),
            _mm256_and_si256(_mm256_srli_epi16::<4>(c), nib),
        )
    }

    /// # Safety
    /// AVX2 available; `codes` and every `luts[i]` hold `pairs * 32` bytes.
    #[target_feature(enable = "avx2")]
    pub unsafe fn sums_avx2<const G: usize>(
        codes: *const u8,
        luts: [*const u8; G],
        pairs: usize,
        mins: [u16; G],
        out: &mut [[u16; 32]; G],
    ) -> [u32; G] {
        let mut acc = [[_mm256_setzero_si256(); 4]; G];
        for p in 0..pairs {
            let (lo, hi) = split256(codes.add(p * 32));
            for i in 0..G {
                pair256(lo, hi, luts[i].add(p * 32), &mut acc[i]);
            }
        }
        std::array::from_fn(|i| finish(acc[i], mins[i], &mut out[i]))
    }

    /// # Safety
    /// AVX-512BW and AVX2 available; `codes` and every `luts[i]` hold `pairs * 32` bytes.
    #[target_feature(enable = "avx512f,avx512bw,avx2")]
    pub unsafe fn sums_avx512<const G: usize>(
        codes: *const u8,
        luts: [*const u8; G],
        pairs: usize,
        mins: [u16; G],
        out: &mut [[u16; 32]; G],
    ) -> [u32; G] {
        let nib = _mm512_set1_epi8(0x0f);
        let mut wide = [[_mm512_setzero_si512(); 4]; G];
        let quads = pairs / 2;
        for p in 0..quads {
            let c = _mm512_loadu_si512(codes.add(p * 64) as *const _);
            let (lo, hi) = (
                _mm512_and_si512(c, nib),
                _mm512_and_si512(_mm512_srli_epi16::<4>(c), nib),
            );
            for i in 0..G {
                let l = _mm512_loadu_si512(luts[i].add(p * 64) as *const _);
                let (vlo, vhi) = (_mm512_shuffle_epi8(l, lo), _mm512_shuffle_epi8(l, hi));
                let a = &mut wide[i];
                a[0] = _mm512_add_epi16(a[0], vlo);
                a[1] = _mm512_add_epi16(a[1], _mm512_srli_epi16::<8>(vlo));
                a[2] = _mm512_add_epi16(a[2], vhi);
                a[3] = _mm512_add_epi16(a[3], _mm512_srli_epi16::<8>(vhi));
            }
        }
        let mut masks = [0; G];
        for i in 0..G {
            // fold the two 256-bit halves (subquantizers 4p, 4p+1 and 4p+2, 4p+3) together
            let mut acc =
                wide[i].map(|w| _mm256_add_epi16(_mm512_castsi512_si256(w), _mm512_extracti64x4_epi64::<1>(w)));
            if pairs % 2 == 1 {
                let (lo, hi) = split256(codes.add(quads * 64));
                pair256(lo, hi, luts[i].add(quads * 64), &mut acc);
            }
            masks[i] = finish(acc, mins[i], &mut out[i]);
        }
        masks
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
            let luts: Vec<Vec<u8>> = (0..4).map(|_| (0..m_even * 16).map(|_| byte()).collect()).collect();
            let mut want = [[0u16; 32]; 4];
            for i in 0..4 {
                assert_eq!(sums_scalar(&block, &luts[i], 0, &mut want[i]), u32::MAX);
            }
            let tops: Vec<u16> = want.iter().map(|w| *w.iter().max().unwrap()).collect();
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
                let mut got = [[0u16; 32]; 4];
                let luts4 = [&luts[0][..], &luts[1][..], &luts[2][..], &luts[3][..]];
                // queries 1 and 3 reach their maxima, 0 and 2 ask for one more
                let mins = [tops[0] + 1, tops[1], tops[2] + 1, tops[3]];
                let masks = scan.sums::<4>(&block, luts4, mins, &mut got);
                let at_max = |i: usize| (0..32).fold(0u32, |m, j| m | ((want[i][j] == tops[i]) as u32) << j);
                assert_eq!(masks, [0, at_max(1), 0, at_max(3)], "m = {m_even}");
                assert_eq!((got[1], got[3]), (want[1], want[3]), "m = {m_even}");
                let mut one = [[0u16; 32]; 1];
                assert_eq!(scan.sums::<1>(&block, [luts4[2]], [0], &mut one), [u32::MAX]);
                assert_eq!(one[0], want[2]);
            }
        }
    }
}
