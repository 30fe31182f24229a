"""Quantized search: ilias codes against faiss-cpu on the same data, in the same run.

For each method: build time, search time of all queries, the memory of what it holds in RAM,
and recall@k against exact search (the exact top k of every query, from ilias exact search).

    python benches/bench_index.py                        # 1M x 768 random, 2,232 queries, k = 1000
    python benches/bench_index.py --kind structured
    python benches/bench_index.py --peer-queries 500     # time slow peers on 500 queries, scaled

Peers: faiss IndexScalarQuantizer QT_8bit, IndexPQ (8-bit), IndexPQFastScan (4-bit), each
alone and inside IndexRefineFlat (float32 vectors in RAM for the exact rescoring). Faiss scans
its codes once per query; a peer timed on a subset of queries is scaled to all of them (its
time is linear in the number of queries) and marked so; fast-scan always runs all queries.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))


def recall(found, exact, k):
    import numpy as np

    return float(np.mean([len(np.intersect1d(a[a >= 0], b[:k])) / k for a, b in zip(found, exact)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--nq", type=int, default=2232)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kind", choices=["random", "structured"], default="random")
    ap.add_argument("--codes", default="sq8,pq96,pq192x4", help="ilias code kinds")
    ap.add_argument("--shortlist", default="sq8=2,pq96=10,pq192x4=10", help="shortlist per kind, as a multiple of k")
    ap.add_argument("--peers", default="sq8,pq96,pq192x4", help="faiss counterparts to run (same kinds)")
    ap.add_argument("--peer-queries", type=int, default=0,
                    help="time faiss SQ8 and IndexPQ (one scan per query) on this many queries (0: all)")
    ap.add_argument("--sample", type=int, default=65536, help="training rows (both sides)")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)

    import ilias
    import numpy as np
    from common import make_store, peak_rss_gb, queries, table
    from ilias.index import build_index, search_codes

    store = make_store("bench", args.n, args.d, args.kind)
    q = queries(args.nq, args.d, args.kind)
    k = args.k
    f16_gb = args.n * args.d * 2 / 1e9
    print(f"data: {args.n:,} x {args.d} float16 ({args.kind}, {f16_gb:.2f} GB), {args.nq} queries, k={k}, "
          f"{args.threads} threads")
    int8_peak = ilias._core.int8_peak_gops(args.threads)
    if int8_peak:
        print(f"machine int8 VNNI peak ({args.threads} threads): {int8_peak:.0f} GOP/s")

    t0 = time.perf_counter()
    exact = ilias.search(q, store, k=k, threads=args.threads)
    exact_t = time.perf_counter() - t0
    print(f"ilias exact search (ground truth): {exact_t:.2f}s")
    shortlist = dict(s.split("=") for s in args.shortlist.split(","))
    rows = [{"method": "ilias exact (float16 store)", "build s": "", "search s": f"{exact_t:.2f}",
             "RAM GB": "0 (reads the store)", "recall@k": "1.0000"}]
    ours = {}
    for kind in [c for c in args.codes.split(",") if c]:
        out = store.path / "codes" / f"{kind}.codes"
        t0 = time.perf_counter()
        build_index(store, kind, out, threads=args.threads, sample=args.sample)
        build_t = time.perf_counter() - t0
        factor = int(shortlist.get(kind, 10))
        for rerank in (False, True):
            t0 = time.perf_counter()
            res = search_codes(q, store, out, k, shortlist=factor * k, rerank=rerank, threads=args.threads)
            t = time.perf_counter() - t0
            r = recall(res.indices, exact.indices, k)
            name = f"ilias {kind}" + (f" + rescoring of {factor}k" if rerank else " (approximate)")
            rows.append({"method": name, "build s": f"{build_t:.1f}", "search s": f"{t:.2f}",
                         "RAM GB": f"{out.stat().st_size / 1e9:.3f}", "recall@k": f"{r:.4f}"})
            print(f"{name}: {t:.2f}s (scan {res.info['scan_seconds']:.2f}s, rescoring "
                  f"{res.info['rerank_seconds']:.2f}s), recall@{k} {r:.4f}, peak RSS {peak_rss_gb():.2f} GB")
            if kind == "sq8" and not rerank and int8_peak:
                ops = 2.0 * args.nq * args.n * args.d
                print(f"  sq8 scan: {ops / res.info['scan_seconds'] / 1e9:.0f} GOP/s = "
                      f"{100 * ops / res.info['scan_seconds'] / 1e9 / int8_peak:.0f}% of the int8 peak")
            ours[(kind, rerank)] = t

    peers = [p for p in args.peers.split(",") if p]
    if peers:
        import faiss

        faiss.omp_set_num_threads(args.threads)
        x32 = np.concatenate([np.asarray(v, dtype=np.float32) for v, _ in store.iter_chunks(200_000)])
        train = x32[np.sort(np.random.default_rng(0).choice(len(x32), min(args.sample, len(x32)), replace=False))]
        ip = faiss.METRIC_INNER_PRODUCT
        for kind in peers:
            nq_peer = args.nq if kind.endswith("x4") or not args.peer_queries else min(args.peer_queries, args.nq)
            if kind == "sq8":
                make = lambda: faiss.IndexScalarQuantizer(args.d, faiss.ScalarQuantizer.QT_8bit, ip)
                label = "faiss IndexScalarQuantizer QT_8bit"
            elif kind.endswith("x4"):
                m = int(kind[2:-2])
                make = lambda m=m: faiss.IndexPQFastScan(args.d, m, 4, ip)
                label = f"faiss IndexPQFastScan M={m} 4-bit"
            else:
                m = int(kind[2:])
                make = lambda m=m: faiss.IndexPQ(args.d, m, 8, ip)
                label = f"faiss IndexPQ M={m} 8-bit"
            factor = int(shortlist.get(kind, 10))
            for refine in (False, True):
                index = make()
                t0 = time.perf_counter()
                if refine:
                    index = faiss.IndexRefineFlat(index)
                    index.k_factor = factor
                index.train(train)
                index.add(x32)
                build_t = time.perf_counter() - t0
                t0 = time.perf_counter()
                _, ids = index.search(q[:nq_peer], k)
                t = (time.perf_counter() - t0) * args.nq / nq_peer
                r = recall(ids, exact.indices[:nq_peer], k)
                mem = faiss.serialize_index(index).nbytes / 1e9 if not refine else (
                    faiss.serialize_index(index.base_index).nbytes + x32.nbytes) / 1e9
                name = label + (f" + IndexRefineFlat k_factor={factor}" if refine else "")
                scaled = f" (timed on {nq_peer} queries, scaled)" if nq_peer < args.nq else ""
                ratio = t / ours[(kind, refine)] if (kind, refine) in ours else None
                rows.append({"method": name, "build s": f"{build_t:.1f}", "search s": f"{t:.2f}{'*' if scaled else ''}",
                             "RAM GB": f"{mem:.3f}", "recall@k": f"{r:.4f}",
                             "faiss / ilias": f"{ratio:.1f}x" if ratio else ""})
                print(f"{name}: {t:.2f}s{scaled}, recall@{k} {r:.4f}"
                      + (f", {ratio:.1f}x the time of ilias {kind}" if ratio else ""))
                del index
    print()
    print(table(rows, ["method", "build s", "search s", "RAM GB", "recall@k", "faiss / ilias"]))
    print("RAM GB: what the method holds in memory (codes, + float32 vectors for IndexRefineFlat); "
          "ilias rescoring reads the float16 store through the page cache. * scaled from a subset of queries.")


if __name__ == "__main__":
    main()
