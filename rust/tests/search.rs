//! The public drivers against a brute force, without Python: exact search (every method, SIMD
//! path and thread count, with tiers), code search (sq8, pq, pq x4, with exact rescoring) over
//! a database of float16 and float32 .npy shards written here, and the progressive pass, whose
//! results must be those of the float32 search bit for bit.
//!
//! The brute force sums in f64 and ranks by score, equal scores larger row first. Identical rows
//! (planted duplicates, also across shards) score the same bits in every kernel, so their order
//! is checked exactly; other rows closer than `NEAR` to a neighbour's score only by score.

use std::path::{Path, PathBuf};

use ilias_core::kernels::Simd;
use ilias_core::parallel::Control;
use ilias_core::quant::progressive::{Progressive, StageKernel};
use ilias_core::quant::{self, pq::Training, CodeSearch, CodesFile, Kind};
use ilias_core::search::{self, Int8Choice, SearchOptions, Tier};
use ilias_core::store::Database;

const DIM: usize = 40; // not a multiple of the 16 lanes: padding is exercised
const SHARDS: [(&str, usize); 3] = [("<f2", 900), ("<f4", 700), ("<f2", 1400)];
const NQ: usize = 13;
/// Returned scores equal the brute force's up to float32 summation.
const TOL: f64 = 1e-5;
/// Scores this close are not relied on to order their rows.
const NEAR: f64 = 1e-4;

/// A temporary folder, removed when the test ends.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ilias-core-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// splitmix64, and normal draws from it (Box-Muller).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    fn unit_row(&mut self) -> Vec<f32> {
        let x: Vec<f64> = (0..DIM).map(|_| self.normal()).collect();
        unit(&x)
    }
}

fn unit(x: &[f64]) -> Vec<f32> {
    let norm = x.iter().map(|v| v * v).sum::<f64>().sqrt();
    x.iter().map(|v| (v / norm) as f32).collect()
}

/// A standard .npy file (format 1.0) of `rows x dim` values of `descr` ("<f2" or "<f4").
fn write_npy(path: &Path, descr: &str, values: &[f32], dim: usize) {
    let rows = values.len() / dim;
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header.as_bytes());
    for &v in values {
        match descr {
            "<f2" => bytes.extend(half::f16::from_f32(v).to_le_bytes()),
            _ => bytes.extend(v.to_le_bytes()),
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// The database: its shard files and every row as stored (float16 rows rounded), in order.
struct Data {
    dir: TempDir,
    paths: Vec<PathBuf>,
    rows: Vec<Vec<f32>>,
    queries: Vec<f32>,
}

fn data(name: &str) -> Data {
    let dir = TempDir::new(name);
    let mut rng = Rng(42);
    let total: usize = SHARDS.iter().map(|s| s.1).sum();
    let mut rows: Vec<Vec<f32>> = (0..total).map(|_| rng.unit_row()).collect();
    for (i, row) in rows.iter_mut().enumerate() {
        if dtype_of(i) == "<f2" {
            row.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
        }
    }
    // duplicates: exact ties, within a shard and across shards (a float16 row stored as float32)
    for (from, to) in [(5, 17), (5, 2990), (100, 101), (1000, 1001), (1000, 1500), (42, 1200)] {
        rows[to] = rows[from].clone();
    }
    let mut paths = Vec::new();
    let mut first = 0;
    for (s, &(descr, n)) in SHARDS.iter().enumerate() {
        let path = dir.0.join(format!("{s:05}.npy"));
        write_npy(&path, descr, &rows[first..first + n].concat(), DIM);
        paths.push(path);
        first += n;
    }
    // queries: noisy copies of rows (clear nearest neighbours, duplicates among them) and random
    let mut queries = Vec::new();
    for q in 0..NQ {
        let row = match q % 3 {
            0 => rng.unit_row(),
            _ => {
                let base = &rows[[5, 100, 1000, 42, 7, 2500, 1999, 333, 1400][q % 9]];
                base.iter().map(|&v| v + 0.05 * rng.normal() as f32).collect()
            }
        };
        queries.extend(row);
    }
    Data {
        dir,
        paths,
        rows,
        queries,
    }
}

fn dtype_of(row: usize) -> &'static str {
    let mut first = 0;
    for &(descr, n) in &SHARDS {
        if row < first + n {
            return descr;
        }
        first += n;
    }
    unreachable!()
}

/// Every row's exact score for query `q`.
fn brute_scores(d: &Data, q: usize) -> Vec<f64> {
    let query = &d.queries[q * DIM..(q + 1) * DIM];
    d.rows
        .iter()
        .map(|row| row.iter().zip(query).map(|(&a, &b)| a as f64 * b as f64).sum())
        .collect()
}

/// The rows with `allowed[r]` in rank order: higher score first, equal scores larger row first.
fn ranked(scores: &[f64], allowed: impl Fn(usize) -> bool) -> Vec<usize> {
    let mut rows: Vec<usize> = (0..scores.len()).filter(|&r| allowed(r)).collect();
    rows.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(b.cmp(&a)));
    rows
}

/// Checks one returned list (`k` scores and rows) against the brute force of its query.
fn check_list(what: &str, got_scores: &[f32], got_rows: &[i64], scores: &[f64], want: &[usize]) {
    let k = got_scores.len();
    assert!(want.len() >= k, "{what}: the tier holds fewer than k rows");
    for j in 0..k {
        let (s, r) = (got_scores[j] as f64, got_rows[j]);
        assert!(r >= 0 && (r as usize) < scores.len(), "{what}: rank {j} is row {r}");
        let r = r as usize;
        assert!(
            (s - scores[want[j]]).abs() <= TOL,
            "{what}: rank {j} scores {s}, want {}",
            scores[want[j]]
        );
        assert!(
            (s - scores[r]).abs() <= TOL,
            "{what}: row {r} scores {s}, exactly {}",
            scores[r]
        );
        // where no other row comes near (exact ties aside) the rank says which row it is
        let clear = |i: usize| {
            let d = (scores[want[i]] - scores[want[j]]).abs();
            d == 0.0 || d > NEAR
        };
        let neighbours = j.saturating_sub(1)..(j + 2).min(want.len());
        if neighbours.clone().all(clear) {
            assert_eq!(r, want[j], "{what}: rank {j}");
        }
        if j > 0 && got_scores[j] == got_scores[j - 1] {
            assert!(
                got_rows[j] < got_rows[j - 1],
                "{what}: equal scores must put the larger row first"
            );
        }
    }
    let mut distinct = got_rows.to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), k, "{what}: a row returned twice");
}

#[test]
fn exact_search_equals_the_brute_force() {
    let d = data("search");
    let db = Database::open(&d.paths, None).unwrap();
    assert_eq!((db.rows, db.dim), (d.rows.len(), DIM));
    let brute: Vec<Vec<f64>> = (0..NQ).map(|q| brute_scores(&d, q)).collect();
    let mut keep = vec![false; db.rows];
    for (r, kept) in keep.iter_mut().enumerate() {
        *kept = r % 3 != 1 || r == 5 || r == 17;
    }
    let tier_sets: [Vec<Tier>; 2] = [
        vec![],
        vec![
            Tier { rows: 1200, keep: None },
            Tier {
                rows: db.rows,
                keep: Some(&keep),
            },
            Tier {
                rows: 1700,
                keep: Some(&keep),
            },
        ],
    ];
    // every float32 path this CPU runs, and every int8 method with the default path
    let mut runs: Vec<(Option<Simd>, Int8Choice)> = [Simd::Scalar, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|s| s.supported())
        .map(|s| (Some(s), Int8Choice::Off))
        .collect();
    for method in ["exact", "int8-scalar", "int8"] {
        match Int8Choice::parse(method, None) {
            Ok(choice) => runs.push((None, choice)),
            Err(e) => assert_eq!(method, "int8", "{e}"),
        }
    }
    for (simd, int8) in runs {
        for tiers in &tier_sets {
            for (k, threads) in [(1, 1), (10, 3), (64, 2)] {
                let opts = SearchOptions {
                    k,
                    threads,
                    simd,
                    tiers: tiers.clone(),
                    int8,
                    progressive: None,
                };
                let control = Control::default();
                let found = search::search(&db, &d.queries, NQ, &opts, &control).unwrap();
                assert_eq!(control.done_rows.into_inner(), db.rows as u64);
                let all = [Tier {
                    rows: db.rows,
                    keep: None,
                }];
                let tiers = if tiers.is_empty() { &all[..] } else { &tiers[..] };
                for (t, tier) in tiers.iter().enumerate() {
                    for (q, scores) in brute.iter().enumerate() {
                        let held = |r: usize| r < tier.rows && tier.keep.is_none_or(|keep| keep[r]);
                        let want = ranked(scores, held);
                        let at = (t * NQ + q) * k;
                        let what = format!("{simd:?} {int8:?} tier {t} k {k} threads {threads} query {q}");
                        let got_rows = &found.indices[at..at + k];
                        check_list(&what, &found.scores[at..at + k], got_rows, scores, &want);
                        assert!(
                            got_rows.iter().all(|&r| held(r as usize)),
                            "{what}: a row outside the tier"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn code_search_rescores_exactly_with_high_recall() {
    let d = data("codes");
    let db = Database::open(&d.paths, None).unwrap();
    let brute: Vec<Vec<f64>> = (0..NQ).map(|q| brute_scores(&d, q)).collect();
    let k = 10;
    let exact = search::search(
        &db,
        &d.queries,
        NQ,
        &SearchOptions {
            k,
            threads: 2,
            simd: None,
            tiers: vec![],
            int8: Int8Choice::Off,
            progressive: None,
        },
        &Control::default(),
    )
    .unwrap();
    let keep: Vec<bool> = (0..db.rows).map(|r| r % 4 != 3).collect();
    let training = Training {
        threads: 2,
        sample: 0,
        iters: 8,
        seed: 7,
    };
    for (kind, shortlist, min_recall) in [("sq8", 20, 0.95), ("pq8", 100, 0.9), ("pq8x4", 300, 0.9)] {
        let kind = Kind::parse(kind).unwrap();
        let path = d.dir.0.join(format!("{}.codes", kind.name()));
        quant::build(&db, kind, &path, "fingerprint", &training, &Control::default()).unwrap();
        let codes = CodesFile::open(&path).unwrap();
        assert_eq!((codes.header.kind, codes.header.rows), (kind, db.rows));
        for keep in [None, Some(&keep[..])] {
            let opts = CodeSearch {
                k,
                shortlist,
                rerank: true,
                threads: 2,
                keep,
            };
            let control = Control::default();
            let found = quant::search(&codes, &db, &d.queries, NQ, &opts, &control).unwrap();
            assert_eq!(found.hits.len(), NQ);
            let mut hit = 0;
            for (q, hits) in found.hits.iter().enumerate() {
                let what = format!("{} keep {} query {q}", kind.name(), keep.is_some());
                assert_eq!(hits.len(), k, "{what}");
                for (j, &(s, r)) in hits.iter().enumerate() {
                    let r = r as usize;
                    assert!(keep.is_none_or(|keep| keep[r]), "{what}: row {r} is not kept");
                    assert!((s as f64 - brute[q][r]).abs() <= TOL, "{what}: row {r} scores {s}");
                    assert!(j == 0 || hits[j - 1].0 > s || (hits[j - 1].0 == s && hits[j - 1].1 > r as u64));
                    // the rescored score is the exact search's, bit for bit
                    let exact_at = exact.indices[q * k..(q + 1) * k].iter().position(|&e| e as usize == r);
                    if let Some(e) = exact_at {
                        assert_eq!(exact.scores[q * k + e].to_bits(), s.to_bits(), "{what}: row {r}");
                    }
                }
                let want = ranked(&brute[q], |r| keep.is_none_or(|keep| keep[r]));
                hit += hits.iter().filter(|h| want[..k].contains(&(h.1 as usize))).count();
            }
            let recall = hit as f64 / (NQ * k) as f64;
            assert!(
                recall >= min_recall,
                "{} keep {}: recall {recall}",
                kind.name(),
                keep.is_some()
            );
        }
        // without rescoring the approximate scores come back, still k kept rows per query
        let opts = CodeSearch {
            k,
            shortlist,
            rerank: false,
            threads: 1,
            keep: Some(&keep),
        };
        let found = quant::search(&codes, &db, &d.queries, NQ, &opts, &Control::default()).unwrap();
        assert!(found
            .hits
            .iter()
            .all(|h| h.len() == k && h.iter().all(|&(_, r)| keep[r as usize])));
    }
}

#[test]
fn code_shortlists_of_row_ranges_merge_into_the_whole_search() {
    let d = data("ranges");
    let db = Database::open(&d.paths, None).unwrap();
    let keep: Vec<bool> = (0..db.rows).map(|r| r % 5 != 2).collect();
    let training = Training {
        threads: 2,
        sample: 0,
        iters: 4,
        seed: 3,
    };
    let (k, shortlist) = (10, 40);
    // range ends off the blocks of 32 rows, and a range shorter than the shortlist
    let cuts = [0, 900, 917, 1600, db.rows];
    for kind in ["sq8", "pq8", "pq8x4"] {
        let kind = Kind::parse(kind).unwrap();
        let path = d.dir.0.join(format!("{}.codes", kind.name()));
        quant::build(&db, kind, &path, "fingerprint", &training, &Control::default()).unwrap();
        let codes = CodesFile::open(&path).unwrap();
        for keep in [None, Some(&keep[..])] {
            let control = Control::default();
            let whole = quant::shortlist(&codes, &d.queries, NQ, shortlist, 0..db.rows, keep, 2, &control).unwrap();
            let mut merged: Vec<Vec<(f32, u64)>> = vec![Vec::new(); NQ];
            for w in cuts.windows(2) {
                let part_keep = keep.map(|k| &k[w[0]..w[1]]);
                let part =
                    quant::shortlist(&codes, &d.queries, NQ, shortlist, w[0]..w[1], part_keep, 2, &control).unwrap();
                for (m, p) in merged.iter_mut().zip(part) {
                    assert!(p.iter().all(|&(_, r)| (w[0]..w[1]).contains(&(r as usize))));
                    m.extend(p);
                }
            }
            for m in merged.iter_mut() {
                m.sort_by(ilias_core::topk::rank_order);
                m.truncate(shortlist);
            }
            let what = format!("{} keep {}", kind.name(), keep.is_some());
            let bits = |l: &Vec<Vec<(f32, u64)>>| -> Vec<Vec<(u32, u64)>> {
                l.iter()
                    .map(|h| h.iter().map(|&(s, r)| (s.to_bits(), r)).collect())
                    .collect()
            };
            assert_eq!(bits(&merged), bits(&whole), "{what}");
            // the merged shortlists rescored: the whole code search, bit for bit
            let lists: Vec<Vec<u64>> = merged.iter().map(|h| h.iter().map(|&(_, r)| r).collect()).collect();
            let rescored = quant::rerank::rerank(&db, &d.queries, &lists, k, 2, &control).unwrap();
            let opts = CodeSearch {
                k,
                shortlist,
                rerank: true,
                threads: 2,
                keep,
            };
            let found = quant::search(&codes, &db, &d.queries, NQ, &opts, &control).unwrap();
            assert_eq!(bits(&rescored), bits(&found.hits), "{what}");
        }
    }
}

/// A random orthogonal `dim x dim` matrix (Gram-Schmidt of normal rows, twice for accuracy).
fn orthogonal(rng: &mut Rng, dim: usize) -> Vec<Vec<f64>> {
    let mut rows: Vec<Vec<f64>> = Vec::new();
    while rows.len() < dim {
        let mut v: Vec<f64> = (0..dim).map(|_| rng.normal()).collect();
        for _ in 0..2 {
            for r in &rows {
                let d: f64 = v.iter().zip(r).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(r).for_each(|(a, b)| *a -= d * b);
            }
        }
        let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
        rows.push(v.iter().map(|a| a / n).collect());
    }
    rows
}

#[test]
fn progressive_search_is_identical_to_the_float32_search() {
    // rows with a decaying spectrum along the axes of a random rotation (as real embeddings
    // have along their principal axes), stored as float16 in shards of uneven sizes
    const D: usize = 128;
    let dir = TempDir::new("progressive");
    let mut rng = Rng(11);
    let axes = orthogonal(&mut rng, D);
    let mut draw = |noise: f64, base: Option<&[f32]>| -> Vec<f32> {
        let z: Vec<f64> = (0..D).map(|i| rng.normal() / (1.0 + i as f64 / 8.0)).collect();
        let x: Vec<f64> = (0..D)
            .map(|c| {
                let v: f64 = (0..D).map(|i| z[i] * axes[i][c]).sum();
                base.map_or(v, |b| b[c] as f64 + noise * v)
            })
            .collect();
        unit(&x)
    };
    let mut rows: Vec<Vec<f32>> = (0..3000).map(|_| draw(0.0, None)).collect();
    for (from, to) in [(3, 4), (3, 2999), (700, 1900)] {
        rows[to] = rows[from].clone();
    }
    let mut queries: Vec<f32> = Vec::new();
    for q in 0..NQ {
        let row = if q % 2 == 0 {
            draw(0.3, Some(&rows[q * 200 + 3]))
        } else {
            draw(0.0, None)
        };
        queries.extend(row);
    }
    let mut paths = Vec::new();
    for (s, (lo, hi)) in [(0, 1100), (1100, 1137), (1137, 3000)].into_iter().enumerate() {
        let path = dir.0.join(format!("{s:05}.npy"));
        let values: Vec<f32> = rows[lo..hi]
            .concat()
            .iter()
            .map(|&v| half::f16::from_f32(v).to_f32())
            .collect();
        write_npy(&path, "<f2", &values, D);
        paths.push(path);
    }
    let db = Database::open(&paths, None).unwrap();
    let rotation: Vec<f32> = axes.concat().iter().map(|&v| v as f32).collect();
    let codes = dir.0.join("progressive.codes");
    quant::progressive::build(
        &db,
        &codes,
        "fingerprint",
        &rotation,
        &[32, 64, 96],
        &[],
        2,
        &Control::default(),
    )
    .unwrap();
    let file = CodesFile::open(&codes).unwrap();
    file.verify(1).unwrap();
    let keep: Vec<bool> = (0..db.rows).map(|r| r % 3 != 0).collect();
    let tiers = vec![
        Tier { rows: 1137, keep: None },
        Tier {
            rows: db.rows,
            keep: Some(&keep),
        },
    ];
    let simds: Vec<Simd> = [Simd::Scalar, Simd::Avx2, Simd::Avx512]
        .into_iter()
        .filter(|s| s.supported())
        .collect();
    for simd in simds {
        // the kernel that goes with the path, and the portable one
        let kernels = [StageKernel::for_simd(simd), StageKernel::Scalar];
        for kernel in kernels {
            let prog = Progressive::open(&file, &db, kernel, true).unwrap();
            for (k, threads) in [(1, 1), (25, 2), (1137, 3)] {
                let run = |progressive| {
                    let opts = SearchOptions {
                        k,
                        threads,
                        simd: Some(simd),
                        tiers: tiers.clone(),
                        int8: Int8Choice::Off,
                        progressive,
                    };
                    search::search(&db, &queries, NQ, &opts, &Control::default()).unwrap()
                };
                let (plain, fast) = (run(None), run(Some(&prog)));
                let what = format!("{simd:?} {kernel:?} k {k} threads {threads}");
                assert_eq!(
                    fast.stats.stages,
                    Some(kernel),
                    "{what}: the progressive pass did not run"
                );
                let entered = fast.stats.stage_pairs;
                // every stage runs: the pairs of the final top k pass every bound
                assert!(
                    entered[..3].iter().all(|&n| n > 0),
                    "{what}: pairs per stage {entered:?}"
                );
                // with a small k the bounds prove most pairs out before the last stage
                assert!(
                    k > 25 || entered[2] < entered[0] / 2,
                    "{what}: pairs per stage {entered:?}"
                );
                assert_eq!(fast.indices, plain.indices, "{what}");
                let bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&fast.scores), bits(&plain.scores), "{what}");
            }
        }
    }
    // codes of another database are refused
    let other = Database::open(&paths[..2], None).unwrap();
    assert!(Progressive::open(&file, &other, StageKernel::Scalar, true).is_err());
}
