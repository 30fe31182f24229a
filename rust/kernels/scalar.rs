//! Portable kernel: plain loops, which compilers vectorise for the baseline instruction set.

pub const MR: usize = 4;
pub const NR: usize = 8;

pub fn block(a: &[f32], b: &[f32], dim: usize, out: &mut [f32], ldo: usize) {
    let mut acc = [[0f32; NR]; MR];
    for d in 0..dim {
        let av = &a[d * MR..d * MR + MR];
        let bv = &b[d * NR..d * NR + NR];
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] += av[i] * bv[j];
            }
        }
    }
    for i in 0..MR {
        out[i * ldo..i * ldo + NR].copy_from_slice(&acc[i]);
    }
}

pub fn column(a: &[f32], i: usize, b: &[f32], dim: usize, out: &mut [f32]) {
    let mut acc = [0f32; NR];
    for d in 0..dim {
        let av = a[d * MR + i];
        let bv = &b[d * NR..d * NR + NR];
        for j in 0..NR {
            acc[j] += av * bv[j];
        }
    }
    out[..NR].copy_from_slice(&acc);
}
