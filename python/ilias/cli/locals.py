"""`ilias locals extract|info`: local-descriptor stores for re-ranking.

    ilias locals extract results.all.npz --data ILIAS/ --tars distractors/ --locals locals/ \\
        --method ames --weights dinov2_ames_dist.pt --detector dinov2_detector.pt [--top 100]
    ilias locals info locals/db

extract describes the image queries of RESULTS (inside their boxes) into LOCALS/queries and the
first --top images of each of their lists into LOCALS/db: only those, read out of the distractor
tars by key through a member index built once per tar. Images a store already holds are skipped,
so an interrupted run, rerun, goes on where it stopped (its last complete shard) and a deeper
--top adds only the new images. The store's variant follows the AMES checkpoint: binary (the
checkpoint's ITQ projection, 16 bytes a token) or float16. Several RESULTS files: the union.
"""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from .rerank import add_method_options

    p = sub.add_parser("locals", help="local-descriptor stores for re-ranking", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    e = actions.add_parser("extract", help="describe the queries and shortlisted images of results files")
    e.add_argument("results", nargs="+", metavar="RESULTS", help="results files (.npz) whose shortlists to describe")
    e.add_argument("--data", required=True, metavar="ILIAS_DIR", help="the ILIAS folder (its ilias_core/)")
    e.add_argument("--tars", nargs="+", help="the distractor tars (or folders of them)")
    e.add_argument("--locals", required=True, metavar="DIR", help="locals folder (queries/ and db/ stores)")
    add_method_options(e)
    e.set_defaults(run=run_extract)
    i = actions.add_parser("info", help="what a locals store holds")
    i.add_argument("store", metavar="STORE")
    i.set_defaults(run=run_info)


def run_extract(args) -> int:
    import time

    from ..rerank.workflow import Method, ensure_locals
    from .rerank import config_of, load_results, source_of

    results = [load_results(r) for r in args.results]
    t0 = time.monotonic()
    q, d = ensure_locals(Method(config_of(args)), results, args.locals, source_of(args))
    print(f"{q.path}: {q.count:,} queries; {d.path}: {d.count:,} database images ({time.monotonic() - t0:.1f}s)")
    return 0


def run_info(args) -> int:
    from ..rerank.locals_store import LocalsStore

    s = LocalsStore.open(args.store)
    m = s.manifest
    per_image = s.tokens * 20 + s.tokens * (s.dim // 8 if s.variant == "binary" else 2 * s.dim)
    print(f"{s.path}: {s.count:,} images, model {m.model}, {s.tokens} tokens x {s.dim} ({s.variant}), "
          f"{per_image / 1024:.1f} KiB per image, {s.num_shards} shard(s)")
    for key, value in m.provenance.items():
        print(f"  {key}: {value}")
    return 0
