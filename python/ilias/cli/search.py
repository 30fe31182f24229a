"""`ilias search --queries Q... --db DB... --out RESULTS`: exact search into a results file.

The database is the ordered list of stores given to --db (positives first, then distractors).
"""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="search query stores against database stores", description=__doc__)
    p.add_argument("--queries", nargs="+", required=True, help="query store(s); image and text queries share one pass")
    p.add_argument("--db", nargs="+", required=True, help="database stores, in order")
    p.add_argument("--out", required=True, help="results file (.npz); .json / .pkl write the official formats")
    p.add_argument("-k", type=int, default=1000, help="neighbours per query (default 1000)")
    p.add_argument("--threads", type=int, default=0, help="worker threads (default 0: all cores)")
    p.add_argument("--mini", metavar="KEYS.txt", help="keep only positives (the first --db store) and these keys: mini-ILIAS")
    p.add_argument("--simd", choices=["auto", "avx512", "avx2", "scalar"], default="auto", help="kernel path")
    p.add_argument("--format", choices=["npz", "json", "pickle"], help="output format (default: from the suffix)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..search import mini_ilias_keep, search
    from ..store import Store

    queries = [Store.open(q) for q in args.queries]
    db = [Store.open(d) for d in args.db]
    out = Path(args.out)
    fmt = args.format or {".json": "json", ".pkl": "pickle", ".pickle": "pickle"}.get(out.suffix.lower(), "npz")
    keep = None
    if args.mini:
        keys = [k.strip() for k in Path(args.mini).read_text().splitlines() if k.strip()]
        keep = mini_ilias_keep(db, keys)
    results = search(queries, db, k=args.k, threads=args.threads, keep=keep, simd=args.simd, progress=True)
    if fmt == "json":
        results.write_official_json(out)
    elif fmt == "pickle":
        results.write_official_pickle(out)
    else:
        results.save(out)
    nq, n = len(results), sum(p.count for p in results.database)
    print(f"{out}: {nq:,} queries x {n:,} rows, k={args.k}, {results.info['seconds']:.1f}s")
    return 0
