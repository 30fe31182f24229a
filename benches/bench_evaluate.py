"""Full-size ILIAS evaluation (2,232 queries, k = 1,000, full report) against the official method
(sklearn's average_precision_score per query and per scale/clutter group, as the reference
evaluator does), in the same run, on a synthetic ILIAS with the real sizes.

    python benches/bench_evaluate.py [--repeat 3] [--threads 0] [--instances 1000]

Prints both times, the ratio (target: at least 100x) and the largest difference between the two.
`--instances` scales the synthetic ILIAS down (queries and positives in the real proportions).
The same cases run as `pytest benches/test_bench_evaluate.py`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from ilias.evaluate import CLUTTER_GROUPS, SCALE_GROUPS, evaluate, load_ground_truth
from ilias.report import build_report
from sklearn.metrics import average_precision_score

N_INSTANCES, N_POSITIVES, N_IMAGE_Q, K = 1000, 4715, 1232, 1000


def sizes(instances: int = N_INSTANCES) -> tuple[int, int, int]:
    """(instances, positives, image queries) in the real benchmark's proportions."""
    return instances, instances * N_POSITIVES // N_INSTANCES, instances * N_IMAGE_Q // N_INSTANCES


def make_dataset(root: Path, rng, instances: int = N_INSTANCES) -> None:
    n_inst, n_pos, n_image_q = sizes(instances)
    insts = [f"inst_{i:03d}" for i in range(n_inst)]
    owner = np.concatenate([np.arange(n_inst), rng.integers(0, n_inst, n_pos - n_inst)])
    pos = sorted(f"{insts[o]}/pos/P{o:03d}_{j:02d}.jpg" for j, o in enumerate(owner))
    image_q = [f"{insts[i % n_inst]}/query/Q{i % n_inst:03d}_{i // n_inst:02d}.jpg" for i in range(n_image_q)]
    text_q = [f"{inst}/query/T{i:03d}.txt" for i, inst in enumerate(insts)]
    (root / "image_ids").mkdir()
    (root / "image_ids" / "image_query_ids.txt").write_text("".join(f"{q},x\n" for q in image_q))
    (root / "image_ids" / "text_query_ids.txt").write_text("".join(f"{q}\n" for q in text_q))
    scale, clutter = rng.uniform(0, 0.6, len(pos)), rng.integers(0, 90, len(pos))
    (root / "image_ids" / "positive_ids.txt").write_text("".join(f"{p},{s!r},{c}\n" for p, s, c in zip(pos, scale.tolist(), clutter.tolist())))
    # 8 coarse, 48 mid, 81 fine categories, instances spread over them
    tree: dict = {}
    for i, inst in enumerate(insts):
        fine = i % 81
        mid = fine % 48
        tree.setdefault(f"coarse{mid % 8}", {}).setdefault(f"mid{mid}", {}).setdefault(f"fine{fine}", []).append(inst)
    (root / "taxonomy.json").write_text(json.dumps(tree))


def make_results(gt, rng, k: int = K) -> dict:
    """An official pickle dict: per query a few of its positives, a few other positives and
    distractors, float32 scores in rank order with some ties."""
    queries = [*gt.image_queries, *gt.text_queries]
    by_inst: dict = {}
    for i, p in enumerate(gt.positives):
        by_inst.setdefault(p.split("/")[0], []).append(i)
    n_pos = len(gt.positives)
    ranks = rng.integers(n_pos, n_pos + 5_000_000, (len(queries), k))
    for row, q in enumerate(queries):
        own = by_inst[q.split("/")[0]]
        slots = rng.choice(k, size=len(own) + 3, replace=False)
        ranks[row, slots[: len(own)]] = np.where(rng.random(len(own)) < 0.7, own, ranks[row, slots[: len(own)]])
        ranks[row, slots[len(own):]] = rng.integers(0, n_pos, 3)
        ranks[row] = _dedup(ranks[row], rng, n_pos)
    used, ranks = np.unique(ranks, return_inverse=True)
    ranks = ranks.reshape(len(queries), k)
    db_ids = np.array([gt.positives[u] if u < n_pos else f"{u // 100_000:05d}.tar/{u}" for u in used.tolist()], dtype=object)
    sims = np.sort(np.round(rng.uniform(0.2, 0.9, (len(queries), k)), 3).astype(np.float32), axis=1)[:, ::-1]
    return {"query_ids": queries, "db_ids": db_ids, "sims": np.ascontiguousarray(sims), "ranks": ranks}


def _dedup(row, rng, n_pos):
    _, first = np.unique(row, return_index=True)
    dup = np.setdiff1d(np.arange(len(row)), first)
    row[dup] = n_pos + 5_000_000 + rng.integers(0, 10**9, len(dup))
    return row


def official(res: dict, gt, k: int) -> dict:
    """The reference evaluator's loop: per query, sort, cut, sklearn AP; then again per scale and
    clutter group with the query's positives outside the group removed. Returns mAP per task."""
    info = {p: (s, c) for p, s, c in zip(gt.positives, gt.scale, gt.clutter)}
    positives_of: dict = {}
    for p in gt.positives:
        positives_of.setdefault(p.split("/")[0], set()).add(p)
    db_ids = res["db_ids"]

    def ap_of(inst, scores, ranks, excluded=frozenset()):
        if excluded:
            keep = [i for i in range(len(ranks)) if db_ids[ranks[i]] not in excluded]
            scores, ranks = scores[keep], ranks[keep]
        order = np.argsort(-scores, kind="stable")
        top = db_ids[ranks[order][:k]]
        g = positives_of[inst] - excluded
        y = np.isin(top, list(g))
        if not y.any():
            return 0.0
        return average_precision_score(y, scores[order][:k]) * y.sum() / min(k, len(g))

    aps: dict = {"i2i": [], "t2i": []}
    groups: dict = {}
    for q, s, r in zip(res["query_ids"], res["sims"], res["ranks"]):
        inst = q.split("/")[0]
        aps[gt.task_of(q)].append(100 * ap_of(inst, s, r))
        for col, bounds in ((0, SCALE_GROUPS), (1, CLUTTER_GROUPS)):
            for lo, hi in bounds:
                excluded = frozenset(p for p in positives_of[inst] if not lo <= info[p][col] < hi)
                if positives_of[inst] - excluded:
                    groups.setdefault((gt.task_of(q), col, f"{lo}-{hi}"), []).append(100 * ap_of(inst, s, r, excluded))
    return {"map": {t: float(np.mean(v)) for t, v in aps.items()}, "groups": {g: float(np.mean(v)) for g, v in groups.items()}}


def synthetic(instances: int = N_INSTANCES, k: int = K):
    """A synthetic ILIAS of `instances` instances and results of `k` per query: (results dict, gt)."""
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        make_dataset(Path(tmp), rng, instances)
        gt = load_ground_truth(tmp)
    return make_results(gt, rng, k), gt


def ours(res: dict, gt, k: int = K, threads: int = 0) -> dict:
    """Our evaluation with the full report (what is timed)."""
    return build_report(evaluate(res, gt, k=k, threads=threads), setting="mini")


def largest_difference(report: dict, ref: dict) -> float:
    """The largest |ours - official| over the tasks' mAP and every scale and clutter group."""
    diff = max(abs(report["tasks"][t]["map"] - ref["map"][t]) for t in ("i2i", "t2i"))
    for (task, col, key), v in ref["groups"].items():
        diff = max(diff, abs(report["tasks"][task]["clutter" if col else "scale"][key] - v))
    return diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours (median reported)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--instances", type=int, default=N_INSTANCES, help="instances of the synthetic ILIAS (default 1000)")
    args = ap.parse_args()
    res, gt = synthetic(args.instances)
    print(f"{len(res['query_ids']):,} queries x k={K:,}, {len(gt.positives):,} positives, "
          f"{len({p.split('/')[0] for p in gt.positives}):,} instances")

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        report = ours(res, gt, K, args.threads)
        times.append(time.perf_counter() - t0)
    mine = float(np.median(times))

    t0 = time.perf_counter()
    ref = official(res, gt, K)
    theirs = time.perf_counter() - t0

    diff = largest_difference(report, ref)
    print(f"ours (evaluate + full report, median of {args.repeat}): {mine:8.3f} s")
    print(f"official method (sklearn per query and group):     {theirs:8.3f} s")
    print(f"ratio: {theirs / mine:.0f}x (target >= 100x); largest mAP difference: {diff:.2e}")
    for t in ("i2i", "t2i"):
        print(f"  {t}: mAP {report['tasks'][t]['map']:.4f} (official {ref['map'][t]:.4f})")


if __name__ == "__main__":
    main()
