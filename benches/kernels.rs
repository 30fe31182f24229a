//! Micro-benchmark of the search kernels alone (no Python): each float32 SIMD path (its block
//! kernel and its single-pair rescoring kernel) and the int8 VNNI kernel, on cached operands,
//! against this machine's measured peak; and the per-tile shard checksum (`block_hash`).
//!
//!     cargo bench --bench kernels
//!
//! A kernel that falls far below the peak here is the kernel's fault; a search that falls below
//! the kernel's rate is the driver's (widening, top-k, memory).

use std::time::Instant;

use ilias_core::kernels::int8::{self, Int8Kernel};
use ilias_core::kernels::peak::{bf16_peak_gflops, fp32_peak_gflops, int8_peak_gops};
use ilias_core::kernels::{pack_queries, padded, widen_tile, Simd};
use ilias_core::store::{block_hash, DType};

const DIM: usize = 768;
/// Rows per timed tile (the search's tile size).
const ROWS: usize = 128;

fn values(n: usize, step: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * step) % 1000) as f32 / 1000.0 - 0.5).collect()
}

fn main() {
    let threads = 1;
    let dp = padded(DIM);
    let xf = values(ROWS * DIM, 104729);
    // the rows as a float16 store holds them
    let x: Vec<u8> = xf
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    for simd in [Simd::Avx512, Simd::Avx2, Simd::Scalar] {
        if !simd.supported() {
            continue;
        }
        let (mr, nr) = (simd.mr(), simd.nr());
        let a = pack_queries(&values(mr * DIM, 7919), mr, DIM, mr);
        let mut b = Vec::new();
        widen_tile(&x, DType::F16, DIM, nr, &mut b, &mut Vec::new());
        let mut out = vec![0f32; mr * ROWS];
        let calls = 2000;
        let t0 = Instant::now();
        for _ in 0..calls {
            for rb in 0..ROWS / nr {
                simd.block(
                    std::hint::black_box(&a),
                    &b[rb * nr * dp..],
                    dp,
                    &mut out[rb * nr..],
                    ROWS,
                );
            }
        }
        let gflops = (calls * mr * ROWS * DIM * 2) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        // single pairs, as the int8 pass rescores them: queries against scattered stored rows
        let pairs: Vec<(&[f32], &[u8])> = (0..256)
            .map(|t| (&a[(t % mr) * dp..][..dp], &x[(t * 37 % ROWS) * DIM * 2..][..DIM * 2]))
            .collect();
        let mut scores = vec![0f32; pairs.len()];
        let t0 = Instant::now();
        for _ in 0..calls {
            simd.dots(std::hint::black_box(&pairs), DType::F16, &mut scores);
            std::hint::black_box(&mut scores);
        }
        let pair_gflops = (calls * pairs.len() * DIM * 2) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        let peak = fp32_peak_gflops(simd, threads, 300);
        for (what, rate) in [
            (format!("block {mr}x{nr}"), gflops),
            ("single pairs".into(), pair_gflops),
        ] {
            println!(
                "float32 {:>6} {what:>12}: {rate:7.1} GFLOP/s = {:5.1}% of the path's 1-thread FMA peak {peak:.0}",
                simd.name(),
                100.0 * rate / peak
            );
        }
    }

    for kernel in [Int8Kernel::Vnni512, Int8Kernel::AvxVnni]
        .into_iter()
        .filter(|k| k.supported())
    {
        let (mr, nr) = (int8::MR, int8::NR);
        let qs = int8::quantize_queries(&values(mr * DIM, 7919), mr, DIM, mr);
        let mut tile = int8::Tile::default();
        tile.reset(nr, DIM, nr);
        for r in 0..nr {
            tile.set_row(r, &xf[r * DIM..(r + 1) * DIM], nr, &mut Vec::new());
        }
        let mut raw = vec![0i32; mr * nr];
        let steps = int8::d4(DIM);
        let calls = 200_000;
        let t0 = Instant::now();
        for _ in 0..calls {
            kernel.block(std::hint::black_box(&qs.codes), &tile.codes, steps, &mut raw, nr);
        }
        let gops = (calls * mr * nr * DIM * 2) as f64 / t0.elapsed().as_secs_f64() / 1e9;
        // the reference is the 512-bit VNNI peak where the CPU has it
        let peak = int8_peak_gops(threads, 300).unwrap_or(f64::NAN);
        println!(
            "int8 {:>11} block {mr}x{nr}: {gops:7.1} GOP/s   = {:5.1}% of the 1-thread AVX-512 VNNI peak {peak:.0}",
            kernel.name(),
            100.0 * gops / peak
        );
    }
    // the shard checksum that exact search computes per tile, on a cached tile (128 rows)
    let calls = 20_000;
    let t0 = Instant::now();
    let mut sink = 0u64;
    for c in 0..calls {
        sink = sink.wrapping_add(block_hash(std::hint::black_box(&x), c as u64));
    }
    let gbs = (calls * x.len()) as f64 / t0.elapsed().as_secs_f64() / 1e9;
    println!(
        "block_hash of one {ROWS}-row float16 tile ({} KiB, cached): {gbs:5.1} GB/s per thread ({sink:x})",
        x.len() / 1024
    );
    if let Some(bf16) = bf16_peak_gflops(threads, 300) {
        // why there is no bf16 pass: it would run at half the int8 rate
        println!("bf16 (AVX512_BF16) 1-thread peak: {bf16:.0} GFLOP/s, against the int8 VNNI peak above");
    }
}
