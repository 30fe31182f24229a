"""`ilias run --model NAME --data ILIAS_DIR --out WORKDIR`: the whole benchmark for one model.

Extracts what is missing (image queries, positives, text queries, distractors from --tars),
searches image and text queries in one pass answering every database size (positives + 1M, 10M,
mini-ILIAS, all), evaluates, and writes report.html, per-tier JSON/Markdown reports and run.json.
With --rerank, the image queries' lists are re-ranked too (AMES, or SIFT without weights; `ilias
rerank --help`), describing only the queries and shortlisted images. Each step is resumable and
skipped when its output is current: run the same command again after
an interruption.
"""

from __future__ import annotations

from .options import POSITIVE, THREADS, K, whole


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole benchmark for one model, resumable", description=__doc__)
    p.add_argument("--model", required=True, help="a model of `ilias models`")
    p.add_argument("--data", required=True, metavar="ILIAS_DIR", help="folder with ilias_core/, image_ids/, taxonomy.json")
    p.add_argument("--out", required=True, metavar="WORKDIR", help="work folder (stores, results, reports)")
    p.add_argument("--tars", nargs="+", help="distractor webdataset tars (or folders of them); none: positives only")
    p.add_argument("--distractors", default="full", help="full, mini (the mini-ILIAS list) or a number (default full)")
    p.add_argument("-k", type=K, default=1000, help="neighbours per query (default 1000)")
    p.add_argument("--weights", help="image tower weights file (offline use)")
    p.add_argument("--text-weights", help="text tower weights file (offline use)")
    p.add_argument("--text-tower", metavar="LABEL",
                   help="which text tower where a model has several (`ilias models -v`; default: published)")
    p.add_argument("--random-init", action="store_true", help="random weights (testing the pipeline only)")
    p.add_argument("--device", help="torch device (default: cuda when available)")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--workers", type=whole(0, 1024), default=4, help="image decoding workers")
    p.add_argument("--threads", type=THREADS, default=0, help="search and evaluation threads (default 0: all cores)")
    from .search import add_variant_options

    add_variant_options(p)  # --adapt W.pth, --qe N, --qe-alpha A: their results as their own report rows
    from .rerank import add_method_options

    add_method_options(p, in_run=True)  # --rerank ames|sift, --rerank-weights, --rerank-top, ...: a re-ranked report row
    from .cluster_args import add_cluster_options

    add_cluster_options(p)  # extraction (a task per tar) and the search (ranges of shards) as Dask tasks
    p.set_defaults(run=run)


def run(args) -> int:
    from ..pipeline import RunConfig
    from ..pipeline import run as run_pipeline

    cfg = RunConfig(
        model=args.model, data=args.data, out=args.out, tars=args.tars, distractors=args.distractors, k=args.k,
        random_init=args.random_init, weights=args.weights, text_weights=args.text_weights, text_tower=args.text_tower, device=args.device,
        batch_size=args.batch_size, workers=args.workers, threads=args.threads,
        adapt=args.adapt, qe=args.qe, qe_alpha=args.qe_alpha,
    )
    if args.rerank_tiers and not args.method:
        raise ValueError("--rerank-tiers: only with --rerank ames|sift")
    if args.method:
        from .rerank import config_of

        cfg.rerank = config_of(args)
        cfg.rerank.check()
        cfg.rerank_tiers = tuple(args.rerank_tiers) if args.rerank_tiers else None
        if cfg.rerank.top > args.k:
            raise ValueError(f"--rerank-top: at most -k ({args.k}), got {cfg.rerank.top}")
    if args.qe is None and args.qe_alpha != 1.0:
        raise ValueError("--qe-alpha: only with --qe N")
    from .cluster_args import cluster_options

    cluster = cluster_options(args, gpu=None if args.device is None else args.device.startswith("cuda"))
    record = run_pipeline(cfg, cluster=cluster)
    print(f"{'database':<12}{'rows':>14}{'image-to-image':>16}{'text-to-image':>15}")
    rows = [(name, r) for name, r in record["results"].items()]
    rows += [(f"{name} + {variant}", r) for variant, found in record.get("variants", {}).items() for name, r in found.items()]
    for name, r in rows:
        print(f"{name:<12}{r['rows']:>14,}{r.get('i2i', float('nan')):>16.2f}{r.get('t2i', float('nan')):>15.2f}")
    print(f"report: {args.out}/report.html; run record: {args.out}/run.json")
    return 0
