"""Exact search (bench_search.py as pytest-benchmark cases): ilias float32, exact and exact
with progressive codes, faiss
IndexFlatIP, faiss IndexScalarQuantizer fp16 and numpy on the same store and queries."""

from __future__ import annotations

import numpy as np
import pytest
from common import run_case
from ilias import benchmark as b


@pytest.fixture(scope="session")
def setup(store, size, threads, data_kind):
    return b.SearchSetup(store.count, store.dim, size.queries, size.k, threads, data_kind)


@pytest.fixture(scope="session")
def search_queries(setup):
    return b.queries(setup.queries, setup.dim, setup.kind)


@pytest.fixture(scope="session")
def truth(store, search_queries, setup):
    """ilias exact search, untimed: what every case is checked against."""
    return b.ilias_search(store, "exact", setup.threads)(search_queries, setup.k)


def record(benchmark, recorder, timing, setup, peaks) -> None:
    """The case's numbers into extra_info (ratio: over ilias exact, when it ran) and the table."""
    recorder.setup, recorder.peaks = setup, peaks
    recorder.search[timing.key] = b.Timing(timing.key, timing.name, timing.seconds, timing.stats)
    order = [*b.METHODS, *b.PEERS]
    recorder.search = dict(sorted(recorder.search.items(), key=lambda kv: order.index(kv[0])))
    info = {"case": timing.name, **setup.as_dict(), **peaks.as_dict(),
            **b.measures(timing, setup, peaks, recorder.search.get("exact"))}
    if timing.stats is not None:
        info["simd"] = timing.stats.simd
    benchmark.extra_info.update(info)


# exact first: the other cases' ratios are taken against it
@pytest.mark.parametrize("method", ["exact", "float32", "exact+codes"])
def test_ilias(benchmark, recorder, store, search_queries, truth, setup, size, peaks, method):
    if method == "exact+codes":
        b.ensure_progressive(store, setup.k, setup.threads, out=lambda line: None)  # untimed, made once
    fn = b.ilias_search(store, method, setup.threads)
    t, res = run_case(benchmark, lambda: fn(search_queries, setup.k), size.rounds)
    # every method gives float32's results bit for bit: same rows, same scores, same tie order
    assert np.array_equal(res.indices, truth.indices)
    assert np.array_equal(res.scores.view(np.uint32), truth.scores.view(np.uint32))
    record(benchmark, recorder, b.Timing(method, f"ilias {method}", t, res.stats), setup, peaks)


@pytest.mark.parametrize("peer", list(b.PEERS))
def test_peer(benchmark, request, recorder, store, search_queries, truth, setup, size, peaks, peer):
    vectors = request.getfixturevalue("vectors32") if peer.startswith("faiss") else None  # skips without faiss
    fn = b.peer_search(peer, store, setup.threads, vectors)
    rounds = size.rounds if peer == "faiss-flat" else size.peer_rounds
    t, (scores, rows) = run_case(benchmark, lambda: fn(search_queries, setup.k), rounds)
    # the same neighbours up to float32 summation order (near-ties at the k-th score may swap)
    assert b.overlap(rows, truth.indices) >= 0.999
    assert float(np.abs(scores - truth.scores).max()) < 1e-5
    record(benchmark, recorder, b.Timing(peer, b.PEERS[peer], t), setup, peaks)
