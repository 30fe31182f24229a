//! The binding layer: numpy in and out, the GIL released during work, every core error mapped
//! once to a Python exception. Work runs on scoped threads while the calling thread wakes every
//! 100 ms to report progress and to look for Ctrl-C.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use numpy::{
    IntoPyArray, PyArray2, PyArray3, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods,
};
use pyo3::create_exception;
use pyo3::exceptions::{PyFileNotFoundError, PyKeyboardInterrupt, PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::error::Error;
use crate::kernels::int8::Int8Kernel;
use crate::kernels::Simd;
use crate::metrics::PositiveIndex;
use crate::parallel::Control;
use crate::quant::progressive::{Progressive, StageKernel};
use crate::quant::CodesFile;
use crate::search::{search, Int8Choice, SearchOptions, Tier};
use crate::store::{Database, Shard};

create_exception!(
    ilias._core,
    StoreFormatError,
    PyValueError,
    "A store file is not what it should be (bad header, size, dtype or dimension)."
);

fn to_py(err: Error) -> PyErr {
    match err {
        Error::Io { path, source } => {
            let msg = format!("{}: {}", path.display(), source);
            if source.kind() == std::io::ErrorKind::NotFound {
                PyFileNotFoundError::new_err(msg)
            } else {
                PyOSError::new_err(msg)
            }
        }
        e @ Error::Format { .. } => StoreFormatError::new_err(e.to_string()),
        Error::Invalid(m) => PyValueError::new_err(m),
        Error::Cancelled => PyKeyboardInterrupt::new_err("search interrupted"),
        // not the user's mistake: the CLI shows a RuntimeError with its traceback
        e @ Error::Internal(_) => PyRuntimeError::new_err(e.to_string()),
    }
}

/// What `exact_search` returns: scores, indices (both (tiers, nq, k)) and statistics.
type Found<'py> = (Bound<'py, PyArray3<f32>>, Bound<'py, PyArray3<i64>>, Bound<'py, PyDict>);
/// What `code_search` returns: scores, indices (both (nq, k)) and statistics.
type Found2<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i64>>, Bound<'py, PyDict>);
type Floats<'py> = Bound<'py, numpy::PyArray1<f64>>;

/// Runs `work` without the GIL on a scoped thread; until it ends, every 100 ms calls
/// `progress(done)` and checks for signals, setting `control.cancel` when one raises.
fn run_watched<T: Send>(
    py: Python<'_>,
    control: &Control,
    progress: Option<&Bound<'_, PyAny>>,
    work: impl FnOnce() -> crate::Result<T> + Send,
) -> PyResult<T> {
    let mut pending: Option<PyErr> = None;
    let done = (std::sync::Mutex::new(false), std::sync::Condvar::new());
    let result = std::thread::scope(|scope| {
        let handle = scope.spawn(|| {
            // flags the end even when `work` panics, so that the wait below always ends
            struct Flag<'a>(&'a (std::sync::Mutex<bool>, std::sync::Condvar));
            impl Drop for Flag<'_> {
                fn drop(&mut self) {
                    *self.0 .0.lock().unwrap_or_else(|e| e.into_inner()) = true;
                    self.0 .1.notify_all();
                }
            }
            let _flag = Flag(&done);
            work()
        });
        // wakes at once when the work ends, else every 100 ms
        let finished = || {
            let guard = done.0.lock().unwrap_or_else(|e| e.into_inner());
            let (guard, _) = done
                .1
                .wait_timeout_while(guard, Duration::from_millis(100), |d| !*d)
                .unwrap_or_else(|e| e.into_inner());
            *guard
        };
        while !py.allow_threads(finished) {
            if pending.is_none() {
                let polled = py.check_signals().and_then(|_| match progress {
                    Some(cb) => cb.call1((control.done_rows.load(Ordering::Relaxed),)).map(|_| ()),
                    None => Ok(()),
                });
                if let Err(e) = polled {
                    control.cancel.store(true, Ordering::Relaxed);
                    pending = Some(e);
                }
            }
        }
        crate::parallel::join(handle)
    });
    match pending {
        Some(e) => Err(e),
        None => result.map_err(to_py),
    }
}

/// Exact inner-product search of float32 `queries` (nq x dim, C order) against the shards,
/// in order. `method`: "exact" (the fastest exact path: int8 first pass where the CPU has VNNI),
/// "float32" (plain), "int8" / "int8-scalar" (the int8 pass from the first row, with this CPU's
/// kernel or the portable one: for tests), "progressive" (the stages of the progressive `codes`
/// from the first row, with the int8 kernel that goes with `simd`). With `codes` (a progressive
/// codes file of these shards), "exact" runs their stages where they pay.
/// `tiers`: the databases answered in the same pass, each `(rows, keep)`: the first `rows` rows,
/// of which those with `keep` True (all when None); default: one tier, the whole database.
/// `checksums`: per shard, the fast checksum its manifest records (`shard_checksum`) or None;
/// a shard whose data gives another one is a `StoreFormatError` naming it, and nothing is returned.
/// Returns `(scores float32 (tiers, nq, k), indices int64 (tiers, nq, k), stats dict)`.
#[pyfunction]
#[pyo3(signature = (shards, queries, k, threads=0, tiers=None, simd=None, method="exact", progress=None, checksums=None, codes=None))]
#[allow(clippy::too_many_arguments)]
fn exact_search<'py>(
    py: Python<'py>,
    shards: Vec<PathBuf>,
    queries: PyReadonlyArray2<'py, f32>,
    k: usize,
    threads: usize,
    tiers: Option<Vec<(usize, Option<PyReadonlyArray1<'py, bool>>)>>,
    simd: Option<&str>,
    method: &str,
    progress: Option<Bound<'py, PyAny>>,
    checksums: Option<Vec<Option<u64>>>,
    codes: Option<PathBuf>,
) -> PyResult<Found<'py>> {
    let forced = method == "progressive";
    if forced && codes.is_none() {
        return Err(PyValueError::new_err(
            "method: \"progressive\" needs progressive codes (ilias index build --codes progressive)",
        ));
    }
    if codes.is_some() && !matches!(method, "exact" | "progressive") {
        return Err(PyValueError::new_err(format!(
            "codes: progressive codes serve the methods exact and progressive, not {method:?}"
        )));
    }
    let int8 = Int8Choice::parse(if forced { "exact" } else { method }, simd).map_err(to_py)?;
    let simd = Simd::parse_option(simd).map_err(to_py)?;
    let nq = queries.shape()[0];
    let qdim = queries.shape()[1];
    let qslice = queries
        .as_slice()
        .map_err(|_| PyValueError::new_err("queries must be C-contiguous (use np.ascontiguousarray)"))?;
    let tiers = tiers.unwrap_or_default();
    let tier_specs = tiers
        .iter()
        .map(|(rows, keep)| {
            let keep = match keep {
                Some(a) => Some(
                    a.as_slice()
                        .map_err(|_| PyValueError::new_err("keep must be C-contiguous"))?,
                ),
                None => None,
            };
            Ok(Tier { rows: *rows, keep })
        })
        .collect::<PyResult<Vec<_>>>()?;
    let mut db = py.allow_threads(|| Database::open(&shards, None)).map_err(to_py)?;
    if let Some(sums) = checksums {
        if sums.len() != db.shards.len() {
            return Err(PyValueError::new_err(format!(
                "checksums: {} values for {} shards",
                sums.len(),
                db.shards.len()
            )));
        }
        for (shard, sum) in db.shards.iter_mut().zip(sums) {
            shard.expected = sum;
        }
    }
    if qdim != db.dim {
        return Err(PyValueError::new_err(format!(
            "queries have dimension {qdim} but the database has dimension {}",
            db.dim
        )));
    }
    let nt = tier_specs.len().max(1);
    let file = match &codes {
        Some(path) => Some(
            py.allow_threads(|| {
                let f = CodesFile::open(path)?;
                f.verify(threads)?;
                Ok(f)
            })
            .map_err(to_py)?,
        ),
        None => None,
    };
    let kernel = StageKernel::for_simd(simd.unwrap_or_else(Simd::detect));
    let prog = match &file {
        Some(f) => Some(Progressive::open(f, &db, kernel, forced).map_err(to_py)?),
        None => None,
    };
    let opts = SearchOptions {
        k,
        threads,
        simd,
        tiers: tier_specs,
        int8,
        progressive: prog.as_ref(),
    };
    let control = Control::default();
    let found = run_watched(py, &control, progress.as_ref(), || {
        search(&db, qslice, nq, &opts, &control)
    })?;
    let st = found.stats;
    let stats = PyDict::new(py);
    stats.set_item("simd", st.simd.map(Simd::name))?;
    stats.set_item("int8", st.int8.map(Int8Kernel::name))?;
    stats.set_item("float_pairs", st.float_pairs)?;
    stats.set_item("int8_pairs", st.int8_pairs)?;
    stats.set_item("rescored_pairs", st.rescored_pairs)?;
    if st.stages.is_some() {
        stats.set_item("stage_kernel", st.stages.map(StageKernel::name))?;
        let used = prog.as_ref().map_or(0, |p| p.stages());
        stats.set_item("stage_pairs", st.stage_pairs[..used].to_vec())?;
        stats.set_item("codes_bytes", st.codes_bytes)?;
        stats.set_item("store_bytes", st.store_bytes)?;
    }
    let scores = found.scores.into_pyarray(py).reshape([nt, nq, k])?;
    let indices = found.indices.into_pyarray(py).reshape([nt, nq, k])?;
    Ok((scores, indices, stats))
}

/// Validates one shard without reading its data: returns `(dtype name, rows, dim)`.
#[pyfunction]
#[pyo3(signature = (path, dim=None))]
fn inspect_shard(path: PathBuf, dim: Option<usize>) -> PyResult<(&'static str, usize, usize)> {
    let s = Shard::open(&path, dim).map_err(to_py)?;
    Ok((s.dtype.name(), s.rows, s.dim))
}

/// The fast checksum of a shard's data section (blocks of 128 rows, see `store::block_hash`),
/// on `threads` threads: what the writer records in the manifest and exact search compares.
#[pyfunction]
#[pyo3(signature = (path, threads=1))]
fn shard_checksum(py: Python<'_>, path: PathBuf, threads: usize) -> PyResult<u64> {
    py.allow_threads(|| Shard::open(&path, None)?.checksum(threads))
        .map_err(to_py)
}

/// Measures this machine's float32 FMA peak (GFLOP/s) on `threads` threads for a given path.
#[pyfunction]
#[pyo3(signature = (simd=None, threads=0, millis=300))]
fn fp32_peak_gflops(py: Python<'_>, simd: Option<&str>, threads: usize, millis: u64) -> PyResult<f64> {
    let simd = Simd::runnable(simd).map_err(to_py)?;
    Ok(py.allow_threads(|| crate::kernels::peak::fp32_peak_gflops(simd, threads, millis)))
}

/// Measures this machine's int8 multiply-add peak (GOP/s, AVX-512 VNNI); None without VNNI.
#[pyfunction]
#[pyo3(signature = (threads=0, millis=300))]
fn int8_peak_gops(py: Python<'_>, threads: usize, millis: u64) -> Option<f64> {
    py.allow_threads(|| crate::kernels::peak::int8_peak_gops(threads, millis))
}

/// The progressive pass's cost model (`progressive::Costs::work`): the work of `entered[j]`
/// pairs entering stages of `widths` dimensions, then `rescored` pairs rescored, in units of one
/// product of the first stage's kernel.
#[pyfunction]
fn progressive_work(entered: Vec<f64>, widths: Vec<usize>, rescored: f64, dim: usize) -> PyResult<f64> {
    if entered.len() != widths.len() {
        return Err(PyValueError::new_err(format!(
            "entered: {} stages for {} widths",
            entered.len(),
            widths.len()
        )));
    }
    Ok(crate::quant::progressive::COSTS.work(&entered, &widths, rescored, dim))
}

/// Measures this machine's int8 multiply-add peak with AVX2 `maddubs` (GOP/s: the progressive
/// stages' kernel without VNNI); None without AVX2.
#[pyfunction]
#[pyo3(signature = (threads=0, millis=300))]
fn maddubs_peak_gops(py: Python<'_>, threads: usize, millis: u64) -> Option<f64> {
    py.allow_threads(|| crate::kernels::peak::maddubs_peak_gops(threads, millis))
}

/// The SIMD paths this CPU can run, fastest first.
#[pyfunction]
fn simd_paths() -> Vec<&'static str> {
    [Simd::Avx512, Simd::Avx2, Simd::Scalar]
        .into_iter()
        .filter(|s| s.supported())
        .map(Simd::name)
        .collect()
}

/// The int8 kernels of exact search's first pass this CPU can run, fastest first.
#[pyfunction]
fn int8_kernels() -> Vec<&'static str> {
    [Int8Kernel::Vnni512, Int8Kernel::AvxVnni, Int8Kernel::Scalar]
        .into_iter()
        .filter(|k| k.supported())
        .map(Int8Kernel::name)
        .collect()
}

// ---- evaluation (metrics.rs)

fn contiguous(name: &str) -> PyErr {
    PyValueError::new_err(format!("{name} must be C-contiguous (use np.ascontiguousarray)"))
}

/// |G| per row, checked non-negative.
fn counts(n_positives: &[i64]) -> PyResult<Vec<u64>> {
    n_positives
        .iter()
        .map(|&n| u64::try_from(n).map_err(|_| PyValueError::new_err(format!("n_positives: {n} is negative"))))
        .collect()
}

/// The ranked lists of an evaluation, borrowed from numpy.
fn lists<'a>(
    scores: &'a PyReadonlyArray2<'_, f64>,
    labels: &'a PyReadonlyArray2<'_, u8>,
    n_pos: &'a [u64],
) -> PyResult<crate::metrics::Lists<'a>> {
    Ok(crate::metrics::Lists {
        scores: scores.as_slice().map_err(|_| contiguous("scores"))?,
        labels: labels.as_slice().map_err(|_| contiguous("labels"))?,
        n_positives: n_pos,
        width: scores.shape()[1],
    })
}

/// AP@k per group of positives (the scale and clutter reports) in one pass: `positive` int32
/// (n, L) is each item's positive index (or -1), `member` bool (G, P) the groups, `n_positives`
/// int64 (G, n) |G| per group and row. Returns ap float64 (G, n), as fractions.
#[pyfunction]
#[pyo3(signature = (scores, labels, positive, member, n_positives, k, threads=0))]
#[allow(clippy::too_many_arguments)]
fn grouped_average_precision<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f64>,
    labels: PyReadonlyArray2<'py, u8>,
    positive: PyReadonlyArray2<'py, i32>,
    member: PyReadonlyArray2<'py, bool>,
    n_positives: PyReadonlyArray2<'py, i64>,
    k: usize,
    threads: usize,
) -> PyResult<Bound<'py, numpy::PyArray2<f64>>> {
    let (groups, rows) = (n_positives.shape()[0], n_positives.shape()[1]);
    if scores.shape() != labels.shape()
        || scores.shape() != positive.shape()
        || scores.shape()[0] != rows
        || member.shape()[0] != groups
    {
        return Err(PyValueError::new_err(
            "shapes disagree: scores, labels, positive (n, L); member (G, P); n_positives (G, n)",
        ));
    }
    let n_pos = counts(n_positives.as_slice().map_err(|_| contiguous("n_positives"))?)?;
    let lists = lists(&scores, &labels, &n_pos)?;
    let positive = positive.as_slice().map_err(|_| contiguous("positive"))?;
    let member = member.as_slice().map_err(|_| contiguous("member"))?;
    let ap = py
        .allow_threads(|| crate::metrics::grouped_average_precision(lists, positive, member, groups, k, threads))
        .map_err(to_py)?;
    ap.into_pyarray(py).reshape([groups, rows])
}

/// The text of one id: a `str`, or UTF-8 `bytes` (borrowed, not copied); `what` names the argument.
fn id_text<'a>(item: &'a Bound<'_, PyAny>, what: &str) -> PyResult<&'a str> {
    if let Ok(s) = item.downcast::<pyo3::types::PyString>() {
        s.to_str()
    } else if let Ok(b) = item.downcast::<pyo3::types::PyBytes>() {
        std::str::from_utf8(b.as_bytes()).map_err(|_| PyValueError::new_err(format!("{what}: a bytes id is not UTF-8")))
    } else {
        Err(PyValueError::new_err(format!(
            "{what}: expected str or bytes ids, got {}",
            item.get_type().name()?
        )))
    }
}

/// The index among `positives` of each id of `ids` (str or UTF-8 bytes, any iterable), or -1.
/// Returns `(codes int32, foreign count, first foreign id)`: a foreign id has the form of an
/// ILIAS positive (`<instance>/pos/...`) without being one of `positives`.
#[pyfunction]
fn positive_codes<'py>(
    py: Python<'py>,
    ids: &Bound<'py, PyAny>,
    positives: Vec<String>,
) -> PyResult<(Bound<'py, numpy::PyArray1<i32>>, usize, Option<String>)> {
    let index = PositiveIndex::new(positives);
    let found = crate::metrics::positive_codes(&index, ids.try_iter()?, |item| id_text(item, "ids"))?;
    Ok((found.codes.into_pyarray(py), found.foreign, found.first_foreign))
}

/// Labels the ranked lists of an official pickle: `ranks` int64 (n, L) index `db_ids` (an
/// object array of str or UTF-8 bytes; -1: no item). Only the ids some list uses are read, in
/// one pass; only those shaped like a positive are hashed. Returns `(positive int32 (n, L):
/// index among the positives, -1 not a positive, -2 no item; foreign count, first foreign id,
/// first list holding an item twice and the number of repeats, or None)`.
#[pyfunction]
#[pyo3(signature = (db_ids, ranks, positives, threads=0))]
#[allow(clippy::type_complexity)]
fn label_official<'py>(
    py: Python<'py>,
    db_ids: PyReadonlyArray1<'py, PyObject>,
    ranks: PyReadonlyArray2<'py, i64>,
    positives: Vec<String>,
    threads: usize,
) -> PyResult<(Bound<'py, PyArray2<i32>>, usize, Option<String>, Option<(usize, usize)>)> {
    let ids = db_ids.as_slice().map_err(|_| contiguous("db_ids"))?;
    let (rows, width) = (ranks.shape()[0], ranks.shape()[1]);
    let r = ranks.as_slice().map_err(|_| contiguous("ranks"))?;
    let index = PositiveIndex::new(positives);
    let found = crate::metrics::used_codes(&index, ids.len(), r, |i| id_text(ids[i].bind(py), "db_ids"))?;
    let (positive, duplicate) = py
        .allow_threads(|| crate::metrics::label_ranks(&found.codes, r, width, threads))
        .map_err(to_py)?;
    Ok((
        positive.into_pyarray(py).reshape([rows, width])?,
        found.foreign,
        found.first_foreign,
        duplicate,
    ))
}

/// AP@k and oracle per row of `scores` float64 (n, L) with `labels` uint8 (n, L) (0 negative,
/// 1 positive, 2 not in the list) and `n_positives` int64 (n,) = |G| per row.
/// Returns `(ap float64 (n,), oracle float64 (n,))`, as fractions.
#[pyfunction]
#[pyo3(signature = (scores, labels, n_positives, k, threads=0))]
fn average_precision<'py>(
    py: Python<'py>,
    scores: PyReadonlyArray2<'py, f64>,
    labels: PyReadonlyArray2<'py, u8>,
    n_positives: PyReadonlyArray1<'py, i64>,
    k: usize,
    threads: usize,
) -> PyResult<(Floats<'py>, Floats<'py>)> {
    if scores.shape() != labels.shape() || scores.shape()[0] != n_positives.len() {
        return Err(PyValueError::new_err(format!(
            "shapes disagree: scores {:?}, labels {:?}, n_positives ({},)",
            scores.shape(),
            labels.shape(),
            n_positives.len()
        )));
    }
    let n_pos = counts(n_positives.as_slice().map_err(|_| contiguous("n_positives"))?)?;
    let lists = lists(&scores, &labels, &n_pos)?;
    let (ap, oracle) = py
        .allow_threads(|| crate::metrics::average_precision(lists, k, threads))
        .map_err(to_py)?;
    Ok((ap.into_pyarray(py), oracle.into_pyarray(py)))
}

/// Builds codes of `kind` ("sq8", "pq<M>", "pq<M>x4") for the database `shards` into `path`
/// (written beside it and renamed into place when complete), tagged with `fingerprint`.
#[pyfunction]
#[pyo3(signature = (shards, kind, path, fingerprint, threads=0, sample=0, iters=20, seed=1234, progress=None))]
#[allow(clippy::too_many_arguments)]
fn build_codes(
    py: Python<'_>,
    shards: Vec<PathBuf>,
    kind: &str,
    path: PathBuf,
    fingerprint: &str,
    threads: usize,
    sample: usize,
    iters: usize,
    seed: u64,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let kind = crate::quant::Kind::parse(kind).map_err(to_py)?;
    let db = py.allow_threads(|| Database::open(&shards, None)).map_err(to_py)?;
    let training = crate::quant::pq::Training {
        threads,
        sample,
        iters,
        seed,
    };
    let control = Control::default();
    run_watched(py, &control, progress.as_ref(), || {
        crate::quant::build(&db, kind, &path, fingerprint, &training, &control)
    })
}

/// Builds progressive codes for the database `shards` into `path`: `rotation` float32
/// (dim, dim), row `i` the `i`-th axis; `boundaries` the stage ends (multiples of 32); `meta`
/// values recorded as they are (what the build measured).
#[pyfunction]
#[pyo3(signature = (shards, path, fingerprint, rotation, boundaries, meta, threads=0, progress=None))]
#[allow(clippy::too_many_arguments)]
fn build_progressive(
    py: Python<'_>,
    shards: Vec<PathBuf>,
    path: PathBuf,
    fingerprint: &str,
    rotation: PyReadonlyArray2<'_, f32>,
    boundaries: Vec<usize>,
    meta: Vec<f32>,
    threads: usize,
    progress: Option<Bound<'_, PyAny>>,
) -> PyResult<()> {
    let r = rotation.as_slice().map_err(|_| contiguous("rotation"))?;
    let db = py.allow_threads(|| Database::open(&shards, None)).map_err(to_py)?;
    let control = Control::default();
    run_watched(py, &control, progress.as_ref(), || {
        crate::quant::progressive::build(&db, &path, fingerprint, r, &boundaries, &meta, threads, &control)
    })
}

/// The header of a codes file: `{kind, dim, rows, fingerprint}` (validated, sizes included);
/// progressive codes add `boundaries`, `eta` and `meta`;
/// with `verify`, every section is also checked against its checksum (as a code search does).
#[pyfunction]
#[pyo3(signature = (path, verify=false, threads=0))]
fn inspect_codes(py: Python<'_>, path: PathBuf, verify: bool, threads: usize) -> PyResult<Bound<'_, PyDict>> {
    let c = py
        .allow_threads(|| {
            let c = crate::quant::CodesFile::open(&path)?;
            if verify {
                c.verify(threads)?;
            }
            Ok(c)
        })
        .map_err(to_py)?;
    let d = PyDict::new(py);
    d.set_item("kind", c.header.kind.name())?;
    d.set_item("dim", c.header.dim)?;
    d.set_item("rows", c.header.rows)?;
    d.set_item("fingerprint", &c.header.fingerprint)?;
    if let crate::quant::Kind::Progressive { .. } = c.header.kind {
        let p = crate::quant::progressive::Params::read(&c).map_err(to_py)?;
        d.set_item("boundaries", p.bounds)?;
        d.set_item("eta", p.eta)?;
        d.set_item("meta", p.meta)?;
    }
    Ok(d)
}

/// Searches with codes: a shortlist of `shortlist` rows per query from the codes, rescored
/// exactly from `shards` when `rerank`. Returns `(scores (nq, k), indices (nq, k), stats)`.
#[pyfunction]
#[pyo3(signature = (codes, shards, queries, k, shortlist, rerank=true, threads=0, keep=None, progress=None))]
#[allow(clippy::too_many_arguments)]
fn code_search<'py>(
    py: Python<'py>,
    codes: PathBuf,
    shards: Vec<PathBuf>,
    queries: PyReadonlyArray2<'py, f32>,
    k: usize,
    shortlist: usize,
    rerank: bool,
    threads: usize,
    keep: Option<PyReadonlyArray1<'py, bool>>,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Found2<'py>> {
    let nq = queries.shape()[0];
    let q = queries.as_slice().map_err(|_| contiguous("queries"))?;
    let keep = match &keep {
        Some(a) => Some(a.as_slice().map_err(|_| contiguous("keep"))?),
        None => None,
    };
    let (file, db) = py
        .allow_threads(|| Ok((crate::quant::CodesFile::open(&codes)?, Database::open(&shards, None)?)))
        .map_err(to_py)?;
    let opts = crate::quant::CodeSearch {
        k,
        shortlist,
        rerank,
        threads,
        keep,
    };
    let control = Control::default();
    let found = run_watched(py, &control, progress.as_ref(), || {
        crate::quant::search(&file, &db, q, nq, &opts, &control)
    })?;
    let mut scores = vec![f32::NEG_INFINITY; nq * k];
    let mut indices = vec![-1i64; nq * k];
    for (qi, hits) in found.hits.iter().enumerate() {
        for (j, &(s, r)) in hits.iter().enumerate() {
            scores[qi * k + j] = s;
            indices[qi * k + j] = r as i64;
        }
    }
    let stats = PyDict::new(py);
    stats.set_item("codes", file.header.kind.name())?;
    stats.set_item("shortlist", shortlist.clamp(k, db.rows))?;
    stats.set_item("rerank", rerank)?;
    stats.set_item("scan_seconds", found.scan_seconds)?;
    stats.set_item("rerank_seconds", found.rerank_seconds)?;
    Ok((
        scores.into_pyarray(py).reshape([nq, k])?,
        indices.into_pyarray(py).reshape([nq, k])?,
        stats,
    ))
}

/// Lists of `(score, row)` per query as (nq, width) arrays, padded with `-inf` and `-1`.
fn padded<'py>(py: Python<'py>, lists: &[Vec<(f32, u64)>], width: usize) -> PyResult<Found2Arrays<'py>> {
    let nq = lists.len();
    let mut scores = vec![f32::NEG_INFINITY; nq * width];
    let mut indices = vec![-1i64; nq * width];
    for (qi, hits) in lists.iter().enumerate() {
        for (j, &(s, r)) in hits.iter().take(width).enumerate() {
            scores[qi * width + j] = s;
            indices[qi * width + j] = r as i64;
        }
    }
    Ok((
        scores.into_pyarray(py).reshape([nq, width])?,
        indices.into_pyarray(py).reshape([nq, width])?,
    ))
}

type Found2Arrays<'py> = (Bound<'py, PyArray2<f32>>, Bound<'py, PyArray2<i64>>);

/// The approximate shortlists of the codes' rows `lo..hi` (a part of a code search split over
/// machines): per query the best `shortlist` (score, global row), in rank order; (nq, width)
/// with width = min(shortlist, hi - lo). `keep` covers the range. The codes are not verified
/// (check them once with `inspect_codes(verify=True)`).
#[pyfunction]
#[pyo3(signature = (codes, queries, shortlist, lo, hi, keep=None, threads=0, progress=None))]
#[allow(clippy::too_many_arguments)]
fn code_shortlist<'py>(
    py: Python<'py>,
    codes: PathBuf,
    queries: PyReadonlyArray2<'py, f32>,
    shortlist: usize,
    lo: usize,
    hi: usize,
    keep: Option<PyReadonlyArray1<'py, bool>>,
    threads: usize,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Found2Arrays<'py>> {
    let nq = queries.shape()[0];
    let q = queries.as_slice().map_err(|_| contiguous("queries"))?;
    let keep = match &keep {
        Some(a) => Some(a.as_slice().map_err(|_| contiguous("keep"))?),
        None => None,
    };
    let file = py
        .allow_threads(|| crate::quant::CodesFile::open(&codes))
        .map_err(to_py)?;
    let control = Control::default();
    let lists = run_watched(py, &control, progress.as_ref(), || {
        crate::quant::shortlist(&file, q, nq, shortlist, lo..hi, keep, threads, &control)
    })?;
    padded(py, &lists, shortlist.min(hi.saturating_sub(lo)))
}

/// Exact rescoring of candidate rows: per query the `k` best of its `candidates` row (global
/// rows of `shards`; -1 entries ignored) by the score exact search gives, in rank order; (nq, k).
#[pyfunction]
#[pyo3(signature = (shards, queries, candidates, k, threads=0, progress=None))]
fn rescore<'py>(
    py: Python<'py>,
    shards: Vec<PathBuf>,
    queries: PyReadonlyArray2<'py, f32>,
    candidates: PyReadonlyArray2<'py, i64>,
    k: usize,
    threads: usize,
    progress: Option<Bound<'py, PyAny>>,
) -> PyResult<Found2Arrays<'py>> {
    let nq = queries.shape()[0];
    let q = queries.as_slice().map_err(|_| contiguous("queries"))?;
    let rows = candidates.as_slice().map_err(|_| contiguous("candidates"))?;
    let width = candidates.shape()[1];
    if candidates.shape()[0] != nq {
        return Err(PyValueError::new_err(format!(
            "candidates: {} lists for {nq} queries",
            candidates.shape()[0]
        )));
    }
    if k == 0 {
        return Err(PyValueError::new_err("k must be at least 1"));
    }
    let db = py.allow_threads(|| Database::open(&shards, None)).map_err(to_py)?;
    if q.len() != nq * db.dim || q.iter().any(|v| !v.is_finite()) {
        return Err(PyValueError::new_err(format!(
            "queries: expected {nq} finite rows of the database's dimension {}",
            db.dim
        )));
    }
    if let Some(&bad) = rows.iter().find(|&&r| r < -1 || r >= db.rows as i64) {
        return Err(PyValueError::new_err(format!(
            "candidates: row {bad} is outside the database's {} rows",
            db.rows
        )));
    }
    let lists: Vec<Vec<u64>> = (0..nq)
        .map(|i| {
            rows[i * width..(i + 1) * width]
                .iter()
                .filter(|&&r| r >= 0)
                .map(|&r| r as u64)
                .collect()
        })
        .collect();
    let control = Control::default();
    let hits = run_watched(py, &control, progress.as_ref(), || {
        crate::quant::rerank::rerank(&db, q, &lists, k, threads, &control)
    })?;
    padded(py, &hits, k)
}

/// Merges two partial results of the same queries over disjoint rows ((nq, width) scores and
/// global rows each, -1 rows ignored): per query the best `k` in the order of one search, (nq, k)
/// padded with -inf and -1. How the parts of a search split over machines join.
#[pyfunction]
fn merge_top<'py>(
    py: Python<'py>,
    scores_a: PyReadonlyArray2<'py, f32>,
    rows_a: PyReadonlyArray2<'py, i64>,
    scores_b: PyReadonlyArray2<'py, f32>,
    rows_b: PyReadonlyArray2<'py, i64>,
    k: usize,
) -> PyResult<Found2Arrays<'py>> {
    let nq = scores_a.shape()[0];
    let mut parts = Vec::new();
    for (name, scores, rows) in [("a", &scores_a, &rows_a), ("b", &scores_b, &rows_b)] {
        if scores.shape() != rows.shape() || scores.shape()[0] != nq {
            return Err(PyValueError::new_err(format!(
                "merge_top: scores_{name} {:?} and rows_{name} {:?} do not match {nq} queries",
                scores.shape(),
                rows.shape()
            )));
        }
        let s = scores.as_slice().map_err(|_| contiguous("scores"))?;
        let r = rows.as_slice().map_err(|_| contiguous("rows"))?;
        if let Some(&bad) = r.iter().find(|&&r| r < -1) {
            return Err(PyValueError::new_err(format!("merge_top: row {bad} is not a row")));
        }
        parts.push((s, r, scores.shape()[1]));
    }
    let lists: Vec<Vec<(f32, u64)>> = py.allow_threads(|| {
        let hits = |(s, r, w): (&[f32], &[i64], usize), q: usize| -> Vec<(f32, u64)> {
            (q * w..(q + 1) * w)
                .filter(|&j| r[j] >= 0)
                .map(|j| (s[j], r[j] as u64))
                .collect()
        };
        (0..nq)
            .map(|q| crate::topk::merge_parts(&hits(parts[0], q), &hits(parts[1], q), k))
            .collect()
    });
    padded(py, &lists, k)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("StoreFormatError", m.py().get_type::<StoreFormatError>())?;
    // the labels of `average_precision` and the codes of `positive_codes` / `label_official`
    m.add("NEGATIVE", crate::metrics::NEGATIVE)?;
    m.add("POSITIVE", crate::metrics::POSITIVE)?;
    m.add("SKIP", crate::metrics::SKIP)?;
    m.add("NOT_POSITIVE", crate::metrics::NOT_POSITIVE)?;
    m.add("EMPTY", crate::metrics::EMPTY)?;
    // what the progressive codes' planner needs to know of the pass (`quant::progressive`)
    m.add("PROGRESSIVE_HEAD", crate::quant::progressive::HEAD)?;
    m.add_function(wrap_pyfunction!(progressive_work, m)?)?;
    m.add_function(wrap_pyfunction!(exact_search, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_shard, m)?)?;
    m.add_function(wrap_pyfunction!(shard_checksum, m)?)?;
    m.add_function(wrap_pyfunction!(simd_paths, m)?)?;
    m.add_function(wrap_pyfunction!(int8_kernels, m)?)?;
    m.add_function(wrap_pyfunction!(average_precision, m)?)?;
    m.add_function(wrap_pyfunction!(positive_codes, m)?)?;
    m.add_function(wrap_pyfunction!(label_official, m)?)?;
    m.add_function(wrap_pyfunction!(grouped_average_precision, m)?)?;
    m.add_function(wrap_pyfunction!(fp32_peak_gflops, m)?)?;
    m.add_function(wrap_pyfunction!(int8_peak_gops, m)?)?;
    m.add_function(wrap_pyfunction!(maddubs_peak_gops, m)?)?;
    m.add_function(wrap_pyfunction!(build_codes, m)?)?;
    m.add_function(wrap_pyfunction!(build_progressive, m)?)?;
    m.add_function(wrap_pyfunction!(inspect_codes, m)?)?;
    m.add_function(wrap_pyfunction!(code_search, m)?)?;
    m.add_function(wrap_pyfunction!(code_shortlist, m)?)?;
    m.add_function(wrap_pyfunction!(rescore, m)?)?;
    m.add_function(wrap_pyfunction!(merge_top, m)?)?;
    Ok(())
}
