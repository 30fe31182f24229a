"""The native core (rust/python.rs). Checked against the built module by tests/test_binding.py."""

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Final, Optional, TypedDict, Union

import numpy as np
import numpy.typing as npt

_Path = Union[str, os.PathLike[str]]
_Progress = Optional[Callable[[int], object]]

__all__ = [
    "__version__",
    "StoreFormatError",
    "NEGATIVE",
    "POSITIVE",
    "SKIP",
    "NOT_POSITIVE",
    "EMPTY",
    "PROGRESSIVE_HEAD",
    "exact_search",
    "inspect_shard",
    "shard_checksum",
    "simd_paths",
    "int8_kernels",
    "average_precision",
    "positive_codes",
    "label_official",
    "grouped_average_precision",
    "fp32_peak_gflops",
    "int8_peak_gops",
    "maddubs_peak_gops",
    "progressive_work",
    "build_codes",
    "build_progressive",
    "inspect_codes",
    "code_search",
    "code_shortlist",
    "rescore",
    "merge_top",
]

__version__: str

# labels of `average_precision` (uint8)
NEGATIVE: Final = 0
POSITIVE: Final = 1
SKIP: Final = 2
# codes of `positive_codes` / `label_official` besides a positive's index (int32)
NOT_POSITIVE: Final = -1
EMPTY: Final = -2
# the rotated dimensions the progressive pass keeps in float32
PROGRESSIVE_HEAD: Final[int]

class StoreFormatError(ValueError):
    """A store file is not what it should be (bad header, size, dtype or dimension)."""

class _SearchStats(TypedDict, total=False):
    simd: Optional[str]
    int8: Optional[str]
    float_pairs: int
    int8_pairs: int
    rescored_pairs: int
    # with progressive codes only
    stage_kernel: str
    stage_pairs: list[int]
    codes_bytes: int
    store_bytes: int

class _CodeSearchStats(TypedDict):
    codes: str
    shortlist: int
    rerank: bool
    scan_seconds: float
    rerank_seconds: float

class _CodesHeader(TypedDict, total=False):
    kind: str
    dim: int
    rows: int
    fingerprint: str
    # progressive codes only
    boundaries: list[int]
    eta: float
    meta: list[float]

def exact_search(
    shards: Sequence[_Path],
    queries: npt.NDArray[np.float32],
    k: int,
    threads: int = 0,
    tiers: Optional[Sequence[tuple[int, Optional[npt.NDArray[np.bool_]]]]] = None,
    simd: Optional[str] = None,
    method: str = "exact",
    progress: _Progress = None,
    checksums: Optional[Sequence[Optional[int]]] = None,
    codes: Optional[_Path] = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], _SearchStats]:
    """Exact search of `queries` (nq, dim) against the shards; scores and indices (tiers, nq, k).

    checksums: per shard the fast checksum its manifest records (or None); a shard that reads
    otherwise is a StoreFormatError naming it, and nothing is returned.

    method: "exact", "float32", "int8", "int8-scalar" or "progressive" (the stages of the
    progressive `codes` from the first row); with `codes`, "exact" runs their stages where they
    pay. simd: None/"auto", "avx512", "avx2", "scalar"; tiers: `(rows, keep)` each (default: one
    tier, every row)."""

def inspect_shard(path: _Path, dim: Optional[int] = None) -> tuple[str, int, int]:
    """Validates one shard without reading its data: `(dtype name, rows, dim)`."""

def shard_checksum(path: _Path, threads: int = 1) -> int:
    """The fast checksum of a shard's data section (64 bits; blocks of 128 rows): what writers
    record in the manifest (`fast_checksum`) and exact search compares as it reads."""

def simd_paths() -> list[str]:
    """The SIMD paths this CPU can run, fastest first."""

def int8_kernels() -> list[str]:
    """The int8 kernels of exact search's first pass this CPU can run, fastest first."""

def fp32_peak_gflops(simd: Optional[str] = None, threads: int = 0, millis: int = 300) -> float:
    """This machine's float32 FMA peak (GFLOP/s) on `threads` threads (0: all) for a path."""

def int8_peak_gops(threads: int = 0, millis: int = 300) -> Optional[float]:
    """This machine's int8 multiply-add peak (GOP/s, AVX-512 VNNI); None without VNNI."""

def progressive_work(entered: Sequence[float], widths: Sequence[int], rescored: float, dim: int) -> float:
    """The progressive pass's cost model: the work of `entered[j]` pairs entering stages of
    `widths` dimensions, then `rescored` pairs rescored (units: one first-stage product)."""

def maddubs_peak_gops(threads: int = 0, millis: int = 300) -> Optional[float]:
    """This machine's int8 multiply-add peak with AVX2 `maddubs` (GOP/s); None without AVX2."""

def average_precision(
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.uint8],
    n_positives: npt.NDArray[np.int64],
    k: int,
    threads: int = 0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """AP@k and oracle (fractions) per row of `scores` (n, L) with `labels` (n, L) and |G| per row."""

def grouped_average_precision(
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.uint8],
    positive: npt.NDArray[np.int32],
    member: npt.NDArray[np.bool_],
    n_positives: npt.NDArray[np.int64],
    k: int,
    threads: int = 0,
) -> npt.NDArray[np.float64]:
    """AP@k per group of positives (G, n): `positive` (n, L), `member` (G, P), `n_positives` (G, n)."""

def positive_codes(
    ids: Iterable[Union[str, bytes]], positives: Sequence[str]
) -> tuple[npt.NDArray[np.int32], int, Optional[str]]:
    """The index among `positives` of each id (or NOT_POSITIVE), the foreign count, the first foreign id."""

def label_official(
    db_ids: npt.NDArray[np.object_],
    ranks: npt.NDArray[np.int64],
    positives: Sequence[str],
    threads: int = 0,
) -> tuple[npt.NDArray[np.int32], int, Optional[str], Optional[tuple[int, int]]]:
    """Labels the ranked lists of an official pickle (`ranks` (n, L) index `db_ids`, -1: no item).

    Returns per item its positive's index, NOT_POSITIVE or EMPTY; the foreign count and first foreign
    id; the first list holding an item twice with the number of repeats (or None)."""

def build_codes(
    shards: Sequence[_Path],
    kind: str,
    path: _Path,
    fingerprint: str,
    threads: int = 0,
    sample: int = 0,
    iters: int = 20,
    seed: int = 1234,
    progress: _Progress = None,
) -> None:
    """Builds codes of `kind` ("sq8", "pq<M>", "pq<M>x4") for the database `shards` into `path`."""

def build_progressive(
    shards: Sequence[_Path],
    path: _Path,
    fingerprint: str,
    rotation: npt.NDArray[np.float32],
    boundaries: Sequence[int],
    meta: Sequence[float],
    threads: int = 0,
    progress: _Progress = None,
) -> None:
    """Builds progressive codes of the database `shards` into `path`: `rotation` (dim, dim) with
    the axes as rows, stage `boundaries` (multiples of 32), `meta` recorded as given."""

def inspect_codes(path: _Path, verify: bool = False, threads: int = 0) -> _CodesHeader:
    """The header of a codes file (validated, sizes included); with `verify`, every section is
    also checked against its checksum, as a code search does before it scans."""

def code_search(
    codes: _Path,
    shards: Sequence[_Path],
    queries: npt.NDArray[np.float32],
    k: int,
    shortlist: int,
    rerank: bool = True,
    threads: int = 0,
    keep: Optional[npt.NDArray[np.bool_]] = None,
    progress: _Progress = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], _CodeSearchStats]:
    """Search with codes: a shortlist per query, rescored exactly from `shards` when `rerank`; (nq, k)."""

def code_shortlist(
    codes: _Path,
    queries: npt.NDArray[np.float32],
    shortlist: int,
    lo: int,
    hi: int,
    keep: Optional[npt.NDArray[np.bool_]] = None,
    threads: int = 0,
    progress: _Progress = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """The approximate shortlists of the codes' rows `lo..hi` (one part of a split code search): per
    query the best `shortlist` (score, global row) in rank order, (nq, min(shortlist, hi - lo)),
    padded with -inf and -1; `keep` covers the range. The codes are not verified here."""

def rescore(
    shards: Sequence[_Path],
    queries: npt.NDArray[np.float32],
    candidates: npt.NDArray[np.int64],
    k: int,
    threads: int = 0,
    progress: _Progress = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Exact rescoring: per query the `k` best of its `candidates` rows (global rows of `shards`,
    -1 ignored) by exact search's score, in rank order; (nq, k) padded with -inf and -1."""

def merge_top(
    scores_a: npt.NDArray[np.float32],
    rows_a: npt.NDArray[np.int64],
    scores_b: npt.NDArray[np.float32],
    rows_b: npt.NDArray[np.int64],
    k: int,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Merges two partial results of the same queries over disjoint rows ((nq, width) each, -1
    rows ignored): per query the best `k` in the order of one search, (nq, k) padded with -inf, -1."""
