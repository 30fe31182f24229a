"""Search throughput on this machine: ilias-core against faiss-cpu and numpy, on the same data.

One implementation behind `ilias bench`, the scripts in benches/ and `pytest benches`: cached
synthetic stores (`make_store`, `queries`), the machine's measured peaks (`measure_peaks`), the
peers (`peer_search`), the runner (`run_search_bench`) and the tables (`table`).

A time alone says little on a shared or unknown machine, so every time comes with two references
measured in the same process: a peer on the same data (faiss IndexFlatIP, numpy; a ratio peer /
ours above 1 means we are faster) and the machine's own peaks, float32 FMA and int8 VNNI, each
the best of three short runs (a peak is what the machine does when nothing disturbs it). The
int8 share can pass 100% of the float32 peak: exact search's first pass is int8.

The data is synthetic: `random` unit vectors (isotropic, the hardest case for the int8 pass's
bounds) or `structured` (an anisotropic spectrum like real embeddings). A store is made once and
cached by name, kind and size under `default_data_dir()` ($ILIAS_BENCH_DATA, else
~/.cache/ilias-core/bench); each chunk's random draws follow the previous ones, and a resumed
store skips the draws of the rows it already holds, so an interrupted store ends with the same
bits as one made in one go.

This module needs numpy only: faiss is imported when a faiss peer runs, threadpoolctl (when
installed) holds numpy's BLAS to the benchmark's threads.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from . import _core
from .progress import Progress
from .store import Store, StoreWriter

if TYPE_CHECKING:
    from .search import SearchStats

KINDS = ("random", "structured", "clip")
# "exact" without progressive codes (the int8 pass where the CPU has VNNI), "exact+codes" as
# `ilias search --method exact` runs with progressive codes (built when missing), "progressive"
# the codes' stages forced from the first row
METHODS = ("float32", "exact", "int8", "exact+codes", "progressive")
# peer name -> its row in the tables
PEERS = {
    "faiss-flat": "faiss IndexFlatIP (float32 in RAM)",
    "faiss-sq-fp16": "faiss IndexScalarQuantizer QT_fp16",
    "numpy": "numpy sgemm + argpartition (float32)",
}
FAISS_HINT = "pip install faiss-cpu"
DATA_ENV = "ILIAS_BENCH_DATA"


def default_data_dir() -> Path:
    """Where benchmark stores are cached: $ILIAS_BENCH_DATA, else ~/.cache/ilias-core/bench."""
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ilias-core" / "bench"


def resolve_threads(threads: int) -> int:
    """The thread count `threads` stands for (0: every core this process may run on)."""
    if threads:
        return threads
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def check_names(names: Sequence[str], known: Sequence[str], what: str) -> list[str]:
    """`names` (all of them in `known`) as a list; an unknown one is a ValueError naming `what`."""
    names = [n for n in names if n]
    for n in names:
        if n not in known:
            raise ValueError(f"{what}: unknown {n!r} (known: {', '.join(known)})")
    return names


# ---------------------------------------------------------------------------------------------
# data


def structured(rng: np.random.Generator, n: int, d: int, decay: float = 0.05) -> np.ndarray:
    """Unit vectors with an anisotropic spectrum (eigenvalues ~ exp(-decay * i)), like real embeddings."""
    scales = np.exp(-decay * np.arange(d) / d * 100).astype(np.float32)
    basis, _ = np.linalg.qr(np.random.default_rng(12345).standard_normal((d, d)).astype(np.float32))
    x = (rng.standard_normal((n, d), dtype=np.float32) * scales) @ basis.T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def clip_like(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Unit vectors sharing a common mean direction, as vision-language embeddings do: a fixed
    mean of norm about 0.7 (varying per row) plus `structured` variation, so that random pairs
    sit at cosine 0.2-0.5 (about 0.33 on average)."""
    mean = np.random.default_rng(54321).standard_normal(d).astype(np.float32)
    mean /= np.linalg.norm(mean)
    x = structured(rng, n, d)
    w = (0.7 * np.exp(0.25 * rng.standard_normal((n, 1)))).astype(np.float32)
    x += w * mean
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def unit_vectors(rng: np.random.Generator, n: int, d: int, kind: str = "random") -> np.ndarray:
    """`n` float32 unit vectors of dimension `d`: gaussian directions (`random`), `structured`
    (an anisotropic spectrum) or `clip` (structured around a shared mean direction)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "structured":
        return structured(rng, n, d)
    if kind == "clip":
        return clip_like(rng, n, d)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def store_path(name: str, n: int, d: int, kind: str = "random", root: str | os.PathLike | None = None) -> Path:
    return Path(root or default_data_dir()) / f"{name}-{kind}-{n}x{d}"


def make_store(
    name: str,
    n: int,
    d: int,
    kind: str = "random",
    *,
    root: str | os.PathLike | None = None,
    chunk: int = 200_000,
    shard_rows: int | None = None,
    progress: bool = False,
) -> Store:
    """A cached float16 store of `n` unit vectors of `kind`, made once under `root` (seed 0).

    Interrupted, it resumes after its last complete shard with the same bits as a store made in
    one go (the draws of the rows already written are made again and dropped)."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {', '.join(KINDS)}, got {kind!r}")
    if n < 1 or d < 1:
        raise ValueError(f"store size: expected at least 1 row and 1 dimension, got {n} x {d}")
    path = store_path(name, n, d, kind, root)
    if (path / "manifest.json").exists():
        store = Store.open(path)
        if store.count == n:
            return store
    rng = np.random.default_rng(0)
    extra = {"shard_rows": shard_rows} if shard_rows else {}
    with StoreWriter(path, dim=d, provenance={"benchmark": {"kind": kind, "seed": 0, "chunk": chunk}}, **extra) as w:
        start = w.count
        with Progress("bench data", total=n, enabled=progress) as bar:
            for lo in range(0, n, chunk):
                m = min(chunk, n - lo)
                x = unit_vectors(rng, m, d, kind)  # drawn even when skipped: the stream stays the same
                if lo + m > start:
                    skip = max(start - lo, 0)
                    w.append(x[skip:], [f"row{i}" for i in range(lo + skip, lo + m)])
                bar.set(lo + m)
    return Store.open(path)


def queries(n: int, d: int, kind: str = "random", seed: int = 1) -> np.ndarray:
    """`n` float32 query vectors of `kind` (drawn apart from the stores: seed 1)."""
    return unit_vectors(np.random.default_rng(seed), n, d, kind)


def float32_vectors(store: Store, chunk: int = 200_000) -> np.ndarray:
    """The whole store as one float32 array in RAM (what faiss's flat indexes hold)."""
    return np.concatenate([np.asarray(v, dtype=np.float32) for v, _ in store.iter_chunks(chunk)])


# ---------------------------------------------------------------------------------------------
# timing, peaks, tables


def timed(fn: Callable, repeat: int = 1):
    """(median seconds, last result) over `repeat` runs."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_rss_gb() -> float:
    """The peak resident set of this process so far, in GB.

    Linux's VmHWM belongs to the process image: ru_maxrss would also count the parent's pages
    of a process started by fork + exec (a search run from a big pytest process)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1e6  # kB
    except OSError:
        pass
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1e9 if sys.platform == "darwin" else rss / 1e6  # bytes on macOS, kB elsewhere


def table(rows: list[dict], cols: list[str]) -> str:
    """`rows` as a plain text table of the columns `cols` (missing cells empty)."""
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)


@dataclass(frozen=True)
class Peaks:
    """This machine's measured peaks on `threads` threads: float32 FMA on the fastest SIMD path,
    int8 VNNI (None where the CPU has no VNNI), int8 with AVX2 `maddubs` (the progressive stages'
    kernel without VNNI; None without AVX2)."""

    threads: int
    simd: str
    fp32_gflops: float
    int8_gops: float | None
    maddubs_gops: float | None = None

    def lines(self) -> list[str]:
        out = [f"machine float32 FMA peak ({self.simd}, {self.threads} threads): {self.fp32_gflops:.0f} GFLOP/s"]
        if self.int8_gops:
            out.append(f"machine int8 VNNI peak ({self.threads} threads): {self.int8_gops:.0f} GOP/s")
        if self.maddubs_gops:
            out.append(f"machine int8 maddubs peak (avx2, {self.threads} threads): {self.maddubs_gops:.0f} GOP/s")
        return out

    def stage_gops(self, kernel: str | None) -> float | None:
        """The measured peak of the progressive stage kernel `kernel` (None: not measured)."""
        return {"avx512-vnni": self.int8_gops, "avx2": self.maddubs_gops}.get(kernel or "")

    def as_dict(self) -> dict:
        return {"peak_threads": self.threads, "peak_simd": self.simd, "fp32_peak_gflops": self.fp32_gflops,
                "int8_peak_gops": self.int8_gops, "maddubs_peak_gops": self.maddubs_gops}


def measure_peaks(threads: int = 0, tries: int = 3) -> Peaks:
    """The best of `tries` short runs of each peak microbenchmark (about 0.3 s each)."""
    fp32 = max(_core.fp32_peak_gflops(None, threads) for _ in range(tries))
    int8 = max(_core.int8_peak_gops(threads) or 0 for _ in range(tries))
    maddubs = max(_core.maddubs_peak_gops(threads) or 0 for _ in range(tries))
    return Peaks(resolve_threads(threads), _core.simd_paths()[0], fp32, int8 or None, maddubs or None)


@contextlib.contextmanager
def blas_threads(threads: int):
    """Holds numpy's BLAS (and OpenMP) pools to `threads` when threadpoolctl is installed; else
    they keep their own setting (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS, read at import)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(resolve_threads(threads)):
        yield


# ---------------------------------------------------------------------------------------------
# the search benchmark


@dataclass(frozen=True)
class SearchSetup:
    """What a search benchmark runs: `queries` queries, top `k`, against `n` x `dim` float16 rows."""

    n: int
    dim: int
    queries: int
    k: int
    threads: int
    kind: str = "random"

    @property
    def flop(self) -> float:
        """Multiply-adds of a brute force, counted as 2 operations each."""
        return 2.0 * self.queries * self.n * self.dim

    @property
    def store_gb(self) -> float:
        return self.n * self.dim * 2 / 1e9

    def line(self) -> str:
        return (f"data: {self.n:,} x {self.dim} float16 ({self.kind}), {self.queries} queries, k={self.k}, "
                f"{resolve_threads(self.threads)} threads")

    def as_dict(self) -> dict:
        return {"n": self.n, "dim": self.dim, "queries": self.queries, "k": self.k,
                "threads": resolve_threads(self.threads), "kind": self.kind}


@dataclass
class Timing:
    """One timed case: `name` is its row in the table ("ilias exact", a PEERS label), `key` the
    method or peer name; `stats` the SearchStats of an ilias search."""

    key: str
    name: str
    seconds: float
    stats: SearchStats | None = None
    indices: np.ndarray | None = field(default=None, repr=False)
    scores: np.ndarray | None = field(default=None, repr=False)


def measures(t: Timing, setup: SearchSetup, peaks: Peaks, ref: Timing | None = None) -> dict:
    """The numbers of one case: seconds, effective GFLOP/s (2 Q N d / t), shares of the peaks,
    GB/s of the float16 store, the int8 pass's pair shares, and t / ref.seconds (`ratio`)."""
    gflops = setup.flop / t.seconds / 1e9
    out = {"seconds": t.seconds, "gflops": gflops, "fp32_peak_share": gflops / peaks.fp32_gflops,
           "store_gbps": setup.store_gb / t.seconds}
    s = t.stats
    if s is not None and s.int8_pairs:
        if peaks.int8_gops:
            out["int8_peak_share"] = gflops / peaks.int8_gops
        out["int8_pair_share"] = s.int8_pairs / (s.int8_pairs + s.float_pairs)
        out["rescored_share"] = s.rescored_pairs / s.int8_pairs
    if ref is not None:
        out["ratio_to"] = ref.name
        out["ratio"] = t.seconds / ref.seconds
    return out


def overlap(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / k for two (nq, k) arrays of rows (-1: no row)."""
    found, truth = np.asarray(found, np.int64), np.asarray(truth, np.int64)
    k = truth.shape[1]
    # absent rows (-1) get distinct negative values that match nothing
    pad = np.arange(k, dtype=np.int64)
    a = np.where(found < 0, -1 - pad[: found.shape[1]], found)
    b = np.where(truth < 0, -1 - k - pad, truth)
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    return float(np.mean((both[:, 1:] == both[:, :-1]).sum(axis=1) / k))


def numpy_topk(store: Store, q: np.ndarray, k: int, block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The plain way: float32 matrix products by blocks, a running top-k by argpartition."""
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    start = 0
    for v, _ in store.iter_chunks(block):
        s = q @ np.asarray(v, dtype=np.float32).T
        cs = np.concatenate([best_s, s], axis=1)
        ci = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(v)), s.shape)], axis=1)
        top = np.argpartition(-cs, min(k, cs.shape[1] - 1), axis=1)[:, :k]
        best_s = np.take_along_axis(cs, top, 1)
        best_i = np.take_along_axis(ci, top, 1)
        start += len(v)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


def import_faiss(peer: str = "faiss"):
    try:
        import faiss
    except ImportError:
        raise ImportError(f"{peer}: faiss is not installed ({FAISS_HINT} adds it)") from None
    return faiss


def faiss_available() -> bool:
    try:
        import_faiss()
    except ImportError:
        return False
    return True


def peer_search(name: str, store: Store, threads: int, vectors: np.ndarray | None = None) -> Callable:
    """The peer `name` (a key of PEERS) ready to search `store`: a function (q, k) -> (scores,
    rows). faiss peers build their index here, from `vectors` (the store in float32) when given."""
    check_names([name], list(PEERS), "peer")
    n = resolve_threads(threads)
    if name == "numpy":
        def run(q, k):
            with blas_threads(n):
                return numpy_topk(store, q, k)
        return run
    faiss = import_faiss(name)
    faiss.omp_set_num_threads(n)
    x = float32_vectors(store) if vectors is None else vectors
    if name == "faiss-flat":
        index = faiss.IndexFlatIP(store.dim)
    else:
        index = faiss.IndexScalarQuantizer(store.dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    index.add(x)

    def run(q, k):
        with blas_threads(n):
            return index.search(q, k)
    return run


def ilias_search(store: Store, method: str, threads: int, simd: str | None = None) -> Callable:
    """ilias exact search with `method` as a function (q, k) -> SearchResults."""
    from .search import search

    check_names([method], METHODS, "method")
    if method == "exact+codes":
        return lambda q, k: search(q, store, k=k, threads=threads, simd=simd, method="exact")
    return lambda q, k: search(q, store, k=k, threads=threads, simd=simd, method=method, use_codes=False)


def ensure_progressive(store: Store, k: int, threads: int, out: Callable[[str], None] = print) -> dict:
    """Builds the store's progressive codes where missing or stale, saying how long it took and
    what they hold; returns their `progressive_info`."""
    from .database import Database
    from .index import build_index, default_path, open_codes, progressive_info

    db = Database.of(store)
    path = default_path(db, "progressive")
    try:
        info = progressive_info(open_codes(path, db))
    except (OSError, ValueError):
        t0 = time.perf_counter()
        build_index(db, "progressive", threads=threads, k=k)
        out(f"progressive codes built in {time.perf_counter() - t0:.1f}s")
        info = progressive_info(open_codes(path, db))
    size = path.stat().st_size
    store_bytes = store.count * store.dim * 2
    out(f"progressive codes: {size / 1e9:.3f} GB ({size / store_bytes:.1%} of the float16 store); stages "
        + ", ".join(f"{b} dims (energy {e:.1%}, expected survival {s:.3%})"
                    for b, e, s in zip(info["boundaries"], info["energy"], info["survival"]))
        + f"; expected work {info['work']:.0%} of the plain int8 pass: "
        + ("exact search uses them" if info["pays"] else "exact search steps aside"))
    return info


@dataclass
class SearchReport:
    setup: SearchSetup
    peaks: Peaks
    timings: list[Timing]

    @property
    def reference(self) -> Timing:
        """What ratios are taken against: ilias exact when it ran, else the first case."""
        return next((t for t in self.timings if t.key == "exact"), self.timings[0])

    def rows(self) -> list[dict]:
        ref = self.reference
        ratio = f"time vs {ref.name}"
        out = []
        for t in self.timings:
            m = measures(t, self.setup, self.peaks, ref)
            row = {"method": t.name, "seconds": f"{t.seconds:.2f}", "GFLOP/s": f"{m['gflops']:.0f}",
                   "% peak": f"{100 * m['fp32_peak_share']:.0f}", "store GB/s": f"{m['store_gbps']:.2f}",
                   ratio: f"{m['ratio']:.2f}x"}
            if "int8_peak_share" in m:
                row["% int8 peak"] = f"{100 * m['int8_peak_share']:.0f}"
            out.append(row)
        return out

    def table(self) -> str:
        ref = self.reference
        return table(self.rows(), ["method", "seconds", "GFLOP/s", "% peak", "% int8 peak", "store GB/s",
                                   f"time vs {ref.name}"])


def run_search_bench(
    store: Store,
    q: np.ndarray,
    k: int,
    *,
    threads: int = 0,
    methods: Sequence[str] = ("float32", "exact"),
    peers: Sequence[str] = ("faiss-flat", "numpy"),
    simd: str | None = None,
    repeat: int = 1,
    scaling: bool = False,
    peaks: Peaks | None = None,
    kind: str = "random",
    out: Callable[[str], None] = print,
) -> SearchReport:
    """Times each ilias `method` and each peer on `store` and `q` (median of `repeat` runs),
    printing through `out` what it finds as it goes: the peaks, identity of every method with
    the first one, the int8 pass's shares, each peer's overlap with ilias. faiss peers are
    skipped with a note when faiss is not installed. Returns the report (`.table()`)."""
    methods = check_names(methods, METHODS, "methods")
    peers = check_names(peers, list(PEERS), "peers")
    if not methods:
        raise ValueError("methods: give at least one ilias method")
    if k > store.count:
        raise ValueError(f"k: {k} is more than the {store.count:,} rows of the store")
    setup = SearchSetup(store.count, store.dim, len(q), k, threads, kind)
    out(setup.line())
    peaks = peaks or measure_peaks(threads)
    for line in peaks.lines():
        out(line)
    report = SearchReport(setup, peaks, [])
    nthreads = resolve_threads(threads)

    codes = None
    if any(m in ("exact+codes", "progressive") for m in methods):
        codes = ensure_progressive(store, k, threads, out)
    first = None
    for method in methods:
        t, res = timed(lambda method=method: ilias_search(store, method, threads, simd)(q, k), repeat)
        timing = Timing(method, f"ilias {method}", t, res.stats, res.indices, res.scores)
        report.timings.append(timing)
        if first is None:
            first = timing
        else:
            same = np.array_equal(res.indices, first.indices) and np.array_equal(res.scores, first.scores)
            out(f"ilias {method}: results identical to {first.name}: {same}")
        m = measures(timing, setup, peaks)
        if "int8_pair_share" in m:
            out(f"ilias {method}: int8 pass on {100 * m['int8_pair_share']:.1f}% of (query, row) pairs, "
                f"{100 * m['rescored_share']:.1f}% of those rescored exactly")
        st = res.stats
        if st.path_reason:
            out(f"ilias {method}: path {st.path} ({st.path_reason})")
        if st.stage_pairs:
            pairs = st.stage_pairs[0]
            store_bytes = store.count * store.dim * 2
            out(f"ilias {method}: pairs entering each stage " + ", ".join(f"{p / pairs:.3%}" for p in st.stage_pairs)
                + f" of the {pairs:,} of stage 1; rescored {st.rescored_pairs / pairs:.4%}; bytes read: codes "
                f"{st.codes_bytes / 1e9:.3f} GB, store {st.store_bytes / 1e9:.3f} GB, together "
                f"{(st.codes_bytes + st.store_bytes) / store_bytes:.1%} of the float16 store")
            # exact scores come from the stored rows: a pass reads at least those it returns
            returned = np.unique(res.indices[res.indices >= 0]).size
            out(f"ilias {method}: the results hold {returned:,} distinct rows, {returned / store.count:.1%} of the "
                "store: the least any pass with exact scores reads")
            # what the first stage's products alone cost at the kernel's peak: a floor for the pass
            peak = peaks.stage_gops(st.stage_kernel)
            if peak and codes and codes["boundaries"]:
                ops = 2 * pairs * (codes["boundaries"][0] - _core.PROGRESSIVE_HEAD)
                floor = ops / (peak * 1e9)
                out(f"ilias {method}: stage 1 is {ops / 1e9:,.3f} G int8 ops: at the measured {st.stage_kernel} peak "
                    f"they alone take {floor:.2f}s, {floor / t:.0%} of this pass")
        out(f"ilias {method}: {t:.2f}s, peak RSS so far {peak_rss_gb():.2f} GB")
        if scaling:
            t1, _ = timed(lambda method=method: ilias_search(store, method, 1, simd)(q, k))
            out(f"ilias {method}: 1 thread {t1:.2f}s, {nthreads} threads {t:.2f}s: {t1 / t:.2f}x")

    faiss_peers = [p for p in peers if p.startswith("faiss")]
    if faiss_peers and not faiss_available():
        out(f"faiss peers ({', '.join(faiss_peers)}) skipped: faiss is not installed ({FAISS_HINT} adds it)")
        peers = [p for p in peers if p not in faiss_peers]
        faiss_peers = []
    x32 = float32_vectors(store) if faiss_peers else None
    for peer in peers:
        fn = peer_search(peer, store, threads, x32)
        t, (scores, rows) = timed(lambda fn=fn: fn(q, k), repeat)
        del fn  # a faiss index holds a copy of the vectors
        timing = Timing(peer, PEERS[peer], t, None, np.asarray(rows), np.asarray(scores))
        report.timings.append(timing)
        agree = overlap(timing.indices, first.indices)
        diff = float(np.abs(timing.scores - first.scores).max())
        out(f"{peer}: {t:.2f}s; overlap of result sets with {first.name} {agree:.5f}, max |score diff| {diff:.2e}")
    return report

