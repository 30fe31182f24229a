"""Search results and their files: our `.npz` and the official similarity formats.

A `SearchResults` holds the top k of every query as global rows of the database it searched,
with what the search was (`tier`, `tier_rows`, `setting`) and how it ran (`stats`) as typed
fields. Ids are read only for the rows some list returns, and kept as one bytes table.

Files, written atomically:

- ours: one `.npz` (scores, indices, query ids, the returned rows and their ids, a JSON `meta`
  with the database's parts and fingerprints, the tier and the statistics);
- the official JSON: `{query_id: {db_id: similarity}}`, keys in rank order;
- the official pickle: `{"query_ids", "db_ids", "sims" (nq, k), "ranks" (nq, k) into db_ids}`.

`read_results_file` reads any of them back: ours as a `SearchResults`, the official ones as the
dict they hold (the evaluation turns each into its ranked lists).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from ._io import atomic_path

if TYPE_CHECKING:
    from .database import Database

RESULTS_FORMAT = "ilias-results"
RESULTS_VERSION = 1
OFFICIAL_PICKLE_KEYS = {"query_ids", "db_ids", "sims", "ranks"}


@dataclass(frozen=True)
class DatabasePart:
    """One store of the database a search ran over, as the results file records it."""

    path: str
    count: int
    fingerprint: str


@dataclass(frozen=True)
class SearchStats:
    """How a search ran. `method`: exact, float32, int8, int8-scalar or codes-<kind>."""

    method: str
    seconds: float
    threads: int
    simd: str | None = None  # the float32 kernel path
    int8: str | None = None  # the int8 kernel of exact search's first pass, None when it did not run
    float_pairs: int = 0  # (query, row) pairs scored in float32 blocks
    int8_pairs: int = 0  # pairs scored by the int8 pass...
    rescored_pairs: int = 0  # ...of which rescored exactly
    # exact search's path ("float32", "int8", "progressive") and why it was taken; with the
    # progressive codes: their stage kernel, the pairs entering each stage, the bytes read
    path: str | None = None
    path_reason: str | None = None
    stage_kernel: str | None = None
    stage_pairs: list | None = None
    codes_bytes: int | None = None
    store_bytes: int | None = None
    codes: str | None = None  # codes search: the kind, the file, the shortlist per query
    codes_path: str | None = None
    shortlist: int | None = None
    rerank: bool | None = None
    scan_seconds: float | None = None
    rerank_seconds: float | None = None
    # query expansion (expand.py): neighbours and alpha, the scans of the second pass and the
    # expanded queries they scored (a vector shared by tiers in one scan counts once), the first
    # pass's time (`seconds` covers both); the pair counts above are the second pass's
    qe: int | None = None
    qe_alpha: float | None = None
    qe_passes: int | None = None
    qe_queries: int | None = None
    qe_first_seconds: float | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "SearchStats":
        """From the `info` of a results file (unknown keys ignored)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})


@dataclass
class SearchResults:
    """Top-k per query. `indices` are global rows over `database` (-1 where fewer rows qualified).

    `tier`: the name of the database answered (one of a one-pass search's tiers, "all" for the
    whole); `tier_rows`: how many rows it holds; `setting`: the published setting it answers
    ("mini", "full"), "" for none, None to infer it from `tier_rows`. `db` (when known) reads
    the ids of the returned rows."""

    scores: np.ndarray
    indices: np.ndarray
    query_ids: list[str]
    k: int
    database: list[DatabasePart]
    tier: str = "all"
    tier_rows: int | None = None
    setting: str | None = None
    stats: SearchStats | None = None
    warnings: list[str] = field(default_factory=list)  # about the data searched, carried into reports
    # the linear adaptation the database was made with (adapt.py: "<weights file>@<sha256[:12]>")
    adaptation: str | None = None
    # the re-ranking applied to the first lists' heads (rerank/): e.g. "AMES binary, top 100"
    reranking: str | None = None
    # a digest of everything the re-ranked scores depend on (checkpoints, descriptors, settings)
    reranking_key: str | None = None
    db: "Database | None" = None
    # every returned row (sorted) and its id as UTF-8 bytes: a compact table, not 2M Python strings
    _rows: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self):
        if self.tier_rows is None:
            self.tier_rows = sum(p.count for p in self.database)

    def __len__(self) -> int:
        return len(self.query_ids)

    @property
    def variant(self) -> str:
        """What was added to the plain global search, as reports label it: "" (nothing),
        "adapt", "QE 2", "adapt + QE 2 (alpha 3)"."""
        parts = ["adapt"] if self.adaptation else []
        if self.stats is not None and self.stats.qe:
            alpha = self.stats.qe_alpha if self.stats.qe_alpha is not None else 1.0
            parts.append(f"QE {self.stats.qe}" + (f" (alpha {alpha:g})" if alpha != 1 else ""))
        if self.reranking:
            parts.append(f"re-ranked ({self.reranking})")
        return " + ".join(parts)

    def returned_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows, ids): the sorted distinct global rows of all results and their ids (bytes)."""
        if self._rows is None:
            if self.db is None:
                raise ValueError("these results hold no ids and have no database to read them from")
            rows = np.unique(self.indices[self.indices >= 0])
            self._rows = (rows, self.db.raw_ids_of(rows))
        return self._rows

    def _ids_at(self, rows: np.ndarray) -> list[str]:
        table, ids = self.returned_rows()
        return [b.decode("utf-8") for b in ids[np.searchsorted(table, rows)]]

    def ids(self, q: int) -> list[str]:
        """The database ids returned for query row `q`, in rank order."""
        rows = self.indices[q]
        return self._ids_at(rows[rows >= 0])

    def ranked(self, q: int) -> list[tuple[str, float]]:
        """(id, score) pairs of query row `q`, in rank order."""
        valid = self.indices[q] >= 0
        return list(zip(self._ids_at(self.indices[q][valid]), self.scores[q][valid].tolist()))

    # ---- our own format
    def _info(self) -> dict:
        info = asdict(self.stats) if self.stats is not None else {}
        info = {k: v for k, v in info.items() if v is not None}
        info.update(tier=self.tier, tier_rows=self.tier_rows)
        if self.setting is not None:
            info["setting"] = self.setting
        if self.warnings:
            info["warnings"] = self.warnings
        if self.adaptation:
            info["adaptation"] = self.adaptation
        if self.reranking:
            info["reranking"] = self.reranking
        if self.reranking_key:
            info["reranking_key"] = self.reranking_key
        return info

    def save(self, path: str | os.PathLike) -> Path:
        """Saves to one .npz (scores, indices, ids of the returned rows, metadata), atomically."""
        return self.write(path, "npz")

    def _write_npz(self, f) -> None:
        rows, ids = self.returned_rows()
        meta = {
            "format": RESULTS_FORMAT,
            "version": RESULTS_VERSION,
            "k": self.k,
            "database": [vars(p) for p in self.database],
            "info": self._info(),
        }
        qids = [q.encode("utf-8") for q in self.query_ids]
        np.savez(
            f,
            scores=self.scores,
            indices=self.indices,
            query_ids=np.array(qids, dtype=f"S{max(map(len, qids), default=1)}"),
            row_index=rows,
            row_ids=ids,
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SearchResults":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such results file")
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                scores, indices = z["scores"], z["indices"]
                qids = [q.decode("utf-8") for q in z["query_ids"]]
                rows = (z["row_index"], z["row_ids"])
        except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable ilias results file ({type(e).__name__}: {e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("k"), int) or not isinstance(meta.get("database"), list):
            raise ValueError(f"{path}: not a readable ilias results file (its metadata is not ours)")
        if meta.get("format") != RESULTS_FORMAT or meta.get("version") != RESULTS_VERSION:
            raise ValueError(
                f"{path}: results format {meta.get('format')!r} v{meta.get('version')}, expected {RESULTS_FORMAT!r} v{RESULTS_VERSION}"
            )
        if scores.shape != indices.shape or scores.shape != (len(qids), meta["k"]):
            raise ValueError(f"{path}: arrays disagree with each other ({scores.shape}, {indices.shape}, {len(qids)} ids)")
        if not np.isin(indices[indices >= 0], rows[0]).all():
            raise ValueError(f"{path}: some returned rows have no id")
        info = meta.get("info", {})
        return cls(
            scores=scores,
            indices=indices,
            query_ids=qids,
            k=meta["k"],
            database=[DatabasePart(**p) for p in meta["database"]],
            tier=info.get("tier", "all"),
            tier_rows=info.get("tier_rows"),
            setting=info.get("setting"),
            stats=SearchStats.from_dict(info) if "method" in info else None,
            warnings=list(info.get("warnings", [])),
            adaptation=info.get("adaptation"),
            reranking=info.get("reranking"),
            reranking_key=info.get("reranking_key"),
            _rows=rows,
        )

    # ---- the official formats
    def to_official_dict(self) -> dict:
        """`{query_id: {db_id: similarity}}` with keys in rank order (the official JSON layout)."""
        return {q: dict(self.ranked(i)) for i, q in enumerate(self.query_ids)}

    def write_official_json(self, path: str | os.PathLike) -> Path:
        return self.write(path, "json")

    def to_official_pickle(self) -> dict:
        """`{"query_ids", "db_ids", "sims" (nq, k) float32, "ranks" (nq, k) into db_ids}`."""
        rows, ids = self.returned_rows()
        ranks = np.where(self.indices >= 0, np.searchsorted(rows, self.indices), -1).astype(np.int64)
        db_ids = np.array([b.decode("utf-8") for b in ids], dtype=object)
        return {"query_ids": list(self.query_ids), "db_ids": db_ids, "sims": self.scores.astype(np.float32), "ranks": ranks}

    def write_official_pickle(self, path: str | os.PathLike) -> Path:
        return self.write(path, "pickle")

    def write(self, path: str | os.PathLike, fmt: str | None = None) -> Path:
        """Writes atomically in `fmt` ("npz", "json", "pickle"; default: from the suffix)."""
        return write_all([(path, self)], fmt)[0]

    def _write_to(self, f, fmt: str) -> None:
        if fmt == "json":
            f.write(json.dumps(self.to_official_dict()).encode())
        elif fmt == "pickle":
            pickle.dump(self.to_official_pickle(), f, protocol=4)
        else:
            self._write_npz(f)


FORMATS = {".npz": "npz", ".json": "json", ".pkl": "pickle", ".pickle": "pickle"}


def format_of(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The results format of a file: `fmt` when given, else from the suffix (.npz, .json, .pkl)."""
    if fmt is not None:
        if fmt not in FORMATS.values():
            raise ValueError(f"format: {fmt!r} is not one of npz, json, pickle")
        return fmt
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{path}: unknown results suffix {suffix!r} (expected .npz, .json or .pkl, or give the format)")
    return FORMATS[suffix]


def write_all(items: Sequence[tuple[str | os.PathLike, SearchResults]], fmt: str | None = None) -> list[Path]:
    """Writes several results files as one: each to a temporary name beside it, then all renamed
    at the end, so that a failure leaves the old files as they were (never a new one beside an
    old one of the same search)."""
    with ExitStack() as stack:
        for path, res in items:
            tmp = stack.enter_context(atomic_path(path))
            with open(tmp, "wb") as f:
                res._write_to(f, format_of(path, fmt))
    return [Path(p) for p, _ in items]


def check_output(paths: Sequence[str | os.PathLike], fmt: str | None, nbytes: int) -> None:
    """Checks before a search that its results can be written: a known format, a folder that is
    (or can be made) writable, and `nbytes` free there."""
    for path in map(Path, paths):
        format_of(path, fmt)
        if path.is_dir():
            raise ValueError(f"{path}: is a folder; give a results file name (.npz, .json or .pkl)")
        folder = path.parent
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder}: cannot write the results here")
        free = shutil.disk_usage(folder).free
        if free < nbytes:
            raise OSError(f"{folder}: {free / 1e9:.2f} GB free, the results need about {nbytes / 1e9:.2f} GB")


def results_bytes(nq: int, k: int, fmt: str) -> int:
    """About how large a results file of `nq` x `k` is (ids of about 48 bytes each)."""
    per_item = {"npz": 12 + 48, "pickle": 12 + 60, "json": 80}[fmt]
    return nq * k * per_item


def read_results_file(path: str | os.PathLike) -> SearchResults | dict:
    """Reads a results file: ours (.npz) as SearchResults, the official .json / .pkl as their dict."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such results file")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return SearchResults.load(path)
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=lambda p: _unique_keys(p, path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected the official {{query_id: {{db_id: similarity}}}} object, found a JSON {type(data).__name__}")
        return data
    if suffix in (".pkl", ".pickle"):
        # the official format is a pickle: open only files you trust, as with any pickle
        try:
            with open(path, "rb") as f:
                data = pickle.load(f)
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
        if not isinstance(data, dict) or not OFFICIAL_PICKLE_KEYS <= data.keys():
            raise ValueError(f"{path}: not an official similarity pickle (expected a dict with {sorted(OFFICIAL_PICKLE_KEYS)})")
        return data
    raise ValueError(f"{path}: unknown results format (expected .npz, .json, .pkl)")


def _unique_keys(pairs, path) -> dict:
    # json.load would keep the last of repeated keys without a word
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"{path}: JSON object: duplicate id {key!r}")
            seen.add(key)
    return out
