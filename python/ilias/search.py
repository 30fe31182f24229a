"""Exact search over a database, answering one or several tiers of it in one pass.

The Rust core scans the database once for all queries; only the ids of returned rows are ever
read (by the results, from the database). A tier is a part of the database answered by the same
pass: the first N rows (positives plus the first N distractors), a subset (mini-ILIAS), or all.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _core
from .database import Database
from .groundtruth import read_id_list
from .progress import Progress
from .results import SearchResults, SearchStats
from .store import Store


@dataclass(frozen=True)
class Tier:
    """A database answered by a search: the first `rows` global rows (all when None), of which
    those with `keep` True (all when None). Several tiers share one pass over the database.
    `setting`: the published setting it answers ("mini", "full"), "" for none, None to infer it
    from its size. The constructors below build the usual ones."""

    name: str
    rows: int | None = None
    keep: np.ndarray | None = None
    setting: str | None = None

    @classmethod
    def prefix(cls, name: str, db: Database, distractors: int) -> "Tier":
        """The first store (the positives) plus the first `distractors` rows after it."""
        return cls(name, min(db.stores[0].count + distractors, db.count), setting="")

    @classmethod
    def mini(cls, db: Database, keys, name: str = "mini") -> "Tier":
        """mini-ILIAS: the positives plus the distractors whose YFCC100M key is in `keys`."""
        return cls(name, None, db.mini_ilias_keep(keys), setting="mini")

    @classmethod
    def parse(cls, text: str, db: Database) -> "Tier":
        """NAME=SPEC, SPEC being `all`, `+N` (positives + the first N distractors) or a keys file
        (mini-ILIAS), as `ilias search --tier` takes it."""
        name, sep, spec = text.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--tier {text!r}: expected NAME=SPEC (SPEC: all, +N or a keys file)")
        if spec == "all":
            return cls(name)
        if spec.startswith("+"):
            try:
                extra = int(spec[1:].replace("_", "").replace(",", ""))
            except ValueError:
                raise ValueError(f"--tier {text!r}: +N needs a whole number of rows") from None
            return cls.prefix(name, db, extra)
        if not Path(spec).exists():
            raise FileNotFoundError(f"--tier {text!r}: {spec}: no such keys file")
        return cls.mini(db, read_id_list(spec), name)

    def held(self, db: Database) -> int:
        """How many rows of `db` this tier holds."""
        rows = db.count if self.rows is None else int(self.rows)
        return int(np.count_nonzero(self.keep[:rows])) if self.keep is not None else rows


def tier_name(distractors: int) -> str:
    """"+1M" for positives plus the first 1,000,000 distractors (k, M, B)."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if distractors >= size and distractors % (size // 1000 or 1) == 0:
            return f"+{distractors / size:g}{unit}"
    return f"+{distractors:,}"


def as_queries(queries, query_ids=None) -> tuple[np.ndarray, list[str]]:
    """Queries as a C-contiguous float32 (nq, dim) array and their ids: from an array (ids given,
    or row numbers) or from one or several query stores (their ids)."""
    if isinstance(queries, (Database, Store, str, os.PathLike)):
        queries = [queries]
    if isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], (Database, Store, str, os.PathLike)):
        if query_ids is not None:
            raise ValueError("query_ids: not needed when the queries come from stores (their ids are used)")
        stores = [s for d in queries for s in Database.of(d).stores]
        Database(stores)  # checks that they share one dimension
        q = np.concatenate([s.read_all().astype(np.float32) for s in stores])
        return q, [i for s in stores for i in s.all_ids()]
    q = np.asarray(queries)
    if q.ndim != 2:
        raise ValueError(f"queries: expected a 2-D array (nq, dim), got shape {q.shape}")
    if q.dtype.kind != "f":
        raise ValueError(f"queries: expected float16 or float32, got {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    ids = [str(i) for i in range(len(q))] if query_ids is None else [str(i) for i in query_ids]
    if len(ids) != len(q):
        raise ValueError(f"query_ids: {len(ids)} ids for {len(q)} queries")
    return q, ids


def search(
    queries,
    database,
    k: int = 1000,
    *,
    query_ids: Sequence[str] | None = None,
    threads: int = 0,
    keep: np.ndarray | None = None,
    simd: str | None = None,
    method: str = "exact",
    progress: bool = False,
    use_codes: bool = True,
) -> SearchResults:
    """Exact inner-product search: the `k` best database rows for each query.

    queries: an (nq, dim) float16/float32 array, or one or several query stores (their ids are used).
    database: a Database, a store, a path to one, or an ordered list of them.
    threads: worker threads (0: all cores). keep: optional bool mask over the global rows: only
    rows with True can be returned (see `Database.mini_ilias_keep`). simd: force "avx512", "avx2"
    or "scalar" (default: the fastest this CPU has). method: "exact" (default) takes the fastest
    exact path: the progressive codes of the database where they exist and pay (`ilias index
    build --codes progressive`), else an int8 first pass with exact float32 rescoring where the
    CPU has AVX-512 VNNI or AVX-VNNI; "float32" scores every row in float32; "progressive"
    forces the codes' stages from the first row, "int8" / "int8-scalar" the int8 pass (for
    tests). All return identical results; `stats.path` and `stats.path_reason` say which ran.
    use_codes=False: "exact" ignores progressive codes (benchmarks time the paths without them).
    """
    tier = Tier("all", None, keep)
    return search_tiers(
        queries, database, [tier], k, query_ids=query_ids, threads=threads, simd=simd, method=method, progress=progress,
        use_codes=use_codes,
    )["all"]


def search_tiers(
    queries,
    database,
    tiers: Sequence[Tier],
    k: int = 1000,
    *,
    query_ids: Sequence[str] | None = None,
    threads: int = 0,
    simd: str | None = None,
    method: str = "exact",
    progress: bool = False,
    use_codes: bool = True,
) -> dict[str, SearchResults]:
    """`search` answering several databases (tiers: nested prefixes, subsets) in one pass, e.g.
    positives + 1M, mini-ILIAS, positives + 10M, everything. Each tier's results equal those of a
    separate search restricted to it. Returns {tier name: SearchResults}."""
    db = Database.of(database)
    q, qids = as_queries(queries, query_ids)
    if db.count == 0:
        raise ValueError("database: the stores are empty (0 rows)")
    names = [t.name for t in tiers]
    if not tiers or len(set(names)) != len(names):
        raise ValueError(f"tiers: expected distinct names, got {names}")
    specs = [
        (db.count if t.rows is None else int(t.rows), None if t.keep is None else np.ascontiguousarray(t.keep, dtype=bool))
        for t in tiers
    ]
    check_memory(len(q), k, len(tiers), threads)
    codes, reason = exact_path(db, method) if use_codes or method != "exact" else (None, "progressive codes not used")
    t0 = time.monotonic()
    with Progress("search", total=db.count, enabled=progress) as bar:
        scores, indices, stats = _core.exact_search(
            db.shard_paths, q, k, threads, specs, simd, method, bar.set if progress else None,
            db.shard_checksums, codes,
        )
        bar.set(db.count)
    path = "progressive" if codes else ("int8" if stats.get("int8") else "float32")
    if not codes and method == "exact" and not stats.get("int8"):
        reason += "; no int8 pass: this CPU has neither AVX-512 VNNI nor AVX-VNNI" if reason else ""
    st = SearchStats(method=method, seconds=time.monotonic() - t0, threads=threads, path=path,
                     path_reason=reason or None, **stats)
    return {
        t.name: results_of(db, scores[i], indices[i], qids, k, st, tier=t)
        for i, t in enumerate(tiers)
    }


def exact_path(db: Database, method: str) -> tuple[str | None, str]:
    """The progressive codes an exact search of `db` uses (None: none) and why: `method`
    "progressive" needs them, "exact" takes them when their build found that they pay (a flat
    spectrum, such as whitened features, makes them step aside). Codes older than the database
    are refused; "exact" runs without codes built for another set of stores."""
    if method not in ("exact", "progressive"):
        return None, ""
    from .index import default_path, open_codes, progressive_info

    path = default_path(db, "progressive")
    if not path.exists():
        if method == "progressive":
            raise FileNotFoundError(
                f"{path}: no progressive codes for this database (build them with `ilias index build --codes progressive`)"
            )
        return None, "no progressive codes (ilias index build --codes progressive)"
    try:
        info = progressive_info(open_codes(path, db))
    except ValueError as err:
        # codes older than the database are refused; codes of another set of stores (this one
        # searched alone, say) are of no use to this search, which runs without them
        if method == "progressive" or "older than the database" in str(err):
            raise
        return None, f"the progressive codes {path} belong to another database"
    b, e = info["boundaries"], info["energy"]
    measured = (f"the first {b[0]} of {info['dim']} rotated dimensions hold {e[0]:.0%} of the energy; expected work "
                f"{info['work']:.0%} of the plain int8 pass")
    if method == "progressive":
        return str(path), f"forced (method progressive): {measured}"
    if info["pays"]:
        return str(path), f"progressive codes pay: {measured}"
    return None, f"progressive codes step aside (flat spectrum): {measured}"


def check_memory(nq: int, k: int, tiers: int, threads: int) -> None:
    """Refuses, before anything is allocated, a search whose top-k buffers (each thread holds
    1.5k candidates of 16 bytes per query and tier) and results would not fit in memory."""
    workers = threads or os.cpu_count() or 1
    need = tiers * nq * k * (workers * 1.5 * 16 + 12)
    free = available_memory()
    if free is not None and need > 0.8 * free:
        raise ValueError(
            f"k = {k:,}: {nq:,} queries x {tiers} tier(s) on {workers} thread(s) need about {need / 1e9:.1f} GB "
            f"of top-k buffers, more than the {free / 1e9:.1f} GB available; lower k, threads or the tiers"
        )


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux: MemAvailable), None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def results_of(db: Database, scores, indices, query_ids, k: int, stats: SearchStats, tier: Tier | None = None) -> SearchResults:
    """The one place a search's arrays become a SearchResults over `db` (exact and codes search)."""
    from .adapt import adaptation_label

    tier = tier or Tier("all")
    return SearchResults(
        scores=scores,
        indices=indices,
        query_ids=query_ids,
        k=k,
        database=db.parts,
        tier=tier.name,
        tier_rows=tier.held(db),
        setting=tier.setting,
        stats=stats,
        warnings=list(db.warnings),
        adaptation=adaptation_label(db),
        db=db,
    )
