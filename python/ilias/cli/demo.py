"""`ilias demo`: the whole benchmark on a built-in, ILIAS-shaped dataset of generated images.

Builds once (cached) 1,000 drawn object instances with their image and text queries, positives in
cluttered scenes and webdataset tars of distractor images; extracts features with a handcrafted
numpy model (no download, no torch); tops the distractor store up to 1M rows sampled from the
distractor features; then runs the `ilias run` pipeline: one search pass for several database
sizes, the official evaluation of each, and report.html with thumbnails of the top results.
"""

from __future__ import annotations

import os
from pathlib import Path

from .options import NON_NEGATIVE, THREADS


def _default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ilias-core" / "demo"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the pipeline on built-in demo data", description=__doc__)
    p.add_argument("--out", type=Path, default=None, help=f"work folder (default {_default_dir()})")
    p.add_argument("--distractors", type=NON_NEGATIVE, default=1_000_000, help="distractor store rows (default 1,000,000)")
    p.add_argument(
        "--distractor-images", type=int, default=6000, help="distractor images rendered into the tars (default 6,000)"
    )
    p.add_argument(
        "--instances",
        type=int,
        default=1000,
        help="object instances (default 1,000; queries and positives scale with them)",
    )
    p.add_argument("--threads", type=THREADS, default=0, help="worker threads (default 0: all cores)")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..demo import DemoConfig
    from ..demo import run as run_demo

    n = args.instances
    if not 1 <= n <= 1000:
        raise ValueError(f"--instances: 1 to 1000, got {n}")
    # the real ratios: 1,232 image queries and 4,715 positives for 1,000 instances
    config = DemoConfig(
        instances=n,
        image_queries=n * 1232 // 1000,
        positives=n * 4715 // 1000,
        distractor_images=args.distractor_images,
        distractors=args.distractors,
    )
    out = args.out or _default_dir()
    record = run_demo(out, config, threads=args.threads)
    print()
    print(
        f"ILIAS-shaped demo ({n:,} generated instances, model {record['config']['model']}), "
        f"mAP@1k in percent, in {record['seconds']:.0f}s"
    )
    print(f"{'database':<10}{'rows':>12}{'image-to-image':>16}{'text-to-image':>15}")
    for name, r in record["results"].items():
        print(f"{name:<10}{r['rows']:>12,}{r.get('i2i', float('nan')):>16.2f}{r.get('t2i', float('nan')):>15.2f}")
    for label, found in record.get("variants", {}).items():
        for name, r in found.items():
            base = record["results"][name]
            print(f"{name:<10}{r['rows']:>12,}{r['i2i']:>16.2f}{'':>15}  {label} (global {base['i2i']:.2f})")
    print(f"report: {out}/report.html (per-tier Markdown and JSON beside it; the data in {out}/ILIAS)")
    return 0
