"""The ILIAS ground truth: queries, positives, their scale and clutter, and the category tree.

Read from the dataset's `image_ids/*.txt` (queries, and positives with their scale and clutter
values) and `taxonomy.json` (coarse -> mid -> fine -> instances); without the id files, from the
`ilias_core/<instance>/{query,pos}/` folders. Also the plain id lists (`read_id_list`: the
mini-ILIAS keys, distractor lists) that extraction, search and the demo select items with.
"""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping

import numpy as np

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def instance_of(item_id: str) -> str:
    return item_id.split("/", 1)[0]


@dataclass(frozen=True)
class GroundTruth:
    """Queries, positives and categories of ILIAS. `scale` / `clutter` are per positive (None when
    the data came from image folders, which do not hold them); `taxonomy` maps an instance to
    (coarse, mid) (None without taxonomy.json)."""

    image_queries: tuple[str, ...]
    text_queries: tuple[str, ...]
    positives: tuple[str, ...]
    scale: np.ndarray | None = None
    clutter: np.ndarray | None = None
    taxonomy: Mapping[str, tuple[str, str]] | None = None
    source: str = ""

    @cached_property
    def positive_index(self) -> dict[str, int]:
        return {p: i for i, p in enumerate(self.positives)}

    @cached_property
    def text_query_set(self) -> frozenset[str]:
        return frozenset(self.text_queries)

    @cached_property
    def query_set(self) -> frozenset[str]:
        return frozenset(self.image_queries) | self.text_query_set

    def task_of(self, query_id: str) -> str:
        return "t2i" if query_id in self.text_query_set or query_id.endswith(".txt") else "i2i"

    def queries(self, task: str) -> tuple[str, ...]:
        return self.text_queries if task == "t2i" else self.image_queries


def load_ground_truth(root: str | os.PathLike) -> GroundTruth:
    """Reads `root/image_ids/*.txt` and `root/taxonomy.json`; without the id files, lists the
    `ilias_core/` image folders (`root/ilias_core`, or `root` itself)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"--gt {root}: no such directory")
    ids = root / "image_ids"
    if (ids / "positive_ids.txt").exists():
        image_q = [line.split(",")[0].strip() for line in _lines(ids / "image_query_ids.txt")]
        text_q = [line.strip() for line in _lines(ids / "text_query_ids.txt")]
        rows = [line.rsplit(",", 2) for line in _lines(ids / "positive_ids.txt")]
        if any(len(r) != 3 for r in rows):
            raise ValueError(f"{ids / 'positive_ids.txt'}: expected 'id,scale,clutter' on every line")
        positives = [r[0].strip() for r in rows]
        try:
            scale = np.array([float(r[1]) for r in rows])
            clutter = np.array([int(r[2]) for r in rows], dtype=np.float64)
        except ValueError as e:
            raise ValueError(f"{ids / 'positive_ids.txt'}: bad scale or clutter value ({e})") from None
        source = str(ids)
    else:
        core = root / "ilias_core" if (root / "ilias_core").is_dir() else root
        image_q, text_q, positives = _scan_core(core)
        if not positives:
            raise FileNotFoundError(
                f"--gt {root}: neither image_ids/positive_ids.txt nor ilias_core/<instance>/pos/ images found"
            )
        scale = clutter = None
        source = str(core)
    for name, lst in (("image queries", image_q), ("text queries", text_q), ("positives", positives)):
        check_unique(lst, f"{source}: {name}")
    return GroundTruth(
        image_queries=tuple(sorted(image_q)),
        text_queries=tuple(sorted(text_q)),
        positives=tuple(positives),
        scale=scale,
        clutter=clutter,
        taxonomy=_load_taxonomy(root),
        source=source,
    )


def read_id_list(path: str | Path) -> list[str]:
    """Ids from a text file (optionally .gz): the first comma-separated column of each line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such id list")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        ids = [line.split(",", 1)[0].strip() for line in f]
    return [i for i in ids if i]


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing (needed next to positive_ids.txt)")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _scan_core(core: Path) -> tuple[list[str], list[str], list[str]]:
    image_q, text_q, positives = [], [], []
    for inst in sorted(p for p in core.iterdir() if p.is_dir()):
        for f in sorted((inst / "query").glob("*")):
            item = f"{inst.name}/query/{f.name}"
            if f.name.startswith("Q") and f.suffix.lower() in IMAGE_SUFFIXES:
                image_q.append(item)
            elif f.name.startswith("T") and f.suffix == ".txt":
                text_q.append(item)
        positives += [
            f"{inst.name}/pos/{f.name}"
            for f in sorted((inst / "pos").glob("P*"))
            if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    return image_q, text_q, positives


def _load_taxonomy(root: Path) -> dict[str, tuple[str, str]] | None:
    for path in (root / "taxonomy.json", root / "misc" / "taxonomy.json"):
        if path.exists():
            try:
                tree = json.loads(path.read_text(encoding="utf-8"))
                return {
                    inst: (coarse, mid)
                    for coarse, mids in tree.items()
                    for mid, fines in mids.items()
                    for insts in fines.values()
                    for inst in insts
                }
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}: not a {{coarse: {{mid: {{fine: [instances]}}}}}} tree ({e})") from None
    return None


def check_unique(items, what: str) -> None:
    items = list(items)
    if len(set(items)) == len(items):  # the common case, at C speed
        return
    seen: set = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{what}: duplicate id {item!r}")
        seen.add(item)
