"""Interchange with other tools' files: the official HDF5 feature files and plain `.npy` matrices.

The official feature files hold a `features` (n, dim) dataset and an `index` of ids, in which
non-ASCII characters are escaped as `#U` + 4 hex digits (UTF-16 code units, so characters beyond
the BMP take two). Import decodes them (stores hold UTF-8) and export writes them back. Imports
stream chunk by chunk into a `StoreWriter` and resume after the rows already written.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from ._core import StoreFormatError
from ._extras import require
from ._io import atomic_path
from .store import DEFAULT_SHARD_ROWS, Store, StoreWriter, file_source

_ESCAPE = re.compile(r"#U([0-9a-fA-F]{4})")


def decode_official_id(s: str | bytes) -> str:
    """Decodes an id of the official HDF5 index (`#U00e9` -> `é`)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    if "#U" not in s:
        return s
    # surrogate pairs (characters beyond the BMP) come out as two escapes
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), s).encode("utf-16", "surrogatepass").decode("utf-16")


def encode_official_id(s: str) -> str:
    """Escapes non-ASCII characters the official way (`é` -> `#U00e9`)."""
    if s.isascii():
        return s
    out = []
    for ch in s:
        if ch.isascii():
            out.append(ch)
        else:
            u = ch.encode("utf-16-le", "surrogatepass")
            out.extend(f"#U{int.from_bytes(u[j:j + 2], 'little'):04x}" for j in range(0, len(u), 2))
    return "".join(out)


def _h5py():
    return require("h5py", "reading official HDF5 files", "hdf5")


def import_hdf5(
    sources: Sequence[str | os.PathLike],
    dest: str | os.PathLike,
    chunk_rows: int = 65536,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    progress=None,
    replace: bool = False,
) -> Store:
    """Imports official feature files (`features` + `index` datasets), in order, into one store.

    Streams chunk by chunk and resumes: rows already in `dest` are skipped. A store imported
    from other files is an error unless `replace` (then it is written anew and swapped in).
    """
    h5py = _h5py()
    files = [Path(s) for s in sources]
    layout, kinds = [], set()
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"{f}: no such file")
        with h5py.File(f, "r") as h:
            for name in ("features", "index"):
                if name not in h:
                    raise StoreFormatError(f"{f}: no '{name}' dataset (expected the official layout: features + index)")
            feats, index = h["features"], h["index"]
            if feats.ndim != 2 or index.shape[0] != feats.shape[0]:
                raise StoreFormatError(f"{f}: features {feats.shape} and index {index.shape} do not match")
            layout.append((feats.shape[0], feats.shape[1]))
            kinds.add(feats.dtype.itemsize)
    dims = {d for _, d in layout}
    if len(dims) != 1:
        raise StoreFormatError(f"files have different dimensions {sorted(dims)}: {', '.join(map(str, files))}")
    dim = dims.pop()
    total = sum(n for n, _ in layout)
    # official text features are float32 and stay so; image features are float16
    dtype = "float32" if kinds and min(kinds) >= 4 else "float16"
    writer = StoreWriter(
        dest, dim, dtype=dtype, shard_rows=shard_rows, provenance={"imported_from": [f.name for f in files]},
        source=file_source(files, shard_rows=shard_rows), expected=total, replace=replace,
    )
    skip = writer.committed
    if progress:
        progress.total = total
        progress.update(skip)
    with writer:
        offset = 0
        for f, (n, _) in zip(files, layout):
            if skip >= offset + n:
                offset += n
                continue
            with h5py.File(f, "r") as h:
                feats, index = h["features"], h["index"]
                for lo in range(max(0, skip - offset), n, chunk_rows):
                    hi = min(lo + chunk_rows, n)
                    ids = [decode_official_id(i) for i in index[lo:hi]]
                    writer.append(np.asarray(feats[lo:hi]), ids)
                    if progress:
                        progress.update(hi - lo)
            offset += n
    return Store.open(dest)


def export_hdf5(store: Store, dest: str | os.PathLike, chunk_rows: int = 65536, progress=None) -> Path:
    """Writes a store as one official feature file (`features` in the store's float16 or float32,
    ASCII `index`): text query features, float32 in the official files, stay float32."""
    h5py = _h5py()
    dest = Path(dest)
    if progress:
        progress.total = store.count
    with atomic_path(dest) as tmp, h5py.File(tmp, "w") as h:
        feats = h.create_dataset("features", (store.count, store.dim), dtype=store.dtype)
        index = h.create_dataset("index", (store.count,), dtype=h5py.string_dtype("ascii"))
        lo = 0
        for v, ids in store.iter_chunks(chunk_rows):
            feats[lo : lo + len(v)] = np.asarray(v)
            index[lo : lo + len(v)] = [encode_official_id(i.decode("utf-8")) for i in ids]
            lo += len(v)
            if progress:
                progress.update(len(v))
    return dest


def import_npy(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    ids: Sequence[str] | None = None,
    chunk_rows: int = 65536,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    progress=None,
    replace: bool = False,
) -> Store:
    """Imports a (n, dim) .npy matrix; without ids, rows are named by their number. Resumes
    like `import_hdf5`, and refuses another source unless `replace`."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such file")
    try:
        arr = np.load(source, mmap_mode="r")
    except ValueError as e:
        raise StoreFormatError(f"{source}: not a readable .npy file ({e})") from None
    if arr.ndim != 2 or arr.dtype.kind != "f":
        raise StoreFormatError(f"{source}: expected a 2-D float array, found {arr.dtype} {arr.shape}")
    if ids is not None and len(ids) != len(arr):
        raise ValueError(f"ids: {len(ids)} ids for {len(arr)} rows of {source}")
    id_hash = None if ids is None else hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:32]
    writer = StoreWriter(dest, arr.shape[1], shard_rows=shard_rows, provenance={"imported_from": [source.name]},
                         source=file_source([source], shard_rows=shard_rows, ids=id_hash), expected=len(arr),
                         replace=replace)
    if progress:
        progress.total = len(arr)
        progress.update(writer.committed)
    with writer:
        for lo in range(writer.committed, len(arr), chunk_rows):
            hi = min(lo + chunk_rows, len(arr))
            chunk_ids = ids[lo:hi] if ids is not None else [str(i) for i in range(lo, hi)]
            writer.append(arr[lo:hi], chunk_ids)
            if progress:
                progress.update(hi - lo)
    return Store.open(dest)
