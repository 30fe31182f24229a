"""The database: the ordered stores searched together, as one sequence of global rows.

For ILIAS the order is positives first, then distractors; a search result is a global row, and
this is the one place that maps it back to a store, a shard and an id. A database is identified
by one fingerprint over the content of all its shards (`fingerprint`), which results files and
codes files record.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator, Sequence

import numpy as np

from .results import DatabasePart
from .store import Store, content_fingerprint, open_stores


class IncompleteStoreError(ValueError):
    """A store of the database does not hold all its rows (its writer was interrupted)."""


class Database:
    """Stores of one dimension, in order: row `i` of store `j` is global row `offsets[j] + i`.

    Every store must be complete (its writer finished): an interrupted import or extraction
    would otherwise be searched as if it were the whole. `allow_incomplete` lets one through
    with a warning, kept in `warnings` and carried into the results and their reports."""

    def __init__(self, stores: Sequence[Store], allow_incomplete: bool = False):
        stores = list(stores)
        if not stores:
            raise ValueError("database: no stores given")
        dims = {s.dim for s in stores}
        if len(dims) != 1:
            raise ValueError(f"database: stores have different dimensions: {', '.join(f'{s.path} ({s.dim})' for s in stores)}")
        self.warnings: list[str] = []
        for s in stores:
            if not s.manifest.complete:
                m = s.manifest
                held = f"{s.count:,} of {m.expected:,} rows" if m.expected is not None else f"{s.count:,} rows so far"
                message = f"{s.path}: incomplete store ({held}; its writer did not finish)"
                if not allow_incomplete:
                    raise IncompleteStoreError(f"{message}: run the import or extraction again to finish it "
                                               "(or pass --allow-incomplete to use it as it is)")
                warnings.warn(message, stacklevel=2)
                self.warnings.append(message)
        self.stores = stores
        # where each store's rows start, then the total
        self.offsets = np.cumsum([0] + [s.count for s in stores])

    @classmethod
    def of(cls, database, allow_incomplete: bool = False) -> "Database":
        """A Database from a Database, a Store, a path (a store, or a folder of stores written in
        parts) or an ordered list of those."""
        if isinstance(database, Database):
            return database
        if isinstance(database, (Store, str, os.PathLike)):
            database = [database]
        stores = [s for d in database for s in ([d] if isinstance(d, Store) else open_stores(d))]
        return cls(stores, allow_incomplete)

    # ---- description
    @property
    def dim(self) -> int:
        return self.stores[0].dim

    @property
    def dtype(self) -> str:
        return self.stores[0].manifest.dtype

    @property
    def count(self) -> int:
        return int(self.offsets[-1])

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"Database({', '.join(str(s.path) for s in self.stores)}; {self.count:,} rows x {self.dim})"

    @property
    def parts(self) -> list[DatabasePart]:
        """The stores as results files record them (path, rows, fingerprint)."""
        return [DatabasePart(str(s.path), s.count, s.fingerprint) for s in self.stores]

    @property
    def shard_paths(self) -> list[str]:
        """Every shard of every store, in row order (what the Rust core scans)."""
        return [str(p) for s in self.stores for p in s.shard_paths]

    @property
    def shard_checksums(self) -> list[int | None]:
        """Per shard, in row order, the fast checksum its manifest records (None where it records
        none): exact search verifies each shard against it as it reads."""
        return [sh.fast_checksum_int for s in self.stores for sh in s.manifest.shards]

    @property
    def shard_counts(self) -> list[int]:
        return [sh.count for s in self.stores for sh in s.manifest.shards]

    @property
    def fingerprint(self) -> str:
        """Identifies the content: the dimension, type, row count and checksum of every shard."""
        return self.prefix_fingerprint(None)

    def prefix_fingerprint(self, shards: int | None) -> str:
        """The fingerprint the database had when it held only its first `shards` shards (shards
        are only ever appended, so this tells codes built before the database grew)."""
        all_shards = [sh for s in self.stores for sh in s.manifest.shards]
        return content_fingerprint(self.dim, self.dtype, all_shards[:shards])

    # ---- rows
    def split(self, rows: np.ndarray) -> Iterator[tuple[Store, np.ndarray, np.ndarray]]:
        """(store, its local rows, where they sit in `rows`) for each store that `rows` touches."""
        rows = np.asarray(rows, dtype=np.int64).ravel()
        if rows.size and (rows.min() < 0 or rows.max() >= self.count):
            raise IndexError(f"row index out of range for {self!r}")
        owner = np.searchsorted(self.offsets, rows, side="right") - 1
        for j in np.unique(owner):
            where = np.nonzero(owner == j)[0]
            yield self.stores[j], rows[where] - self.offsets[j], where

    def raw_ids_of(self, rows: np.ndarray) -> np.ndarray:
        """The ids (UTF-8 bytes, one fixed-width array) of global `rows`, reading only those."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = [(where, store.raw_ids_of(local)) for store, local, where in self.split(rows)]
        width = max((p.dtype.itemsize for _, p in parts), default=1)
        out = np.zeros(rows.size, dtype=f"S{width}")
        for where, p in parts:
            out[where] = p
        return out.reshape(rows.shape)

    def vectors_of(self, rows: np.ndarray) -> np.ndarray:
        """The float32 vectors of global `rows`, in the order given."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.zeros((rows.size, self.dim), dtype=np.float32)
        for store, local, where in self.split(rows):
            out[where] = store.vectors_of(local)
        return out.reshape(*rows.shape, self.dim)

    def mini_ilias_keep(self, keys, always: Sequence[int] = (0,), min_share: float = 0.99) -> np.ndarray:
        """The mini-ILIAS row filter over the global rows.

        A row is kept when its store's position is in `always` (the positives store, first by
        convention) or when the part of its id after the first "/" is one of `keys` (the bare
        YFCC100M keys of the mini-ILIAS list).

        A filter is only mini-ILIAS if the database holds its keys: fewer than `min_share` of them
        matched (ids of another form, a partial database) is an error that shows both sides; a
        few missing (images skipped at extraction) is a warning.
        """
        keyset = np.unique(np.array([k.encode() if isinstance(k, str) else bytes(k) for k in keys], dtype=object).astype("S"))
        if keyset.size == 0:
            raise ValueError("mini-ILIAS keys: the list is empty")
        parts, matched, example_id = [], [], None
        for pos, s in enumerate(self.stores):
            if pos in always:
                parts.append(np.ones(s.count, dtype=bool))
                continue
            for i in range(s.num_shards):
                ids = np.asarray(s.checked_ids(i))
                tail = np.char.partition(ids, b"/")[:, 2]
                hit = np.isin(tail, keyset)
                parts.append(hit)
                matched.append(tail[hit])
                if example_id is None and len(ids):
                    example_id = ids[0].decode("utf-8", "replace")
        found = int(np.unique(np.concatenate(matched)).size) if matched else 0
        share = found / keyset.size
        if share < min_share:
            raise ValueError(
                f"mini-ILIAS keys: only {found:,} of {keyset.size:,} keys match a distractor id of {self!r} "
                f"(a key: {keyset[0].decode('utf-8', 'replace')!r}; an id: {example_id!r}; a key should equal the "
                "part of an id after its first '/'); is this the full distractor set?"
            )
        if found < keyset.size:
            warnings.warn(f"mini-ILIAS keys: {keyset.size - found:,} of {keyset.size:,} keys are not in the database "
                          "(images skipped at extraction?)", stacklevel=2)
        return np.concatenate(parts) if parts else np.zeros(0, dtype=bool)


def mini_ilias_keep(database, keys, always: Sequence[int] = (0,), min_share: float = 0.99) -> np.ndarray:
    """`Database.mini_ilias_keep` for a database given as stores or paths."""
    return Database.of(database).mini_ilias_keep(keys, always, min_share)
