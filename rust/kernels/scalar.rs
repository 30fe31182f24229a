//! Portable kernels in the canonical order (unfused multiply-adds), which compilers vectorise
//! for the baseline instruction set.

use super::{reduce_lanes, sizes::SCALAR_MR as MR, sizes::SCALAR_NR as NR, LANES};

pub fn block(a: &[f32], b: &[f32], dp: usize, out: &mut [f32], ldo: usize) {
    for i in 0..MR {
        for j in 0..NR {
            out[i * ldo + j] = dot(&a[i * dp..(i + 1) * dp], &b[j * dp..(j + 1) * dp]);
        }
    }
}

pub fn dot(q: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    for (qs, xs) in q.chunks_exact(LANES).zip(x.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] += qs[l] * xs[l];
        }
    }
    reduce_lanes(&acc)
}
