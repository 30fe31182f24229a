"""Fusing the global scores of a shortlist with local re-ranking scores.

The first M of each list get `lambda * global + (1 - lambda) * sigmoid(gamma * s)`, where s is
the re-ranker's raw score (the AMES logit) of the pair, and are re-sorted among themselves; the
rest of the list keeps its order. Equal fused scores keep their original order (a stable sort).

The evaluation orders a list by its scores (ILIAS_SPEC: stable sort by descending score), not by
position, and a fused score is on another scale than a global one: an image at rank M + 1 may
hold a larger global score than the fused scores above it. With `rest="shift"` (the default)
the scores after the first M are moved down by one constant per query, rounded to a multiple of
2^-30 so that the subtraction from float32 scores is exact in float64 (bar scores under about
1e-6 in magnitude): their order, their ties and their gaps stay as they were, and they rank below the fused block, as in the published protocol (which works
on ranks). `rest="keep"` leaves them as they were, for callers that work on ranks themselves.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..results import SearchResults

# The published (lambda, gamma) per backbone and precision (AMES, tuned on the GLDv2 public test split)
DEFAULTS = {
    ("dinov2", "binary"): (0.35, 0.10),
    ("dinov2", "float16"): (0.55, 0.30),
}
_SHIFT_QUANTUM = 2.0 ** -30


def default_weights(backbone: str = "dinov2", variant: str = "binary") -> tuple[float, float]:
    """The published (lambda, gamma) for a backbone and a descriptor variant ("binary" or "float16")."""
    try:
        return DEFAULTS[(backbone, variant)]
    except KeyError:
        known = ", ".join(f"{b}/{v}" for b, v in DEFAULTS)
        raise ValueError(f"no published fusion weights for {backbone}/{variant} (known: {known}); give lambda and gamma") from None


def fused_scores(global_scores: np.ndarray, local_scores: np.ndarray, lam: float, gamma: float) -> np.ndarray:
    """`lam * global + (1 - lam) * sigmoid(gamma * local)`, in float64."""
    g = np.asarray(global_scores, dtype=np.float64)
    s = gamma * np.asarray(local_scores, dtype=np.float64)
    # 1 / (1 + exp(-x)) overflows for very negative x; this form does not
    sig = np.where(s >= 0, 1.0 / (1.0 + np.exp(-np.abs(s))), np.exp(-np.abs(s)) / (1.0 + np.exp(-np.abs(s))))
    return lam * g + (1.0 - lam) * sig


def fuse(results: SearchResults, local_scores: np.ndarray, lam: float, gamma: float, rest: str = "shift") -> SearchResults:
    """Re-ranks the first M = local_scores.shape[1] of every list of `results`.

    `local_scores[q, j]`: the re-ranker's raw score of query q and the j-th item of its list
    (ignored where the list holds no item, index -1). Returns new results of the same format,
    scores in float64; the input is not changed."""
    if rest not in ("shift", "keep"):
        raise ValueError(f"rest: {rest!r} is not one of shift, keep")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda: must be within [0, 1], got {lam}")
    if not np.isfinite(gamma):
        raise ValueError(f"gamma: must be finite, got {gamma}")
    local = np.asarray(local_scores)
    nq, k = results.indices.shape
    if local.ndim != 2 or local.shape[0] != nq or not 1 <= local.shape[1] <= k:
        raise ValueError(f"local scores: expected shape ({nq}, M) with 1 <= M <= {k} (the results' queries and k), got {local.shape}")
    m = local.shape[1]
    indices = results.indices.copy()
    scores = results.scores.astype(np.float64)
    head_idx, head_scores = indices[:, :m], scores[:, :m]
    valid = head_idx >= 0
    if not np.isfinite(local[valid]).all():
        q = int(np.nonzero(~np.isfinite(np.where(valid, local, 0)).all(axis=1))[0][0])
        raise ValueError(f"local scores: NaN or infinite for query {results.query_ids[q]!r}")
    fused = np.where(valid, fused_scores(np.where(valid, head_scores, 0.0), np.where(valid, local, 0.0), lam, gamma), -np.inf)
    # a stable sort of the negated scores: equal fused scores keep their list order, and the
    # empty slots (-inf) stay at the end
    order = np.argsort(-fused, axis=1, kind="stable")
    indices[:, :m] = np.take_along_axis(head_idx, order, axis=1)
    scores[:, :m] = np.take_along_axis(np.where(valid, fused, head_scores), order, axis=1)
    if rest == "shift" and m < k:
        tail, tail_valid = scores[:, m:], indices[:, m:] >= 0
        top_tail = np.where(tail_valid, tail, -np.inf).max(axis=1)
        low_head = np.where(valid, fused, np.inf).min(axis=1)
        need = top_tail - low_head
        gap = np.isfinite(need) & (need >= 0)
        # strictly below the block: one quantum under its lowest score, the shift exact in float64
        shift = np.where(gap, (np.floor(np.where(gap, need, 0) / _SHIFT_QUANTUM) + 1) * _SHIFT_QUANTUM, 0.0)
        scores[:, m:] = np.where(tail_valid, tail - shift[:, None], tail)
    return replace(results, scores=scores, indices=indices)
