"""Exact search over one or several stores, and the results it produces.

The database is an ordered list of stores (for ILIAS: positives first, then distractors); a
result index is a global row across them. The Rust core scans the database once for all
queries; only the ids of returned rows are ever read.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import _core
from ._io import atomic_path, atomic_write
from .progress import Progress
from .store import Store, open_stores

RESULTS_FORMAT = "ilias-results"
RESULTS_VERSION = 1


def _as_stores(database) -> list[Store]:
    """Stores, paths of stores or of stores written in parts, in order, as one list of stores."""
    if isinstance(database, (Store, str, os.PathLike)):
        database = [database]
    stores = [s for d in database for s in ([d] if isinstance(d, Store) else open_stores(d))]
    if not stores:
        raise ValueError("database: no stores given")
    dims = {s.dim for s in stores}
    if len(dims) != 1:
        raise ValueError(f"database: stores have different dimensions: {', '.join(f'{s.path} ({s.dim})' for s in stores)}")
    return stores


def _as_queries(queries, query_ids) -> tuple[np.ndarray, list[str]]:
    if isinstance(queries, (Store, str, os.PathLike)):
        queries = [queries]
    if isinstance(queries, (list, tuple)) and queries and isinstance(queries[0], (Store, str, os.PathLike)):
        stores = _as_stores(queries)
        q = np.concatenate([s.read_all().astype(np.float32) for s in stores])
        ids = [i for s in stores for i in s.all_ids()]
        if query_ids is not None:
            raise ValueError("query_ids: not needed when the queries come from stores (their ids are used)")
        return q, ids
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


@dataclass(frozen=True)
class Tier:
    """A database answered by a search: the first `rows` global rows (all when None), of which
    those with `keep` True (all when None). Several tiers share one pass over the database.
    `setting`: the published setting it answers ("mini", "full"), "" for none, None to infer it
    from its size."""

    name: str
    rows: int | None = None
    keep: np.ndarray | None = None
    setting: str | None = None


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
) -> "SearchResults":
    """Exact inner-product search: the `k` best database rows for each query.

    queries: an (nq, dim) float16/float32 array, or one or several query stores (their ids are used).
    database: a store, a path to one, or an ordered list of them.
    threads: worker threads (0: all cores). keep: optional bool mask over the global rows: only
    rows with True can be returned (see `mini_ilias_keep`). simd: force "avx512", "avx2" or
    "scalar" (default: the fastest this CPU has). method: "exact" (default) takes the fastest
    exact path: an int8 first pass with exact float32 rescoring where the CPU has AVX-512 VNNI or
    AVX-VNNI; "float32" scores every row in float32; "int8" / "int8-scalar" force the int8 pass
    from the first row (for tests). All return identical results.
    """
    tier = Tier("all", None, keep)
    return search_tiers(
        queries, database, [tier], k, query_ids=query_ids, threads=threads, simd=simd, method=method, progress=progress
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
) -> dict[str, "SearchResults"]:
    """`search` answering several databases (tiers: nested prefixes, subsets) in one pass, e.g.
    positives + 1M, mini-ILIAS, positives + 10M, everything. Each tier's results equal those of a
    separate search restricted to it. Returns {tier name: SearchResults}."""
    stores = _as_stores(database)
    q, qids = _as_queries(queries, query_ids)
    paths = [str(p) for s in stores for p in s.shard_paths]
    total = sum(s.count for s in stores)
    if len(paths) == 0:
        raise ValueError("database: the stores are empty (0 rows)")
    names = [t.name for t in tiers]
    if not tiers or len(set(names)) != len(names):
        raise ValueError(f"tiers: expected distinct names, got {names}")
    specs = []
    for t in tiers:
        rows = total if t.rows is None else int(t.rows)
        keep = None if t.keep is None else np.ascontiguousarray(t.keep, dtype=bool)
        specs.append((rows, keep))
    bar = Progress("search", total=total, enabled=progress)
    t0 = time.monotonic()
    with bar:
        scores, indices, stats = _core.exact_search(
            paths, q, k, threads, specs, simd, method, bar.set if progress else None
        )
        bar.set(total)
    seconds = time.monotonic() - t0
    parts = [DatabasePart(str(s.path), s.count, s.fingerprint) for s in stores]
    out = {}
    for i, (t, (rows, keep)) in enumerate(zip(tiers, specs)):
        held = int(keep[:rows].sum()) if keep is not None else rows
        out[t.name] = SearchResults(
            scores=scores[i],
            indices=indices[i],
            query_ids=qids,
            k=k,
            database=parts,
            stores=stores,
            info={"seconds": seconds, "threads": threads, "method": method, "tier": t.name, "tier_rows": held,
                  **({"setting": t.setting} if t.setting is not None else {}), **stats},
        )
    return out


@dataclass(frozen=True)
class DatabasePart:
    path: str
    count: int
    fingerprint: str


@dataclass
class SearchResults:
    """Top-k per query. `indices` are global rows over `database` (-1 where fewer rows qualified)."""

    scores: np.ndarray
    indices: np.ndarray
    query_ids: list[str]
    k: int
    database: list[DatabasePart]
    stores: list[Store] | None = None
    info: dict = field(default_factory=dict)
    # every returned row (sorted) and its id as UTF-8 bytes: a compact table, not 2M Python strings
    _rows: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.query_ids)

    def returned_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ids): the sorted distinct global rows of all results and their ids (bytes)."""
        if self._rows is None:
            if self.stores is None:
                raise ValueError("these results hold no ids and have no stores to read them from")
            rows = np.unique(self.indices[self.indices >= 0])
            parts, start = [], 0
            for s in self.stores:
                sel = rows[(rows >= start) & (rows < start + s.count)]
                parts.append(s.raw_ids_of(sel - start))
                start += s.count
            width = max((p.dtype.itemsize for p in parts), default=1)
            self._rows = (rows, np.concatenate([p.astype(f"S{width}") for p in parts]))
        return self._rows

    def _ids_at(self, rows: np.ndarray) -> list[str]:
        table, ids = self.returned_rows()
        return [b.decode("utf-8") for b in ids[np.searchsorted(table, rows)]]

    def ids(self, q: int) -> list[str]:
        """The database ids returned for query row `q`, in rank order."""
        rows = self.indices[q]
        return self._ids_at(rows[rows >= 0])

    def ranked(self, q: int) -> list[tuple[str, float]]:
        """(id, score) pairs of query row `q`, in rank order."""
        valid = self.indices[q] >= 0
        return list(zip(self._ids_at(self.indices[q][valid]), self.scores[q][valid].tolist()))

    # ---- our own format
    def save(self, path: str | os.PathLike) -> Path:
        """Saves to one .npz (scores, indices, ids of the returned rows, metadata), atomically."""
        path = Path(path)
        rows, ids = self.returned_rows()
        meta = {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "k": self.k,
            "database": [vars(p) for p in self.database],
            "info": self.info,
        }
        qids = [q.encode("utf-8") for q in self.query_ids]
        with atomic_path(path) as tmp:
            np.savez(
                tmp,
                scores=self.scores,
                indices=self.indices,
                query_ids=np.array(qids, dtype=f"S{max(map(len, qids), default=1)}"),
                row_index=rows,
                row_ids=ids,
                meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
            )
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchResults":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such results file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                scores, indices = z["scores"], z["indices"]
                qids = [q.decode("utf-8") for q in z["query_ids"]]
                rows = (z["row_index"], z["row_ids"])
        except (KeyError, OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable ilias results file ({type(e).__name__}: {e})") from None
        if meta.get("format") != RESULTS_FORMAT or meta.get("version") != RESULTS_VERSION:
            raise ValueError(
                f"{path}: results format {meta.get('format')!r} v{meta.get('version')}, expected {RESULTS_FORMAT!r} v{RESULTS_VERSION}"
            )
        if scores.shape != indices.shape or scores.shape != (len(qids), meta["k"]):
            raise ValueError(f"{path}: arrays disagree with each other ({scores.shape}, {indices.shape}, {len(qids)} ids)")
        if not np.isin(indices[indices >= 0], rows[0]).all():
            raise ValueError(f"{path}: some returned rows have no id")
        return cls(
            scores=scores,
            indices=indices,
            query_ids=qids,
            k=meta["k"],
            database=[DatabasePart(**p) for p in meta["database"]],
            info=meta.get("info", {}),
            _rows=rows,
        )

    # ---- the official formats
    def to_official_dict(self) -> dict:
        """`{query_id: {db_id: similarity}}` with keys in rank order (the official JSON layout)."""
        return {q: dict(self.ranked(i)) for i, q in enumerate(self.query_ids)}

    def write_official_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write(path, json.dumps(self.to_official_dict()))
        return path

    def to_official_pickle(self) -> dict:
        """`{"query_ids", "db_ids", "sims" (nq, k) float32, "ranks" (nq, k) into db_ids}`."""
        rows, ids = self.returned_rows()
        ranks = np.where(self.indices >= 0, np.searchsorted(rows, self.indices), -1).astype(np.int64)
        db_ids = np.array([b.decode("utf-8") for b in ids], dtype=object)
        return {"query_ids": list(self.query_ids), "db_ids": db_ids, "sims": self.scores.astype(np.float32), "ranks": ranks}

    def write_official_pickle(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            pickle.dump(self.to_official_pickle(), f, protocol=4)
        return path


def mini_ilias_keep(database, keys, always: Sequence[int] = (0,)) -> np.ndarray:
    """The mini-ILIAS row filter over the global rows of `database` (a list of stores).

    A row is kept when its store's position is in `always` (the positives store, first by
    convention) or when the part of its id after the first "/" is one of `keys` (the bare
    YFCC100M keys of the mini-ILIAS list).
    """
    stores = _as_stores(database)
    keyset = np.unique(np.array([k.encode() if isinstance(k, str) else bytes(k) for k in keys], dtype=object).astype("S"))
    parts = []
    for pos, s in enumerate(stores):
        if pos in always:
            parts.append(np.ones(s.count, dtype=bool))
            continue
        for i in range(s.num_shards):
            ids = np.asarray(s.ids(i))
            tail = np.char.partition(ids, b"/")[:, 2]
            parts.append(np.isin(tail, keyset))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)
