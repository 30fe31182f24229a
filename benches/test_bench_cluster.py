"""The cluster's overhead (bench_cluster.py as a pytest-benchmark case): exact search on a
2-worker LocalCluster (one thread each) against one process with 2 threads, results identical."""

from __future__ import annotations

import bench_cluster as bc
import pytest
from common import run_case

pytest.importorskip("distributed")
TITLE = "cluster overhead (bench_cluster.py; 2 workers x 1 thread against 1 process x 2 threads)"


def test_cluster_overhead(benchmark, recorder, size, data_dir, data_kind):
    from ilias.benchmark import queries

    store = bc.cluster_store(size.n, size.dim, data_dir, data_kind)
    q = queries(size.queries, size.dim, data_kind)
    # both ways measured inside (alternated, medians); the case's own time is the whole comparison
    _, m = run_case(benchmark, lambda: bc.run(store, q, size.k, repeat=size.rounds, out=lambda line: None), 1)
    benchmark.extra_info.update(n=store.count, dim=size.dim, queries=size.queries, k=size.k,
                                one_process_seconds=m["one"], cluster_seconds=m["cluster"],
                                overhead=m["overhead"], tasks=m["tasks"], cluster_start_seconds=m["start"])
    recorder.add_row(TITLE, bc.COLUMNS, bc.row(m))
