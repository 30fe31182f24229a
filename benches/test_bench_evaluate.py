"""Evaluation (bench_evaluate.py as pytest-benchmark cases): ours (evaluate + full report) and
the official method (sklearn per query and per scale / clutter group) on one synthetic ILIAS:
the real sizes with --bench-size full, a quarter of the instances by default."""

from __future__ import annotations

import pytest
from common import run_case

pytest.importorskip("sklearn")
import bench_evaluate as be  # noqa: E402  (imports sklearn)

TITLE = "evaluation (bench_evaluate.py)"
COLUMNS = ["method", "queries", "seconds", "official / ours"]


@pytest.fixture(scope="session")
def synthetic(size):
    return be.synthetic(size.instances)


@pytest.fixture(scope="session")
def ours_time():
    return {}


def _info(res, gt, t):
    return {"queries": len(res["query_ids"]), "k": be.K, "positives": len(gt.positives), "seconds": t}


def test_ours(benchmark, recorder, synthetic, ours_time, threads):
    res, gt = synthetic
    t, report = run_case(benchmark, lambda: be.ours(res, gt, be.K, threads), 5)
    assert set(report["tasks"]) == {"i2i", "t2i"}
    ours_time["seconds"] = t
    benchmark.extra_info.update(case="ours (evaluate + full report)", threads=threads, **_info(res, gt, t))
    recorder.add_row(TITLE, COLUMNS, {"method": "ours (evaluate + full report)", "queries": len(res["query_ids"]),
                                      "seconds": f"{t:.3f}"})


def test_official(benchmark, recorder, synthetic, ours_time, threads):
    res, gt = synthetic
    t, ref = run_case(benchmark, lambda: be.official(res, gt, be.K), 1)
    # the same numbers as the official method, every task and every scale and clutter group
    diff = be.largest_difference(be.ours(res, gt, be.K, threads), ref)
    assert diff < 1e-9
    info = {"case": "official method (sklearn per query and group)", **_info(res, gt, t), "largest_difference": diff}
    ours = ours_time.get("seconds")
    if ours:
        info.update(ratio=t / ours, ratio_to="ours (evaluate + full report)")
    benchmark.extra_info.update(info)
    recorder.add_row(TITLE, COLUMNS, {"method": info["case"], "queries": len(res["query_ids"]), "seconds": f"{t:.3f}",
                                      "official / ours": f"{t / ours:.0f}x" if ours else ""})
