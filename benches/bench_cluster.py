"""The cluster's overhead: exact search on a 2-worker Dask LocalCluster (one thread each) against
one process with 2 threads, on the same store and queries, results checked bit-identical.

    python benches/bench_cluster.py                   # 1M x 768 float16 in 8 shards, 2,232 queries, k=1000
    python benches/bench_cluster.py --n 200000 --repeat 3

The cluster is started once (its start is printed, not counted); each cluster search counts
everything a `--cluster tcp://...` search does: checking the workers, sending the queries, the
tasks (two ranges of whole shards per worker thread), moving their top-k lists and merging them.
Prints both medians and the overhead, cluster / one process - 1. The store (under bench-data/,
shards of n/8 rows so that the ranges balance) is made once. `pytest benches/test_bench_cluster.py`
runs the same function.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

COLUMNS = ["rows", "queries", "k", "one process (2 threads)", "cluster (2 workers x 1)", "overhead", "tasks", "cluster start"]


def cluster_store(n: int, d: int, root, kind: str = "random"):
    from ilias.benchmark import make_store

    return make_store("cluster", n, d, kind, root=root, shard_rows=-(-n // 8), progress=True)


def run(store, q, k: int, workers: int = 2, repeat: int = 3, out=print) -> dict:
    """Medians of `repeat` searches each way (alternated), the overhead, and the identity check."""
    import numpy as np
    from distributed import Client, LocalCluster
    from ilias import search
    from ilias.cluster import ClusterOptions, ClusterSpec, search_tiers_on_cluster
    from ilias.search import Tier

    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=40)
    client = Client(cluster)
    client.run(lambda: __import__("ilias._core"))
    started = time.perf_counter() - t0
    opts = ClusterOptions(ClusterSpec.parse(cluster.scheduler_address), progress=False)
    one_times, cluster_times = [], []
    try:
        for r in range(repeat):
            t0 = time.perf_counter()
            one = search(q, store, k, threads=workers)
            one_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            two = search_tiers_on_cluster(opts, q, store, [Tier("all")], k)["all"]
            cluster_times.append(time.perf_counter() - t0)
            same = np.array_equal(one.indices, two.indices) and np.array_equal(one.scores.view(np.uint32),
                                                                                two.scores.view(np.uint32))
            if not same:
                raise AssertionError("the cluster's results differ from the single process's")
            out(f"round {r + 1}: one process {one_times[-1]:.2f} s, cluster {cluster_times[-1]:.2f} s (identical)")
    finally:
        client.close()
        cluster.close()
    a, b = statistics.median(one_times), statistics.median(cluster_times)
    from ilias.cluster import shard_ranges
    from ilias.database import Database

    return {"rows": store.count, "queries": len(q), "k": k, "one": a, "cluster": b, "overhead": b / a - 1,
            "tasks": len(shard_ranges(Database.of(store), 2 * workers)), "start": started}


def row(m: dict) -> dict:
    return {"rows": f"{m['rows']:,}", "queries": f"{m['queries']:,}", "k": m["k"],
            "one process (2 threads)": f"{m['one']:.2f} s", "cluster (2 workers x 1)": f"{m['cluster']:.2f} s",
            "overhead": f"{100 * m['overhead']:+.1f}%", "tasks": m["tasks"], "cluster start": f"{m['start']:.1f} s"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--nq", type=int, default=2232)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--kind", choices=["random", "structured", "clip"], default="random")
    args = ap.parse_args()
    from common import DATA
    from ilias.benchmark import queries, table

    store = cluster_store(args.n, args.d, DATA, args.kind)
    m = run(store, queries(args.nq, args.d, args.kind), args.k, repeat=args.repeat)
    print()
    print(table([row(m)], COLUMNS))


if __name__ == "__main__":
    main()
