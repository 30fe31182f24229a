"""Exact search: ilias-core against faiss-cpu and numpy on the same data, in the same run.

    python benches/bench_search.py                 # 1M x 768 float16, 2,232 queries, k=1000, 2 threads
    python benches/bench_search.py --n 200000 --peers numpy

Runs the exact methods of ilias ("float32": every score in float32; "exact": the int8 first
pass with exact rescoring where the CPU has VNNI; "exact+codes": exact search with the store's
progressive codes, built once and timed apart, as `ilias search --method exact` runs with them;
"progressive": their stages forced; identical results) and the peers, and prints seconds, effective
GFLOP/s (2*Q*N*d / t), the fraction of this machine's measured float32 FMA and int8 peaks, GB/s
of the float16 store, every time relative to ilias "exact", and for the int8 pass the share of
(query, row) pairs it scored and the share of those rescored exactly. `--scaling` also runs each
ilias method on one thread. `--kind structured` uses an anisotropic spectrum like real
embeddings, `--kind clip` the same around a shared mean direction (random pairs at cosine
0.2-0.5, as vision-language embeddings). With progressive codes it prints their size and build
time, the pairs entering each stage, the bytes read against the float16 store, and the distinct
rows in the results (the least any exact pass reads). The data (a cached store under bench-data/) is
made once.

The same benchmark is `ilias bench` (installed package, default: all cores, peers faiss-flat and
numpy) and `pytest benches/test_bench_search.py --benchmark-only`; all three run
ilias.benchmark.run_search_bench.
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
    ap.add_argument("--kind", choices=["random", "structured", "clip"], default="random")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--peers", default="faiss-flat,faiss-sq-fp16,numpy")
    ap.add_argument("--simd", default="auto")
    ap.add_argument("--methods", default="float32,exact,exact+codes", help="ilias methods to run")
    ap.add_argument("--scaling", action="store_true", help="also run each ilias method on 1 thread")
    args = ap.parse_args()
    from common import DATA, limit_threads

    limit_threads(args.threads)
    from ilias import benchmark as b

    store = b.make_store("bench", args.n, args.d, args.kind, root=DATA, progress=True)
    q = b.queries(args.nq, args.d, args.kind)
    try:
        report = b.run_search_bench(store, q, args.k, threads=args.threads, methods=args.methods.split(","),
                                    peers=args.peers.split(","), simd=None if args.simd == "auto" else args.simd,
                                    repeat=args.repeat, scaling=args.scaling, kind=args.kind,
                                    out=lambda line: print(line, flush=True))
    except ValueError as e:  # a bad name among --methods / --peers / --simd
        sys.exit(f"bench_search: {e}")
    print()
    print(report.table())


if __name__ == "__main__":
    main()
