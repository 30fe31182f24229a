"""`ilias bench`: exact search throughput on this machine, against faiss-cpu and numpy.

Makes (once, cached under --data) a float16 store of N random or structured unit vectors, then
times each ilias method and each peer on the same queries in this process, and prints seconds,
effective GFLOP/s (2 Q N d / t), the share of this machine's measured float32 FMA and int8 peaks,
GB/s of the store and every time relative to ilias exact (a peer's ratio above 1: ilias is
faster). The results of every method are checked identical, the peers' overlap with them shown.

    ilias bench                                   # 1M x 768, 2,232 queries, k = 1000, all cores
    ilias bench --n 200000 --peers numpy          # smaller; numpy only
    ilias bench --kind structured --threads 2 --scaling

faiss peers need faiss-cpu (`pip install faiss-cpu`); without it they are skipped with a note.
"""

from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    from ..benchmark import DATA_ENV, KINDS, METHODS, PEERS
    from .options import POSITIVE, THREADS, K

    p = sub.add_parser("bench", help="benchmark exact search on this machine against faiss and numpy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=POSITIVE, default=1_000_000, help="database rows (default 1,000,000)")
    p.add_argument("--dim", type=POSITIVE, default=768, help="dimension (default 768)")
    p.add_argument("--queries", type=POSITIVE, default=2232, help="queries (default 2,232, as ILIAS)")
    p.add_argument("-k", type=K, default=1000, help="neighbours per query (default 1000)")
    p.add_argument("--threads", type=THREADS, default=0, help="threads of ilias and of the peers (default 0: all cores)")
    p.add_argument("--kind", default="random", help=f"data: {' or '.join(KINDS)} (default random)")
    p.add_argument("--methods", default="float32,exact", help=f"ilias methods, of {', '.join(METHODS)} (default float32,exact)")
    p.add_argument("--peers", default="faiss-flat,numpy",
                   help=f"peers, of {', '.join(PEERS)}; '' for none (default faiss-flat,numpy)")
    p.add_argument("--repeat", type=POSITIVE, default=1, help="runs of each case, the median reported (default 1)")
    p.add_argument("--simd", choices=["auto", "avx512", "avx2", "scalar"], default="auto", help="ilias kernel path")
    p.add_argument("--scaling", action="store_true", help="also run each ilias method on 1 thread")
    p.add_argument("--data", metavar="DIR",
                   help=f"where the benchmark stores are cached (default ${DATA_ENV} or ~/.cache/ilias-core/bench)")
    p.set_defaults(run=run)


def _names(text: str, known, flag: str) -> list[str]:
    from ..benchmark import check_names

    return check_names([s.strip() for s in text.split(",")], list(known), flag)


def check(args) -> tuple[list[str], list[str]]:
    """The flags' values, checked (numbers have their bounds from argparse): (methods, peers).
    A mistake is a ValueError naming the flag."""
    from ..benchmark import KINDS, METHODS, PEERS

    if args.n < args.k:
        raise ValueError(f"--n: {args.n:,} rows are fewer than -k {args.k:,}: the database needs at least k rows")
    if args.kind not in KINDS:
        raise ValueError(f"--kind: expected {' or '.join(KINDS)}, got {args.kind!r}")
    methods = _names(args.methods, METHODS, "--methods")
    if not methods:
        raise ValueError("--methods: give at least one ilias method")
    return methods, _names(args.peers, PEERS, "--peers")


def run(args) -> int:
    from .. import benchmark as b

    methods, peers = check(args)
    threads = b.resolve_threads(args.threads)
    # faiss's OpenMP and BLAS read these when it is imported (after this); numpy's BLAS is held
    # by threadpoolctl where installed. They are put back afterwards: processes started later by
    # the same Python (Dask workers, say) must not inherit this command's thread counts.
    saved = {var: os.environ.get(var) for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    for var in saved:
        os.environ.setdefault(var, str(threads))
    try:
        return _run(args, b, methods, peers, threads)
    finally:
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _run(args, b, methods, peers, threads) -> int:
    path = b.store_path("bench", args.n, args.dim, args.kind, args.data)
    if not (path / "manifest.json").exists():
        print(f"making the benchmark store {path} (once; {args.n * args.dim * 2 / 1e9:.2f} GB)", flush=True)
    store = b.make_store("bench", args.n, args.dim, args.kind, root=args.data or None, progress=True)
    q = b.queries(args.queries, args.dim, args.kind)
    report = b.run_search_bench(store, q, args.k, threads=args.threads, methods=methods, peers=peers,
                                simd=None if args.simd == "auto" else args.simd, repeat=args.repeat,
                                scaling=args.scaling, kind=args.kind, out=lambda line: print(line, flush=True))
    print()
    print(report.table())
    return 0
