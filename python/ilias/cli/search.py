"""`ilias search --queries Q... --db DB... --out RESULTS`: exact search into a results file.

The database is the ordered list of stores given to --db (positives first, then distractors).
With --tier, one pass answers several databases, each written to its own file
`<RESULTS stem>.<name><suffix>`:

    --tier mini=image_ids/mini_ilias_yfcc100m_ids.txt   positives + the listed YFCC100M keys
    --tier 10M=+10000000                                positives + the first 10M distractors
    --tier full=all                                     everything
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import POSITIVE, THREADS, K


def add_parser(sub) -> None:
    p = sub.add_parser(
        "search",
        help="search query stores against database stores",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--queries", nargs="+", required=True, help="query store(s); image and text queries share one pass")
    p.add_argument("--db", nargs="+", required=True, help="database stores, in order")
    p.add_argument("--out", required=True, help="results file (.npz); .json / .pkl write the official formats")
    p.add_argument("-k", type=K, default=1000, help="neighbours per query (default 1000)")
    p.add_argument("--threads", type=THREADS, default=0, help="worker threads (default 0: all cores)")
    p.add_argument("--mini", metavar="KEYS.txt", help="keep only positives (the first --db store) and these keys: mini-ILIAS")
    p.add_argument("--tier", action="append", default=[], metavar="NAME=SPEC",
                   help="a database answered in the same pass: SPEC is all, +N (positives + N rows after them) or a keys file")
    p.add_argument("--method", choices=["exact", "float32"], default="exact",
                   help="exact: fastest exact path (int8 first pass where the CPU has AVX-512 VNNI or AVX-VNNI); float32: plain (same results)")
    p.add_argument("--simd", choices=["auto", "avx512", "avx2", "scalar"], default="auto", help="kernel path")
    p.add_argument("--codes", metavar="KIND|PATH",
                   help="search with quantized codes (see `ilias index`): a shortlist rescored exactly")
    p.add_argument("--shortlist", type=POSITIVE, metavar="N", help="with --codes: candidates per query (default: 2k sq8, 10k pq)")
    p.add_argument("--no-rerank", action="store_true", help="with --codes: return the approximate scores")
    p.add_argument("--measure-recall", type=POSITIVE, nargs="?", const=100, metavar="N",
                   help="check recall@k against exact search on N sampled queries (default 100) and print it")
    p.add_argument("--format", choices=["npz", "json", "pickle"], help="output format (default: from the suffix)")
    p.add_argument("--allow-incomplete", action="store_true",
                   help="search stores whose writer did not finish (a warning, carried into the results and reports)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..database import Database
    from ..results import check_output, format_of, results_bytes, write_all
    from ..search import Tier, search_tiers

    queries = Database.of(args.queries, args.allow_incomplete).stores
    db = Database.of(args.db, args.allow_incomplete)
    out = Path(args.out)
    if args.tier and args.mini:
        raise ValueError("--mini: use --tier mini=KEYS.txt together with other tiers")
    if args.codes and args.tier:
        raise ValueError("--codes: tiers are answered by exact search only; use --mini for mini-ILIAS")
    mini = Tier.parse(f"mini={args.mini}", db) if args.mini else None
    keep = mini.keep if mini else None
    tiers = [Tier.parse(t, db) for t in args.tier] or [mini or Tier("all")]
    # one file per tier (RESULTS stem.name.suffix) when --tier names them, else RESULTS itself
    outputs = {t.name: out.with_name(f"{out.stem}.{t.name}{out.suffix}") if args.tier else out for t in tiers}
    nq = sum(s.count for s in queries)
    check_output(outputs.values(), args.format, len(tiers) * results_bytes(nq, args.k, format_of(out, args.format)))
    if args.codes:
        found = {tiers[0].name: _search_codes(args, queries, db, keep)}
    else:
        found = search_tiers(queries, db, tiers, k=args.k, threads=args.threads, simd=args.simd, method=args.method,
                             progress=True)
    paths = write_all([(outputs[name], r) for name, r in found.items()], args.format)
    for path, results in zip(paths, found.values()):
        print(f"{path}: {len(results):,} queries x {results.tier_rows:,} rows, k={args.k}, {results.stats.seconds:.1f}s")
    if args.measure_recall:
        from ..index import measure_recall

        results = found[next(iter(found))]
        r = measure_recall(results, queries, db, sample=args.measure_recall, threads=args.threads, keep=keep)
        print(f"recall@{r['k']} against exact search on {r['queries']} queries: {r['recall']:.4f} "
              f"(lowest {r['min']:.4f}; exact search of the sample took {r['exact_seconds']:.1f}s)")
    return 0


def _search_codes(args, queries, db, keep):
    from ..index import search_codes

    return search_codes(queries, db, args.codes, args.k, shortlist=args.shortlist, rerank=not args.no_rerank,
                        keep=keep, threads=args.threads, progress=True)
