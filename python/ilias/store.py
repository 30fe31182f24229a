"""The vector store: a directory of float16 (or float32) `.npy` shards with their ids.

Layout (format version 1)::

    <store>/manifest.json
    <store>/shards/00000.npy       (n_i, dim) float16, C order, standard .npy header
    <store>/shards/00000.ids.npy   (n_i,) fixed-width bytes, the id of each row (UTF-8)

Writing is append-only and crash-safe: rows stream into a hidden temporary shard whose header
is rewritten when the shard is complete; the shard is then fsynced and renamed into place, and
only then does the manifest (itself replaced atomically) count it. A reader therefore never sees
a half-written shard, and a writer reopened on the same directory resumes after the last
complete shard: `StoreWriter.count` tells the caller how many rows to skip.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import tokenize
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import _core
from ._core import StoreFormatError
from ._io import atomic_path, atomic_write, fsync_dir

FORMAT = "ilias-store"
VERSION = 1
DEFAULT_SHARD_ROWS = 1_000_000
_DTYPES = {"float16": np.float16, "float32": np.float32}
# Ids are stored fixed-width, so one long id widens every id of its shard: ILIAS ids are under
# 100 bytes, and a limit keeps a stray path or a whole caption from making a shard of gigabytes.
MAX_ID_BYTES = 1024
# A sane bound on a vector's dimension (the largest ILIAS models give 1,536).
MAX_DIM = 1 << 16
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# A fixed header size (numpy pads to 64 bytes; 128 holds any 2-D shape) lets a shard be
# streamed to disk before its row count is known and its header rewritten in place at the end.
_HEADER_BYTES = 128


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    d = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    text = repr(d).encode("latin1")
    pad = _HEADER_BYTES - 10 - len(text) - 1
    if pad < 0:
        raise ValueError(f"shape {shape} does not fit a {_HEADER_BYTES}-byte .npy header")
    return b"\x93NUMPY\x01\x00" + (_HEADER_BYTES - 10).to_bytes(2, "little") + text + b" " * pad + b"\n"


def encode_ids(ids: Iterable, what: str = "ids") -> list[bytes]:
    """Ids as UTF-8 bytes; accepts str, bytes and numpy string arrays."""
    out = []
    for i in ids:
        if isinstance(i, (bytes, np.bytes_)):
            b = bytes(i)
        elif isinstance(i, (str, np.str_)):
            b = str(i).encode("utf-8")
        else:
            raise TypeError(f"{what}: expected str or bytes ids, got {type(i).__name__}")
        if not b or b.endswith(b"\0"):
            raise ValueError(f"{what}: ids must be non-empty and must not end with a NUL byte: {b!r}")
        if len(b) > MAX_ID_BYTES:
            raise ValueError(f"{what}: id {len(out)} is {len(b):,} bytes long, over the limit of {MAX_ID_BYTES:,} ({b[:40]!r}...)")
        out.append(b)
    return out


def content_fingerprint(dim: int, dtype: str, shards: Sequence["ShardInfo"]) -> str:
    """Identifies vectors by content: the dimension, type, and every shard's row count and
    checksum, in order. The one scheme for a store, a database of several, and the codes built
    from one (which record it)."""
    key = repr((dim, dtype, [(s.count, s.sha256) for s in shards]))
    return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ShardInfo:
    name: str
    count: int
    sha256: str | None = None  # of the vectors' data section
    ids_sha256: str | None = None  # of the whole ids file
    # the fast 64-bit checksum of the data section (`_core.shard_checksum`, 16 hex digits) that
    # exact search verifies as it streams the shard; stores written before it are not verified
    fast_checksum: str | None = None

    @property
    def fast_checksum_int(self) -> int | None:
        return None if self.fast_checksum is None else int(self.fast_checksum, 16)


@dataclass
class Manifest:
    dim: int
    dtype: str
    shards: list[ShardInfo] = field(default_factory=list)
    normalized: bool | None = None
    provenance: dict = field(default_factory=dict)
    # what the rows are written from (source files, writer parameters): a writer given another
    # source refuses to add to the store, so that one store never mixes two inputs
    source: dict | None = None
    expected: int | None = None  # the rows the store holds when complete, where known
    # False from the moment a writer opens the store until it closes it with every row written:
    # a killed writer leaves a store that is valid but says it is partial
    complete: bool = True

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "dim": self.dim,
                "dtype": self.dtype,
                "count": self.count,
                "normalized": self.normalized,
                "complete": self.complete,
                "expected": self.expected,
                "shards": [{"name": s.name, "count": s.count, "sha256": s.sha256, "ids_sha256": s.ids_sha256,
                            **({"fast_checksum": s.fast_checksum} if s.fast_checksum is not None else {})}
                           for s in self.shards],
                "source": self.source,
                "provenance": self.provenance,
            },
            indent=1,
        )

    @classmethod
    def read(cls, store: Path) -> "Manifest":
        path = store / "manifest.json"
        if not store.exists():
            raise FileNotFoundError(f"{store}: no such store directory")
        if not path.exists():
            raise FileNotFoundError(f"{path}: missing; {store} is not an ilias store")
        try:
            m = json.loads(path.read_text())
            if not isinstance(m, dict):
                raise StoreFormatError(f"{path}: expected a JSON object, found {type(m).__name__}")
            if m.get("format") != FORMAT:
                raise StoreFormatError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r}")
            if m.get("version") != VERSION:
                raise StoreFormatError(
                    f"{path}: store format version {m.get('version')} is not supported (this is version {VERSION})"
                )
            if m["dtype"] not in _DTYPES:
                raise StoreFormatError(f"{path}: dtype {m['dtype']!r} (expected float16 or float32)")
            shards = [ShardInfo(s["name"], int(s["count"]), s.get("sha256"), s.get("ids_sha256"),
                                _hex64(s.get("fast_checksum"))) for s in m["shards"]]
            expected = None if m.get("expected") is None else int(m["expected"])
            man = cls(int(m["dim"]), m["dtype"], shards, m.get("normalized"), m.get("provenance") or {},
                      m.get("source"), expected, bool(m.get("complete", True)))
        except UnicodeDecodeError:
            raise StoreFormatError(f"{path}: not a text file") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, StoreFormatError):
                raise
            raise StoreFormatError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
        if not 1 <= man.dim <= MAX_DIM:
            raise StoreFormatError(f"{path}: dim {man.dim} is out of range (1 to {MAX_DIM:,})")
        for sh in man.shards:
            if not _SHARD_NAME.match(sh.name) or sh.count < 0:
                raise StoreFormatError(f"{path}: bad shard entry {sh.name!r} ({sh.count} rows)")
        if man.count != m.get("count", man.count):
            raise StoreFormatError(f"{path}: count {m['count']} disagrees with the sum of its shards {man.count}")
        return man


class Store:
    """A store opened for reading: zero-copy numpy views of its shards, ids on demand."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest
        self._starts = np.cumsum([0] + [s.count for s in manifest.shards])
        self._ids_checked: set[int] = set()

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        """Opens a store and validates every shard's header against its file and the manifest."""
        path = Path(path)
        man = Manifest.read(path)
        store = cls(path, man)
        for i, s in enumerate(man.shards):
            vec_path = store.shard_path(i)
            for f in (vec_path, store.ids_path(i)):
                _regular_file(f)
            dtype, rows, dim = _core.inspect_shard(str(vec_path), man.dim)
            if dtype != man.dtype or rows != s.count:
                raise StoreFormatError(
                    f"{vec_path}: holds {rows} {dtype} rows but the manifest says {s.count} {man.dtype} rows"
                )
            ids = store.ids(i)
            if ids.ndim != 1 or ids.dtype.kind != "S" or len(ids) != s.count:
                raise StoreFormatError(
                    f"{store.ids_path(i)}: expected {s.count} byte-string ids, found {ids.dtype} {ids.shape}"
                )
        return store

    # ---- description
    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.manifest.dtype)

    @property
    def count(self) -> int:
        return self.manifest.count

    def __len__(self) -> int:
        return self.count

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def shard_path(self, i: int) -> Path:
        return self.path / "shards" / f"{self.manifest.shards[i].name}.npy"

    def ids_path(self, i: int) -> Path:
        return self.path / "shards" / f"{self.manifest.shards[i].name}.ids.npy"

    @property
    def shard_paths(self) -> list[Path]:
        return [self.shard_path(i) for i in range(self.num_shards)]

    @property
    def fingerprint(self) -> str:
        """Identifies the content: dim, dtype and every shard's count and checksum."""
        return content_fingerprint(self.dim, self.manifest.dtype, self.manifest.shards)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, count={self.count}, dim={self.dim}, dtype={self.manifest.dtype})"

    # ---- data
    def vectors(self, i: int) -> np.ndarray:
        """Shard `i` as a read-only memory-mapped (n_i, dim) array."""
        try:
            return np.load(self.shard_path(i), mmap_mode="r")
        except (ValueError, SyntaxError, tokenize.TokenError, EOFError) as e:
            raise StoreFormatError(f"{self.shard_path(i)}: not a readable .npy file ({type(e).__name__}: {e})") from None

    def ids(self, i: int) -> np.ndarray:
        """The ids of shard `i` as a memory-mapped bytes array."""
        try:
            return np.load(self.ids_path(i), mmap_mode="r")
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.ids_path(i)}: missing id shard") from None
        except (ValueError, SyntaxError, tokenize.TokenError, EOFError) as e:
            # numpy parses a damaged header with Python's own tokenizer, whose errors are not ValueErrors
            raise StoreFormatError(f"{self.ids_path(i)}: not a readable .npy file ({type(e).__name__}: {e})") from None

    def checked_ids(self, i: int) -> np.ndarray:
        """`ids(i)`, its checksum verified the first time (the ids that results report: a
        corrupt ids file would put wrong names on right rows)."""
        if i not in self._ids_checked:
            want = self.manifest.shards[i].ids_sha256
            if want is not None and file_sha256(self.ids_path(i)) != want:
                raise StoreFormatError(f"{self.ids_path(i)}: checksum mismatch (the ids changed or are corrupt)")
            self._ids_checked.add(i)
        return self.ids(i)

    def iter_chunks(self, rows: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(vectors, ids) in store order, `rows` at a time (never more than one shard)."""
        for i in range(self.num_shards):
            v, ids = self.vectors(i), self.ids(i)
            for lo in range(0, len(v), rows):
                yield v[lo : lo + rows], ids[lo : lo + rows]

    def read_all(self) -> np.ndarray:
        """All vectors in one array in memory (for small stores: queries)."""
        if self.num_shards == 0:
            return np.zeros((0, self.dim), self.dtype)
        return np.concatenate([self.vectors(i) for i in range(self.num_shards)])

    def all_ids(self) -> list[str]:
        """All ids as Python strings (for small stores: queries, positives)."""
        return [b.decode("utf-8") for i in range(self.num_shards) for b in self.ids(i)]

    def ids_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The ids (as an object array of str) of the given rows, reading only those rows."""
        raw = self.raw_ids_of(rows)
        out = np.empty(raw.shape, dtype=object)
        out.ravel()[:] = [b.decode("utf-8") for b in raw.ravel()]
        return out

    def _split(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(shard, its local rows, where they sit in `rows`) for each shard that `rows` touches."""
        rows = rows.ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"row index out of range for {self.path} ({self.count} rows)")
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            yield int(s), rows[where] - self._starts[s], where

    def raw_ids_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The ids (UTF-8 bytes, a fixed-width array) of the given rows, reading only those rows.

        Id shards are mapped one at a time and let go afterwards, so resolving the results of
        a search over 100M rows never holds more than one id shard's pages.
        """
        rows = np.asarray(rows, dtype=np.int64)
        parts = [(where, self.checked_ids(s)[local]) for s, local, where in self._split(rows)]
        width = max((p.dtype.itemsize for _, p in parts), default=1)
        out = np.zeros(rows.size, dtype=f"S{width}")
        for where, p in parts:
            out[where] = p
        return out.reshape(rows.shape)

    def vectors_of(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """The vectors of the given rows as float32 (len(rows), dim), reading only those rows."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((rows.size, self.dim), dtype=np.float32)
        for s, local, where in self._split(rows):
            out[where] = self.vectors(s)[local]
        return out.reshape(*rows.shape, self.dim)

    def verify(self) -> None:
        """Recomputes each shard's checksums against the manifest (reads the whole store)."""
        for i, s in enumerate(self.manifest.shards):
            self._ids_checked.discard(i)
            self.checked_ids(i)
            if s.sha256 is None:
                continue
            v = self.vectors(i)
            h = hashlib.sha256()
            flat = np.asarray(v).reshape(-1).view(np.uint8)
            for lo in range(0, flat.size, 1 << 26):
                h.update(flat[lo : lo + (1 << 26)])
            if h.hexdigest() != s.sha256:
                raise StoreFormatError(f"{self.shard_path(i)}: checksum mismatch (the data changed or is corrupt)")
        for i, s in enumerate(self.manifest.shards):
            if s.fast_checksum is not None and _core.shard_checksum(str(self.shard_path(i)), 0) != s.fast_checksum_int:
                raise StoreFormatError(f"{self.shard_path(i)}: fast checksum mismatch (the data changed or is corrupt)")


def _hex64(value) -> str | None:
    """A manifest's `fast_checksum`: None, or 16 hex digits (anything else is a damaged manifest)."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 16 or not all(c in "0123456789abcdef" for c in value):
        raise ValueError(f"fast_checksum {value!r} is not 16 hex digits")
    return value


def _regular_file(path: Path) -> None:
    """A shard must be a plain file: opening a FIFO would wait forever, a device would read garbage."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing shard file") from None
    if not stat.S_ISREG(mode):
        raise StoreFormatError(f"{path}: not a regular file")


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def file_tag(path: str | os.PathLike) -> str:
    """How results and stores name a weights file: its name and the first 12 hex digits of its sha256."""
    return f"{Path(path).name}@{file_sha256(path)[:12]}"


class StoreLockedError(OSError):
    """Another writer holds the store."""


class StoreWriter:
    """Appends vectors and ids to a store, shard by shard; resumes an interrupted store.

    >>> with StoreWriter("out/positives", dim=768) as w:   # doctest: +SKIP
    ...     w.append(features, ids)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        dim: int,
        dtype: str = "float16",
        shard_rows: int = DEFAULT_SHARD_ROWS,
        normalized: bool | None = None,
        provenance: dict | None = None,
        resume: bool = True,
        source: dict | None = None,
        expected: int | None = None,
        replace: bool = False,
    ):
        """`source`: what the rows come from (files with sizes and sample hashes, parameters);
        resuming a store written from another source is an error unless `replace`, which writes
        the store anew beside the old one and swaps them when it is complete. `expected`: the
        rows the store will hold, when known; it is marked complete only when it holds them."""
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: {dtype!r} is not supported (expected float16 or float32)")
        if not 1 <= dim <= MAX_DIM:
            raise ValueError(f"dim: must be 1 to {MAX_DIM:,}, got {dim}")
        if shard_rows < 1:
            raise ValueError(f"shard_rows: must be at least 1, got {shard_rows}")
        if expected is not None and expected < 0:
            raise ValueError(f"expected: must be at least 0, got {expected}")
        self.final = Path(path)
        self.path = self.final
        self.shard_rows = shard_rows
        self._locks = [_lock(self.final)]
        try:
            if replace and (self.final / "manifest.json").exists():
                # written beside the old store, swapped in by close(): readers see one or the other
                self.path = self.final.with_name(f".{self.final.name}.replacing")
                shutil.rmtree(self.path, ignore_errors=True)
                self._locks.append(_lock(self.path))
            (self.path / "shards").mkdir(parents=True, exist_ok=True)
            if (self.path / "manifest.json").exists():
                if not resume:
                    raise FileExistsError(f"{self.path}: a store already exists here (resume it or choose another path)")
                man = Manifest.read(self.path)
                if man.dim != dim or man.dtype != dtype:
                    raise ValueError(
                        f"{self.path}: existing store has dim {man.dim} {man.dtype}, cannot append dim {dim} {dtype}"
                    )
                for what, old, new in (("source", man.source, source), ("expected rows", man.expected, expected)):
                    if old is not None and new is not None and old != new:
                        raise StoreSourceError(
                            f"{self.path}: holds rows written from another input ({what} {_brief(old)}, "
                            f"not {_brief(new)}); replace it (--replace) or choose another path"
                        )
                man.source = source if source is not None else man.source
                man.expected = expected if expected is not None else man.expected
                self.manifest = man
            else:
                self.manifest = Manifest(dim, dtype, [], normalized, provenance or {}, source, expected)
            if provenance:
                self.manifest.provenance.update(provenance)
            self.manifest.complete = False
            self._write_manifest()
        except BaseException:
            self._unlock()
            raise
        self._np_dtype = np.dtype(_DTYPES[dtype]).newbyteorder("<")
        self._file = None
        self._rows = 0
        self._ids: list[bytes] = []
        self._hash = None
        self._all_normalized = True
        self._collapsed = 0  # rows that float16 could not hold faithfully (underflow)

    @property
    def count(self) -> int:
        """Rows written so far, including the shard in progress."""
        return self.manifest.count + self._rows

    @property
    def committed(self) -> int:
        """Rows in complete shards: what survives an interruption."""
        return self.manifest.count

    def _write_manifest(self) -> None:
        atomic_write(self.path / "manifest.json", self.manifest.to_json())

    def _tmp_path(self) -> Path:
        return self.path / "shards" / f".{len(self.manifest.shards):05d}.npy.tmp"

    def append(self, vectors: np.ndarray, ids: Sequence) -> None:
        """Appends rows; `ids` gives one id per row."""
        vectors = np.asarray(vectors)
        dim = self.manifest.dim
        if vectors.ndim != 2 or vectors.shape[1] != dim:
            raise ValueError(f"vectors: expected shape (n, {dim}), got {vectors.shape}")
        if vectors.dtype.kind != "f":
            raise ValueError(f"vectors: expected a floating-point array, got {vectors.dtype}")
        ids = encode_ids(ids)
        if len(ids) != len(vectors):
            raise ValueError(f"ids: {len(ids)} ids for {len(vectors)} vectors")
        if len(vectors) and not np.isfinite(vectors).all():
            bad = int(np.nonzero(~np.isfinite(vectors).all(axis=1))[0][0])
            raise ValueError(f"vectors: row {bad} holds NaN or Inf")
        with np.errstate(over="ignore"):
            converted = np.ascontiguousarray(vectors, dtype=self._np_dtype)
        if len(converted) and not np.isfinite(converted).all():
            raise ValueError(f"vectors: values overflow {self.manifest.dtype} (largest magnitude {np.abs(vectors).max()})")
        if len(vectors):
            stored = converted.astype(np.float32)
            norms = np.sqrt(np.einsum("ij,ij->i", stored, stored))
            if self._np_dtype.itemsize == 2:
                # float16 keeps 11 bits down to 6e-5 only: rows of smaller values lose their direction
                given = vectors.astype(np.float32, copy=False)
                wanted = np.sqrt(np.einsum("ij,ij->i", given, given))
                self._collapsed += int(np.count_nonzero(np.abs(norms - wanted) > 1e-2 * wanted))
            if self.manifest.normalized is None:
                self._all_normalized &= bool(np.all(np.abs(norms - 1) < 1e-2))
        lo = 0
        while lo < len(converted):
            if self._file is None:
                self._open_shard()
            take = min(self.shard_rows - self._rows, len(converted) - lo)
            block = converted[lo : lo + take]
            data = block.tobytes()
            self._file.write(data)
            self._hash.update(data)
            self._ids.extend(ids[lo : lo + take])
            self._rows += take
            lo += take
            if self._rows == self.shard_rows:
                self._finish_shard()

    def _open_shard(self) -> None:
        self._file = open(self._tmp_path(), "wb")
        self._file.write(b"\0" * _HEADER_BYTES)
        self._hash = hashlib.sha256()
        self._rows = 0
        self._ids = []

    def _finish_shard(self) -> None:
        name = f"{len(self.manifest.shards):05d}"
        shards = self.path / "shards"
        f = self._file
        f.seek(0)
        f.write(_npy_header(self._np_dtype, (self._rows, self.manifest.dim)))
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._file = None
        width = max(len(i) for i in self._ids)
        with atomic_path(shards / f"{name}.ids.npy") as tmp:
            np.save(tmp, np.array(self._ids, dtype=f"S{width}"), allow_pickle=False)
            ids_sha256 = file_sha256(tmp)
        # from the file just written (in the page cache): what exact search verifies as it reads
        fast = f"{_core.shard_checksum(str(self._tmp_path()), 0):016x}"
        os.replace(self._tmp_path(), shards / f"{name}.npy")
        fsync_dir(shards)
        self.manifest.shards.append(ShardInfo(name, self._rows, self._hash.hexdigest(), ids_sha256, fast))
        self._write_manifest()
        self._rows = 0
        self._ids = []

    def close(self) -> "Store":
        """Writes the last (partial) shard and the final manifest, marked complete when the store
        holds the rows expected; returns the store opened."""
        try:
            if self._file is not None and self._rows:
                self._finish_shard()
            self._drop_partial()
            man = self.manifest
            if man.normalized is None and man.count:
                man.normalized = self._all_normalized
            if man.expected is not None and man.count != man.expected:
                self._write_manifest()
                if self.path != self.final:
                    shutil.rmtree(self.path, ignore_errors=True)
                raise ValueError(f"{self.final}: holds {man.count:,} of the {man.expected:,} rows expected; it stays incomplete")
            man.complete = True
            self._write_manifest()
            if self._collapsed:
                warnings.warn(
                    f"{self.final}: {self._collapsed:,} rows lost more than 1% of their norm in float16 (values under "
                    "6e-5 underflow); store them as float32 (dtype='float32') or scale them up",
                    stacklevel=2,
                )
            if self.path != self.final:
                _swap_in(self.path, self.final)
                self.path = self.final
        finally:
            self._unlock()
        return Store.open(self.final)

    def _drop_partial(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp_path().unlink(missing_ok=True)
        self._rows = 0
        self._ids = []

    def abort(self) -> None:
        """Stops without completing: complete shards stay (the resume point), the partial one goes."""
        self._drop_partial()
        if self.path != self.final:
            shutil.rmtree(self.path, ignore_errors=True)  # a failed replacement leaves the old store as it was
        self._unlock()

    def _unlock(self) -> None:
        for fd in getattr(self, "_locks", ()):
            os.close(fd)  # closing the descriptor releases its lock
        self._locks = []

    def __del__(self) -> None:
        self._unlock()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            # keep only complete shards: the resume point stays exact
            self.abort()


def write_store(path, vectors: np.ndarray, ids: Sequence, **kwargs) -> Store:
    """Writes a whole array as a new store (a convenience for small data and tests)."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors: expected shape (n, dim), got {vectors.shape}")
    with StoreWriter(path, dim=vectors.shape[1], resume=False, **kwargs) as w:
        w.append(vectors, ids)
    return Store.open(path)


def file_source(paths: Sequence[str | os.PathLike], **params) -> dict:
    """A store's `source` for rows read from files: each file's name, size and a hash of its
    first and last MiB (cheap on 100 GB, and blind to a copy's new modification time), plus the
    writer's parameters."""
    files = []
    for p in map(Path, paths):
        size = p.stat().st_size
        h = hashlib.sha256()
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
            h.update(f.read(1 << 20))
        files.append({"name": p.name, "size": size, "sample_sha256": h.hexdigest()[:32]})
    return {"files": files, **params}


class StoreSourceError(ValueError):
    """A store holds rows of another input than the one being written into it."""


def _brief(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def _lock(store: Path) -> int:
    """An advisory lock on `store` (its `.lock` file), held until the descriptor is closed; a
    second writer of the same store fails at once instead of interleaving its shards."""
    store.mkdir(parents=True, exist_ok=True)
    fd = os.open(store / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreLockedError(f"{store}: another process is writing this store (its .lock is held)") from None
    return fd


def _swap_in(new: Path, final: Path) -> None:
    """Replaces the store `final` by the complete store `new`: two renames, the old one removed."""
    old = final.with_name(f".{final.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


# ---- stores written in pieces

# `ilias extract --shard-id k --num-shards n` writes piece k of a store to `<out>/part-<k>-of-<n>`
PART_NAME = re.compile(r"^part-(\d{5})-of-(\d{5})$")


def part_dirs(out: Path) -> list[Path]:
    """The finished pieces under `out`, in order; an error names what is missing or unfinished."""
    parts = sorted(p for p in out.iterdir() if p.is_dir() and PART_NAME.match(p.name)) if out.is_dir() else []
    if not parts:
        raise FileNotFoundError(f"{out}: neither a store nor a folder of part-XXXXX-of-XXXXX stores")
    counts = {int(PART_NAME.match(p.name).group(2)) for p in parts}
    if len(counts) != 1:
        raise ValueError(f"{out}: parts of different splits ({sorted(counts)} pieces) are mixed here")
    n = counts.pop()
    have = {int(PART_NAME.match(p.name).group(1)) for p in parts}
    missing = sorted(set(range(n)) - have)
    if missing:
        raise ValueError(f"{out}: {len(missing)} of {n} parts are missing (first: part {missing[0]})")
    for p in parts:
        if not Manifest.read(p).provenance.get("complete"):
            raise ValueError(f"{p}: this part is not finished yet (run its piece again to complete it)")
    return parts


def open_stores(path: str | os.PathLike) -> list[Store]:
    """A store, or the ordered pieces of one written in parts, as a list of stores (one database)."""
    path = Path(path)
    if (path / "manifest.json").exists() or not path.is_dir():
        return [Store.open(path)]
    return [Store.open(p) for p in part_dirs(path)]
