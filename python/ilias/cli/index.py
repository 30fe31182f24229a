"""`ilias index build STORE... --codes KIND`: quantized codes for faster repeated search.

Kinds: sq8 (int8 per dimension, half the float16 size), pq<M> (M bytes per row), pq<M>x4
(M/2 bytes per row, 4-bit fast-scan). Search with them: `ilias search --codes KIND ...`; the
shortlist is rescored exactly from the float16 store, so the scores are exact. progressive:
rotated int8 codes in dimension blocks for exact search itself (`ilias search --method exact`
uses them where they pay; results identical to float32).

    ilias index build distractors/ --codes sq8
    ilias index build positives/ distractors/ --codes pq192x4 --sample 65536
    ilias index build positives/ distractors/ --codes progressive
    ilias index info distractors/codes/pq192x4.codes
"""

from __future__ import annotations

import argparse

from .options import NON_NEGATIVE, SEED, THREADS, whole


def add_parser(sub) -> None:
    p = sub.add_parser("index", help="build or inspect quantized codes of a database",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="build codes of a database")
    b.add_argument("stores", nargs="*", metavar="STORE", help="database stores, in the order searched")
    b.add_argument("--db", nargs="+", default=[], help="the same stores (as `ilias search --db` takes them)")
    b.add_argument("--codes", required=True, metavar="KIND", help="sq8, pq<M>, pq<M>x4 (e.g. pq192x4) or progressive")
    b.add_argument("--out", help="codes file (default: codes/KIND.codes in the last store)")
    b.add_argument("--threads", type=THREADS, default=0, help="worker threads (default 0: all cores)")
    b.add_argument("--sample", type=NON_NEGATIVE, default=0, help="rows to train PQ on (default: 64 per centroid, >= 16384), or to learn the progressive rotation and stages (default 20000)")
    b.add_argument("--iters", type=whole(1, 10_000), default=20, help="k-means iterations (default 20)")
    b.add_argument("--seed", type=SEED, default=1234, help="training seed (default 1234)")
    b.set_defaults(run=run_build)
    i = actions.add_parser("info", help="show what a codes file holds")
    i.add_argument("path")
    i.set_defaults(run=run_info)


def run_build(args) -> int:
    import time

    from ..index import build_index

    stores = [*args.stores, *args.db]
    if not stores:
        raise ValueError("index build: give the database stores (STORE... or --db STORE...)")
    t0 = time.monotonic()
    path = build_index(stores, args.codes, args.out, threads=args.threads, sample=args.sample,
                       iters=args.iters, seed=args.seed, progress=True)
    print(f"{path}: {args.codes} codes, {path.stat().st_size / 1e6:,.1f} MB, {time.monotonic() - t0:.1f}s")
    if args.codes == "progressive":
        print(_progressive_line(path))
    return 0


def _progressive_line(path) -> str:
    from .. import _core
    from ..index import progressive_info

    p = progressive_info(_core.inspect_codes(str(path)))
    stages = ", ".join(f"{b} dims: energy {e:.1%}, survival {s:.2%}"
                       for b, e, s in zip(p["boundaries"], p["energy"], p["survival"]))
    verdict = "exact search uses them" if p["pays"] else "exact search steps aside (flat spectrum)"
    return (f"stages ({stages}); expected work {p['work']:.0%} of the plain int8 pass "
            f"(measured on {p['sample']:,} rows, k = {p['k']}): {verdict}")


def run_info(args) -> int:
    from .. import _core

    info = _core.inspect_codes(args.path)
    print(f"{args.path}: {info['kind']} codes of {info['rows']:,} rows x {info['dim']}, "
          f"database fingerprint {info['fingerprint']}")
    if info["kind"] == "progressive":
        print(_progressive_line(args.path))
    return 0
