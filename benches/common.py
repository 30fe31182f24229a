"""What the benchmark scripts and `pytest benches` share beyond ilias.benchmark (which holds the
data generation, the peers, the peaks and the tables): where their data is cached, how the
peers' thread pools are sized, and how a pytest case is timed (`run_case`). Imports nothing
heavy: `limit_threads` must run before numpy.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

# the benchmarks' stores: $ILIAS_BENCH_DATA, else bench-data/ at the top of the repository
DATA = Path(os.environ.get("ILIAS_BENCH_DATA") or Path(__file__).resolve().parent.parent / "bench-data")


def limit_threads(threads: int) -> None:
    """Peers use as many threads as we do: OpenMP (faiss) and BLAS (numpy, faiss) read these
    when they are loaded, so call this before importing numpy (0 leaves them as they are)."""
    if threads:
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[var] = str(threads)


def run_case(benchmark, fn, rounds: int):
    """Times `fn` through pytest-benchmark (`rounds` rounds of one call) and with our own clock,
    which runs with --benchmark-disable too: (median seconds, last result)."""
    times, last = [], []

    def call():
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        last[:] = [out]
        return out

    benchmark.pedantic(call, rounds=rounds, iterations=1)
    return statistics.median(times), last[0]
