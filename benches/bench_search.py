"""Exact search: ilias-core against faiss-cpu and numpy on the same data, in the same run.

    python benches/bench_search.py                 # 1M x 768 float16, 2,232 queries, k=1000, 2 threads
    python benches/bench_search.py --n 200000 --peers numpy

Runs both exact methods of ilias ("float32": every score in float32; "exact": the int8 first
pass with exact rescoring, identical results) and the peers, and prints seconds, effective
GFLOP/s (2*Q*N*d / t), the fraction of this machine's measured float32 FMA and int8 peaks, GB/s
of the float16 store, every time relative to ilias "exact", and for the int8 pass the share of
(query, row) pairs it scored and the share of those rescored exactly. `--scaling` also runs each
ilias method on one thread. `--kind structured` uses an anisotropic spectrum like real
embeddings. The data (a cached store under bench-data/) is made once.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--nq", type=int, default=2232)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kind", choices=["random", "structured"], default="random")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--peers", default="faiss-flat,faiss-sq-fp16,numpy")
    ap.add_argument("--simd", default="auto")
    ap.add_argument("--methods", default="float32,exact", help="ilias methods to run")
    ap.add_argument("--scaling", action="store_true", help="also run each ilias method on 1 thread")
    args = ap.parse_args()
    # peers use the same number of threads as we do
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import ilias
    import numpy as np
    from common import make_store, peak_rss_gb, queries, table, timed

    store = make_store("bench", args.n, args.d, args.kind)
    q = queries(args.nq, args.d, args.kind)
    flop = 2.0 * args.nq * args.n * args.d
    gb = args.n * args.d * 2 / 1e9
    # the best of three short runs: a peak is what the machine can do when nothing disturbs it
    peak = max(ilias._core.fp32_peak_gflops(None, args.threads) for _ in range(3))
    int8_peak = max(ilias._core.int8_peak_gops(args.threads) or 0 for _ in range(3))
    print(f"data: {args.n:,} x {args.d} float16 ({args.kind}), {args.nq} queries, k={args.k}, {args.threads} threads")
    print(f"machine float32 FMA peak ({ilias.simd_paths()[0]}, {args.threads} threads): {peak:.0f} GFLOP/s")
    if int8_peak:
        print(f"machine int8 VNNI peak ({args.threads} threads): {int8_peak:.0f} GOP/s")

    rows = []

    def add(name, secs):
        gflops = flop / secs / 1e9
        rows.append(
            {
                "method": name,
                "secs": secs,
                "seconds": f"{secs:.2f}",
                "GFLOP/s": f"{gflops:.0f}",
                "% peak": f"{100 * gflops / peak:.0f}",
                "store GB/s": f"{gb / secs:.2f}",
            }
        )

    ours = None
    for method in args.methods.split(","):
        t, res = timed(
            lambda method=method: ilias.search(q, store, k=args.k, threads=args.threads, simd=args.simd, method=method), args.repeat
        )
        if ours is None:
            ours = res
        else:
            same = np.array_equal(res.indices, ours.indices) and np.array_equal(res.scores, ours.scores)
            print(f"ilias {method}: results identical to ilias {args.methods.split(',')[0]}: {same}")
        add(f"ilias {method}", t)
        i = res.info
        pairs = i["float_pairs"] + i["int8_pairs"]
        if i["int8_pairs"]:
            rows[-1]["% int8 peak"] = f"{100 * flop / t / 1e9 / int8_peak:.0f}" if int8_peak else ""
            print(
                f"ilias {method}: int8 pass on {100 * i['int8_pairs'] / pairs:.1f}% of (query, row) pairs, "
                f"{100 * i['rescored_pairs'] / i['int8_pairs']:.1f}% of those rescored exactly"
            )
        print(f"ilias {method}: {t:.2f}s, peak RSS so far {peak_rss_gb():.2f} GB")
        if args.scaling:
            t1, _ = timed(lambda method=method: ilias.search(q, store, k=args.k, threads=1, simd=args.simd, method=method))
            print(f"ilias {method}: 1 thread {t1:.2f}s, {args.threads} threads {t:.2f}s: {t1 / t:.2f}x")

    peers = [p for p in args.peers.split(",") if p]
    if any(p.startswith("faiss") for p in peers):
        import faiss

        faiss.omp_set_num_threads(args.threads)
        x32 = np.concatenate([np.asarray(v, dtype=np.float32) for v, _ in store.iter_chunks(200_000)])
        if "faiss-flat" in peers:
            index = faiss.IndexFlatIP(args.d)
            index.add(x32)
            t, (dist, ids) = timed(lambda: index.search(q, args.k), args.repeat)
            add("faiss IndexFlatIP (float32 in RAM)", t)
            agree = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, ours.indices)])
            print(f"faiss flat: {t:.2f}s; overlap of result sets with ilias {agree:.5f}, max |score diff| {np.abs(dist - ours.scores).max():.2e}")
            del index
        if "faiss-sq-fp16" in peers:
            index = faiss.IndexScalarQuantizer(args.d, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
            index.add(x32)
            t, _ = timed(lambda: index.search(q, args.k), args.repeat)
            add("faiss IndexScalarQuantizer QT_fp16", t)
            print(f"faiss sq fp16: {t:.2f}s")
            del index
        del x32
    if "numpy" in peers:
        t, _ = timed(lambda: numpy_topk(store, q, args.k), args.repeat)
        add("numpy sgemm + argpartition (float32)", t)
        print(f"numpy: {t:.2f}s")

    # every time relative to ilias's default method ("exact") when it ran
    ref = next((r for r in rows if r["method"] == "ilias exact"), rows[0])
    ratio = f"time vs {ref['method']}"
    for r in rows:
        r[ratio] = f"{r['secs'] / ref['secs']:.2f}x"
    print()
    print(table(rows, ["method", "seconds", "GFLOP/s", "% peak", "% int8 peak", "store GB/s", ratio]))


def numpy_topk(store, q, k, block=65536):
    """The plain way: float32 matrix products by blocks, a running top-k by argpartition."""
    import numpy as np

    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    start = 0
    for v, _ in store.iter_chunks(block):
        s = q @ np.asarray(v, dtype=np.float32).T
        cs = np.concatenate([best_s, s], axis=1)
        ci = np.concatenate([best_i, np.broadcast_to(np.arange(start, start + len(v)), s.shape)], axis=1)
        top = np.argpartition(-cs, min(k, cs.shape[1] - 1), axis=1)[:, :k]
        best_s = np.take_along_axis(cs, top, 1)
        best_i = np.take_along_axis(ci, top, 1)
        start += len(v)
    order = np.argsort(-best_s, axis=1, kind="stable")
    return np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)


if __name__ == "__main__":
    main()
