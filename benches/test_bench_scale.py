"""Scale check (scale_search.py as pytest-benchmark cases): exact search in a fresh process per
size, for its own peak RSS: it should stay flat as the database grows."""

from __future__ import annotations

import pytest
import scale_search as ss
from common import run_case

TITLE = "scale (scale_search.py; each search in its own process)"


@pytest.fixture(scope="session")
def scale_store(data_dir, size):
    from ilias.benchmark import make_store

    return lambda n: make_store("scale", n, size.dim, root=data_dir, chunk=100_000, progress=True)


@pytest.fixture(params=["float32", "exact"])
def method(request):
    return request.param


@pytest.fixture(params=[0, 1], ids=["smaller", "larger"])
def rows(request, size):
    return size.scale_sizes[request.param]


def test_scale(benchmark, recorder, scale_store, size, threads, rows, method):
    store = scale_store(rows)
    _, m = run_case(benchmark, lambda: ss.search_in_child(store, size.queries, size.k, threads, method), 1)
    # the child's own clock: without the interpreter's start and the import
    benchmark.extra_info.update(n=rows, dim=size.dim, queries=size.queries, k=size.k, threads=threads, method=method,
                                seconds=m["seconds"], peak_rss_gb=m["rss_gb"], int8_pair_share=m["int8_share"],
                                rescored_share=m["rescored"],
                                gflops=2 * size.queries * rows * size.dim / m["seconds"] / 1e9)
    recorder.add_row(TITLE, ss.COLUMNS, ss.row(rows, size.dim, size.queries, method, m))
    # the search holds top-k buffers and a few chunks of pages, never the database
    assert m["rss_gb"] < 1.0 + 0.25 * rows * size.dim * 2 / 1e9
