"""Query expansion: a second search with each query moved towards its first neighbours.

alpha-QE: the expanded query is `normalize(q + sum_i w_i x_i)` over the query's first `n`
neighbours x_i (database vectors, as searched: adapted ones on an adapted database) with
`w_i = s_i ** alpha`, s_i the first pass's score. alpha = 1 is the official kNN search's
method (knn_search/src/searcher.py: the mean of the query and the s_i-weighted neighbours,
re-normalised: the same direction); alpha = 0 is plain average QE (w_i = 1). The power keeps the
sign of a negative score (`sign(s) |s| ** alpha`), so alpha = 1 gives the official s_i exactly.

Two flaws of the official code are fixed here, openly: it looks the neighbours up assuming every
distractor file holds as many rows as the first and that result indices count all rows, which is
wrong under the mini-ILIAS filter (its indices count the kept rows only) and with unequal files;
here neighbours are global rows read with `Database.vectors_of`, right for any filter and any
shard sizes. With a linear adaptation it weights the raw neighbours and then adapts them, which
re-normalises the weights away; here the adapted neighbours are weighted.

Tiers. The neighbours come from the same tier as the results they expand, so a query has one
expanded vector per tier, and each must be scored against its own tier: a one-pass second search
of every tier is not possible in general. Yet expanded vectors often repeat across tiers (a
query's first neighbours are often the same in +1M and in everything). The second pass therefore
scores an expanded vector in the scan of the largest tier whose neighbours gave it, for the
other tiers that share it too when enough of that scan's vectors do (`plan_scans`): where every
tier agrees this is one scan of the first pass's cost; where they all differ, one scan per tier,
the cost of searching each tier alone (measured: benches/bench_adapt.py); never more than one
scan per tier, nor more top-k lists than the first pass. A scan reads only the shards its tiers
reach (a +1M tier's scan stops after the shards of its rows).

The first pass keeps only the `n` neighbours (k = n), which is cheaper than a plain search; pass
`first=` the results of an earlier search of the same queries and database (k >= n) to reuse
them. With codes (`search_codes_expanded`) both passes are codes searches (shortlist + exact
rescoring) of one database, with `keep` for mini-ILIAS.

Database-side augmentation (DBA) is not offered: it needs the neighbours of every database row,
a search with 100M queries, far more than the benchmark's search itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from . import _core
from .database import Database
from .progress import Progress
from .results import SearchResults, SearchStats
from .search import Tier, as_queries, check_memory, results_of, search_tiers

MERGES = ("auto", "none", "all")
# neighbour vectors are read for this many queries at a time (n x dim float32 each)
BLOCK = 512


@dataclass(frozen=True)
class Expansion:
    n: int
    alpha: float = 1.0

    def __post_init__(self):
        if self.n < 1:
            raise ValueError(f"--qe: the number of neighbours must be at least 1, got {self.n}")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"--qe-alpha: must be a finite number >= 0, got {self.alpha}")


def qe_weights(scores: np.ndarray, alpha: float) -> np.ndarray:
    """`sign(s) |s| ** alpha` (float64); 1 everywhere for alpha = 0 (average QE)."""
    s = np.asarray(scores, dtype=np.float64)
    if alpha == 0:
        return np.ones_like(s)
    if alpha == 1:
        return s
    return np.sign(s) * np.abs(s) ** alpha


def expand_queries(queries: np.ndarray, database, indices: np.ndarray, scores: np.ndarray, n: int,
                   alpha: float = 1.0) -> np.ndarray:
    """The expanded queries (nq, dim) float32: `normalize(q + sum_i w_i x_i)` over the first `n`
    results (`indices`: global rows of `database`, -1 for none; `scores` their scores)."""
    Expansion(n, alpha)
    db = Database.of(database)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != db.dim:
        raise ValueError(f"queries: expected (nq, {db.dim}), got {q.shape}")
    indices, scores = np.asarray(indices)[:, :n], np.asarray(scores)[:, :n]
    if indices.shape[0] != len(q):
        raise ValueError(f"results: {indices.shape[0]} lists for {len(q)} queries")
    out = np.empty(q.shape, dtype=np.float32)
    for lo in range(0, len(q), BLOCK):
        rows, s = indices[lo : lo + BLOCK], scores[lo : lo + BLOCK]
        valid = rows >= 0
        w = np.where(valid, qe_weights(np.where(valid, s, 0), alpha), 0.0)
        x = db.vectors_of(np.where(valid, rows, 0)).astype(np.float64)
        e = q[lo : lo + BLOCK].astype(np.float64) + np.einsum("qn,qnd->qd", w, x)
        norms = np.linalg.norm(e, axis=1, keepdims=True)
        out[lo : lo + BLOCK] = e / np.maximum(norms, 1e-12)
    return out


@dataclass
class _Scan:
    tiers: frozenset[int]
    entries: list[tuple[int, int, frozenset[int]]]  # (query, a tier whose vector it is, the tiers it answers)


def _tier_extents(db: Database, tiers: Sequence[Tier]) -> list[int]:
    """How many leading rows each tier reaches (its last held row + 1)."""
    out = []
    for t in tiers:
        rows = db.count if t.rows is None else int(t.rows)
        if t.keep is not None:
            held = np.flatnonzero(np.asarray(t.keep[:rows], dtype=bool))
            rows = int(held[-1]) + 1 if held.size else 1
        out.append(max(rows, 1))
    return out


def plan_scans(vectors: Sequence[np.ndarray], sizes: Sequence, merge: str = "auto") -> list[_Scan]:
    """The second pass's scans. `vectors[t]`: tier t's expanded queries (nq, dim); `sizes[t]`:
    how large tier t is (any sortable key; larger: scans more). Each distinct vector of a query
    is scored once, for the tiers whose neighbours gave it (its signature). `merge`:

    - "auto": at most one scan per tier. A vector goes to the scan of the largest tier of its
      signature; the other tiers of its signature are answered there too when at least half of
      that scan's vectors need them (a tier added to a scan gives every query of it one more
      top-k list, which costs far less than scoring them again, but not nothing), else the vector
      is scored again in the smaller tier's own scan. So where the tiers agree it is one scan of
      nq queries and all tiers (the first pass's cost); where they differ, one scan per tier of
      nq queries (the cost of searching each tier alone); no scan holds more than nq queries;
    - "none": one scan per signature; "all": one scan of every distinct vector (for tests)."""
    if merge not in MERGES:
        raise ValueError(f"merge: expected one of {', '.join(MERGES)}, got {merge!r}")
    nt, nq = len(vectors), len(vectors[0])
    rank = lambda t: (sizes[t], t)  # noqa: E731
    groups: dict = {}
    for q in range(nq):
        seen: dict[bytes, list[int]] = {}
        for t in range(nt):
            seen.setdefault(vectors[t][q].tobytes(), []).append(t)
        for ts in seen.values():
            sig = frozenset(ts)
            key = max(ts, key=rank) if merge == "auto" else (sig if merge == "none" else 0)
            groups.setdefault(key, []).append((q, ts[0], sig))
    if merge == "auto":
        # largest tiers first: what a scan hands down lands in a smaller tier's scan, done later
        for t in sorted(groups, key=rank, reverse=True):
            entries = groups[t]
            need = {u: sum(u in sig for _, _, sig in entries) for u in range(nt) if u != t}
            shared = {u for u, c in need.items() if c and 2 * c >= len(entries)}
            kept = []
            for q, src, sig in entries:
                for u in sig - shared - {t}:
                    groups.setdefault(u, []).append((q, src, frozenset([u])))
                kept.append((q, src, sig & (shared | {t})))
            groups[t] = kept
    scans = [_Scan(frozenset().union(*(e[2] for e in entries)), entries) for entries in groups.values()]
    return sorted(scans, key=lambda s: sorted(s.tiers))


def _check_first(first: dict, db: Database, tiers: Sequence[Tier], qids: list[str], n: int) -> None:
    for t in tiers:
        r = first.get(t.name)
        if r is None:
            raise ValueError(f"first: no results for tier {t.name!r} (have {', '.join(first) or 'none'})")
        if list(r.query_ids) != list(qids):
            raise ValueError(f"first[{t.name!r}]: results of other queries than these")
        if [p.fingerprint for p in r.database] != [p.fingerprint for p in db.parts]:
            raise ValueError(f"first[{t.name!r}]: results of another database than {db!r}")
        if r.tier_rows != t.held(db):
            raise ValueError(f"first[{t.name!r}]: results over {r.tier_rows:,} rows, but the tier holds {t.held(db):,}")
        if r.k < n:
            raise ValueError(f"first[{t.name!r}]: k = {r.k} results, fewer than the {n} neighbours of --qe")


def search_expanded(
    queries,
    database,
    tiers: Sequence[Tier] | None = None,
    k: int = 1000,
    *,
    n: int,
    alpha: float = 1.0,
    first: dict[str, SearchResults] | None = None,
    query_ids: Sequence[str] | None = None,
    threads: int = 0,
    simd: str | None = None,
    method: str = "exact",
    merge: str = "auto",
    progress: bool = False,
) -> dict[str, SearchResults]:
    """Exact search with alpha-QE, answering every tier (default: one, the whole database) with
    its own neighbours. `first`: {tier name: SearchResults} of an earlier search to take the
    neighbours from (else a first pass with k = n runs). Returns {tier name: SearchResults}."""
    exp = Expansion(n, alpha)
    db = Database.of(database)
    tiers = list(tiers) if tiers else [Tier("all")]
    q, qids = as_queries(queries, query_ids)
    if q.shape[1] != db.dim:
        raise ValueError(f"queries have dimension {q.shape[1]} but the database has {db.dim}")
    if k > db.count:
        raise ValueError(f"k = {k:,} is larger than the database ({db.count:,} rows)")
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise ValueError(f"tiers: expected distinct names, got {names}")
    if first is None:
        first = search_tiers(q, db, tiers, min(n, db.count), query_ids=qids, threads=threads, simd=simd,
                             method=method, progress=progress)
    else:
        _check_first(first, db, tiers, qids, n)
    first_stats = first[tiers[0].name].stats
    t_first = first_stats.seconds if first_stats is not None else 0.0
    t1 = time.monotonic()
    vectors = [expand_queries(q, db, first[t.name].indices, first[t.name].scores, exp.n, exp.alpha) for t in tiers]
    extents = _tier_extents(db, tiers)
    scans = plan_scans(vectors, [(e, t.held(db)) for e, t in zip(extents, tiers)], merge)
    counts = np.cumsum(db.shard_counts)
    paths = db.shard_paths
    nq, nt = len(q), len(tiers)
    scores = np.full((nt, nq, k), -np.inf, dtype=np.float32)
    indices = np.full((nt, nq, k), -1, dtype=np.int64)
    plan = []
    for scan in scans:
        reach = min(max(max(extents[t] for t in scan.tiers), k), db.count)
        shards = int(np.searchsorted(counts, reach)) + 1  # the shards holding the first `reach` rows
        plan.append((scan, shards, int(counts[shards - 1])))
    totals: dict[str, int] = {}
    info: dict = {}
    with Progress("search (QE)", total=sum(c for _, _, c in plan), enabled=progress) as bar:
        base = 0
        for scan, shards, covered in plan:
            order = sorted(scan.tiers)
            specs = []
            for t in order:
                tier = tiers[t]
                rows = min(db.count if tier.rows is None else int(tier.rows), covered)
                keep = None if tier.keep is None else np.ascontiguousarray(tier.keep[:covered], dtype=bool)
                specs.append((rows, keep))
            qmat = np.ascontiguousarray(np.stack([vectors[src][qi] for qi, src, _ in scan.entries]))
            check_memory(len(qmat), k, len(order), threads)
            s, i, st = _core.exact_search(paths[:shards], qmat, k, threads, specs, simd, method,
                                          (lambda done, b=base: bar.set(b + done)) if progress else None,
                                          db.shard_checksums[:shards])
            base += covered
            bar.set(base)
            pos = {t: j for j, t in enumerate(order)}
            for e, (qi, _, sig) in enumerate(scan.entries):
                for t in sig:
                    scores[t, qi], indices[t, qi] = s[pos[t], e], i[pos[t], e]
            for key, value in st.items():
                if isinstance(value, int) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
                else:
                    info.setdefault(key, value)
    t_second = time.monotonic() - t1
    stats = SearchStats(
        method=method, seconds=t_first + t_second, threads=threads, **{**info, **totals},
        qe=exp.n, qe_alpha=exp.alpha, qe_passes=len(scans), qe_queries=sum(len(s.entries) for s in scans),
        qe_first_seconds=t_first,
    )
    return {t.name: results_of(db, scores[j], indices[j], qids, k, stats, tier=t) for j, t in enumerate(tiers)}


def search_codes_expanded(
    queries,
    database,
    codes,
    k: int = 1000,
    *,
    n: int,
    alpha: float = 1.0,
    shortlist: int | None = None,
    rerank: bool = True,
    keep: np.ndarray | None = None,
    query_ids: Sequence[str] | None = None,
    threads: int = 0,
    first: SearchResults | None = None,
    progress: bool = False,
) -> SearchResults:
    """alpha-QE with codes: both passes are `search_codes` (shortlist + exact rescoring) over the
    database, restricted to `keep` (mini-ILIAS) when given. `first`: an earlier codes search of
    the same queries to take the neighbours from."""
    from .index import search_codes

    exp = Expansion(n, alpha)
    db = Database.of(database)
    q, qids = as_queries(queries, query_ids)
    tier = Tier("all", keep=keep)
    if first is None:
        first = search_codes(q, db, codes, k, shortlist=shortlist, rerank=rerank, keep=keep, query_ids=qids,
                             threads=threads, progress=progress)
    else:
        _check_first({"all": first}, db, [tier], qids, n)
    expanded = expand_queries(q, db, first.indices, first.scores, exp.n, exp.alpha)
    second = search_codes(expanded, db, codes, k, shortlist=shortlist, rerank=rerank, keep=keep, query_ids=qids,
                          threads=threads, progress=progress)
    st = second.stats
    stats = replace(st, seconds=first.stats.seconds + st.seconds, qe=exp.n, qe_alpha=exp.alpha, qe_passes=1,
                    qe_queries=len(q), qe_first_seconds=first.stats.seconds)
    return replace(second, stats=stats)
