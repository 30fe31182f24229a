"""Quantized codes of a database, and search with them.

`build_index` writes compact codes of every database row into one file: `sq8` (one int8 per
dimension with a per-row scale: half the float16 bytes), `pq<M>` (M bytes per row, 256
centroids per group of dim/M dimensions) or `pq<M>x4` (M/2 bytes per row, scanned with the
tables in SIMD registers). `search_codes` scans the codes for a shortlist of candidates per
query and rescores them exactly from the float16 store, so returned scores are exact; only rows
that the codes rank outside the shortlist can be missed (`measure_recall` says how many).

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

KIND = re.compile(r"^(sq8|pq[1-9]\d*(x4)?)$")
# shortlist sizes (x k) that reach recall@1000 >= 0.999 (sq8) and >= 0.95 (pq) on our benchmarks
DEFAULT_SHORTLIST = {"sq8": 2, "pq": 10}


def default_path(db: Database, kind: str) -> Path:
    """Where codes of `kind` live by default: in `codes/` of the last store (the distractors)."""
    return db.stores[-1].path / "codes" / f"{kind}.codes"


def check_kind(kind: str) -> str:
    if not KIND.match(kind):
        raise ValueError(f"codes: unknown kind {kind!r} (expected sq8, pq<M> or pq<M>x4, e.g. pq96x4)")
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
) -> Path:
    """Builds codes of `kind` for the database (a store, a path or an ordered list of them).

    PQ codebooks are trained by k-means on `sample` rows (0: 64 per centroid, at least 16,384),
    `iters` iterations, seeded. The file is written beside `out` and renamed into place when
    complete. Returns its path (default: `codes/<kind>.codes` in the last store)."""
    db = Database.of(database)
    check_kind(kind)
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
