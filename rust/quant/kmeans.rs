//! Lloyd's k-means, seeded: the codebooks of product quantization.

/// A small, fast, seeded generator (splitmix64): training must give the same codes every time.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 11) as u128 * n as u128) >> 53) as usize
    }

    /// `count` distinct values of `0..n`, sorted (partial Fisher-Yates on a sparse map).
    pub fn sample(&mut self, n: usize, count: usize) -> Vec<usize> {
        let count = count.min(n);
        let mut swapped = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(count);
        for i in 0..count {
            let j = i + self.below(n - i);
            let vj = *swapped.get(&j).unwrap_or(&j);
            let vi = *swapped.get(&i).unwrap_or(&i);
            swapped.insert(j, vi);
            out.push(vj);
        }
        out.sort_unstable();
        out
    }
}

/// Centroids laid out for nearest-centroid search: transposed (`[d][k]`, so that one point's
/// distances to all centroids are computed along contiguous vectors) with their squared norms.
pub struct Codebook {
    k: usize,
    d: usize,
    transposed: Vec<f32>,
    norms: Vec<f32>,
}

impl Codebook {
    /// From row-major `k x d` centroids.
    pub fn new(centroids: &[f32], d: usize) -> Codebook {
        let k = centroids.len() / d;
        let mut transposed = vec![0f32; k * d];
        for (c, row) in centroids.chunks_exact(d).enumerate() {
            for (j, &v) in row.iter().enumerate() {
                transposed[j * k + c] = v;
            }
        }
        let norms = centroids
            .chunks_exact(d)
            .map(|c| c.iter().map(|v| v * v).sum())
            .collect();
        Codebook {
            k,
            d,
            transposed,
            norms,
        }
    }

    /// The index of the centroid nearest to `x` (squared L2; ties: the lowest index).
    /// `dist` is scratch space, reused between calls.
    #[inline]
    pub fn nearest(&self, x: &[f32], dist: &mut Vec<f32>) -> usize {
        #[cfg(target_arch = "x86_64")]
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was just detected.
            return unsafe { self.nearest_avx512(x, dist) };
        }
        self.nearest_lanes(x, dist)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn nearest_avx512(&self, x: &[f32], dist: &mut Vec<f32>) -> usize {
        self.nearest_lanes(x, dist)
    }

    #[inline(always)]
    fn nearest_lanes(&self, x: &[f32], dist: &mut Vec<f32>) -> usize {
        dist.clear();
        dist.extend_from_slice(&self.norms);
        for (j, col) in self.transposed.chunks_exact(self.k).enumerate().take(self.d) {
            let w = -2.0 * x[j];
            for (acc, &c) in dist.iter_mut().zip(col) {
                *acc += w * c;
            }
        }
        let mut best = (f32::INFINITY, 0);
        for (c, &v) in dist.iter().enumerate() {
            if v < best.0 {
                best = (v, c);
            }
        }
        best.1
    }
}

/// `k` centroids (row-major `k x d`) of the `n x d` points, after `iters` Lloyd iterations from
/// `k` distinct random points. An empty cluster takes half of the largest one (its centroid is
/// split in two slightly different copies), so every centroid stays in use.
pub fn kmeans(points: &[f32], d: usize, k: usize, iters: usize, rng: &mut Rng) -> Vec<f32> {
    let n = points.len() / d;
    assert!(n >= 1 && d >= 1 && k >= 1);
    let mut centroids: Vec<f32> = (0..k)
        .flat_map(|c| {
            // with fewer points than centroids, points repeat (and splitting separates them)
            let p = if n >= k { c } else { c % n };
            points[p * d..(p + 1) * d].to_vec()
        })
        .collect();
    if n > k {
        for (c, p) in rng.sample(n, k).into_iter().enumerate() {
            centroids[c * d..(c + 1) * d].copy_from_slice(&points[p * d..(p + 1) * d]);
        }
    }
    let mut assign = vec![0usize; n];
    let mut sums = vec![0f64; k * d];
    let mut counts = vec![0usize; k];
    let mut dist = Vec::new();
    for _ in 0..iters {
        let book = Codebook::new(&centroids, d);
        for (x, a) in points.chunks_exact(d).zip(assign.iter_mut()) {
            *a = book.nearest(x, &mut dist);
        }
        sums.fill(0.0);
        counts.fill(0);
        for (x, &a) in points.chunks_exact(d).zip(&assign) {
            counts[a] += 1;
            for (s, &v) in sums[a * d..(a + 1) * d].iter_mut().zip(x) {
                *s += v as f64;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                for j in 0..d {
                    centroids[c * d + j] = (sums[c * d + j] / counts[c] as f64) as f32;
                }
            }
        }
        for c in 0..k {
            if counts[c] == 0 {
                let big = (0..k).max_by_key(|&b| counts[b]).unwrap_or(0);
                for j in 0..d {
                    let v = centroids[big * d + j];
                    let eps = if j % 2 == 0 { 1.0 / 1024.0 } else { -1.0 / 1024.0 };
                    centroids[c * d + j] = v * (1.0 + eps);
                    centroids[big * d + j] = v * (1.0 - eps);
                }
                counts[big] /= 2;
                counts[c] = counts[big];
            }
        }
    }
    centroids
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_well_separated_clusters() {
        let mut rng = Rng::new(1);
        let centres = [[0.0f32, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        let mut points = Vec::new();
        for i in 0..400 {
            let c = centres[i % 4];
            points.push(c[0] + (rng.below(1000) as f32 / 1000.0 - 0.5));
            points.push(c[1] + (rng.below(1000) as f32 / 1000.0 - 0.5));
        }
        let got = kmeans(&points, 2, 4, 20, &mut Rng::new(7));
        for c in centres {
            let near = got
                .chunks(2)
                .any(|g| (g[0] - c[0]).abs() < 0.2 && (g[1] - c[1]).abs() < 0.2);
            assert!(near, "{c:?} not found in {got:?}");
        }
    }

    #[test]
    fn samples_are_distinct_and_seeded() {
        let a = Rng::new(3).sample(1000, 100);
        assert_eq!(a, Rng::new(3).sample(1000, 100));
        let mut d = a.clone();
        d.dedup();
        assert_eq!(d.len(), 100);
        assert!(a.iter().all(|&v| v < 1000));
        assert_eq!(Rng::new(3).sample(5, 10), vec![0, 1, 2, 3, 4]);
    }
}
