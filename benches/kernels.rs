//! Micro-benchmark of the search kernels alone (no Python): each float32 SIMD path and the int8
//! VNNI kernel on one cached query block x database panel, against this machine's measured peak.
//!
//!     cargo bench --bench kernels
//!
//! A kernel that falls far below the peak here is the kernel's fault; a search that falls below
//! the kernel's rate is the driver's (packing, top-k, memory).

use std::time::Instant;

use ilias_core::kernels::int8::{self, Int8Kernel};
use ilias_core::kernels::peak::{fp32_peak_gflops, int8_peak_gops};
use ilias_core::kernels::{pack_queries, pack_rows, RowScratch, Simd};
use ilias_core::store::DType;

const DIM: usize = 768;

fn main() {
    let threads = 1;
    for simd in [Simd::Avx512, Simd::Avx2, Simd::Scalar] {
        if !simd.supported() {
            continue;
        }
        let (mr, nr) = (simd.mr(), simd.nr());
        let q: Vec<f32> = (0..mr * DIM)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let x: Vec<u8> = (0..nr * DIM)
            .flat_map(|i| (((i * 104729) % 1000) as f32 / 1000.0 - 0.5).to_le_bytes())
            .collect();
        let a = pack_queries(&q, mr, DIM, mr);
        let mut b = Vec::new();
        pack_rows(
            &x,
            DType::F32,
            nr,
            DIM,
            nr,
            &mut b,
            &mut RowScratch::default(),
            |_, _| {},
        );
        let mut out = vec![0f32; mr * nr];
        let calls = 200_000 / (mr * nr / 8).max(1);
        let t0 = Instant::now();
        for _ in 0..calls {
            simd.block(std::hint::black_box(&a), &b, DIM, &mut out, nr);
        }
        let secs = t0.elapsed().as_secs_f64();
        let gflops = (calls * mr * nr * DIM * 2) as f64 / secs / 1e9;
        if simd == Simd::Scalar {
            // no meaningful peak: the compiler vectorises plain loops for the baseline ISA
            println!("float32 {:>6} block {mr}x{nr}: {gflops:7.1} GFLOP/s", simd.name());
        } else {
            let peak = fp32_peak_gflops(simd, threads, 300);
            println!(
                "float32 {:>6} block {mr}x{nr}: {gflops:7.1} GFLOP/s = {:5.1}% of its 1-thread peak {peak:.0}",
                simd.name(),
                100.0 * gflops / peak
            );
        }

        if let Some(kernel) = Int8Kernel::detect(simd) {
            let qs = int8::quantize_queries(&q, mr, DIM, mr);
            let mut tile = int8::Tile::default();
            tile.reset(nr, DIM, nr);
            let xf: Vec<f32> = x
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            for r in 0..nr {
                tile.set_row(r, &xf[r * DIM..(r + 1) * DIM], nr, &mut Vec::new());
            }
            let mut raw = vec![0i32; mr * nr];
            let steps = int8::d4(DIM);
            let calls = calls * 4;
            let t0 = Instant::now();
            for _ in 0..calls {
                kernel.block(simd, std::hint::black_box(&qs.codes), &tile.codes, steps, &mut raw, nr);
            }
            let gops = (calls * mr * nr * DIM * 2) as f64 / t0.elapsed().as_secs_f64() / 1e9;
            let peak = int8_peak_gops(threads, 300).unwrap_or(f64::NAN);
            println!(
                "int8 {:>9} block {mr}x{nr}: {gops:7.1} GOP/s   = {:5.1}% of its 1-thread peak {peak:.0}",
                kernel.name(),
                100.0 * gops / peak
            );
        }
    }
}
