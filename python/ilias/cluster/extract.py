"""Extraction as cluster tasks: one task per tar (or per range of core or folder images).

Task `k` of `n` writes the part store `<out>/part-<k>-of-<n>` exactly as `ilias extract
--shard-id k --num-shards n` does (`n` = 1: the store `<out>` itself); when all are finished they
are merged (`merge_parts`: shards linked, not copied). Why this gives the single-process store
bit for bit: windows never span two tars and, for plain files, start every `window` items from the
first one (see `extract/loop.py`), so a task made of whole tars, or of a range of files that
starts on a window, forms the very batches of a run over everything.

- A finished part (its manifest says complete) is never redone; an interrupted one resumes from its
  last complete shard, on whichever worker runs it next.
- A worker builds the model once (cached per process, random weights seeded as `ilias extract
  --random-init` seeds them) and, with `--device cuda`, takes one GPU of its node for its lifetime
  (a lock file per GPU), so that several workers of one node share its GPUs.
- Tars are listed by the task that reads them (not by this process): the run starts at once, and
  only the workers read the tars' headers.
"""

from __future__ import annotations

import fcntl
import math
import multiprocessing
import os
import tempfile
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from ..store import Store
from .engine import ClusterOptions, Task, check_workers, open_cluster, run_tasks

# items per task for plain files (rounded up to whole windows): a few minutes of a GPU
ITEMS_PER_TASK = 2048


@dataclass(frozen=True)
class Recipe:
    """How a worker builds the run's model (a registry name or a ModelSpec)."""

    model: Any
    pretrained: bool = True
    weights: str | None = None
    text_weights: str | None = None
    text_tower: str | None = None


@dataclass
class StoreJob:
    """One output store: its sources (tars, or files), what to keep of them, and the kind."""

    out: Path
    sources: list  # of ilias.extract.Source, all tars or all files
    text: bool = False
    exif: bool = False
    ids_file: str | None = None  # only the ids listed there (tars: bare keys match too)
    limit: int | None = None  # only the first `limit` items (the first N distractors)
    provenance: dict | None = None


@dataclass(frozen=True)
class Settings:
    """The extraction options every task shares (those of `ilias extract`)."""

    transform: str = "resize_large"
    resolution: int | None = None
    batch_size: int = 32
    text_batch_size: int = 256
    workers: int = 4
    device: str | None = None
    shard_rows: int = 1_000_000
    items_per_task: int = ITEMS_PER_TASK


def image_window(spec, settings: Settings) -> int:
    """The window of a single-process run of these settings (`extract_images`' default)."""
    from ..extract.loop import default_window

    res = (settings.resolution or spec.resolution) if settings.transform == "resize_large" else None
    return default_window(res or 224, settings.batch_size)


# ---- on the workers

_MODELS: dict = {}
_GPU: list = []  # [device, lock descriptor] once this worker took a GPU


def _model(recipe: Recipe, text: bool):
    from ..models import build_image_encoder, build_text_encoder

    key = (repr(recipe), text)
    if key not in _MODELS:
        if not recipe.pretrained:
            import torch

            torch.manual_seed(0)  # the random weights of every other run (`--random-init`)
        if text:
            _MODELS[key] = build_text_encoder(recipe.model, pretrained=recipe.pretrained, weights=recipe.text_weights,
                                              tower=recipe.text_tower)
        else:
            _MODELS[key] = build_image_encoder(recipe.model, pretrained=recipe.pretrained, weights=recipe.weights)
    return _MODELS[key]


def _device(asked: str | None) -> str:
    """The device of this worker: with cuda asked, a GPU of this node no other worker holds."""
    if not (asked or "").startswith("cuda"):
        return asked or "cpu"
    if not _GPU:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OSError(f"worker on {os.uname().nodename}: no CUDA GPU, and --device {asked} asks for one")
        for i in range(count):
            fd = os.open(Path(tempfile.gettempdir()) / f"ilias-gpu-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            _GPU.extend([f"cuda:{i}", fd])  # held until the worker process ends
            break
        else:
            raise OSError(f"worker on {os.uname().nodename}: all {count} GPUs are taken by other workers "
                          "(start one GPU worker per GPU)")
    return _GPU[0]


def _extract_task(recipe: Recipe, job: StoreJob, dest: str, items, settings: Settings, window: int,
                  piece: str) -> dict:
    """Writes one part store at `dest`: of `items` (listed already), or of the job's tars."""
    from ..extract import extract_images, extract_texts, list_items, select
    from ..groundtruth import read_id_list

    if items is None:
        items = list_items(job.sources, exif=job.exif, text=job.text)
        if job.ids_file is not None:
            items = select(items, read_id_list(job.ids_file))
        if job.limit is not None:
            items = items.take(range(min(job.limit, len(items))))
    device = _device(settings.device)
    # a daemonic worker process cannot start decoding processes: decode in the task then
    workers = 0 if multiprocessing.current_process().daemon else settings.workers
    prov = {**(job.provenance or {}), "piece": piece}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped images are listed in the manifest
        if job.text:
            store = extract_texts(items, _model(recipe, True), dest, batch_size=settings.text_batch_size,
                                  device=device, shard_rows=settings.shard_rows, progress=False, provenance=prov)
        else:
            store = extract_images(items, _model(recipe, False), dest, transform=settings.transform,
                                   resolution=settings.resolution, batch_size=settings.batch_size, workers=workers,
                                   device=device, shard_rows=settings.shard_rows, window=window, progress=False,
                                   provenance=prov)
    return {"items": len(items), "rows": store.count}


# ---- the client side


def _absolute(job: StoreJob) -> StoreJob:
    resolve = lambda p: str(Path(p).resolve())  # noqa: E731
    return replace(job, out=Path(resolve(job.out)), sources=[replace(s, path=resolve(s.path)) for s in job.sources],
                   ids_file=None if job.ids_file is None else resolve(job.ids_file))


def _finished(path: Path, model_name: str) -> bool:
    """Whether `path` is a complete store of this model (a finished part or store)."""
    if not (path / "manifest.json").exists():
        return False
    prov = Store.open(path).manifest.provenance
    if prov.get("model") not in (None, model_name):
        raise ValueError(f"{path}: holds features with model={prov.get('model')!r}, not {model_name!r}; "
                         "choose another output folder (or delete this one to start again)")
    return bool(prov.get("complete"))


def _plan(job: StoreJob, spec, settings: Settings) -> tuple[list, int]:
    """[(piece, its tars or None, its items or None, its item limit or None)] of one store, and
    the store's window."""
    from ..extract import Piece, list_items, select
    from ..groundtruth import read_id_list

    window = settings.text_batch_size if job.text else image_window(spec, settings)
    tars = job.sources and job.sources[0].kind == "tar"
    if tars:
        sources, limits = list(job.sources), [None] * len(job.sources)
        if job.limit is not None:  # only the tars that hold the first `limit` items, the last one cut
            sources, limits, left = [], [], job.limit
            for s in job.sources:
                if left <= 0:
                    break
                sources.append(s)
                limits.append(left)
                left -= len(list_items([s]))
        pieces = [(Piece(i, len(sources)), [s], None, limits[i]) for i, s in enumerate(sources)]
    else:
        items = list_items(job.sources, exif=job.exif, text=job.text)
        if job.ids_file is not None:
            items = select(items, read_id_list(job.ids_file))
        if job.limit is not None:
            items = items.take(range(min(job.limit, len(items))))
        per = window * math.ceil(settings.items_per_task / window)  # ranges start on windows
        n = max(1, math.ceil(len(items) / per))
        pieces = [(Piece(i, n), None, items.take(range(i * per, min((i + 1) * per, len(items)))), None)
                  for i in range(n)]
    return pieces, window


def extract_on_cluster(opts: ClusterOptions, recipe: Recipe, jobs: Sequence[StoreJob], settings: Settings) -> list[Store]:
    """Extracts every job's store on the cluster (parts as tasks, then merged); returns the stores.
    A store already complete is left as it is; a rerun after an interruption runs only the parts
    not finished."""
    from ..extract import merge_parts
    from ..models import get_spec

    spec = recipe.model if not isinstance(recipe.model, str) else get_spec(recipe.model)
    jobs = [_absolute(job) for job in jobs]  # workers may start in another folder
    tasks, merges, inputs = [], [], []
    for j, job in enumerate(jobs):
        out = job.out
        if _finished(out, spec.name):
            continue
        plan, window = _plan(job, spec, settings)
        inputs += [s.path for s in job.sources[:1]] + ([job.ids_file] if job.ids_file else [])
        for piece, sources, items, limit in plan:
            dest = piece.out_dir(out)
            if _finished(dest, spec.name):
                continue
            part_job = StoreJob(out, sources or [], job.text, job.exif, job.ids_file, limit, job.provenance)
            size = None if items is None else len(items)
            tasks.append(Task(f"ilias-extract-{j}-{piece.name}", _extract_task,
                              (recipe, part_job, str(dest), items, settings, window, piece.name), size))
        merges.append((out, len(plan)))
    if tasks:
        with open_cluster(opts) as client:
            check_workers(client, opts, inputs, writable=[job.out for job in jobs])
            run_tasks(client, tasks, opts, "extract", "items", lambda *_: None, count=lambda r: r["items"])
    for out, n in merges:
        if n > 1:
            merge_parts(out)
    return [Store.open(job.out) for job in jobs]

