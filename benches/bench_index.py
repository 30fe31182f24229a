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

The cases are functions shared with `pytest benches/test_bench_index.py`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

COLUMNS = ["method", "build s", "search s", "RAM GB", "recall@k", "faiss / ilias"]


def recall(found, exact, k):
    import numpy as np

    return float(np.mean([len(np.intersect1d(a[a >= 0], b[:k])) / k for a, b in zip(found, exact)]))


def exact_bits_kept(res, exact) -> bool:
    """Whether every row that `res` and `exact` both return has the same score bits in both
    (rescored codes results are scored by exact search's kernel)."""
    import numpy as np

    for a, sa, b, sb in zip(res.indices, res.scores, exact.indices, exact.scores):
        _, ia, ib = np.intersect1d(a, b, assume_unique=True, return_indices=True)
        if not np.array_equal(sa[ia].view(np.uint32), sb[ib].view(np.uint32)):
            return False
    return True


def build_ours(store, kind, threads, sample):
    """ilias codes of `kind` for `store` (codes/KIND.codes in it): (path, build seconds)."""
    from ilias.index import build_index

    out = store.path / "codes" / f"{kind}.codes"
    t0 = time.perf_counter()
    build_index(store, kind, out, threads=threads, sample=sample)
    return out, time.perf_counter() - t0


def search_ours(q, store, codes, k, factor, rerank, threads):
    """(results, seconds) of a codes search with a shortlist of factor * k."""
    from ilias.index import search_codes

    t0 = time.perf_counter()
    res = search_codes(q, store, codes, k, shortlist=factor * k, rerank=rerank, threads=threads)
    return res, time.perf_counter() - t0


def ours_name(kind, factor, rerank):
    return f"ilias {kind}" + (f" + rescoring of {factor}k" if rerank else " (approximate)")


def training_sample(x32, sample):
    import numpy as np

    rows = np.random.default_rng(0).choice(len(x32), min(sample, len(x32)), replace=False)
    return x32[np.sort(rows)]


def faiss_label(kind, factor, refine):
    if kind == "sq8":
        label = "faiss IndexScalarQuantizer QT_8bit"
    elif kind.endswith("x4"):
        label = f"faiss IndexPQFastScan M={int(kind[2:-2])} 4-bit"
    else:
        label = f"faiss IndexPQ M={int(kind[2:])} 8-bit"
    return label + (f" + IndexRefineFlat k_factor={factor}" if refine else "")


def build_faiss(kind, d, factor, refine, train, x32):
    """The faiss counterpart of ilias `kind`, trained and filled: (index, build seconds, GB held)."""
    import faiss

    ip = faiss.METRIC_INNER_PRODUCT
    t0 = time.perf_counter()
    if kind == "sq8":
        index = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, ip)
    elif kind.endswith("x4"):
        index = faiss.IndexPQFastScan(d, int(kind[2:-2]), 4, ip)
    else:
        index = faiss.IndexPQ(d, int(kind[2:]), 8, ip)
    if refine:
        index = faiss.IndexRefineFlat(index)
        index.k_factor = factor
    index.train(train)
    index.add(x32)
    build_t = time.perf_counter() - t0
    if refine:
        mem = (faiss.serialize_index(index.base_index).nbytes + x32.nbytes) / 1e9
    else:
        mem = faiss.serialize_index(index).nbytes / 1e9
    return index, build_t, mem


def peer_queries(kind, nq, limit):
    """Queries a faiss peer is timed on: all for fast-scan, else `limit` of them when given."""
    return nq if kind.endswith("x4") or not limit else min(limit, nq)


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
    from common import DATA, limit_threads

    limit_threads(args.threads)
    import ilias
    from ilias import benchmark as b

    store = b.make_store("bench", args.n, args.d, args.kind, root=DATA, progress=True)
    q = b.queries(args.nq, args.d, args.kind)
    k = args.k
    f16_gb = args.n * args.d * 2 / 1e9
    print(f"data: {args.n:,} x {args.d} float16 ({args.kind}, {f16_gb:.2f} GB), {args.nq} queries, k={k}, "
          f"{args.threads} threads")
    int8_peak = b.measure_peaks(args.threads).int8_gops
    if int8_peak:
        print(f"machine int8 VNNI peak ({args.threads} threads): {int8_peak:.0f} GOP/s")

    t0 = time.perf_counter()
    exact = ilias.search(q, store, k=k, threads=args.threads)
    exact_t = time.perf_counter() - t0
    print(f"ilias exact search (ground truth): {exact_t:.2f}s")
    shortlist = {kind: int(f) for kind, f in (s.split("=") for s in args.shortlist.split(","))}
    rows = [{"method": "ilias exact (float16 store)", "build s": "", "search s": f"{exact_t:.2f}",
             "RAM GB": "0 (reads the store)", "recall@k": "1.0000"}]
    ours = {}
    for kind in [c for c in args.codes.split(",") if c]:
        codes, build_t = build_ours(store, kind, args.threads, args.sample)
        factor = shortlist.get(kind, 10)
        for rerank in (False, True):
            res, t = search_ours(q, store, codes, k, factor, rerank, args.threads)
            r = recall(res.indices, exact.indices, k)
            name = ours_name(kind, factor, rerank)
            s = res.stats
            rows.append({"method": name, "build s": f"{build_t:.1f}", "search s": f"{t:.2f}",
                         "RAM GB": f"{codes.stat().st_size / 1e9:.3f}", "recall@k": f"{r:.4f}"})
            print(f"{name}: {t:.2f}s (scan {s.scan_seconds:.2f}s, rescoring {s.rerank_seconds:.2f}s), "
                  f"recall@{k} {r:.4f}, peak RSS {b.peak_rss_gb():.2f} GB"
                  + (f", scores bit-identical to exact search: {exact_bits_kept(res, exact)}" if rerank else ""))
            if kind == "sq8" and not rerank and int8_peak:
                ops = 2.0 * args.nq * args.n * args.d
                print(f"  sq8 scan: {ops / s.scan_seconds / 1e9:.0f} GOP/s = "
                      f"{100 * ops / s.scan_seconds / 1e9 / int8_peak:.0f}% of the int8 peak")
            ours[(kind, rerank)] = t

    peers = [p for p in args.peers.split(",") if p]
    if peers:
        import faiss

        faiss.omp_set_num_threads(b.resolve_threads(args.threads))
        x32 = b.float32_vectors(store)
        train = training_sample(x32, args.sample)
        for kind in peers:
            nq_peer = peer_queries(kind, args.nq, args.peer_queries)
            factor = shortlist.get(kind, 10)
            for refine in (False, True):
                index, build_t, mem = build_faiss(kind, args.d, factor, refine, train, x32)
                t0 = time.perf_counter()
                _, ids = index.search(q[:nq_peer], k)
                t = (time.perf_counter() - t0) * args.nq / nq_peer
                del index
                r = recall(ids, exact.indices[:nq_peer], k)
                name = faiss_label(kind, factor, refine)
                scaled = f" (timed on {nq_peer} queries, scaled)" if nq_peer < args.nq else ""
                ratio = t / ours[(kind, refine)] if (kind, refine) in ours else None
                rows.append({"method": name, "build s": f"{build_t:.1f}", "search s": f"{t:.2f}{'*' if scaled else ''}",
                             "RAM GB": f"{mem:.3f}", "recall@k": f"{r:.4f}",
                             "faiss / ilias": f"{ratio:.1f}x" if ratio else ""})
                print(f"{name}: {t:.2f}s{scaled}, recall@{k} {r:.4f}"
                      + (f", {ratio:.1f}x the time of ilias {kind}" if ratio else ""))
    print()
    print(b.table(rows, COLUMNS))
    print("RAM GB: what the method holds in memory (codes, + float32 vectors for IndexRefineFlat); "
          "ilias rescoring reads the float16 store through the page cache. * scaled from a subset of queries.")


if __name__ == "__main__":
    main()
