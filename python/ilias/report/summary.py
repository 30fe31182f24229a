"""An evaluation as one JSON-able dict (everything, with the configuration that produced it), and
the Markdown summary rendered from that dict, so that the two can never disagree."""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from .._io import atomic_write
from ..evaluate import TASKS, Evaluation
from .published import SETTING_ROWS, SETTINGS, VARIANT_NOTE, infer_setting, place, size_matches

REPORT_FORMAT, REPORT_VERSION = "ilias-evaluation", 1


def build_report(ev: Evaluation, setting: str | None = None, config: dict | None = None) -> dict:
    """`setting` ("mini" / "full") picks the published numbers to compare with; by default it is
    read from the database size when the results record it. `config` is added as given (CLI args)."""
    from .. import __version__

    notes = list(ev.warnings)
    # results that know their setting (a mini-ILIAS tier; "" for a tier that is neither) say so
    inferred = ev.setting if ev.setting is not None else infer_setting(ev.database_rows)
    if setting is not None and setting not in SETTINGS:
        raise ValueError(f"setting: {setting!r} is not one of {', '.join(SETTINGS)}")
    setting = setting or inferred or None
    if setting and ev.database_rows is not None and not size_matches(setting, ev.database_rows):
        # a wrong placement looks as plausible as a right one: none at all
        msg = (f"not placed among the published {SETTINGS[setting][1]} results: the database searched has "
               f"{ev.database_rows:,} rows, not about {SETTING_ROWS[setting]:,}")
        notes.append(msg)
        warnings.warn(msg, stacklevel=2)
        setting = None
    tasks = {}
    variant = getattr(ev, "variant", "")
    for name, t in ev.tasks.items():
        placement = place(t.map, name, setting) if setting else None
        text = placement.describe() + (f"; {VARIANT_NOTE}" if variant else "") if placement else None
        tasks[name] = {
            "name": TASKS[name],
            "queries": len(t.query_ids),
            "missing": t.missing,
            "map": t.map,
            "oracle": t.oracle_mean,
            "placement": vars(placement) | {"text": text} if placement else None,
            "categories": t.categories,
            "subcategories": t.subcategories,
            "scale": t.scale,
            "clutter": t.clutter,
            "per_query": {"ids": t.query_ids, "ap": t.ap.tolist(), "oracle": t.oracle.tolist()},
        }
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "config": {
            "results": ev.source,
            "ground_truth": ev.ground_truth,
            "k": ev.k,
            "results_k": ev.results_k,
            "database_rows": ev.database_rows,
            "setting": setting,
            "variant": variant,  # "" for the plain global search, else e.g. "adapt", "adapt + QE 2"
            "ilias_core": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **(config or {}),
        },
        "warnings": notes,
        "tasks": tasks,
    }


def to_markdown(report: dict) -> str:
    cfg = report["config"]
    k = cfg["k"]
    setting = SETTINGS[cfg["setting"]][1] if cfg.get("setting") else "setting unknown"
    variant = f" ({cfg['variant']})" if cfg.get("variant") else ""
    out = [
        f"# ILIAS evaluation: `{cfg['results']}`{variant}",
        "",
        f"mAP@{k} (percent, official semantics) · {setting} · ground truth `{cfg['ground_truth']}` · "
        f"ilias-core {cfg['ilias_core']}",
        "",
        f"| task | queries | mAP@{k} | oracle | published placement |",
        "|---|---:|---:|---:|---|",
    ]
    for t in report["tasks"].values():
        placed = t["placement"]["text"] if t["placement"] else "-"
        missing = f" ({t['missing']:,} missing)" if t["missing"] else ""
        out.append(f"| {t['name']} | {t['queries']:,}{missing} | {t['map']:.2f} | {t['oracle']:.2f} | {placed} |")
    for t in report["tasks"].values():
        for key, title in (("categories", "category"), ("subcategories", "subcategory"),
                           ("scale", "scale group"), ("clutter", "clutter group")):
            if t[key]:
                out += ["", f"### {t['name']}: mAP per {title}", "", f"| {title} | mAP |", "|---|---:|"]
                out += [f"| {name} | {value:.2f} |" for name, value in t[key].items()]
    if report["warnings"]:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(out) + "\n"


def write_json(report: dict, path: str | os.PathLike) -> Path:
    atomic_write(path, json.dumps(report, indent=1))
    return Path(path)


def write_markdown(report: dict, path: str | os.PathLike) -> Path:
    atomic_write(path, to_markdown(report))
    return Path(path)
