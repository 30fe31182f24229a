"""Quantized codes of a database, and search with them.

`build_index` writes compact codes of every database row into one file: `sq8` (one int8 per
dimension with a per-row scale: half the float16 bytes), `pq<M>` (M bytes per row, 256
centroids per group of dim/M dimensions) or `pq<M>x4` (M/2 bytes per row, scanned with the
tables in SIMD registers). `search_codes` scans the codes for a shortlist of candidates per
query and rescores them exactly from the float16 store, so returned scores are exact; only rows
that the codes rank outside the shortlist can be missed (`measure_recall` says how many).

`progressive` codes serve exact search instead (`ilias search --method exact` uses them where
they pay, `--method progressive` forces them): the rows rotated onto the principal axes of the
database's second moment, int8 codes in dimension blocks with tail norms, read a block at a time
while a rigorous bound lets a pair reach the top k; the survivors are rescored exactly, so results
are bit-identical to `method="float32"` (`plan_progressive` picks the rotation and the stages).

A codes file records the fingerprint of the database it was built from; opening it against any
other database, or against the same stores after they changed, is an error.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _core
from .database import Database
from .progress import Progress
from .results import SearchResults, SearchStats
from .search import Tier, as_queries, check_memory, results_of, search

KIND = re.compile(r"^(sq8|pq[1-9]\d*(x4)?|progressive)$")
# shortlist sizes (x k) that reach recall@1000 >= 0.999 (sq8) and >= 0.95 (pq) on our benchmarks
DEFAULT_SHORTLIST = {"sq8": 2, "pq": 10}


def default_path(db: Database, kind: str) -> Path:
    """Where codes of `kind` live by default: in `codes/` of the last store (the distractors)."""
    return db.stores[-1].path / "codes" / f"{kind}.codes"


def check_kind(kind: str) -> str:
    if not KIND.match(kind):
        raise ValueError(f"codes: unknown kind {kind!r} (expected sq8, pq<M>, pq<M>x4 (e.g. pq96x4) or progressive)")
    return kind


def build_index(
    database,
    kind: str,
    out: str | os.PathLike | None = None,
    *,
    threads: int = 0,
    sample: int = 0,
    iters: int = 20,
    seed: int = 1234,
    progress: bool = False,
    k: int = 1000,
) -> Path:
    """Builds codes of `kind` for the database (a store, a path or an ordered list of them).

    PQ codebooks are trained by k-means on `sample` rows (0: 64 per centroid, at least 16,384),
    `iters` iterations, seeded; progressive codes learn their rotation and stages on `sample`
    rows (0: 20,000), for searches of `k` neighbours (any k is searched exactly). The file is written beside `out` and renamed into place when
    complete. Returns its path (default: `codes/<kind>.codes` in the last store)."""
    db = Database.of(database)
    check_kind(kind)
    if kind == "progressive":
        return _build_progressive(db, out, threads=threads, sample=sample, seed=seed, progress=progress, k=k)
    m = re.match(r"pq(\d+)", kind)
    if m and (int(m.group(1)) > db.dim or db.dim % int(m.group(1))):
        raise ValueError(f"codes {kind}: the dimension {db.dim} is not a multiple of {m.group(1)} subquantizers")
    path = Path(out) if out is not None else default_path(db, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    with Progress(f"codes {kind}", total=db.count, enabled=progress) as bar:
        _core.build_codes(
            db.shard_paths, kind, str(path), db.fingerprint, threads, sample, iters, seed,
            bar.set if progress else None,
        )
        bar.set(db.count)
    return path


def open_codes(path: str | os.PathLike, database) -> dict:
    """Validates the codes file at `path` against the database; returns its header."""
    path = Path(path)
    db = Database.of(database)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such codes file (build it with `ilias index build`)")
    info = _core.inspect_codes(str(path))
    total = db.count
    if info["fingerprint"] == db.fingerprint and info["rows"] == total:
        return info
    # shards are only ever appended: codes of the first shards of this database are older than it
    counts = np.cumsum(db.shard_counts)
    j = int(np.searchsorted(counts, info["rows"])) + 1
    if info["rows"] < total and counts[j - 1] == info["rows"] and db.prefix_fingerprint(j) == info["fingerprint"]:
        raise ValueError(
            f"{path}: the codes are older than the database: built when it held {info['rows']:,} rows, "
            f"it now holds {total:,}; rebuild them with `ilias index build`"
        )
    modified = max((s.path / "manifest.json").stat().st_mtime for s in db.stores) > path.stat().st_mtime
    raise ValueError(
        f"{path}: the codes were built from a different database ({info['rows']:,} rows x {info['dim']}, "
        f"fingerprint {info['fingerprint']}) than {', '.join(str(s.path) for s in db.stores)}"
        + (" (or from it before it was modified: it is newer than the codes)" if modified else "")
        + "; rebuild them with `ilias index build`"
    )


def codes_search_inputs(queries, database, codes, k: int, shortlist: int | None, query_ids=None):
    """The checked inputs of a codes search: (database, codes path, codes info, queries, query ids,
    shortlist). `codes`: a codes file, or a kind found at its default place."""
    db = Database.of(database)
    path = Path(codes)
    if not path.exists() and KIND.match(str(codes)):
        path = default_path(db, str(codes))
    info = open_codes(path, db)
    q, qids = as_queries(queries, query_ids)
    if q.shape[1] != info["dim"]:
        raise ValueError(f"queries have dimension {q.shape[1]} but the codes have {info['dim']}")
    if shortlist is None:
        shortlist = k * DEFAULT_SHORTLIST["sq8" if info["kind"] == "sq8" else "pq"]
    if shortlist < k:
        raise ValueError(f"shortlist: {shortlist} is smaller than k = {k}")
    return db, path, info, q, qids, shortlist


def search_codes(
    queries,
    database,
    codes: str | os.PathLike,
    k: int = 1000,
    *,
    shortlist: int | None = None,
    rerank: bool = True,
    keep: np.ndarray | None = None,
    query_ids: Sequence[str] | None = None,
    threads: int = 0,
    progress: bool = False,
) -> SearchResults:
    """Search with codes: the `shortlist` (default: a multiple of k that suits the kind)
    best rows per query by the codes, rescored exactly from the stores when `rerank`.
    `codes`: a codes file, or a kind (`sq8`, ...) found at its default place."""
    db, path, info, q, qids, shortlist = codes_search_inputs(queries, database, codes, k, shortlist, query_ids)
    check_memory(len(q), shortlist, 1, threads)
    keep = None if keep is None else np.ascontiguousarray(keep, dtype=bool)
    t0 = time.monotonic()
    with Progress(f"search {info['kind']}", total=db.count, enabled=progress) as bar:
        scores, indices, stats = _core.code_search(
            str(path), db.shard_paths, q, k, shortlist, rerank, threads, keep, bar.set if progress else None
        )
        bar.set(db.count)
    st = SearchStats(method=f"codes-{info['kind']}", seconds=time.monotonic() - t0, threads=threads,
                     codes_path=str(path), **stats)
    return results_of(db, scores, indices, qids, k, st, Tier("all", keep=keep))


def measure_recall(
    results: SearchResults, queries, database, *, sample: int = 100, seed: int = 0, threads: int = 0,
    keep: np.ndarray | None = None,
) -> dict:
    """Recall@k of `results` against exact search on a seeded sample of its queries: the mean
    share of each query's exact top k that the results hold (ids compared, ties aside)."""
    q, _ = as_queries(queries, None)
    n = len(q)
    rows = np.sort(np.random.default_rng(seed).choice(n, size=min(sample, n), replace=False))
    exact = search(q[rows], database, results.k, threads=threads, keep=keep)
    shares = []
    for i, r in enumerate(rows):
        want = exact.indices[i][exact.indices[i] >= 0]
        got = results.indices[r][results.indices[r] >= 0]
        shares.append(len(np.intersect1d(want, got)) / max(len(want), 1))
    return {"recall": float(np.mean(shares)), "min": float(np.min(shares)), "queries": len(rows),
            "k": results.k, "exact_seconds": exact.stats.seconds}


# ---- progressive codes for exact search

# the rotation and stages are learnt on this many rows, against a database of the full size
PROGRESSIVE_SAMPLE = 20_000
# the k the stages are chosen for (survival depends on it; any k is searched exactly)
PROGRESSIVE_K = 1000
# the stages are used by `--method exact` when their expected work (the pass's cost model,
# rust/quant/progressive.rs: Costs) is at most PAYS_BELOW of the plain int8 pass (every
# dimension in the block kernel, then rescoring; flat spectra come out near 1); the float32
# pass, all a CPU without VNNI has, costs about 2.7 times the plain int8 pass per dimension
PAYS_BELOW = 0.7
# a pass meets each row with the k-th score of the rows before it: the survival is averaged
# over (fraction of the database whose k-th score is the threshold, share of the pass), the
# first eighth at the threshold of a sixteenth (the search scores the first rows in float32
# until the stages pay)
RUNNING = ((1 / 16, 1 / 8), (1 / 8, 1 / 8), (1 / 4, 1 / 4), (1 / 2, 1 / 2))
STEP = 32
# the first rotated dimensions kept in float32
HEAD = _core.PROGRESSIVE_HEAD


def plan_progressive(x: np.ndarray, n_total: int, *, k: int = PROGRESSIVE_K, queries: int = 256) -> dict:
    """The rotation and stage boundaries of progressive codes, from a sample `x` of the rows of a
    database of `n_total` rows: the principal axes of the sample's second moment (an orthogonal
    rotation: dot products are unchanged), then the boundaries (multiples of 32, at most 4 stages)
    minimising the expected work, measured on the sample: its first `queries` rows serve as
    queries against the others, with the thresholds a pass over a database of `n_total` rows
    meets (`RUNNING`), and the pass's cost model (`_core.progressive_work`). Returns the
    rotation (float32, rows = axes, largest first), the boundaries, the energy and the survival
    at each boundary, the expected work as a share of the plain int8 pass, and whether the codes
    pay."""
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x).all(axis=1)]
    n, d = x.shape
    if n < 2 * queries:
        queries = max(1, n // 4)
    w, v = np.linalg.eigh(x.T @ x / max(n, 1))
    order = np.argsort(w)[::-1]
    rotation = np.ascontiguousarray(v[:, order].T, dtype=np.float32)
    energy = np.cumsum(np.maximum(w[order], 0)) / max(float(np.sum(np.maximum(w, 0))), 1e-300)
    y = (x @ rotation.T.astype(np.float64)).astype(np.float32)
    qy, dy = y[:queries], y[queries:]
    full = qy @ dy.T
    thresholds = []
    for fraction, weight in RUNNING:
        # the k-th score of a `fraction` of the database is about its (k / fraction)-th
        kk = int(np.clip(round(k * len(dy) / max(n_total * fraction, 1)), 1, max(len(dy), 1)))
        thr = -np.partition(-full, kk - 1, axis=1)[:, kk - 1 : kk] if len(dy) else np.zeros((len(qy), 1))
        thresholds.append((thr, weight))
    qn2, dn2 = np.sum(qy.astype(np.float64) ** 2, axis=1), np.sum(dy.astype(np.float64) ** 2, axis=1)
    qh2, dh2 = np.sum(qy[:, :HEAD].astype(np.float64) ** 2, axis=1), np.sum(dy[:, :HEAD].astype(np.float64) ** 2, axis=1)
    cands = list(range(STEP, d - d % STEP + 1, STEP)) if d >= STEP else []
    survival = {}
    partial = np.zeros_like(full)
    lo_q, lo_d = np.zeros(len(qy)), np.zeros(len(dy))
    prev = 0
    for m in cands:
        partial += qy[:, prev:m] @ dy[:, prev:m].T
        lo_q += np.sum(qy[:, prev:m].astype(np.float64) ** 2, axis=1)
        lo_d += np.sum(dy[:, prev:m].astype(np.float64) ** 2, axis=1)
        prev = m
        tail = np.sqrt(np.maximum(qn2 - lo_q, 0))[:, None] * np.sqrt(np.maximum(dn2 - lo_d, 0))[None, :]
        # the int8 error (7-bit query, 8-bit row codes): about 2.5% of |q_<=m| |x_<=m| after the
        # float32 head
        quant = 0.025 * np.sqrt(np.maximum(lo_q - qh2, 0))[:, None] * np.sqrt(np.maximum(lo_d - dh2, 0))[None, :]
        bound = partial + tail + quant
        survival[m] = sum(w * float(np.mean(bound >= thr)) for thr, w in thresholds) if len(dy) else 1.0
    best, best_cost = [], float("inf")
    from itertools import combinations

    for s in range(1, 5):
        for bounds in combinations(cands, s):
            # per pair: every one enters stage 1, a share survival[b] the stage after boundary b
            entered = [1.0] + [survival[b] for b in bounds[:-1]]
            widths = [bounds[0] - HEAD] + [m - m0 for m0, m in zip(bounds, bounds[1:])]
            cost = _core.progressive_work(entered, widths, survival[bounds[-1]], d)
            if cost < best_cost:
                best, best_cost = list(bounds), cost
    plain = _core.progressive_work([1.0], [d], survival.get(cands[-1], 1.0), d) if cands else float("inf")
    work = best_cost / plain if best else 1.0
    return {
        "rotation": rotation,
        "boundaries": best,
        "energy": [float(energy[m - 1]) for m in best],
        "survival": [survival[m] for m in best],
        "work": work,
        "pays": bool(best) and work <= PAYS_BELOW,
        "k": k,
        "sample": n,
    }


def _build_progressive(db: Database, out, *, threads: int, sample: int, seed: int, progress: bool, k: int) -> Path:
    if db.dim < STEP:
        raise ValueError(f"codes progressive: the dimension {db.dim} is below {STEP}, the smallest stage")
    path = Path(out) if out is not None else default_path(db, "progressive")
    path.parent.mkdir(parents=True, exist_ok=True)
    n = min(db.count, sample or PROGRESSIVE_SAMPLE)
    rows = np.sort(np.random.default_rng(seed).choice(db.count, size=n, replace=False))
    plan = plan_progressive(db.vectors_of(rows).astype(np.float32), db.count, k=k)
    bounds = plan["boundaries"] or [STEP]
    meta = [plan["k"], plan["sample"], float(plan["pays"]), plan["work"], *plan["energy"], *plan["survival"]]
    with Progress("codes progressive", total=db.count, enabled=progress) as bar:
        _core.build_progressive(db.shard_paths, str(path), db.fingerprint, plan["rotation"], bounds,
                                [float(v) for v in meta], threads, bar.set if progress else None)
        bar.set(db.count)
    return path


def progressive_info(info: dict) -> dict:
    """What the build of progressive codes measured, from `_core.inspect_codes`: boundaries,
    energy and expected survival at each, expected work (share of the plain int8 pass), pays."""
    meta, b = info["meta"], info["boundaries"]
    s = len(b)
    return {"boundaries": b, "k": int(meta[0]), "sample": int(meta[1]), "pays": meta[2] > 0,
            "work": meta[3], "energy": meta[4:4 + s], "survival": meta[4 + s:4 + 2 * s], "dim": info["dim"]}
