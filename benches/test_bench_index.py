"""Quantized search (bench_index.py as pytest-benchmark cases): ilias sq8 / pq96 / pq192x4 codes,
with and without exact rescoring, against faiss IndexScalarQuantizer QT_8bit, IndexPQ and
IndexPQFastScan, alone and inside IndexRefineFlat, on the search benchmark's store."""

from __future__ import annotations

import bench_index as bi
import pytest
from common import run_case
from ilias import benchmark as b

KINDS = ["sq8", "pq96", "pq192x4"]
SHORTLIST = {"sq8": 2, "pq96": 10, "pq192x4": 10}  # x k, as bench_index.py
TITLE = "quantized search (bench_index.py)"
CASES = [(kind, rerank) for kind in KINDS for rerank in (False, True)]


@pytest.fixture(scope="session")
def index_queries(size, data_kind):
    return b.queries(size.index_queries, size.dim, data_kind)


@pytest.fixture(scope="session")
def index_truth(store, index_queries, size, threads, recorder):
    """The exact top k of every query (ilias exact search): the recall reference."""
    t, res = b.timed(lambda: b.ilias_search(store, "exact", threads)(index_queries, size.k))
    recorder.add_row(TITLE, bi.COLUMNS, {"method": "ilias exact (float16 store)", "search s": f"{t:.2f}",
                                          "RAM GB": "0 (reads the store)", "recall@k": "1.0000"})
    return res


@pytest.fixture(scope="session")
def codes(store, threads, size):
    """ilias codes of each kind, built once per session: kind -> (path, build seconds)."""
    built: dict = {}

    def get(kind):
        if kind not in built:
            built[kind] = bi.build_ours(store, kind, threads, size.sample)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def ours_seconds():
    return {}


@pytest.fixture(scope="session")
def training(vectors32, size):
    return bi.training_sample(vectors32, size.sample)


def _info(size, store, threads, kind, name, seconds, build_t, ram_gb, r, nq):
    return {"case": name, "codes": kind, "n": store.count, "dim": store.dim, "queries": nq, "k": size.k,
            "threads": threads, "seconds": seconds, "build_seconds": build_t, "ram_gb": ram_gb, "recall": r}


@pytest.mark.parametrize("kind, rerank", CASES, ids=[f"{k}-{'rescored' if r else 'approx'}" for k, r in CASES])
def test_ilias_codes(benchmark, recorder, store, index_queries, index_truth, codes, ours_seconds, size, threads,
                     peaks, kind, rerank):
    path, build_t = codes(kind)
    factor = SHORTLIST[kind]
    t, res = run_case(benchmark, lambda: bi.search_ours(index_queries, store, path, size.k, factor, rerank, threads)[0],
                      size.peer_rounds)
    r = bi.recall(res.indices, index_truth.indices, size.k)
    name = bi.ours_name(kind, factor, rerank)
    ours_seconds[(kind, rerank)] = t
    info = _info(size, store, threads, kind, name, t, build_t, path.stat().st_size / 1e9, r, len(index_queries))
    s = res.stats
    info.update(scan_seconds=s.scan_seconds, rerank_seconds=s.rerank_seconds, shortlist=s.shortlist)
    if kind == "sq8" and peaks.int8_gops:
        gops = 2.0 * len(index_queries) * store.count * store.dim / s.scan_seconds / 1e9
        info.update(scan_gops=gops, int8_peak_share=gops / peaks.int8_gops, **peaks.as_dict())
    benchmark.extra_info.update(info)
    recorder.add_row(TITLE, bi.COLUMNS, {"method": name, "build s": f"{build_t:.1f}", "search s": f"{t:.2f}",
                                          "RAM GB": f"{info['ram_gb']:.3f}", "recall@k": f"{r:.4f}"})
    if rerank:
        # the shortlist is rescored by exact search's kernel: shared rows have exact search's bits
        assert bi.exact_bits_kept(res, index_truth)
    if kind == "sq8" and rerank:
        assert r >= 0.99  # int8 codes with a shortlist of 2k miss (almost) nothing


@pytest.mark.parametrize("kind, refine", CASES, ids=[f"{k}-{'refine' if r else 'alone'}" for k, r in CASES])
def test_faiss_codes(benchmark, recorder, store, vectors32, training, index_queries, index_truth, ours_seconds, size,
                     threads, kind, refine):
    faiss = pytest.importorskip("faiss")
    faiss.omp_set_num_threads(threads)
    factor = SHORTLIST[kind]
    index, build_t, mem = bi.build_faiss(kind, store.dim, factor, refine, training, vectors32)
    nq = bi.peer_queries(kind, len(index_queries), size.peer_queries)
    with b.blas_threads(threads):
        t, (_, ids) = run_case(benchmark, lambda: index.search(index_queries[:nq], size.k), size.peer_rounds)
    t *= len(index_queries) / nq  # faiss scans once per query: linear in the queries
    r = bi.recall(ids, index_truth.indices[:nq], size.k)
    name = bi.faiss_label(kind, factor, refine)
    info = _info(size, store, threads, kind, name, t, build_t, mem, r, len(index_queries))
    info["timed_queries"] = nq
    ours = ours_seconds.get((kind, refine))
    if ours:
        info.update(ratio=t / ours, ratio_to=bi.ours_name(kind, factor, refine))
    benchmark.extra_info.update(info)
    recorder.add_row(TITLE, bi.COLUMNS, {"method": name, "build s": f"{build_t:.1f}",
                                          "search s": f"{t:.2f}{'*' if nq < len(index_queries) else ''}",
                                          "RAM GB": f"{mem:.3f}", "recall@k": f"{r:.4f}",
                                          "faiss / ilias": f"{t / ours:.1f}x" if ours else ""})
