"""Search as cluster tasks: ranges of whole shards searched apart, top-k lists merged exactly.

Each task searches one range of the database (whole shards, read by the worker from shared
storage) for every query and tier with the Rust core on one thread, and returns its partial top
k as global rows: only these lists cross the network. They merge by the core's own top-k code, in
its rank order (higher score first, equal scores the larger global row first, -0 equal to +0), and
every score has the bits the single-process search gives the same pair (one canonical summation
order), so the merged lists are the single-process results, bit for bit.

Codes search is two rounds of tasks, which keeps it identical to the one-process search: the
ranges' approximate shortlists (the best `shortlist` of each range by the codes) merge into the
whole database's shortlists, since a range's best hold every row of the whole's best that falls
in it; then each range rescores exactly the shortlisted rows it holds, and those top-k lists merge.
The codes file is checked once (its section checksums) by a first task.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np

from .. import _core
from ..database import Database
from ..results import SearchResults, SearchStats
from ..search import Tier, as_queries, results_of
from .engine import ClusterOptions, Task, check_workers, open_cluster, run_tasks


def shard_ranges(db: Database, tasks: int) -> list[tuple[int, int, int, int]]:
    """Contiguous groups of whole shards, about `tasks` of them of similar row counts:
    (first shard, end shard, first global row, end row) each."""
    counts = db.shard_counts
    target = max(1, -(-db.count // max(tasks, 1)))
    out, first, lo, rows = [], 0, 0, 0
    for i, n in enumerate(counts):
        rows += n
        if rows >= target or i == len(counts) - 1:
            out.append((first, i + 1, lo, lo + rows))
            first, lo, rows = i + 1, lo + rows, 0
    return out


def merge_top(a: tuple[np.ndarray, np.ndarray] | None, b: tuple[np.ndarray, np.ndarray], k: int):
    """The best `k` of two partial lists (scores, global rows; -1 rows are padding; last axis the
    list, any leading axes), in the core's rank order, by the core's own top-k code; padded to `k`
    with -inf and -1."""
    if a is None:
        a = (np.zeros((*b[0].shape[:-1], 0), np.float32), np.zeros((*b[1].shape[:-1], 0), np.int64))
    lead = b[0].shape[:-1]
    flat = [np.ascontiguousarray(x.reshape(int(np.prod(lead)), x.shape[-1]), dtype=t)
            for x, t in ((a[0], np.float32), (a[1], np.int64), (b[0], np.float32), (b[1], np.int64))]
    scores, rows = _core.merge_top(*flat, k)
    return scores.reshape(*lead, k), rows.reshape(*lead, k)


# ---- tasks (they run on the workers)


def _exact_task(paths, checksums, queries, k, tiers, method, simd, lo):
    scores, rows, stats = _core.exact_search(paths, queries, k, 1, tiers, simd, method, None, checksums)
    return scores, np.where(rows >= 0, rows + lo, -1), stats


def _verify_codes_task(path):
    return _core.inspect_codes(path, verify=True)


def _shortlist_task(path, queries, shortlist, lo, hi, keep):
    return _core.code_shortlist(path, queries, shortlist, lo, hi, keep, 1)


def _rescore_task(paths, queries, candidates, k, lo):
    scores, rows = _core.rescore(paths, queries, candidates, k, 1)
    return scores, np.where(rows >= 0, rows + lo, -1)


# ---- the client side


def search_tiers_on_cluster(
    opts: ClusterOptions,
    queries,
    database,
    tiers: Sequence[Tier],
    k: int = 1000,
    *,
    query_ids=None,
    method: str = "exact",
    simd: str | None = None,
    tasks: int | None = None,
) -> dict[str, SearchResults]:
    """`ilias.search.search_tiers` on a cluster: identical results. `tasks`: how many ranges
    (default: two per worker thread, at most one per shard)."""
    db = Database.of(database)
    q, qids = as_queries(queries, query_ids)
    names = [t.name for t in tiers]
    if not tiers or len(set(names)) != len(names):
        raise ValueError(f"tiers: expected distinct names, got {names}")
    if k > db.count:
        raise ValueError(f"k = {k:,} is larger than the database ({db.count:,} rows)")
    specs = [(db.count if t.rows is None else int(t.rows), None if t.keep is None else np.asarray(t.keep, bool))
             for t in tiers]
    paths, checksums = db.shard_paths, db.shard_checksums
    t0 = time.monotonic()
    with open_cluster(opts) as client:
        threads = check_workers(client, opts, paths)
        ranges = shard_ranges(db, tasks or 2 * threads)
        qf = client.scatter(q, broadcast=True)
        work, slots = [], {}  # task key -> the tiers its lists answer
        for n, (s0, s1, lo, hi) in enumerate(ranges):
            local = [(min(rows, hi) - lo, None if keep is None else np.ascontiguousarray(keep[lo:hi]))
                     for rows, keep in specs if rows > lo]
            args = (paths[s0:s1], checksums[s0:s1], qf, min(k, hi - lo), local, method, simd, lo)
            work.append(Task(f"ilias-search-{n:05d}-{lo}", _exact_task, args, hi - lo))
            slots[work[-1].key] = [i for i, (rows, _) in enumerate(specs) if rows > lo]
        acc: list = [None] * len(tiers)
        total: dict = {}

        def merge(task, result):
            scores, rows, stats = result
            for j, i in enumerate(slots[task.key]):
                acc[i] = merge_top(acc[i], (scores[j], rows[j]), k)
            for key, value in stats.items():
                total[key] = total.get(key, 0) + value if isinstance(value, int) else value

        run_tasks(client, work, opts, "search", "rows", merge)
    st = SearchStats(method=method, seconds=time.monotonic() - t0, threads=threads, **total)
    return {t.name: results_of(db, *acc[i], qids, k, st, tier=t) for i, t in enumerate(tiers)}


def search_codes_on_cluster(
    opts: ClusterOptions,
    queries,
    database,
    codes,
    k: int = 1000,
    *,
    shortlist: int | None = None,
    rerank: bool = True,
    keep: np.ndarray | None = None,
    query_ids=None,
    tasks: int | None = None,
) -> SearchResults:
    """`ilias.index.search_codes` on a cluster: identical results (see the module notes)."""
    from ..index import codes_search_inputs

    db, path, info, q, qids, shortlist = codes_search_inputs(queries, database, codes, k, shortlist, query_ids)
    if k > db.count:
        raise ValueError(f"k = {k:,} is larger than the database ({db.count:,} rows)")
    shortlist = min(shortlist, db.count)
    keep = None if keep is None else np.asarray(keep, dtype=bool)
    paths = db.shard_paths
    t0 = time.monotonic()
    with open_cluster(opts) as client:
        threads = check_workers(client, opts, [*paths, str(path)])
        ranges = shard_ranges(db, tasks or 2 * threads)
        qf = client.scatter(q, broadcast=True)
        run_tasks(client, [Task("ilias-codes-verify", _verify_codes_task, (str(path),), 1)], opts,
                  "verify codes", "files", lambda *_: None, progress=False)
        found: list = [None]
        scan = [Task(f"ilias-shortlist-{n:05d}-{lo}", _shortlist_task,
                     (str(path), qf, shortlist, lo, hi, None if keep is None else np.ascontiguousarray(keep[lo:hi])),
                     hi - lo)
                for n, (_, _, lo, hi) in enumerate(ranges)]
        run_tasks(client, scan, opts, f"shortlist {info['kind']}", "rows",
                  lambda _t, r: found.__setitem__(0, merge_top(found[0], r, shortlist)))
        t_scan = time.monotonic() - t0
        scores, rows = found[0]
        if rerank:
            best: list = [None]
            work = []
            for n, (s0, s1, lo, hi) in enumerate(ranges):
                cands = _candidates_in(rows, lo, hi)
                if cands.shape[1]:
                    work.append(Task(f"ilias-rescore-{n:05d}-{lo}", _rescore_task,
                                     (paths[s0:s1], qf, cands, min(k, hi - lo), lo), hi - lo))
            run_tasks(client, work, opts, "rescore", "rows",
                      lambda _t, r: best.__setitem__(0, merge_top(best[0], r, k)))
            scores, rows = best[0]
        else:
            scores, rows = merge_top(None, (scores, rows), k)
    st = SearchStats(method=f"codes-{info['kind']}", seconds=time.monotonic() - t0, threads=threads,
                     codes=info["kind"], codes_path=str(path), shortlist=shortlist, rerank=rerank,
                     scan_seconds=t_scan, rerank_seconds=time.monotonic() - t0 - t_scan)
    return results_of(db, scores, rows, qids, k, st, Tier("all", keep=keep))


def _candidates_in(rows: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Per query the shortlisted rows in `lo..hi`, as rows of that range, packed left and padded
    with -1 to the longest list: (nq, width)."""
    inside = (rows >= lo) & (rows < hi)
    width = int(inside.sum(axis=1).max(initial=0))
    out = np.full((rows.shape[0], width), -1, dtype=np.int64)
    for i in range(rows.shape[0]):
        picked = rows[i][inside[i]] - lo
        out[i, : picked.size] = picked
    return out
