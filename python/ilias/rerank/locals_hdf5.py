"""The AMES HDF5 layout of local descriptors, in and out of locals stores.

An AMES file holds one dataset, `features`, float32 (n, N, 5 + D): per token x, y, scale, mask,
weight, then the D-dimensional descriptor (mask = 1 marks padding). It names no images (its rows
follow an image list kept beside it); ours add an `ids` dataset of UTF-8 strings, which import
reads when present. Export of a binary store writes its +-1 signs as the descriptor (D = bits):
exact, but not what AMES's own binary model reads (it projects 768-d floats itself).

Import streams `chunk` images at a time into a LocalsWriter and resumes after the images already
written; float32 descriptors become float16 (bit-exact back out where float16 holds the value).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .._core import StoreFormatError
from .._extras import require
from .._io import atomic_path
from ..store import file_source
from .binary import unpack_signs
from .locals_store import DEFAULT_SHARD_IMAGES, LocalsStore, LocalsWriter


def _h5py():
    return require("h5py", "AMES HDF5 files", "rerank")


def import_ames_hdf5(source: str | os.PathLike, dest: str | os.PathLike, model: str, variant: str = "float16",
                     projection: np.ndarray | None = None, ids: Sequence[str] | None = None, chunk: int = 256,
                     shard_images: int = DEFAULT_SHARD_IMAGES) -> LocalsStore:
    """Imports an AMES `features` file into a locals store of `variant` (binary: `projection`
    (D, bits) projects and signs the descriptors). Ids: the file's `ids` dataset, else `ids`,
    else the row numbers."""
    h5py = _h5py()
    source = Path(source)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such file")
    try:
        h = h5py.File(source, "r")
    except OSError as e:
        raise StoreFormatError(f"{source}: not a readable HDF5 file ({e})") from None
    with h:
        if "features" not in h:
            raise StoreFormatError(f"{source}: no 'features' dataset (expected the AMES layout: features float32 [n, N, 5 + D])")
        feats = h["features"]
        if feats.ndim != 3 or feats.shape[2] <= 5 or feats.dtype.kind != "f":
            raise StoreFormatError(f"{source}: features is {feats.dtype} {feats.shape}, expected float32 [n, N, 5 + D]")
        n, tokens, width = feats.shape
        if "ids" in h:
            file_ids = h["ids"]
            if file_ids.shape != (n,):
                raise StoreFormatError(f"{source}: ids {file_ids.shape} do not match features {feats.shape}")
            names = [i.decode("utf-8") if isinstance(i, bytes) else str(i) for i in file_ids[:]]
            if ids is not None and list(ids) != names:
                raise ValueError(f"ids: differ from the ids dataset of {source}")
        elif ids is not None:
            if len(ids) != n:
                raise ValueError(f"ids: {len(ids)} ids for the {n} images of {source}")
            names = list(ids)
        else:
            names = [str(i) for i in range(n)]
        in_dim = width - 5
        dim = projection.shape[1] if variant == "binary" and projection is not None else in_dim
        writer = LocalsWriter(dest, model, tokens, dim, variant=variant, projection=projection, shard_images=shard_images,
                              provenance={"imported_from": source.name},
                              source=file_source([source], chunk_shape=[tokens, width]), expected=n)
        with writer:
            for lo in range(writer.committed, n, chunk):
                block = np.asarray(feats[lo:lo + chunk], dtype=np.float32)
                writer.append(block[..., :5], block[..., 5:], names[lo:lo + chunk])
    return LocalsStore.open(dest)


def export_ames_hdf5(store: LocalsStore, dest: str | os.PathLike, chunk: int = 256) -> Path:
    """Writes a locals store as one AMES file (`features` float32 [n, N, 5 + D], plus `ids`), atomically."""
    h5py = _h5py()
    dest = Path(dest)
    n, tokens, dim = store.count, store.tokens, store.dim
    with atomic_path(dest) as tmp, h5py.File(tmp, "w") as h:
        feats = h.create_dataset("features", (n, tokens, 5 + dim), dtype=np.float32)
        names = h.create_dataset("ids", (n,), dtype=h5py.string_dtype("utf-8"))
        for lo in range(0, n, chunk):
            rows = np.arange(lo, min(lo + chunk, n))
            meta, desc = store.read(rows)
            values = unpack_signs(desc) if store.variant == "binary" else desc.astype(np.float32)
            feats[lo:lo + len(rows)] = np.concatenate([meta, values], axis=-1)
        lo = 0
        for i in range(store.num_shards):
            batch = [b.decode("utf-8") for b in store.ids(i)]
            names[lo:lo + len(batch)] = batch
            lo += len(batch)
    return dest
