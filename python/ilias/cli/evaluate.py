"""`ilias evaluate RESULTS --gt ILIAS_DIR`: official mAP@k of a results file, with reports.

RESULTS is a results file of `ilias search` (.npz) or an official similarity file (.json, .pkl).
ILIAS_DIR holds image_ids/ and taxonomy.json (or, without image_ids/, the ilias_core/ folders).
"""

from __future__ import annotations

import sys
import time
import warnings

from .options import THREADS, K


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="mAP@k of a results file, with category/scale/clutter reports", description=__doc__)
    p.add_argument("results", metavar="RESULTS", help="results file: .npz (ours), .json or .pkl (official)")
    p.add_argument("--gt", required=True, metavar="ILIAS_DIR", help="dataset folder with image_ids/ and taxonomy.json")
    p.add_argument("--k", type=K, default=1000, help="evaluate the top k of each list (default 1000)")
    p.add_argument("--json", metavar="OUT", help="write the full report (per query, per group, config) as JSON")
    p.add_argument("--md", metavar="OUT", help="write a Markdown summary")
    p.add_argument("--setting", choices=["mini", "full"], help="published numbers to compare with (default: from the database size)")
    p.add_argument("--threads", type=THREADS, default=0, help="worker threads (default 0: all cores)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..evaluate import evaluate, load_ground_truth, read_results
    from ..report import build_report, write_json, write_markdown

    t0 = time.monotonic()
    gt = load_ground_truth(args.gt)
    _say(f"ground truth: {len(gt.image_queries):,} image + {len(gt.text_queries):,} text queries, "
         f"{len(gt.positives):,} positives ({gt.source})")
    _say(f"reading {args.results} ...")
    with warnings.catch_warnings():
        warnings.showwarning = _warn  # one plain line per warning, not the source line that raised it
        lists = read_results(args.results, gt)
        ev = evaluate(lists, gt, args.k, threads=args.threads, progress=True)
        report = build_report(ev, setting=args.setting, config={"argv": sys.argv[1:]})
    for t in report["tasks"].values():
        line = f"{t['name']}: mAP@{args.k} {t['map']:.2f}  oracle {t['oracle']:.2f}  ({t['queries']:,} queries)"
        print(line + (f"  {t['placement']['text']}" if t["placement"] else ""))
    for path, write in ((args.json, write_json), (args.md, write_markdown)):
        if path:
            print(f"wrote {write(report, path)}")
    _say(f"done in {time.monotonic() - t0:.1f}s")
    return 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def _warn(message, *_args, **_kwargs) -> None:
    _say(f"ilias evaluate: warning: {message}")
