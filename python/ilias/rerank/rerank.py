"""Re-ranking a results file: the first M of each image query's list scored by local descriptors.

`rerank(results, query_locals, db_locals, scorer, top, lam, gamma)` gives a results file of the same
format: for every image query, the first `top` entries get `lam * global + (1 - lam) *
sigmoid(gamma * s)` with s the scorer's raw score of the pair (`fuse.py`), the rest of its list
keeps its order below them; text queries are left as they are (their query is not an image).

Every query and every shortlisted image must be in the locals stores: a missing one is an error
that says how many are missing and how to add them, never a silently shorter re-ranking.

The work goes `chunk` queries at a time: their shortlisted images are read from the store (only
those rows), each query and image is prepared once for the chunk, and the scorer runs on the
chunk's pairs. Memory is bounded by the chunk, not by the number of queries.

Scorers (`scorer(q_store, q_rows, d_store, d_rows, pairs) -> raw scores`):
- `AmesScorer`: the AMES model (`ames.py`) on the first `query_tokens` / `db_tokens` tokens
  (published use: 600 and 50);
- `SiftScorer`: RANSAC inlier counts of the weight-free verifier (`sift.py`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np

from ..progress import Progress
from ..results import SearchResults
from .extract import heads
from .fuse import fuse
from .locals_store import LocalsStore


class LocalsMissing(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class AmesScorer:
    """AMES logits of the pairs: `model` a loaded `ames.AMES`."""

    def __init__(self, model, query_tokens: int = 600, db_tokens: int = 50, batch_size: int = 256):
        self.model, self.query_tokens, self.db_tokens, self.batch_size = model, query_tokens, db_tokens, batch_size

    @property
    def label(self) -> str:
        return f"AMES {self.model.variant}"

    def check(self, q_store: LocalsStore, d_store: LocalsStore) -> None:
        """The stores must hold what the model reads: enough tokens, the model's projection."""
        for store, n, side in ((q_store, self.query_tokens, "query"), (d_store, self.db_tokens, "database")):
            if store.tokens < n:
                raise ValueError(f"{store.path}: holds {store.tokens} tokens per image, the {side} side reads {n}")
            if self.model.variant == "binary" and store.variant == "binary":
                proj = self.model.projection
                LocalsStore.open(store.path, projection=proj)  # the same ITQ matrix, or a clear error
            elif store.variant == "binary":
                raise ValueError(f"{store.path}: a binary locals store; the full-precision AMES model reads float16 stores")
            elif store.dim != self.model.local_dim:
                raise ValueError(f"{store.path}: {store.dim}-d descriptors, the AMES model reads {self.model.local_dim}")

    def __call__(self, q_store, q_rows, d_store, d_rows, pairs) -> np.ndarray:
        qv, qm = q_store.model_inputs(q_rows, self.query_tokens)
        dv, dm = d_store.model_inputs(d_rows, self.db_tokens)
        return self.model.score(qv, qm, dv, dm, pairs=pairs, batch_size=self.batch_size).astype(np.float64)


class SiftScorer:
    """Inlier counts of the weight-free verifier on the stores' SIFT tokens, the pairs split over
    `threads` threads (its matching and RANSAC release the GIL)."""

    label = "SIFT + RANSAC"

    def __init__(self, threads: int = 2):
        self.threads = max(1, threads)

    def check(self, q_store: LocalsStore, d_store: LocalsStore) -> None:
        from . import sift

        for store in (q_store, d_store):
            if store.manifest.model != sift.NAME:
                raise ValueError(f"{store.path}: holds {store.manifest.model} descriptors, the SIFT verifier reads {sift.NAME}")

    def __call__(self, q_store, q_rows, d_store, d_rows, pairs) -> np.ndarray:
        from . import sift

        qm, qd = q_store.read(q_rows)
        dm, dd = d_store.read(d_rows)
        parts = np.array_split(np.asarray(pairs), self.threads)
        with ThreadPoolExecutor(self.threads) as pool:
            found = list(pool.map(lambda p: sift.verify_pairs(qm, qd, dm, dd, p), parts))
        return np.concatenate(found).astype(np.float64)


def _rows_or_fail(store: LocalsStore, ids: list[str], what: str) -> np.ndarray:
    try:
        return store.rows_of(ids)
    except KeyError:
        have = set(store.all_ids())
        missing = [i for i in ids if i not in have]
        raise LocalsMissing(f"{store.path}: {len(missing):,} of {len(ids):,} {what} have no local descriptors (first: "
                            f"{missing[0]}); add them with `ilias locals extract` on this results file") from None


def rerank(results: SearchResults, query_locals: LocalsStore, db_locals: LocalsStore, scorer, top: int = 100,
           lam: float = 0.35, gamma: float = 0.10, chunk: int = 64, progress: bool = True) -> SearchResults:
    """The results with the first `top` of every image query's list re-ranked (see the module)."""
    if not 1 <= top <= results.k:
        raise ValueError(f"top: 1 to the results' k = {results.k}, got {top}")
    if chunk < 1:
        raise ValueError(f"chunk: must be at least 1, got {chunk}")
    scorer.check(query_locals, db_locals)
    image_rows, head, uniq, uniq_ids = heads(results, top)
    if not image_rows:
        raise ValueError("the results hold no image queries (text queries are not re-ranked by local descriptors)")
    q_rows = _rows_or_fail(query_locals, [results.query_ids[q] for q in image_rows], "queries")
    d_rows_of = _rows_or_fail(db_locals, uniq_ids, "shortlisted images")
    local = np.zeros(head.shape, np.float64)
    with Progress(f"re-rank ({scorer.label})", total=int((head >= 0).sum()), unit="pairs", enabled=progress) as bar:
        for lo in range(0, len(image_rows), chunk):
            block = head[lo:lo + chunk]
            valid = block >= 0
            wanted = np.unique(block[valid])
            # the chunk's images, each once, read in store order
            where = d_rows_of[np.searchsorted(uniq, wanted)]
            qi, j = np.nonzero(valid)
            pairs = np.stack([qi, np.searchsorted(wanted, block[qi, j])], 1)
            scores = scorer(query_locals, q_rows[lo:lo + chunk], db_locals, where, pairs)
            local[lo + qi, j] = scores
            bar.update(len(pairs))
    sub = replace(results, scores=results.scores[image_rows], indices=results.indices[image_rows],
                  query_ids=[results.query_ids[q] for q in image_rows])
    fused = fuse(sub, local, lam, gamma)
    scores = results.scores.astype(np.float64)
    indices = results.indices.copy()
    scores[image_rows], indices[image_rows] = fused.scores, fused.indices
    return replace(results, scores=scores, indices=indices, reranking=label_of(scorer, top, lam, gamma))


def label_of(scorer, top: int, lam: float, gamma: float) -> str:
    """How a re-ranking is named in its results file and the reports."""
    return f"{scorer.label}, top {top}, lambda {lam:g}, gamma {gamma:g}"
