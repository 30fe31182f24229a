"""`ilias rerank RESULTS --locals DIR --method ames|sift --out OUT`: re-rank the first M of each list.

    ilias locals extract results.all.npz --data ILIAS/ --tars distractors/ --locals locals/ --method ames \\
        --weights dinov2_ames_dist.pt --detector dinov2_detector.pt      # GPU: queries + the top 100 of each list
    ilias rerank results.all.npz --locals locals/ --method ames --weights dinov2_ames_dist.pt --out reranked.npz
    ilias evaluate reranked.npz --gt ILIAS/

    ilias rerank results.+1k.npz --method sift --data ILIAS/ --tars distractors/ --locals locals-sift/ --out r.npz

The image queries' lists are re-ranked (text queries are written unchanged): the first --top get
`lambda * global + (1 - lambda) * sigmoid(gamma * s)` with s the re-ranker's raw score (AMES: its
logit; sift: RANSAC inliers), the rest keeps its order below them. OUT's suffix chooses its format
(.npz, or the official .json / .pkl), so `ilias evaluate` and the reports read it.

The locals folder holds two stores, `queries/` and `db/`. With --data (and --tars), images they do
not hold yet are described first (only those: a rerun after an interruption, or a deeper --top,
adds the rest); without it, a missing image is an error that says how many are missing.

Methods: `ames`, the published AMES model (`--weights`: its checkpoint, the binary `dist` or the
full-precision one; `--detector`: the AMES detector for DINOv2 ViT-B/14 with registers, whose
pretrained weights are downloaded once or given with --backbone-weights); `sift`, a verifier that
needs no learned weights (OpenCV SIFT with colour, RANSAC; pip install 'ilias-core[sift]').
"""

from __future__ import annotations

import argparse
import os

from .options import POSITIVE, THREADS, number, whole


def add_method_options(p, in_run: bool = False) -> None:
    """The re-ranker's options, shared by `ilias locals extract`, `ilias rerank` and `ilias run`
    (where they are prefixed: `--rerank METHOD`, `--rerank-weights`, `--rerank-top`, ...)."""
    pre = "rerank-" if in_run else ""
    if in_run:
        p.add_argument("--rerank", dest="method", choices=["ames", "sift"],
                       help="also re-rank the image queries' lists: ames (published checkpoints) or sift (no weights)")
        p.add_argument("--rerank-tiers", nargs="+", metavar="TIER", help="the tiers re-ranked (default: all of the run's)")
    else:
        p.add_argument("--method", choices=["ames", "sift"], default="ames",
                       help="re-ranker: ames (published checkpoints) or sift (no weights) (default ames)")
    p.add_argument(f"--{pre}weights", dest="ames_weights", metavar="AMES.pt",
                   help="AMES checkpoint (weights under 'state'; binary or full precision)")
    p.add_argument(f"--{pre}detector", dest="detector", metavar="DETECTOR.pt",
                   help="AMES detector checkpoint (default: none, tokens weighted by their norm)")
    p.add_argument(f"--{pre}backbone-weights", dest="backbone_weights", metavar="W",
                   help="local DINOv2 ViT-B/14 (registers) weights (offline use)")
    p.add_argument(f"--{pre}imsize", dest="imsize", type=whole(14), help="longer side of the described images (AMES; default 768)")
    p.add_argument(f"--{pre}top", dest="top", type=POSITIVE, default=100, help="entries re-ranked per list (default 100)")
    p.add_argument(f"--{pre}query-tokens", dest="query_tokens", type=POSITIVE, help="query tokens read (AMES default 600)")
    p.add_argument(f"--{pre}db-tokens", dest="db_tokens", type=POSITIVE, help="database tokens read (AMES default 50)")
    p.add_argument(f"--{pre}lambda", dest="lam", type=number(0), help="weight of the global score (default: the method's own)")
    p.add_argument(f"--{pre}gamma", dest="gamma", type=number(0), help="temperature of the local score (default: the method's own)")
    if not in_run:
        p.add_argument("--random-init", action="store_true", help="random AMES and backbone weights (testing only)")
        p.add_argument("--device", help="torch device (default: cuda when available)")
        p.add_argument("--threads", type=THREADS, default=4,
                       help="threads decoding images and running the verifier (default 4; 0: all cores)")


def config_of(args):
    from ..rerank.workflow import RerankConfig

    return RerankConfig(
        method=args.method, weights=args.ames_weights, detector=args.detector, backbone_weights=args.backbone_weights,
        imsize=args.imsize, top=args.top, query_tokens=args.query_tokens, db_tokens=args.db_tokens, lam=args.lam,
        gamma=args.gamma, random_init=getattr(args, "random_init", False), device=args.device, threads=args.threads or os.cpu_count() or 1,
    )


def add_parser(sub) -> None:
    p = sub.add_parser("rerank", help="re-rank results with local descriptors (AMES, or SIFT without weights)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", metavar="RESULTS", help="a results file of `ilias search` / `ilias run` (.npz)")
    p.add_argument("--locals", required=True, metavar="DIR", help="locals folder (queries/ and db/ stores)")
    p.add_argument("--out", required=True, metavar="OUT", help="re-ranked results (.npz, .json or .pkl)")
    p.add_argument("--data", metavar="ILIAS_DIR", help="describe missing images from this ILIAS folder (its ilias_core/)")
    p.add_argument("--tars", nargs="+", help="distractor tars (or folders of them) to describe missing images from")
    add_method_options(p)
    p.set_defaults(run=run)


def source_of(args):
    from ..rerank.images import ImageSource

    if args.data is None and not args.tars:
        return None
    return ImageSource(args.data, args.tars or ())


def load_results(path: str):
    from ..results import SearchResults

    if not path.endswith(".npz"):
        raise ValueError(f"{path}: re-ranking reads our .npz results (they carry the database row ids)")
    return SearchResults.load(path)


def run(args) -> int:
    import time

    from ..rerank.extract import image_query_rows
    from ..rerank.workflow import rerank_results
    from ..results import check_output

    cfg = config_of(args)
    cfg.check()
    res = load_results(args.results)
    check_output([args.out], None, 0)
    t0 = time.monotonic()
    [out] = rerank_results(cfg, [res], args.locals, source_of(args))
    out.write(args.out)
    print(f"re-ranked the first {args.top} of {len(image_query_rows(res)):,} image queries' lists ({out.reranking}) in "
          f"{time.monotonic() - t0:.1f}s: {args.out}")
    return 0
