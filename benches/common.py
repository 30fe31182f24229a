"""Shared helpers of the Python benchmarks: synthetic data cached on disk, timing, tables."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np

DATA = Path(os.environ.get("ILIAS_BENCH_DATA", Path(__file__).resolve().parent.parent / "bench-data"))


def structured(rng, n: int, d: int, decay: float = 0.05) -> np.ndarray:
    """Unit vectors with an anisotropic spectrum (eigenvalues ~ exp(-decay * i)), like real embeddings."""
    scales = np.exp(-decay * np.arange(d) / d * 100).astype(np.float32)
    basis, _ = np.linalg.qr(np.random.default_rng(12345).standard_normal((d, d)).astype(np.float32))
    x = (rng.standard_normal((n, d), dtype=np.float32) * scales) @ basis.T
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_store(name: str, n: int, d: int, kind: str = "random", chunk: int = 200_000):
    """A cached float16 store of `n` unit vectors (`random` gaussian or `structured`)."""
    from ilias import Store, StoreWriter

    path = DATA / f"{name}-{kind}-{n}x{d}"
    if (path / "manifest.json").exists():
        store = Store.open(path)
        if store.count == n:
            return store
    rng = np.random.default_rng(0)
    with StoreWriter(path, dim=d) as w:
        for lo in range(w.count, n, chunk):
            m = min(chunk, n - lo)
            if kind == "structured":
                x = structured(rng, m, d)
            else:
                x = rng.standard_normal((m, d), dtype=np.float32)
                x /= np.linalg.norm(x, axis=1, keepdims=True)
            w.append(x, [f"row{i}" for i in range(lo, lo + m)])
    return Store.open(path)


def queries(n: int, d: int, kind: str = "random", seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "structured":
        return structured(rng, n, d)
    q = rng.standard_normal((n, d), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def timed(fn, repeat: int = 1):
    """(median seconds, last result) over `repeat` runs."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)
