from typing import Callable, Optional

import numpy as np
import numpy.typing as npt

__version__: str

class StoreFormatError(ValueError): ...

def exact_search(
    shards: list[str],
    queries: npt.NDArray[np.float32],
    k: int,
    threads: int = 0,
    tiers: Optional[list[tuple[int, Optional[npt.NDArray[np.bool_]]]]] = None,
    simd: Optional[str] = None,
    method: str = "exact",
    progress: Optional[Callable[[int], object]] = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], dict]: ...  # (tiers, nq, k)
def inspect_shard(path: str, dim: Optional[int] = None) -> tuple[str, int, int]: ...
def simd_paths() -> list[str]: ...
def fp32_peak_gflops(simd: Optional[str] = None, threads: int = 0, millis: int = 300) -> float: ...
def average_precision(
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.uint8],
    n_positives: npt.NDArray[np.int64],
    k: int,
    threads: int = 0,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
def int8_peak_gops(threads: int = 0, millis: int = 300) -> Optional[float]: ...
def positive_codes(ids: object, positives: list[str]) -> tuple[npt.NDArray[np.int32], int, Optional[str]]: ...
def grouped_average_precision(
    scores: npt.NDArray[np.float64],
    labels: npt.NDArray[np.uint8],
    positive: npt.NDArray[np.int32],
    member: npt.NDArray[np.bool_],
    n_positives: npt.NDArray[np.int64],
    k: int,
    threads: int = 0,
) -> npt.NDArray[np.float64]: ...
