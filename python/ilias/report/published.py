"""The published mAP@1k of the ILIAS models (data/seed_results.tsv), and where a new result sits
among them for the same task and setting."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

# setting -> (column of the table, words for people)
SETTINGS = {"mini": ("map_5M", "mini-ILIAS, 5M distractors"), "full": ("map_100M", "ILIAS, 100M distractors")}
# the database of each setting: the 4,715 positives and 5M or 100M distractors; a database within
# 1% of it counts (extraction skips the few unreadable images), any other size is neither setting
SETTING_ROWS = {"mini": 5_004_715, "full": 100_004_715}
SETTING_TOLERANCE = 0.01


@lru_cache(maxsize=None)
def _table() -> tuple[dict, ...]:
    text = resources.files("ilias").joinpath("data", "seed_results.tsv").read_text(encoding="utf-8")
    rows = [line for line in io.StringIO(text) if not line.startswith("#")]
    return tuple(csv.DictReader(rows, delimiter="\t"))


def published(task: str, setting: str) -> list[tuple[str, float]]:
    """(checkpoint, mAP) of the published models, best first. The t2i rows whose single score
    sits in the unlabelled third column are left out: their setting is not stated. The third
    column is never compared with: it is not clearly the adapted one, so adapted or expanded
    results are placed among these frozen-model columns, and say so (`VARIANT_NOTE`)."""
    column = SETTINGS[setting][0]
    found = [(r["checkpoint"], float(r[column])) for r in _table() if r["task"] == task and r[column].strip()]
    return sorted(found, key=lambda x: -x[1])


@dataclass(frozen=True)
class Placement:
    task: str
    setting: str
    rank: int  # 1 + the number of published models strictly better
    of: int  # published models compared with, plus this one
    above: tuple[str, float] | None  # the nearest published model ranked above
    below: tuple[str, float] | None  # the nearest published model at or below
    column: str = ""  # the column of the published table compared with (map_5M, map_100M; never map_third)

    def describe(self) -> str:
        parts = [f"rank {self.rank} of {self.of} ({SETTINGS[self.setting][1]}; published column {self.column})"]
        for word, near in (("next above", self.above), ("next below", self.below)):
            if near:
                parts.append(f"{word}: {near[0]} {near[1]:.1f}")
        return "; ".join(parts)


# what a placement of an adapted or expanded result (report rows "+ adapt", "+ QE N") says
VARIANT_NOTE = ("compared with the published frozen-feature numbers (no adaptation, no query expansion); the page's "
                "third, unlabelled column is not used")


def place(map_value: float, task: str, setting: str) -> Placement | None:
    """Rank among published results. They are rounded to one decimal, so ours is compared rounded
    too: a model published as 15.0 is not beaten by 15.04."""
    table = published(task, setting)
    if not table:
        return None
    ours = round(map_value, 1)
    above = [m for m in table if m[1] > ours]
    below = [m for m in table if m[1] <= ours]
    return Placement(task, setting, len(above) + 1, len(table) + 1, above[-1] if above else None,
                     below[0] if below else None, SETTINGS[setting][0])


def size_matches(setting: str, database_rows: int) -> bool:
    """Whether a database of `database_rows` rows is the size of `setting`'s."""
    return abs(database_rows - SETTING_ROWS[setting]) <= SETTING_TOLERANCE * SETTING_ROWS[setting]


def infer_setting(database_rows: int | None) -> str | None:
    """The setting a database of this size is (None: neither, or size unknown)."""
    if database_rows is None:
        return None
    return next((s for s in SETTING_ROWS if size_matches(s, database_rows)), None)
