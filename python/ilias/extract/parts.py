"""Splitting one extraction across processes, GPUs and nodes, and joining the pieces.

A run is cut into `n` pieces by contiguous ranges of its sources (image files, or whole tars), so
that a piece reads only its own tars. Piece `k` of `n` writes a complete store of its own at
`<out>/part-<k>-of-<n>` (five digits each, k from 0), with its own shards, resume point and skipped
list. Read in the order of k, the parts hold exactly the rows of a single run, in its order:

- `ilias.store.open_parts(out)` gives them as an ordered list of stores, which `ilias.search` takes as one
  database as it is (no copy);
- `merge_parts(out)` turns them into one ordinary store at `<out>` by hard-linking their shards
  (no data copied; copies only where links are unsupported), then removes the parts.

Which piece am I: `--shard-id/--num-shards`, else RANK/WORLD_SIZE (torchrun: one process per GPU,
LOCAL_RANK picks the GPU), else SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT (ids counted from
SLURM_ARRAY_TASK_MIN). Several GPUs of one node without torchrun: start one process per GPU with
CUDA_VISIBLE_DEVICES=i and --shard-id (node * gpus + i) --num-shards (nodes * gpus).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

from .._io import atomic_write
from ..store import Manifest, Store, part_dirs


@dataclass(frozen=True)
class Piece:
    index: int = 0
    count: int = 1

    def __post_init__(self):
        if self.count < 1 or not 0 <= self.index < self.count:
            raise ValueError(f"--shard-id/--num-shards: piece {self.index} of {self.count} does not exist")

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}-of-{self.count:05d}"

    def out_dir(self, out: str | Path) -> Path:
        """Where this piece writes: `out` itself for a single piece."""
        return Path(out) if self.count == 1 else Path(out) / self.name

    def slice(self, seq: Sequence) -> Sequence:
        """This piece's contiguous share of `seq` (sizes differ by at most one)."""
        n = len(seq)
        return seq[self.index * n // self.count : (self.index + 1) * n // self.count]


def piece_from_env(shard_id: int | None = None, num_shards: int | None = None, env: Mapping[str, str] | None = None) -> Piece:
    """The piece this process runs: explicit arguments, else the launcher's variables, else the whole run."""
    env = os.environ if env is None else env
    if shard_id is not None or num_shards is not None:
        if shard_id is None or num_shards is None:
            raise ValueError("--shard-id and --num-shards go together")
        return Piece(shard_id, num_shards)
    if "WORLD_SIZE" in env:
        return Piece(int(env.get("RANK", 0)), int(env["WORLD_SIZE"]))
    if "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return Piece(int(env["SLURM_ARRAY_TASK_ID"]) - first, int(env["SLURM_ARRAY_TASK_COUNT"]))
    return Piece()


def merge_parts(out: str | os.PathLike) -> Store:
    """Joins the finished parts under `out` into one store at `out` (shards linked, parts removed)."""
    out = Path(out)
    if (out / "manifest.json").exists():
        return Store.open(out)
    parts = [Store.open(p) for p in part_dirs(out)]
    first = parts[0].manifest
    if any(p.dim != first.dim or p.manifest.dtype != first.dtype for p in parts):
        raise ValueError(f"{out}: the parts have different dims or dtypes")
    (out / "shards").mkdir(exist_ok=True)
    shards, skipped, before = [], [], 0
    for part in parts:
        # a part counts its items from its own first one: the merged list counts from the run's
        own = part.manifest.provenance.get("skipped", [])
        skipped += [{**s, "index": s["index"] + before} for s in own]
        before += part.count + len(own)  # each item of a part is a row or a skipped item
        for i, s in enumerate(part.manifest.shards):
            name = f"{len(shards):05d}"
            for src, suffix in ((part.shard_path(i), ".npy"), (part.ids_path(i), ".ids.npy")):
                _link(src, out / "shards" / f"{name}{suffix}")
            shards.append(replace(s, name=name))
    provenance = {k: v for k, v in first.provenance.items() if k not in ("piece", "skipped")}
    provenance.update(skipped=skipped, merged_from=len(parts))
    merged = Manifest(first.dim, first.dtype, shards, first.normalized, provenance)
    atomic_write(out / "manifest.json", merged.to_json())  # from here on `out` is the store
    for part in parts:
        shutil.rmtree(part.path)
    return Store.open(out)


def _link(src: Path, dst: Path) -> None:
    dst.unlink(missing_ok=True)  # left by an interrupted merge
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
