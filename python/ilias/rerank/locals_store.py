"""The local-descriptor store: N tokens per image, each with its place, scale, mask and weight.

Layout (format `ilias-locals`, version 1), a sibling of the vector store (store.py)::

    <store>/manifest.json
    <store>/shards/00000.meta.npy   float32 (n_i, N, 5): x, y, scale, mask, weight
    <store>/shards/00000.desc.npy   float16 (n_i, N, D), or uint8 (n_i, N, D / 8) for "binary"
    <store>/shards/00000.ids.npy    (n_i,) fixed-width bytes, the id of each image (UTF-8)

Every image holds exactly N tokens (an array per shard, no offsets): an image with fewer marks
the rest as padding, mask = 1, as the AMES files do. The binary variant holds the packed signs of
the descriptors projected by a fixed ITQ matrix (`binary.py`); D is then the number of bits, and
the manifest records the projection's checksum and the descriptors' dimension before it.

The manifest names the model the descriptors come from, N, D and the variant; opening a store
with other expectations, or resuming one with other parameters, is a one-line error naming the
manifest. Writing follows StoreWriter: each shard streams into hidden temporary files whose
.npy headers are rewritten when it is complete, then fsynced and renamed, and only then does the
manifest (replaced atomically) count it; a writer reopened on the directory resumes after the
last complete shard (`count` says how many images to skip).
"""

from __future__ import annotations

import json
import os
import tokenize
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np

from .._core import StoreFormatError
from .._io import atomic_path, atomic_write, fsync_dir
from ..store import (
    _HEADER_BYTES,
    _SHARD_NAME,
    StoreSourceError,
    _brief,
    _lock,
    _npy_header,
    _regular_file,
    encode_ids,
    file_sha256,
)
from .binary import check_projection, pack_signs, projection_sha256, unpack_signs

FORMAT = "ilias-locals"
VERSION = 1
VARIANTS = ("float16", "binary")
META_FIELDS = ("x", "y", "scale", "mask", "weight")
MASK = META_FIELDS.index("mask")
DEFAULT_SHARD_IMAGES = 10_000
MAX_TOKENS = 1 << 14
MAX_DIM = 1 << 14


class LocalsMismatchError(ValueError):
    """A locals store holds other descriptors (model, N, D, variant) than the ones expected."""


@dataclass(frozen=True)
class LocalsShard:
    name: str
    count: int
    meta_sha256: str | None = None
    desc_sha256: str | None = None
    ids_sha256: str | None = None


@dataclass
class LocalsManifest:
    model: str
    tokens: int  # N, per image
    dim: int  # D: the descriptor's dimension (binary: its bits)
    variant: str
    source_dim: int | None = None  # binary: the dimension before the projection
    projection: str | None = None  # binary: projection_sha256 of the projection
    shards: list[LocalsShard] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    source: dict | None = None
    expected: int | None = None
    complete: bool = True

    @property
    def count(self) -> int:
        return sum(s.count for s in self.shards)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "version": VERSION, "model": self.model, "tokens": self.tokens, "dim": self.dim,
            "variant": self.variant, "meta_fields": list(META_FIELDS), "source_dim": self.source_dim,
            "projection": self.projection, "count": self.count, "complete": self.complete, "expected": self.expected,
            "shards": [vars(s) for s in self.shards], "source": self.source, "provenance": self.provenance,
        }, indent=1)

    @classmethod
    def read(cls, store: Path) -> "LocalsManifest":
        path = store / "manifest.json"
        if not store.is_dir():
            raise FileNotFoundError(f"{store}: no such locals store directory")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; {store} is not a locals store")
        try:
            m = json.loads(path.read_text())
            if not isinstance(m, dict):
                raise StoreFormatError(f"{path}: expected a JSON object, found {type(m).__name__}")
            if m.get("format") != FORMAT:
                raise StoreFormatError(f"{path}: format is {m.get('format')!r}, expected {FORMAT!r} (a local-descriptor store)")
            if m.get("version") != VERSION:
                raise StoreFormatError(f"{path}: locals format version {m.get('version')} is not supported (this is version {VERSION})")
            man = cls(str(m["model"]), int(m["tokens"]), int(m["dim"]), str(m["variant"]),
                      None if m.get("source_dim") is None else int(m["source_dim"]), m.get("projection"),
                      [LocalsShard(str(s["name"]), int(s["count"]), s.get("meta_sha256"), s.get("desc_sha256"),
                                   s.get("ids_sha256")) for s in m["shards"]],
                      m.get("provenance") or {}, m.get("source"),
                      None if m.get("expected") is None else int(m["expected"]), bool(m.get("complete", True)))
        except UnicodeDecodeError:
            raise StoreFormatError(f"{path}: not a text file") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
            if isinstance(e, StoreFormatError):
                raise
            raise StoreFormatError(f"{path}: unreadable manifest ({type(e).__name__}: {e})") from None
        problem = _check_params(man.tokens, man.dim, man.variant)
        if problem:
            raise StoreFormatError(f"{path}: {problem}")
        for s in man.shards:
            if not _SHARD_NAME.match(s.name) or s.count < 0:
                raise StoreFormatError(f"{path}: bad shard entry {s.name!r} ({s.count} images)")
        if man.count != m.get("count", man.count):
            raise StoreFormatError(f"{path}: count {m['count']} disagrees with the sum of its shards {man.count}")
        return man

    def check(self, path: Path, model: str | None, tokens: int | None, dim: int | None, variant: str | None,
              projection: np.ndarray | None = None) -> None:
        """Raises LocalsMismatchError naming `path` where an expectation (not None) differs."""
        for what, have, want in (("model", self.model, model), ("tokens per image", self.tokens, tokens),
                                 ("descriptor dimension", self.dim, dim), ("variant", self.variant, variant)):
            if want is not None and have != want:
                raise LocalsMismatchError(f"{path}: holds {what} {have!r}, expected {want!r}")
        if projection is not None:
            want = projection_sha256(check_projection(projection))
            if self.variant != "binary" or self.projection != want:
                have = "no projection" if self.variant != "binary" else f"projection {self.projection}"
                raise LocalsMismatchError(f"{path}: holds bits of {have}, expected projection {want} "
                                          "(pack the store with the model's projection)")


def _check_params(tokens: int, dim: int, variant: str) -> str | None:
    if variant not in VARIANTS:
        return f"variant {variant!r} is not one of {', '.join(VARIANTS)}"
    if not 1 <= tokens <= MAX_TOKENS:
        return f"tokens per image {tokens} is out of range (1 to {MAX_TOKENS:,})"
    if not 1 <= dim <= MAX_DIM or (variant == "binary" and dim % 8):
        return f"descriptor dimension {dim} is out of range (1 to {MAX_DIM:,}, a multiple of 8 for binary)"
    return None


class LocalsStore:
    """A locals store opened for reading: memory-mapped shards, images looked up by id."""

    def __init__(self, path: Path, manifest: LocalsManifest):
        self.path = path
        self.manifest = manifest
        self._starts = np.cumsum([0] + [s.count for s in manifest.shards])
        self._rows_of: dict[bytes, int] | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, model: str | None = None, tokens: int | None = None, dim: int | None = None,
             variant: str | None = None, projection: np.ndarray | None = None) -> "LocalsStore":
        """Opens and validates a store (every shard's headers against the manifest); the given
        expectations are checked too (LocalsMismatchError naming the manifest). `projection`: a
        binary store must have been packed with it (e.g. the binary AMES model's)."""
        path = Path(path)
        man = LocalsManifest.read(path)
        man.check(path / "manifest.json", model, tokens, dim, variant, projection)
        store = cls(path, man)
        for i, s in enumerate(man.shards):
            for kind, want in (("meta", ("<f4", (s.count, man.tokens, 5))), ("desc", store._desc_layout(s.count)),
                               ("ids", None)):
                arr = store._load(i, kind)
                if want is None:
                    ok = arr.ndim == 1 and arr.dtype.kind == "S" and len(arr) == s.count
                    expect = f"{s.count} byte-string ids"
                else:
                    ok = arr.dtype == np.dtype(want[0]) and arr.shape == want[1]
                    expect = f"{np.dtype(want[0])} {want[1]}"
                if not ok:
                    raise StoreFormatError(f"{store.file(i, kind)}: holds {arr.dtype} {arr.shape}, the manifest says {expect}")
        return store

    def _desc_layout(self, n: int) -> tuple[str, tuple[int, int, int]]:
        m = self.manifest
        if m.variant == "binary":
            return "u1", (n, m.tokens, m.dim // 8)
        return "<f2", (n, m.tokens, m.dim)

    # ---- description
    @property
    def count(self) -> int:
        return self.manifest.count

    def __len__(self) -> int:
        return self.count

    @property
    def tokens(self) -> int:
        return self.manifest.tokens

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def variant(self) -> str:
        return self.manifest.variant

    @property
    def num_shards(self) -> int:
        return len(self.manifest.shards)

    def file(self, i: int, kind: str) -> Path:
        """Shard `i`'s file of `kind` ("meta", "desc" or "ids")."""
        return self.path / "shards" / f"{self.manifest.shards[i].name}.{kind}.npy"

    def __repr__(self) -> str:
        m = self.manifest
        return f"LocalsStore({str(self.path)!r}, count={self.count}, model={m.model!r}, tokens={m.tokens}, dim={m.dim}, variant={m.variant})"

    # ---- data
    def _load(self, i: int, kind: str) -> np.ndarray:
        f = self.file(i, kind)
        _regular_file(f)
        try:
            return np.load(f, mmap_mode="r", allow_pickle=False)
        except (ValueError, SyntaxError, tokenize.TokenError, EOFError) as e:
            raise StoreFormatError(f"{f}: not a readable .npy file of the expected size ({type(e).__name__}: {e})") from None

    def meta(self, i: int) -> np.ndarray:
        """Shard `i`'s metadata, float32 (n_i, N, 5), memory-mapped."""
        return self._load(i, "meta")

    def descriptors(self, i: int) -> np.ndarray:
        """Shard `i`'s descriptors as stored: float16 (n_i, N, D) or packed uint8 (n_i, N, D / 8)."""
        return self._load(i, "desc")

    def ids(self, i: int) -> np.ndarray:
        return self._load(i, "ids")

    def all_ids(self) -> list[str]:
        return [b.decode("utf-8") for i in range(self.num_shards) for b in self.ids(i)]

    def rows_of(self, ids: Sequence[str]) -> np.ndarray:
        """The rows of the given ids; a KeyError names the store and how many are missing."""
        if self._rows_of is None:
            self._rows_of = {b: r for r, b in enumerate(b for i in range(self.num_shards) for b in self.ids(i))}
        wanted = encode_ids(ids)
        rows = [self._rows_of.get(b, -1) for b in wanted]
        missing = [w for w, r in zip(wanted, rows) if r < 0]
        if missing:
            raise KeyError(f"{self.path}: {len(missing):,} of {len(wanted):,} ids are not in this store "
                           f"(first: {missing[0].decode('utf-8', 'replace')!r})")
        return np.array(rows, dtype=np.int64)

    def read(self, rows: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(metadata float32 (k, N, 5), descriptors as stored) of the given rows, reading only those."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"row index out of range for {self.path} ({self.count} images)")
        dt, shape = self._desc_layout(rows.size)
        meta = np.zeros((rows.size, self.tokens, 5), np.float32)
        desc = np.zeros(shape, np.dtype(dt))
        shard = np.searchsorted(self._starts, rows, side="right") - 1
        for s in np.unique(shard):
            where = np.nonzero(shard == s)[0]
            local = rows[where] - self._starts[s]
            meta[where] = self.meta(int(s))[local]
            desc[where] = self.descriptors(int(s))[local]
        return meta, desc

    def model_inputs(self, rows: Sequence[int] | np.ndarray, tokens: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(descriptors float32 (k, n, D), padding mask bool (k, n)) as the re-ranker reads them:
        float16 widened, bits unpacked to +-1. `tokens`: keep the first n of the N (the
        asymmetric use: AMES reads 600 query and 50 database tokens of files of 700; the tokens
        are stored strongest first, as the detector's top-N gives them)."""
        if tokens is not None and not 1 <= tokens <= self.tokens:
            raise ValueError(f"tokens: must be 1 to {self.tokens} (what {self.path} holds per image), got {tokens}")
        meta, desc = self.read(rows)
        n = self.tokens if tokens is None else tokens
        meta, desc = meta[:, :n], desc[:, :n]
        values = unpack_signs(desc) if self.variant == "binary" else desc.astype(np.float32)
        return values, meta[..., MASK] != 0

    def verify(self) -> None:
        """Recomputes every shard file's checksum against the manifest (reads the whole store)."""
        for i, s in enumerate(self.manifest.shards):
            for kind, want in (("meta", s.meta_sha256), ("desc", s.desc_sha256), ("ids", s.ids_sha256)):
                if want is not None and file_sha256(self.file(i, kind)) != want:
                    raise StoreFormatError(f"{self.file(i, kind)}: checksum mismatch (the data changed or is corrupt)")


class LocalsWriter:
    """Appends images' local descriptors to a locals store, shard by shard; resumes an interrupted one.

    >>> with LocalsWriter("locals/db", model="dinov2_vitb14_reg", tokens=50, dim=768) as w:  # doctest: +SKIP
    ...     w.append(meta, descriptors, ids)      # (n, 50, 5) float32, (n, 50, 768) float
    """

    def __init__(self, path: str | os.PathLike, model: str, tokens: int, dim: int, variant: str = "float16",
                 projection: np.ndarray | None = None, shard_images: int = DEFAULT_SHARD_IMAGES,
                 provenance: dict | None = None, source: dict | None = None, expected: int | None = None,
                 resume: bool = True):
        """`dim`: the stored descriptor's dimension (binary: the projection's bits). `projection`
        (binary only, (D_in, bits)): float descriptors given to `append` are projected and
        signed with it; already packed ones are stored as given. `source` / `expected` as
        for StoreWriter: resuming from another input is an error; complete only with `expected`."""
        problem = _check_params(tokens, dim, variant)
        if problem:
            raise ValueError(f"locals store parameters: {problem}")
        if not model:
            raise ValueError("model: name the model the descriptors come from")
        if shard_images < 1:
            raise ValueError(f"shard_images: must be at least 1, got {shard_images}")
        self.projection = None
        if projection is not None:
            if variant != "binary":
                raise ValueError("projection: only the binary variant is projected")
            self.projection = check_projection(projection)
            if self.projection.shape[1] != dim:
                raise ValueError(f"projection: gives {self.projection.shape[1]} bits, the store holds {dim}")
        self.path = Path(path)
        self.shard_images = shard_images
        want = LocalsManifest(model, tokens, dim, variant,
                              None if self.projection is None else self.projection.shape[0],
                              None if self.projection is None else projection_sha256(self.projection),
                              [], provenance or {}, source, expected)
        self._locks = [_lock(self.path)]
        try:
            (self.path / "shards").mkdir(parents=True, exist_ok=True)
            if (self.path / "manifest.json").exists():
                if not resume:
                    raise FileExistsError(f"{self.path}: a locals store already exists here (resume it or choose another path)")
                man = LocalsManifest.read(self.path)
                man.check(self.path / "manifest.json", model, tokens, dim, variant)
                for what, old, new in (("projection", man.projection, want.projection), ("source", man.source, source),
                                       ("expected images", man.expected, expected)):
                    if old is not None and new is not None and old != new:
                        raise StoreSourceError(f"{self.path}: holds images written with another {what} ({_brief(old)}, "
                                               f"not {_brief(new)}); remove it or choose another path")
                man.source = source if source is not None else man.source
                man.expected = expected if expected is not None else man.expected
                man.projection = man.projection or want.projection
                man.source_dim = man.source_dim or want.source_dim
                if provenance:
                    man.provenance.update(provenance)
                self.manifest = man
            else:
                self.manifest = want
            self.manifest.complete = False
            self._write_manifest()
        except BaseException:
            self._unlock()
            raise
        self._files: dict[str, BinaryIO] | None = None
        self._rows = 0

    @property
    def count(self) -> int:
        """Images written so far, including the shard in progress."""
        return self.manifest.count + self._rows

    @property
    def committed(self) -> int:
        """Images in complete shards: what survives an interruption."""
        return self.manifest.count

    def _write_manifest(self) -> None:
        atomic_write(self.path / "manifest.json", self.manifest.to_json())

    def _tmp(self, kind: str) -> Path:
        return self.path / "shards" / f".{len(self.manifest.shards):05d}.{kind}.npy.tmp"

    def _prepare(self, meta: np.ndarray, desc: np.ndarray, ids: Sequence) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
        m = self.manifest
        n_tok = m.tokens
        meta, desc = np.asarray(meta), np.asarray(desc)
        if meta.ndim != 3 or meta.shape[1:] != (n_tok, 5):
            raise ValueError(f"meta: expected shape (n, {n_tok}, 5) (x, y, scale, mask, weight), got {meta.shape}")
        if meta.dtype.kind != "f" or not np.isfinite(meta).all():
            raise ValueError(f"meta: expected finite floats, got {meta.dtype}{' with NaN or Inf' if meta.dtype.kind == 'f' else ''}")
        mask = meta[..., MASK]
        if not np.isin(mask, (0, 1)).all():
            raise ValueError("meta: the mask column (index 3) must be 0 (token) or 1 (padding)")
        ids = encode_ids(ids)
        if len(ids) != len(meta) or len(desc) != len(meta):
            raise ValueError(f"append: {len(meta)} metadata rows, {len(desc)} descriptor rows and {len(ids)} ids")
        if m.variant == "binary":
            if desc.dtype == np.uint8:
                if desc.shape[1:] != (n_tok, m.dim // 8):
                    raise ValueError(f"descriptors: packed bits expected in shape (n, {n_tok}, {m.dim // 8}), got {desc.shape}")
                packed = desc
            else:
                if self.projection is None:
                    raise ValueError("descriptors: float descriptors for a binary store need the writer's projection "
                                     "(or give packed uint8 bits)")
                if desc.ndim != 3 or desc.shape[1:] != (n_tok, self.projection.shape[0]):
                    raise ValueError(f"descriptors: expected shape (n, {n_tok}, {self.projection.shape[0]}), got {desc.shape}")
                _check_finite(desc)
                packed = pack_signs(desc, self.projection)
            return np.ascontiguousarray(meta, "<f4"), np.ascontiguousarray(packed, np.uint8), ids
        if desc.ndim != 3 or desc.shape[1:] != (n_tok, m.dim) or desc.dtype.kind != "f":
            raise ValueError(f"descriptors: expected float shape (n, {n_tok}, {m.dim}), got {desc.dtype} {desc.shape}")
        _check_finite(desc)
        with np.errstate(over="ignore"):
            half = np.ascontiguousarray(desc, "<f2")
        if not np.isfinite(half).all():
            raise ValueError("descriptors: values overflow float16")
        return np.ascontiguousarray(meta, "<f4"), half, ids

    def append(self, meta: np.ndarray, descriptors: np.ndarray, ids: Sequence) -> None:
        """Appends images: metadata (n, N, 5), descriptors (n, N, D) float (binary: float of the
        projection's input dimension, or packed uint8 (n, N, D / 8)), one id per image. All are
        checked before anything is written."""
        meta, desc, ids = self._prepare(meta, descriptors, ids)
        lo = 0
        while lo < len(meta):
            if self._files is None:
                self._open_shard()
            assert self._files is not None
            take = min(self.shard_images - self._rows, len(meta) - lo)
            for kind, block in (("meta", meta[lo:lo + take]), ("desc", desc[lo:lo + take])):
                self._files[kind].write(block.tobytes())
            self._ids.extend(ids[lo:lo + take])
            self._rows += take
            lo += take
            if self._rows == self.shard_images:
                self._finish_shard()

    def _open_shard(self) -> None:
        self._files = {}
        for kind in ("meta", "desc"):
            f = self._files[kind] = open(self._tmp(kind), "wb")
            f.write(b"\0" * _HEADER_BYTES)
        self._rows = 0
        self._ids: list[bytes] = []

    def _finish_shard(self) -> None:
        m = self.manifest
        name = f"{len(m.shards):05d}"
        shards = self.path / "shards"
        desc_dtype, desc_shape = (np.dtype("u1"), (self._rows, m.tokens, m.dim // 8)) if m.variant == "binary" else \
            (np.dtype("<f2"), (self._rows, m.tokens, m.dim))
        assert self._files is not None
        sums = {}
        for kind, (dtype, shape) in (("meta", (np.dtype("<f4"), (self._rows, m.tokens, 5))), ("desc", (desc_dtype, desc_shape))):
            f = self._files[kind]
            f.seek(0)
            f.write(_npy_header(dtype, shape))
            f.flush()
            os.fsync(f.fileno())
            f.close()
            # of the whole file, header included (what verify() recomputes), read back from the page cache
            sums[kind] = file_sha256(self._tmp(kind))
        self._files = None
        width = max(len(i) for i in self._ids)
        with atomic_path(shards / f"{name}.ids.npy") as tmp:
            np.save(tmp, np.array(self._ids, dtype=f"S{width}"), allow_pickle=False)
            ids_sha = file_sha256(tmp)
        for kind in ("meta", "desc"):
            os.replace(self._tmp(kind), shards / f"{name}.{kind}.npy")
        fsync_dir(shards)
        m.shards.append(LocalsShard(name, self._rows, sums["meta"], sums["desc"], ids_sha))
        self._write_manifest()
        self._rows = 0
        self._ids = []

    def close(self) -> LocalsStore:
        """Writes the last shard and the final manifest (complete when it holds the images
        expected); returns the store opened."""
        try:
            if self._files is not None and self._rows:
                self._finish_shard()
            self._drop_partial()
            m = self.manifest
            if m.expected is not None and m.count != m.expected:
                self._write_manifest()
                raise ValueError(f"{self.path}: holds {m.count:,} of the {m.expected:,} images expected; it stays incomplete")
            m.complete = True
            self._write_manifest()
        finally:
            self._unlock()
        return LocalsStore.open(self.path)

    def _drop_partial(self) -> None:
        if self._files is not None:
            for f in self._files.values():
                f.close()
            self._files = None
        for kind in ("meta", "desc"):
            self._tmp(kind).unlink(missing_ok=True)
        self._rows = 0
        self._ids = []

    def abort(self) -> None:
        """Stops without completing: complete shards stay (the resume point), the partial one goes."""
        self._drop_partial()
        self._unlock()

    def _unlock(self) -> None:
        for fd in getattr(self, "_locks", ()):
            os.close(fd)
        self._locks = []

    def __del__(self) -> None:
        self._unlock()

    def __enter__(self) -> "LocalsWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _check_finite(desc: np.ndarray) -> None:
    if not np.isfinite(desc).all():
        bad = int(np.nonzero(~np.isfinite(desc).reshape(len(desc), -1).all(axis=1))[0][0])
        raise ValueError(f"descriptors: image {bad} holds NaN or Inf")
