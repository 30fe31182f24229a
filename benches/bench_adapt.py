"""Linear adaptation and query expansion: what they cost on this machine.

`adapt apply` is a GEMM (rows x in -> out) streamed from one store to another: rows/s and
GFLOP/s, against the machine's float32 FMA peak and against the same GEMM alone (numpy's BLAS
on float32 rows already in RAM, the part no streaming can beat) and, when torch is installed,
the official way (torch Linear + F.normalize in float32 on the CPU, rows in RAM).
QE: a plain search (the reference: one pass), the QE first pass (k = N neighbours) and the
second pass (the expanded queries, k results), on one tier and on three (+10% prefix, a tenth
subset as mini-ILIAS is, all), where each tier expands with its own neighbours.

    python benches/bench_adapt.py                          # adapt 1M x 1024 -> 512; QE on 1M x 768, 2,232 queries
    python benches/bench_adapt.py --n 200000 --qe-rows 100000 --repeat 1
    OPENBLAS_CORETYPE=SkylakeX python benches/bench_adapt.py --skip-qe   # OpenBLAS's AVX-512 GEMM

The cases are functions shared with `pytest benches/test_bench_adapt.py`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

COLUMNS = ["case", "rows", "seconds", "rows/s", "GFLOP/s", "% fp32 peak", "vs GEMM alone"]
QE_COLUMNS = ["case", "tiers", "seconds", "scans", "queries scored", "second / plain"]


def make_weights(root: Path, d_in: int, d_out: int, seed: int = 0) -> Path:
    """A random layer in the official layout, as an .npz (no torch needed): W ~ N(0, 1/d_in)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    path = Path(root) / f"layer-{d_in}x{d_out}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{"layer.weight": (rng.standard_normal((d_out, d_in)) / d_in**0.5).astype(np.float32),
                          "layer.bias": (0.01 * rng.standard_normal(d_out)).astype(np.float32)})
    return path


def gemm_flop(rows: int, d_in: int, d_out: int) -> float:
    return 2.0 * rows * d_in * d_out


def apply_once(store, weights, out: Path, threads: int) -> float:
    """Seconds of one `adapt.apply` of the whole store into a fresh `out`."""
    from ilias import adapt

    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    adapt.apply(weights, store, out, threads=threads)
    return time.perf_counter() - t0


def gemm_alone(store, weights, threads: int, rows: int = 131072, repeat: int = 3) -> float:
    """Seconds per row of the layer (GEMM, bias, normalisation) on float32 rows in RAM."""
    import numpy as np
    from ilias import adapt

    layer = adapt.load_weights(weights)
    x = np.asarray(store.vectors(0)[:rows], dtype=np.float32)
    with adapt._blas_threads(threads):
        layer(x[:1024])
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(x)


def torch_official(store, weights, threads: int, rows: int = 131072, repeat: int = 3) -> float | None:
    """Seconds per row of the official layer (torch Linear + F.normalize, float32, CPU)."""
    try:
        import torch
    except ImportError:
        return None
    import numpy as np
    from ilias import adapt

    layer = adapt.load_weights(weights)
    if threads:
        torch.set_num_threads(threads)
    lin = torch.nn.Linear(layer.in_dim, layer.out_dim)
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(layer.weight))
        lin.bias.copy_(torch.from_numpy(layer.bias))
        x = torch.from_numpy(np.asarray(store.vectors(0)[:rows], dtype=np.float32))
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.nn.functional.normalize(lin(x), p=2, dim=-1)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(x)


def qe_tiers(db, which: str):
    """The tiers of a QE case: "all", or "three": positives + 10%, a tenth subset, all."""
    import numpy as np
    from ilias import Tier

    if which == "all":
        return [Tier("all")]
    keep = np.zeros(db.count, dtype=bool)
    keep[::10] = True
    return [Tier("+10%", rows=max(db.count // 10, 1)), Tier("tenth", keep=keep), Tier("all")]


def qe_case(q, db, tiers, k: int, n: int, threads: int) -> dict:
    """A plain search of the tiers (one pass), plain searches of each tier alone (what a second
    pass whose tiers all found other neighbours has to match), then QE with its own first pass
    (k = n): {plain, separate, first, second: seconds, scans, queries scored, the results}."""
    from ilias import search_tiers
    from ilias.expand import search_expanded

    t0 = time.perf_counter()
    plain = search_tiers(q, db, tiers, k, threads=threads)
    t_plain = time.perf_counter() - t0
    t_separate = 0.0
    if len(tiers) > 1:
        for t in tiers:
            t0 = time.perf_counter()
            search_tiers(q, db, [t], k, threads=threads)
            t_separate += time.perf_counter() - t0
    t0 = time.perf_counter()
    found = search_expanded(q, db, tiers, k, n=n, threads=threads)
    total = time.perf_counter() - t0
    st = next(iter(found.values())).stats
    return {"plain": t_plain, "separate": t_separate, "first": st.qe_first_seconds, "second": total - st.qe_first_seconds,
            "scans": st.qe_passes, "scored": st.qe_queries, "plain_results": plain, "results": found}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="rows adapted (default 1M)")
    ap.add_argument("--d", type=int, default=1024, help="input dimension of the layer (default 1024)")
    ap.add_argument("--out-dim", type=int, default=512, help="output dimension (default 512, as published)")
    ap.add_argument("--qe-rows", type=int, default=1_000_000, help="database rows of the QE cases (default 1M)")
    ap.add_argument("--qe-d", type=int, default=768)
    ap.add_argument("--nq", type=int, default=2232)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--qe", type=int, default=2, help="neighbours of the expansion (default 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kind", choices=["random", "structured"], default="random")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each timed case (median)")
    ap.add_argument("--skip-adapt", action="store_true")
    ap.add_argument("--skip-qe", action="store_true")
    args = ap.parse_args()
    from common import DATA, limit_threads

    limit_threads(args.threads)
    from ilias import adapt
    from ilias import benchmark as b

    peaks = b.measure_peaks(args.threads)
    for line in peaks.lines():
        print(line)
    hint = adapt.blas_hint()
    if hint:
        print(f"note: {hint}")
    if not args.skip_adapt:
        store = b.make_store("adapt", args.n, args.d, args.kind, root=DATA, progress=True)
        weights = make_weights(DATA, args.d, args.out_dim)
        out = DATA / f"adapted-{args.n}x{args.d}"
        times = [apply_once(store, weights, out, args.threads) for _ in range(args.repeat)]
        shutil.rmtree(out, ignore_errors=True)
        t = statistics.median(times)
        flop = gemm_flop(args.n, args.d, args.out_dim)
        alone = gemm_alone(store, weights, args.threads)
        official = torch_official(store, weights, args.threads)
        rows = []
        for name, seconds in (("ilias adapt apply (store -> store)", t), ("the layer alone (numpy BLAS, rows in RAM)", alone * args.n),
                              ("official: torch Linear + normalize (rows in RAM)", official * args.n if official else None)):
            if seconds is None:
                continue
            g = flop / seconds / 1e9
            rows.append({"case": name, "rows": f"{args.n:,}", "seconds": f"{seconds:.2f}", "rows/s": f"{args.n / seconds:,.0f}",
                         "GFLOP/s": f"{g:.0f}", "% fp32 peak": f"{100 * g / peaks.fp32_gflops:.0f}",
                         "vs GEMM alone": f"{seconds / (alone * args.n):.2f}x"})
        print(f"\nadapt apply: {args.n:,} x {args.d} -> {args.out_dim} float16 ({args.kind}), {args.threads} threads, "
              f"runs {', '.join(f'{x:.2f}' for x in times)} s; BLAS kernel: {_blas_arch()}")
        print(b.table(rows, COLUMNS))
    if not args.skip_qe:
        db = b.make_store("bench", args.qe_rows, args.qe_d, args.kind, root=DATA, progress=True)
        from ilias import Database

        db = Database.of(db)
        q = b.queries(args.nq, args.qe_d, args.kind)
        rows = []
        for which in ("all", "three"):
            tiers = qe_tiers(db, which)
            cases = [qe_case(q, db, tiers, args.k, args.qe, args.threads) for _ in range(args.repeat)]
            med = {key: statistics.median(c[key] for c in cases) for key in ("plain", "separate", "first", "second")}
            c = cases[-1]
            names = ", ".join(t.name for t in tiers)
            rows += [
                {"case": "plain search (one pass)", "tiers": names, "seconds": f"{med['plain']:.2f}", "scans": 1,
                 "queries scored": f"{args.nq:,}"},
            ]
            if len(tiers) > 1:
                rows.append({"case": "plain searches of each tier alone", "tiers": names, "seconds": f"{med['separate']:.2f}",
                             "scans": len(tiers), "queries scored": f"{args.nq * len(tiers):,}"})
            rows += [
                {"case": f"QE {args.qe}: first pass (k = {args.qe})", "tiers": names, "seconds": f"{med['first']:.2f}",
                 "scans": 1, "queries scored": f"{args.nq:,}"},
                {"case": f"QE {args.qe}: second pass (k = {args.k})", "tiers": names, "seconds": f"{med['second']:.2f}",
                 "scans": c["scans"], "queries scored": f"{c['scored']:,}",
                 "second / plain": f"{med['second'] / med['plain']:.2f}x"
                 + (f" ({med['second'] / med['separate']:.2f}x the tiers alone)" if len(tiers) > 1 else "")},
            ]
        print(f"\nquery expansion: {args.qe_rows:,} x {args.qe_d} float16 ({args.kind}), {args.nq} queries, k={args.k}, "
              f"{args.threads} threads, median of {args.repeat}")
        print(b.table(rows, QE_COLUMNS))
        print("queries scored: expanded queries of the second pass; a query whose tiers found the same neighbours "
              "is scored once for them when they share a scan")


def _blas_arch() -> str:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (no threadpoolctl)"
    info = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    env = os.environ.get("OPENBLAS_CORETYPE")
    return (", ".join(f"{i.get('internal_api')} {i.get('architecture', '?')}" for i in info) or "unknown") + (
        f" (OPENBLAS_CORETYPE={env})" if env else "")


if __name__ == "__main__":
    main()
