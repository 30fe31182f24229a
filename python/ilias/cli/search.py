"""`ilias search --queries Q... --db DB... --out RESULTS`: exact search into a results file.

The database is the ordered list of stores given to --db (positives first, then distractors).
With --tier, one pass answers several databases, each written to its own file
`<RESULTS stem>.<name><suffix>`:

    --tier mini=image_ids/mini_ilias_yfcc100m_ids.txt   positives + the listed YFCC100M keys
    --tier 10M=+10000000                                positives + the first 10M distractors
    --tier full=all                                     everything

--adapt W.pth searches adapted copies of the stores (`ilias adapt apply`, made where missing, in
--adapt-dir); --qe N adds alpha-QE: each query moved to normalize(q + sum s_i^alpha x_i) over its
first N neighbours (alpha 1: the official method), searched again; every tier with its own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import POSITIVE, THREADS, K, number


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
    p.add_argument("--method", choices=["exact", "float32", "progressive"], default="exact",
                   help="exact: fastest exact path (progressive codes where built and paying, else an int8 first pass where "
                        "the CPU has AVX-512 VNNI or AVX-VNNI); float32: plain; progressive: force the progressive codes "
                        "(same results)")
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
    add_variant_options(p)
    p.add_argument("--adapt-dir", metavar="DIR",
                   help="with --adapt: where the adapted stores go (default: adapted/<weights>-<sha> beside the first --db)")
    from .cluster_args import add_cluster_options

    add_cluster_options(p)  # --cluster local[:N] | slurm | tcp://HOST:PORT: ranges of shards as Dask tasks
    p.set_defaults(run=run)


def add_variant_options(p) -> None:
    """--adapt, --qe, --qe-alpha (shared with `ilias run`)."""
    p.add_argument("--adapt", metavar="W.pth", help="linear adaptation layer: search normalize(W x + b) of queries and database")
    p.add_argument("--qe", type=POSITIVE, metavar="N", help="query expansion with the first N neighbours, then a second pass")
    p.add_argument("--qe-alpha", type=number(0), default=1.0, metavar="A",
                   help="with --qe: neighbour weights score^A (default 1: the official method; 0: average QE)")


def run(args) -> int:
    from ..database import Database
    from ..results import check_output, format_of, results_bytes, write_all
    from ..search import Tier, search_tiers

    if args.qe is None and args.qe_alpha != 1.0:
        raise ValueError("--qe-alpha: only with --qe N")
    if args.qe and args.measure_recall:
        raise ValueError("--measure-recall: compares with exact search of the queries as given, not with --qe")
    from .cluster_args import cluster_options

    cluster = cluster_options(args)
    if cluster is not None and (args.qe or args.measure_recall or args.method == "progressive"):
        what = "--qe" if args.qe else "--measure-recall" if args.measure_recall else "--method progressive"
        raise ValueError(f"--cluster: {what} runs in one process only (leave out --cluster)")
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
    if args.adapt:  # the same rows and ids: the tiers above hold for the adapted database
        queries, db = _adapted(args, queries, db)
    from ..adapt import check_same_adaptation

    check_same_adaptation(queries, db)
    if args.codes:
        found = {tiers[0].name: _search_codes(args, queries, db, keep, cluster)}
    elif args.qe:
        from ..expand import search_expanded

        found = search_expanded(queries, db, tiers, k=args.k, n=args.qe, alpha=args.qe_alpha, threads=args.threads,
                                simd=args.simd, method=args.method, progress=True)
    elif cluster is not None:
        from ..cluster import search_tiers_on_cluster

        found = search_tiers_on_cluster(cluster, queries, db, tiers, k=args.k, simd=args.simd, method=args.method,
                                        tasks=args.cluster_tasks)
    else:
        found = search_tiers(queries, db, tiers, k=args.k, threads=args.threads, simd=args.simd, method=args.method,
                             progress=True)
    paths = write_all([(outputs[name], r) for name, r in found.items()], args.format)
    for path, results in zip(paths, found.values()):
        label = f" ({results.variant})" if results.variant else ""
        print(f"{path}: {len(results):,} queries x {results.tier_rows:,} rows, k={args.k}, {results.stats.seconds:.1f}s{label}")
    st = next(iter(found.values())).stats
    if st.path and not args.codes:
        print(f"path: {st.path}" + (f" ({st.path_reason})" if st.path_reason else ""))
    if st.stage_pairs:
        shares = ", ".join(f"{p / st.stage_pairs[0]:.2%}" for p in st.stage_pairs[1:])
        print(f"progressive stages ({st.stage_kernel}): pairs entering stages 2+: {shares or '-'} of stage 1, "
              f"rescored {st.rescored_pairs / st.stage_pairs[0]:.3%}")
    if st.qe:
        print(f"QE {st.qe}: first pass {st.qe_first_seconds:.1f}s, second pass {st.seconds - st.qe_first_seconds:.1f}s "
              f"({st.qe_passes} scan(s), {st.qe_queries:,} expanded queries scored)")
    if args.measure_recall:
        from ..index import measure_recall

        results = found[next(iter(found))]
        r = measure_recall(results, queries, db, sample=args.measure_recall, threads=args.threads, keep=keep)
        print(f"recall@{r['k']} against exact search on {r['queries']} queries: {r['recall']:.4f} "
              f"(lowest {r['min']:.4f}; exact search of the sample took {r['exact_seconds']:.1f}s)")
    return 0


def _adapted(args, queries, db):
    """The query stores and the database, adapted with --adapt (made where missing)."""
    from ..adapt import adapted_database, default_adapted_dir, load_weights
    from ..database import Database

    ad = load_weights(args.adapt)
    target = Path(args.adapt_dir) if args.adapt_dir else default_adapted_dir(ad, Path(args.db[0]).parent)
    given = [*args.queries, *args.db]
    paths = adapted_database(ad, given, target, threads=args.threads, progress=True)
    nq = len(args.queries)
    return Database.of(paths[:nq]).stores, Database.of(paths[nq:])


def _search_codes(args, queries, db, keep, cluster=None):
    from ..index import search_codes

    if cluster is not None:
        from ..cluster import search_codes_on_cluster

        return search_codes_on_cluster(cluster, queries, db, args.codes, args.k, shortlist=args.shortlist,
                                       rerank=not args.no_rerank, keep=keep, tasks=args.cluster_tasks)

    if args.qe:
        from ..expand import search_codes_expanded

        return search_codes_expanded(queries, db, args.codes, args.k, n=args.qe, alpha=args.qe_alpha,
                                     shortlist=args.shortlist, rerank=not args.no_rerank, keep=keep,
                                     threads=args.threads, progress=True)
    return search_codes(queries, db, args.codes, args.k, shortlist=args.shortlist, rerank=not args.no_rerank,
                        keep=keep, threads=args.threads, progress=True)
