"""Local descriptors of the images a re-ranking needs, into a locals store, resumable.

`needed(results, top)` names them: the image queries of a results file and the union of the first
`top` of their lists. `extract_locals` describes the ids a store does not hold yet, in the order
given, and appends them: an interrupted run, rerun, goes on after the last complete shard and
ends with the store an uninterrupted run writes; a later run that needs more images (a deeper
shortlist, another results file) adds only those.

Decoding and resizing run in a few threads (OpenCV releases the GIL) ahead of the model, which
describes one image at a time (sizes differ). A describer is an object with `name`, `dim`,
`identity` (settings that must agree to resume), `prepare(rgb) -> x` (thread-safe CPU work)
and `describe(x, tokens) -> (meta, desc)`: `local_features.DinoLocals` (AMES) or `SiftLocals`.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..progress import Progress
from ..results import SearchResults
from ..store import StoreSourceError
from .images import ImageSource, decode_image
from .locals_store import LocalsManifest, LocalsStore, LocalsWriter

DEFAULT_SHARD_IMAGES = 1000  # an interruption loses at most this many images' work


def image_query_rows(results: SearchResults) -> list[int]:
    """The rows of the image queries (text queries, `<instance>/query/T000.txt`, have no image)."""
    return [q for q, qid in enumerate(results.query_ids) if not qid.endswith(".txt")]


def heads(results: SearchResults, top: int) -> tuple[list[int], np.ndarray, np.ndarray, list[str]]:
    """(image query rows, their first `top` global rows (-1: none), the distinct rows among those
    sorted, their ids)."""
    if top < 1:
        raise ValueError(f"top: must be at least 1, got {top}")
    rows = image_query_rows(results)
    head = results.indices[rows, :top]
    table, ids = results.returned_rows()
    wanted = np.unique(head[head >= 0])
    return rows, head, wanted, [b.decode("utf-8") for b in ids[np.searchsorted(table, wanted)]]


def needed(results: SearchResults, top: int) -> tuple[list[str], list[str]]:
    """(query ids, database ids) a re-ranking of the first `top` of each image query's list
    needs; the database ids in database row order."""
    rows, _, _, db_ids = heads(results, top)
    return [results.query_ids[q] for q in rows], db_ids


class SiftLocals:
    """The weight-free describer: OpenCV SIFT keypoints with opponent-colour descriptors (sift.py).
    All its work is CPU work that releases the GIL, so it is done in `prepare`, in the threads."""

    def __init__(self, tokens: int):
        from . import sift

        self._sift, self.tokens = sift, tokens
        self.name, self.dim = sift.NAME, sift.dim()
        self.identity = {"describer": sift.NAME, **sift.SETTINGS}

    def prepare(self, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._sift.describe(img, self.tokens)

    def describe(self, described: tuple[np.ndarray, np.ndarray], tokens: int) -> tuple[np.ndarray, np.ndarray]:
        if tokens != self.tokens:
            raise ValueError(f"tokens: this describer keeps {self.tokens}, not {tokens}")
        return described


def _have(out: Path, describer, tokens: int, variant: str) -> set[str]:
    """The ids already in the store at `out` (none if there is no store); a store of other
    descriptors or settings is an error naming it."""
    if not (out / "manifest.json").exists():
        return set()
    man = LocalsManifest.read(out)
    man.check(out / "manifest.json", describer.name, tokens, describer.dim if variant == "float16" else None, variant)
    old = man.provenance.get("identity")
    if old is not None and old != describer.identity:
        raise StoreSourceError(f"{out}: holds descriptors made with other settings ({old}, not {describer.identity}); "
                               "remove it or choose another folder")
    return set(LocalsStore.open(out).all_ids()) if man.shards else set()


def extract_locals(ids: Sequence[str], source: ImageSource, describer, out: str | os.PathLike, tokens: int, *,
                   variant: str = "float16", projection: np.ndarray | None = None, boxes: bool = True,
                   shard_images: int = DEFAULT_SHARD_IMAGES, threads: int = 4, progress: bool = True,
                   label: str = "locals") -> LocalsStore:
    """Adds to the locals store at `out` the descriptors of those `ids` it does not hold yet.

    `boxes`: describe image queries inside their box. `variant` "binary" packs the signs of
    `projection` (the binary AMES model's). Images that do not exist are an error before any work."""
    out = Path(out)
    if tokens < 1:
        raise ValueError(f"tokens: must be at least 1, got {tokens}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids: listed more than once")
    have = _have(out, describer, tokens, variant)
    todo = [i for i in ids if i not in have]
    if not todo and have:  # nothing to add: the store is read as it is (a read-only one too)
        return LocalsStore.open(out)
    absent = source.missing(todo)
    if absent:
        raise FileNotFoundError(f"{len(absent):,} of {len(todo):,} images to describe have no image file "
                                f"(first: {absent[0]}); give the ILIAS folder and the distractor tars they come from")
    dim = describer.dim if variant == "float16" else (projection.shape[1] if projection is not None else None)
    if dim is None:
        raise ValueError("variant binary: give the projection (the binary AMES model's, or an ITQ .npz)")
    # `have` counts complete shards only: a shard cut short by an interruption is dropped by the
    # writer and its images are in `todo` again
    writer = LocalsWriter(out, describer.name, tokens, dim, variant, projection=projection, shard_images=shard_images,
                          provenance={"identity": describer.identity})

    def load(item_id: str):
        return describer.prepare(decode_image(source.read(item_id), source.box(item_id) if boxes else None, item_id))

    try:
        with Progress(label, total=len(todo), unit="images", enabled=progress and bool(todo)) as bar, \
                ThreadPoolExecutor(max(1, threads)) as pool:
            ahead: deque = deque()  # decoded images waiting for the model: a few per thread, not all
            flush_every = min(64, shard_images)  # a finished shard is committed at once
            batch_ids: list[str] = []
            metas, descs = [], []
            for item_id in todo:
                ahead.append((item_id, pool.submit(load, item_id)))
                if len(ahead) < 4 * max(1, threads):
                    continue
                _take(ahead, describer, tokens, batch_ids, metas, descs)
                if len(batch_ids) == flush_every:
                    _flush(writer, batch_ids, metas, descs, bar)
            while ahead:
                _take(ahead, describer, tokens, batch_ids, metas, descs)
            _flush(writer, batch_ids, metas, descs, bar)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _take(ahead: deque, describer, tokens: int, batch_ids: list, metas: list, descs: list) -> None:
    item_id, future = ahead.popleft()
    meta, desc = describer.describe(future.result(), tokens)
    batch_ids.append(item_id)
    metas.append(meta)
    descs.append(desc)


def _flush(writer: LocalsWriter, batch_ids: list, metas: list, descs: list, bar) -> None:
    if batch_ids:
        writer.append(np.stack(metas), np.stack(descs), batch_ids)
        bar.update(len(batch_ids))
        batch_ids.clear()
        metas.clear()
        descs.clear()
