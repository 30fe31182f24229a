"""Linear adaptation and query expansion (bench_adapt.py as pytest-benchmark cases): `adapt apply`
of a store (the search benchmark's row count, 1024-d in, 512 out) against the layer alone and the
official torch layer, and the QE passes against a plain search on the search benchmark's store."""

from __future__ import annotations

import bench_adapt as ba
import numpy as np
import pytest
from common import run_case
from ilias import Database
from ilias import benchmark as b

TITLE = "linear adaptation (bench_adapt.py)"
QE_TITLE = "query expansion (bench_adapt.py)"
D_IN, D_OUT = 1024, 512


@pytest.fixture(scope="session")
def adapt_store(size, data_kind, data_dir):
    return b.make_store("adapt", size.n, D_IN, data_kind, root=data_dir, progress=True)


@pytest.fixture(scope="session")
def weights(data_dir):
    return ba.make_weights(data_dir, D_IN, D_OUT)


def _row(name, n, seconds, peaks, alone):
    g = ba.gemm_flop(n, D_IN, D_OUT) / seconds / 1e9
    return {"case": name, "rows": f"{n:,}", "seconds": f"{seconds:.2f}", "rows/s": f"{n / seconds:,.0f}",
            "GFLOP/s": f"{g:.0f}", "% fp32 peak": f"{100 * g / peaks.fp32_gflops:.0f}",
            "vs GEMM alone": f"{seconds / alone:.2f}x" if alone else ""}, g


def test_adapt_apply(benchmark, recorder, adapt_store, weights, data_dir, threads, peaks, size):
    from ilias import Store, adapt

    out = data_dir / f"adapted-{adapt_store.count}x{D_IN}"
    t, _ = run_case(benchmark, lambda: ba.apply_once(adapt_store, weights, out, threads), size.rounds)
    got = Store.open(out)
    # what it wrote is the layer's output (float16 of it)
    layer = adapt.load_weights(weights)
    np.testing.assert_allclose(got.vectors(0)[:256].astype(np.float32), layer(adapt_store.vectors(0)[:256]), atol=1e-3)
    alone = ba.gemm_alone(adapt_store, weights, threads) * adapt_store.count
    row, g = _row("ilias adapt apply (store -> store)", adapt_store.count, t, peaks, alone)
    benchmark.extra_info.update(case=row["case"], rows=adapt_store.count, d_in=D_IN, d_out=D_OUT, seconds=t,
                                rows_per_s=adapt_store.count / t, gflops=g, fp32_peak_share=g / peaks.fp32_gflops,
                                gemm_alone_seconds=alone, blas=ba._blas_arch(), **peaks.as_dict())
    recorder.add_row(TITLE, ba.COLUMNS, row)
    recorder.add_row(TITLE, ba.COLUMNS, _row("the layer alone (numpy BLAS, rows in RAM)", adapt_store.count, alone, peaks, alone)[0])
    official = ba.torch_official(adapt_store, weights, threads)
    if official:
        recorder.add_row(TITLE, ba.COLUMNS, _row("official: torch Linear + normalize (rows in RAM)", adapt_store.count,
                                                 official * adapt_store.count, peaks, alone)[0])


@pytest.mark.parametrize("which", ["all", "three"])
def test_qe_passes(benchmark, recorder, store, size, data_kind, threads, which):
    db = Database.of(store)
    q = b.queries(size.queries, size.dim, data_kind)
    tiers = ba.qe_tiers(db, which)
    t, case = run_case(benchmark, lambda: ba.qe_case(q, db, tiers, size.k, 2, threads), size.peer_rounds)
    # every tier's expanded results hold only that tier's rows
    for tier in tiers:
        idx = case["results"][tier.name].indices
        if tier.keep is not None:
            assert tier.keep[idx[idx >= 0]].all()
        if tier.rows is not None:
            assert idx.max() < tier.rows
    names = ", ".join(t.name for t in tiers)
    benchmark.extra_info.update(case=f"QE 2, tiers {names}", plain_seconds=case["plain"], first_seconds=case["first"],
                                second_seconds=case["second"], separate_seconds=case["separate"], scans=case["scans"],
                                queries_scored=case["scored"],
                                ratio=case["second"] / case["plain"], ratio_to="plain search (one pass)")
    recorder.add_row(QE_TITLE, ba.QE_COLUMNS, {"case": "plain search (one pass)", "tiers": names,
                                               "seconds": f"{case['plain']:.2f}", "scans": 1})
    if len(tiers) > 1:
        recorder.add_row(QE_TITLE, ba.QE_COLUMNS, {"case": "plain searches of each tier alone", "tiers": names,
                                                   "seconds": f"{case['separate']:.2f}", "scans": len(tiers)})
    alone = f" ({case['second'] / case['separate']:.2f}x the tiers alone)" if len(tiers) > 1 else ""
    recorder.add_row(QE_TITLE, ba.QE_COLUMNS, {"case": "QE 2: second pass", "tiers": names, "seconds": f"{case['second']:.2f}",
                                               "scans": case["scans"], "queries scored": f"{case['scored']:,}",
                                               "second / plain": f"{case['second'] / case['plain']:.2f}x{alone}"})
