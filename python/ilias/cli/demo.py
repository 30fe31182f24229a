"""`ilias demo`: the whole pipeline on a built-in, ILIAS-shaped benchmark, no download needed.

Builds the demo data once (cached), searches the 2,232 image and text queries in one pass
against several database sizes (growing prefixes, the mini subset, everything), evaluates each
with the official semantics and writes the reports and the mAP-versus-distractors curve.
"""

from __future__ import annotations

import os
from pathlib import Path


def _default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ilias-core" / "demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the pipeline on built-in demo data", description=__doc__)
    p.add_argument("--out", type=Path, default=None, help=f"work folder (default {_default_dir()})")
    p.add_argument("--distractors", type=int, default=1_000_000, help="distractor vectors (default 1,000,000)")
    p.add_argument("--threads", type=int, default=0, help="worker threads (default 0: all cores)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import DemoConfig
    from ..demo import run as run_demo

    if args.distractors < 1000:
        raise ValueError(f"--distractors: at least 1000, got {args.distractors}")
    out = args.out or _default_dir()
    summary = run_demo(out, DemoConfig(distractors=args.distractors), threads=args.threads)
    print()
    print(f"ILIAS-shaped demo (synthetic embeddings), mAP@1k in percent, in {summary['seconds']:.0f}s")
    print(f"{'database':<10}{'rows':>12}{'image-to-image':>16}{'text-to-image':>15}")
    for c in summary["curve"]:
        print(f"{c['name']:<10}{c['rows']:>12,}{c.get('i2i', float('nan')):>16.2f}{c.get('t2i', float('nan')):>15.2f}")
    print(f"report: {out}/report.html (Markdown and JSON per setting beside it)")
    return 0
