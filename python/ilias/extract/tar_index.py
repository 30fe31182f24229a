"""Random access into webdataset tars: a member-offset index, built once per tar and cached.

Re-ranking decodes only the images of a shortlist, a few hundred out of each 100K-image tar. A tar
has no table of contents, so finding one member means walking the headers before it. The index
walks them once (tarfile reads each header and seeks past the data: one sequential pass of about
a 512-byte read per member) and keeps, for every `(key, extension)`, where the member's data
starts and how long it is. Reading a member is then one seek and one read.

The index is cached as `.<tar name>.index.npz` next to the tar, or, when that folder is not
writable (read-only datasets), under a cache folder keyed by the tar's absolute path. It records
the tar's size and modification time (nanoseconds) and is rebuilt when either differs: a
rewritten tar never serves stale offsets.

Keys and extensions are split the way webdataset splits member names (`webdataset_key`: at the
first dot of the file name); extensions are lower-cased, as webdataset does. This module needs
numpy only (the demo and the weight-free re-ranker read tars without torch).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
import zipfile
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from .._io import atomic_path

INDEX_FORMAT = "ilias-tar-index"
INDEX_VERSION = 1


def default_cache_dir() -> Path:
    """Where indexes of tars in read-only folders go: $ILIAS_CACHE or ~/.cache/ilias, then tar-index/."""
    root = os.environ.get("ILIAS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ilias")
    return Path(root) / "tar-index"


def tar_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """Tar shards, in the order given; a folder stands for its *.tar files, sorted (a folder
    without any, or a path that does not exist, is an error naming it)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            tars = sorted(p.glob("*.tar"))
            if not tars:
                raise ValueError(f"{p}: no .tar files in this folder")
            out.extend(tars)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such tar file")
    return out


def webdataset_key(member: str) -> tuple[str, str]:
    """(key, extension) of a tar member the way webdataset splits it: at the first dot of the file name."""
    head, _, name = member.rpartition("/")
    stem, _, ext = name.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


class TarIndex:
    """The members of one tar by (key, extension): offsets and sizes of their data.

    >>> idx = TarIndex.open("distractors/00000.tar")          # doctest: +SKIP
    >>> jpeg = idx.read("000000042")                          # the bytes of 000000042.jpg
    """

    def __init__(self, tar: Path, keys: np.ndarray, exts: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                 cache_path: Path | None = None):
        self.tar = tar
        self.cache_path = cache_path
        self._offsets = offsets
        self._sizes = sizes
        self._keys = keys
        self._exts = exts
        # a dict of Python strings for 100K members is a few MB: fine for one tar at a time
        self._where = {(k.decode("utf-8"), e.decode("utf-8")): i for i, (k, e) in enumerate(zip(keys, exts))}
        self._file: BinaryIO | None = None
        self._lock = threading.Lock()

    # ---- building and caching
    @classmethod
    def build(cls, tar: str | os.PathLike) -> "TarIndex":
        """Indexes `tar` with one pass over its headers (no cache read or written)."""
        tar = Path(tar)
        found: dict[tuple[str, str], tuple[int, int]] = {}
        try:
            with tarfile.open(tar, "r:") as t:
                for m in t:
                    if not m.isfile():
                        continue
                    key, ext = webdataset_key(m.name)
                    # a repeated name: the last one wins, as tarfile.getmember and tar -x do
                    found[(key, ext.lower())] = (m.offset_data, m.size)
        except FileNotFoundError:
            raise FileNotFoundError(f"{tar}: no such tar file") from None
        except tarfile.ReadError as e:
            raise ValueError(f"{tar}: not a readable (uncompressed) tar file ({e})") from None
        keys = _bytes_array([k for k, _ in found])
        exts = _bytes_array([e for _, e in found])
        where = np.array(list(found.values()), dtype=np.int64).reshape(-1, 2)
        return cls(tar, keys, exts, where[:, 0].copy(), where[:, 1].copy())

    @classmethod
    def open(cls, tar: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> "TarIndex":
        """The index of `tar`: read from its cache when that matches the tar's size and
        modification time, otherwise built and cached. `cache_dir`: where to cache (default:
        next to the tar when that folder is writable, else `default_cache_dir()`)."""
        tar = Path(tar)
        try:
            st = tar.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{tar}: no such tar file") from None
        path = cache_path_for(tar, cache_dir)
        cached = _read_cache(path, tar, st)
        if cached is not None:
            return cached
        idx = cls.build(tar)
        idx.cache_path = path
        idx._write_cache(path, st)
        return idx

    def _write_cache(self, path: Path, st: os.stat_result) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            np.savez(tmp, format=np.array(INDEX_FORMAT), version=np.int64(INDEX_VERSION),
                     tar_name=np.array(self.tar.name), tar_size=np.int64(st.st_size), tar_mtime_ns=np.int64(st.st_mtime_ns),
                     keys=self._keys, exts=self._exts, offsets=self._offsets, sizes=self._sizes)

    # ---- lookups
    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, key) -> bool:
        key, ext = key if isinstance(key, tuple) else (key, "jpg")
        return (key, ext) in self._where

    def keys(self, ext: str = "jpg") -> list[str]:
        """The keys that have a member with extension `ext`, in tar order."""
        return [k for (k, e) in self._where if e == ext]

    def locate(self, key: str, ext: str = "jpg") -> tuple[int, int]:
        """(offset, size) of the data of member `key.ext`; KeyError naming the tar if absent."""
        i = self._where.get((key, ext.lower()))
        if i is None:
            raise KeyError(f"{self.tar}: no member {key}.{ext} (the tar has {len(self):,} members)")
        return int(self._offsets[i]), int(self._sizes[i])

    def read(self, key: str, ext: str = "jpg") -> bytes:
        """The bytes of member `key.ext`: one positional read (the tar stays open between reads;
        safe from several threads at once, as there is no shared file position)."""
        offset, size = self.locate(key, ext)
        with self._lock:
            if self._file is None:
                self._file = open(self.tar, "rb")
        data = os.pread(self._file.fileno(), size, offset)
        if len(data) != size:
            raise ValueError(f"{self.tar}: member {key}.{ext} is cut short ({len(data):,} of {size:,} bytes; truncated tar?)")
        return data

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "TarIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def cache_path_for(tar: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the index of `tar` is cached (see `TarIndex.open`)."""
    name = f".{tar.name}.index.npz"
    if cache_dir is None and os.access(tar.parent, os.W_OK):
        return tar.parent / name
    # several folders may hold tars of the same name: key the cached file by the tar's full path
    tag = hashlib.sha256(str(tar.resolve()).encode()).hexdigest()[:16]
    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"{tag}{name}"


def _read_cache(path: Path, tar: Path, st: os.stat_result) -> TarIndex | None:
    """The cached index when it is ours and describes the tar as it is now; None otherwise (stale,
    damaged or missing caches are rebuilt, never trusted)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if (str(z["format"]) != INDEX_FORMAT or int(z["version"]) != INDEX_VERSION or str(z["tar_name"]) != tar.name
                    or int(z["tar_size"]) != st.st_size or int(z["tar_mtime_ns"]) != st.st_mtime_ns):
                return None
            keys, exts, offsets, sizes = z["keys"], z["exts"], z["offsets"], z["sizes"]
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None
    if not (len(keys) == len(exts) == len(offsets) == len(sizes)) or (len(offsets) and (
            offsets.min() < 0 or (offsets + sizes).max() > st.st_size)):
        return None
    return TarIndex(tar, keys, exts, offsets, sizes, path)


def _bytes_array(strings: list[str]) -> np.ndarray:
    enc = [s.encode("utf-8") for s in strings]
    return np.array(enc, dtype=f"S{max(map(len, enc), default=1)}")
