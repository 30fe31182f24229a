"""The official mAP@k evaluation of ILIAS, with its detailed reports.

The numbers are the reference evaluator's (see ILIAS_SPEC.md, "Evaluation: AP@k exactly"); the
Rust core computes every AP. To get there, each results source (our .npz, the official JSON or
pickle) is first turned into one matrix form: per query, the scores in rank order and, per item,
which positive it is (or none). Every report is then a choice of labels over that one matrix:
the scale and clutter groups only mark the query's positives outside the group as not listed.

Anything that would make the number differ from an official one without saying so (unknown or
duplicate ids, NaN scores, a results k below the evaluation k, core ids this ground truth does
not know) is an error; a subset of the queries is a warning that gives the count.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from statistics import fmean

import numpy as np

from . import _core
from .groundtruth import GroundTruth, check_unique, instance_of, load_ground_truth
from .progress import Progress
from .results import OFFICIAL_PICKLE_KEYS, SearchResults, read_results_file

# [lo, hi) bounds of the reference; ints stay ints so that keys read "0-18" and "53-inf" as there
SCALE_GROUPS = [
    (0, 0.06880213760855043),
    (0.06880213760855043, 0.13526567164179104),
    (0.13526567164179104, 0.2729876723163842),
    (0.2729876723163842, float("inf")),
]
CLUTTER_GROUPS = [(0, 18), (18, 33), (33, 53), (53, float("inf"))]
TASKS = {"i2i": "image-to-image", "t2i": "text-to-image"}

# the labels of the Rust core (metrics.rs): NEGATIVE, POSITIVE, SKIP for AP; NOT_POSITIVE and
# EMPTY as codes in RankedLists.positive besides a positive's index
NEGATIVE, POSITIVE, SKIP, NOT_POSITIVE, EMPTY = _core.NEGATIVE, _core.POSITIVE, _core.SKIP, _core.NOT_POSITIVE, _core.EMPTY


# ---------------------------------------------------------------- results in one form


@dataclass
class RankedLists:
    """Results of any source, as the evaluation needs them. `positive[q, j]` is the index (in
    `gt.positives`) of the j-th returned item, NOT_POSITIVE, or EMPTY for a slot with no item."""

    query_ids: list[str]
    scores: np.ndarray  # float64 (nq, L), rank order
    positive: np.ndarray  # int32 (nq, L)
    k: int  # the k the results were made with
    source: str
    database_rows: int | None = None  # database size, when the source records it
    setting: str | None = None  # the published setting the results answer (mini, full), "" for none
    warnings: list[str] = field(default_factory=list)  # about the data the results came from
    variant: str = ""  # what was added to the plain search ("adapt", "QE 2"; SearchResults.variant)


def read_results(results, gt: GroundTruth) -> RankedLists:
    """A SearchResults, a path (.npz ours, .json / .pkl official) or an official dict."""
    if isinstance(results, RankedLists):
        return results
    source = None
    if isinstance(results, (str, os.PathLike)):
        source = str(results)
        results = read_results_file(results)
    if isinstance(results, SearchResults):
        return _from_search_results(results, gt, source or "<SearchResults>")
    if isinstance(results, dict) and OFFICIAL_PICKLE_KEYS <= results.keys():
        return _from_official_pickle(results, gt, source or "<pickle dict>")
    if isinstance(results, dict):
        return _from_official_json(results, gt, source or "<json dict>")
    raise TypeError(f"results: cannot evaluate a {type(results).__name__}")


def _from_search_results(r: SearchResults, gt: GroundTruth, source: str) -> RankedLists:
    rows, ids = r.returned_rows()
    code = _positive_codes(ids, gt, source)
    idx = r.indices
    valid = idx >= 0
    positive = np.full(idx.shape, EMPTY, dtype=np.int32)
    positive[valid] = code[np.searchsorted(rows, idx[valid])]
    _no_duplicate_items(np.where(valid, idx, -1), r.query_ids, source)
    return RankedLists(
        list(r.query_ids),
        r.scores.astype(np.float64),
        positive,
        r.k,
        source,
        # a tier of a one-pass search answers a part of the database: its own size counts
        r.tier_rows or None,
        r.setting,
        list(r.warnings),
        r.variant,
    )


def _from_official_pickle(d: dict, gt: GroundTruth, source: str) -> RankedLists:
    sims, ranks = np.asarray(d["sims"]), np.asarray(d["ranks"])
    qids = [str(q) for q in d["query_ids"]]
    if sims.ndim != 2 or sims.shape != ranks.shape or len(qids) != len(sims):
        raise ValueError(f"{source}: sims {sims.shape}, ranks {ranks.shape} and {len(qids)} query ids disagree")
    db_ids = np.asarray(d["db_ids"], dtype=object)
    if db_ids.ndim != 1:
        raise ValueError(f"{source}: db_ids should be a flat list of ids, got shape {db_ids.shape}")
    if ranks.size and (ranks.max() >= len(db_ids) or ranks.min() < -1):
        raise ValueError(f"{source}: ranks point outside db_ids ({len(db_ids)} ids)")
    # db_ids may be the whole database: only the ids that some list uses are read (in Rust)
    positive, foreign, first, duplicate = _core.label_official(
        db_ids, np.ascontiguousarray(ranks, dtype=np.int64), list(gt.positives)
    )
    _check_foreign(foreign, first, gt, source)
    if duplicate:
        row, repeats = duplicate
        raise ValueError(f"{source}: query {qids[row]!r} lists the same database item twice ({repeats} repeats in all)")
    return RankedLists(qids, sims.astype(np.float64), positive, sims.shape[1], source)


def _from_official_json(d: dict, gt: GroundTruth, source: str) -> RankedLists:
    qids = list(d)
    width = max((len(v) for v in d.values()), default=0)
    scores = np.full((len(qids), width), -np.inf)
    positive = np.full((len(qids), width), EMPTY, dtype=np.int32)
    for row, q in enumerate(qids):
        items = d[q]
        if not isinstance(items, dict):
            raise ValueError(f"{source}: query {q!r}: expected {{db_id: similarity}}, got {type(items).__name__}")
        scores[row, : len(items)] = np.fromiter(items.values(), dtype=np.float64, count=len(items))
        positive[row, : len(items)] = _positive_codes(list(items), gt, source)
    # dict keys cannot repeat, so there is no duplicate check here (read_results_file checks a file's repeated keys)
    return RankedLists(qids, scores, positive, width, source)


def _positive_codes(ids, gt: GroundTruth, source: str) -> np.ndarray:
    """Index of each id (str or UTF-8 bytes) among the positives, or NOT_POSITIVE, looked up in
    Rust. A core-style id that this ground truth lacks means another ILIAS version or dataset:
    counting it as a negative would be wrong."""
    code, foreign, first = _core.positive_codes(ids, list(gt.positives))
    _check_foreign(foreign, first, gt, source)
    return code


def _check_foreign(foreign: int, first: str | None, gt: GroundTruth, source: str) -> None:
    if foreign:
        raise ValueError(
            f"{source}: {foreign} returned id(s) look like ILIAS positives but are not in the ground truth "
            f"({gt.source}), e.g. {first!r}: results from another dataset or version?"
        )


def _no_duplicate_items(items: np.ndarray, qids: list[str], source: str) -> None:
    s = np.sort(items, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
        q = int(np.flatnonzero(dup.any(axis=1))[0])
        raise ValueError(f"{source}: query {qids[q]!r} lists the same database item twice ({int(dup.sum())} repeats in all)")


# ---------------------------------------------------------------- evaluation


@dataclass
class TaskResult:
    """One task (i2i or t2i). AP and oracle per query in percent, like the reference."""

    task: str
    query_ids: list[str]
    ap: np.ndarray
    oracle: np.ndarray
    missing: int  # queries of this task in the ground truth but not in the results
    categories: dict[str, float] | None = None
    subcategories: dict[str, float] | None = None
    scale: dict[str, float] | None = None
    clutter: dict[str, float] | None = None

    @property
    def map(self) -> float:
        return float(np.mean(self.ap))

    @property
    def oracle_mean(self) -> float:
        return float(np.mean(self.oracle))


@dataclass
class Evaluation:
    k: int
    tasks: dict[str, TaskResult]
    source: str
    ground_truth: str
    results_k: int
    database_rows: int | None
    warnings: list[str] = field(default_factory=list)
    setting: str | None = None
    variant: str = ""  # "adapt", "QE 2", ...: reported as its own row, never as the plain model


def evaluate(
    results, gt: GroundTruth | str | os.PathLike, k: int = 1000, *, threads: int = 0, progress: bool = False
) -> Evaluation:
    """mAP@k with the official semantics, per task, with category / subcategory / scale / clutter
    reports. `results`: a SearchResults, a results file (.npz, official .json / .pkl) or an official
    dict. Problems that change the meaning of the number raise ValueError; partial query sets warn."""
    if k < 1:
        raise ValueError(f"k: must be at least 1, got {k}")
    if not isinstance(gt, GroundTruth):
        gt = load_ground_truth(gt)
    lists = read_results(results, gt)
    notes: list[str] = []
    for message in lists.warnings:
        _note(notes, f"{lists.source}: searched with a warning: {message}")
    _check(lists, gt, k, notes)

    inst_names = sorted({instance_of(p) for p in gt.positives} | {instance_of(q) for q in lists.query_ids})
    inst = {name: i for i, name in enumerate(inst_names)}
    pos_inst = np.array([inst[instance_of(p)] for p in gt.positives], dtype=np.int64)
    q_inst = np.array([inst[instance_of(q)] for q in lists.query_ids], dtype=np.int64)
    relevant = (lists.positive >= 0) & (pos_inst[np.maximum(lists.positive, 0)] == q_inst[:, None])
    labels = np.where(lists.positive == EMPTY, SKIP, relevant).astype(np.uint8)

    n_inst = len(inst_names)
    groups = [("scale", gt.scale, SCALE_GROUPS), ("clutter", gt.clutter, CLUTTER_GROUPS)]
    keys = [(name, f"{lo}-{hi}") for name, values, bounds in groups if values is not None for lo, hi in bounds]
    member = np.array(
        [(values >= lo) & (values < hi) for _, values, bounds in groups if values is not None for lo, hi in bounds],
        dtype=bool,
    ).reshape(len(keys), len(gt.positives))
    bar = Progress("evaluate", total=2, unit="passes", enabled=progress)
    with bar:
        n_pos = np.bincount(pos_inst, minlength=n_inst).astype(np.int64)[q_inst]
        ap, oracle = _core.average_precision(lists.scores, labels, n_pos, k, threads)
        ap, oracle = 100 * ap, 100 * oracle
        bar.update(1)
        # per (query, group): AP with the query's positives outside the group taken out of the list
        grouped: dict[str, list[tuple[str, np.ndarray, np.ndarray]]] = {}
        if keys:
            g_pos = np.stack([np.bincount(pos_inst, weights=m, minlength=n_inst) for m in member]).astype(np.int64)
            g_pos = np.ascontiguousarray(g_pos[:, q_inst])
            positive = np.ascontiguousarray(lists.positive, dtype=np.int32)
            g_ap = 100 * _core.grouped_average_precision(lists.scores, labels, positive, member, g_pos, k, threads)
            for (name, key), row_ap, row_pos in zip(keys, g_ap, g_pos):
                grouped.setdefault(name, []).append((key, row_ap, row_pos > 0))
        bar.update(1)

    if gt.taxonomy is None:
        _note(notes, f"{gt.source}: no taxonomy.json, so no category reports")
    if gt.scale is None:
        _note(notes, f"{gt.source}: scale and clutter of the positives unknown (no image_ids/positive_ids.txt)")
    tasks = {}
    for task in TASKS:
        rows = np.array([i for i, q in enumerate(lists.query_ids) if gt.task_of(q) == task], dtype=np.int64)
        if len(rows) == 0:
            continue
        expected = gt.queries(task)
        missing = len(set(expected) - {lists.query_ids[i] for i in rows})
        if missing:
            _note(notes, f"{lists.source}: {missing:,} of {len(expected):,} {TASKS[task]} queries missing from the "
                  f"results; {task} mAP is over the {len(rows):,} present")
        qids = [lists.query_ids[i] for i in rows]
        res = TaskResult(task, qids, ap[rows], oracle[rows], missing)
        if gt.taxonomy is not None:
            res.categories, res.subcategories = _by_category(qids, ap[rows], gt.taxonomy)
        for name, per_group in grouped.items():
            report = {key: float(np.mean(g_ap[rows][has[rows]])) for key, g_ap, has in per_group if has[rows].any()}
            setattr(res, name, report)
        tasks[task] = res
    return Evaluation(k, tasks, lists.source, gt.source, lists.k, lists.database_rows, notes, lists.setting,
                      lists.variant)


def _check(lists: RankedLists, gt: GroundTruth, k: int, notes: list[str]) -> None:
    src = lists.source
    check_unique(lists.query_ids, f"{src}: query ids")
    unknown = [q for q in lists.query_ids if q not in gt.query_set]
    if unknown:
        raise ValueError(f"{src}: {len(unknown):,} query id(s) not in the ground truth ({gt.source}), e.g. {unknown[0]!r}")
    if lists.k < k:
        raise ValueError(
            f"{src}: results hold {lists.k} items per query, fewer than k={k}; evaluate with k={lists.k} or search again"
        )
    _no_duplicate_items(lists.positive, lists.query_ids, src)  # one positive twice in a list
    listed = lists.positive != EMPTY
    bad = listed & ~np.isfinite(lists.scores)
    if bad.any():
        q = int(np.flatnonzero(bad.any(axis=1))[0])
        raise ValueError(f"{src}: {int(bad.sum()):,} NaN or infinite score(s), first in query {lists.query_ids[q]!r}")
    short = int((listed.sum(axis=1) < k).sum())
    if short:
        _note(notes, f"{src}: {short:,} queries have fewer than k={k} results; their lists are evaluated as they are")
    if not (lists.positive >= 0).any() and len(lists.query_ids):
        _note(notes, f"{src}: no query retrieved any ILIAS positive: is the database the ILIAS positives + distractors?")


def _note(notes: list[str], message: str) -> None:
    """A problem that does not stop the evaluation: warned now and kept for the report."""
    notes.append(message)
    warnings.warn(message, stacklevel=3)


def _by_category(qids, ap, taxonomy) -> tuple[dict[str, float], dict[str, float]]:
    """Mean over instances of each instance's mean AP, per coarse and per coarse-mid category."""
    per_inst: dict[str, list[float]] = {}
    for q, a in zip(qids, ap.tolist()):
        per_inst.setdefault(instance_of(q), []).append(a)
    missing = sorted(i for i in per_inst if i not in taxonomy)
    if missing:
        raise ValueError(f"taxonomy: {len(missing)} instance(s) not in the category tree, e.g. {missing[0]!r}")
    coarse: dict[str, list[float]] = {}
    mid: dict[str, list[float]] = {}
    for i, aps in per_inst.items():
        c, m = taxonomy[i]
        mean = fmean(aps)  # plain floats: thousands of tiny numpy means cost more than the rest
        coarse.setdefault(c, []).append(mean)
        mid.setdefault(f"{c}-{m}", []).append(mean)
    return ({c: fmean(v) for c, v in sorted(coarse.items())}, {c: fmean(v) for c, v in sorted(mid.items())})
