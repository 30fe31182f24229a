"""pytest-benchmark cases of the benchmarks in this folder: the same functions as the scripts.

    pytest benches --benchmark-disable            # every case once, quickly: a smoke test (CI)
    pytest benches --benchmark-only               # timed, default size (100k x 768 search)
    pytest benches --benchmark-only --bench-size full --benchmark-json out.json
    pytest-benchmark compare out.json other.json  # or --benchmark-compare: throughput across versions

Each case puts its numbers in `benchmark.extra_info` (so they land in --benchmark-json): the
setup, seconds (median of its rounds, our own clock), effective GFLOP/s, the shares of this
machine's float32 and int8 peaks (measured once per session, best of 3), and `ratio`: its time
over ilias's for the same work (peer / ours; for ilias cases, over ilias exact). What the
scripts print as checks (exact bit-identical to float32, overlap with faiss, the official mAP)
are asserts here; timings are never asserted. At the end the scripts' tables are printed from
the session's cases. Peers are skipped when faiss (or torch, sklearn...) is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from common import DATA


@dataclass(frozen=True)
class BenchSize:
    # search: rows, dimension, queries, k
    n: int
    dim: int
    queries: int
    k: int
    rounds: int  # of each ilias and faiss-flat search case
    peer_rounds: int  # of the slow peers (faiss-sq-fp16, numpy) and the codes cases
    index_queries: int
    peer_queries: int  # faiss SQ8 / IndexPQ are timed on this many queries, scaled (fast-scan: all)
    sample: int  # training rows of PQ, both sides
    instances: int  # of the synthetic ILIAS of the evaluation benchmark
    scale_sizes: tuple[int, ...]
    forward_batch: int


SIZES = {
    "default": BenchSize(100_000, 768, 500, 1000, 3, 2, 200, 200, 16384, 250, (100_000, 200_000), 2),
    "full": BenchSize(1_000_000, 768, 2232, 1000, 3, 1, 2232, 500, 65536, 1000, (1_000_000, 10_000_000), 8),
}


def pytest_addoption(parser):
    g = parser.getgroup("ilias benchmarks")
    g.addoption("--bench-size", choices=sorted(SIZES), default="default",
                help="default: 100k x 768 search, 500 queries; full: 1M x 768, 2,232 queries, k=1000 (as the README)")
    g.addoption("--bench-kind", choices=["random", "structured", "clip"], default="random", help="data of search and codes")
    g.addoption("--bench-threads", type=int, default=0, help="threads of ilias and the peers (default 0: all cores)")
    g.addoption("--bench-data", type=Path, default=DATA, help=f"where the stores are cached (default {DATA})")


class Recorder:
    """The session's cases, for the tables at the end: search timings and finished table rows."""

    def __init__(self):
        self.search: dict = {}  # key -> ilias.benchmark.Timing (without results)
        self.setup = None
        self.peaks = None
        self.sections: dict = {}  # title -> (columns, rows)

    def add_row(self, title: str, columns: list[str], row: dict) -> None:
        self.sections.setdefault(title, (columns, []))[1].append(row)


RECORDER = pytest.StashKey[Recorder]()


def pytest_configure(config):
    config.stash[RECORDER] = Recorder()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    from ilias.benchmark import SearchReport, table

    rec = config.stash.get(RECORDER, None)
    if rec is None or not (rec.search or rec.sections):
        return
    disabled = config.getoption("benchmark_disable", False)
    terminalreporter.section("ilias benchmarks" + (" (single untimed runs: --benchmark-disable)" if disabled else ""))
    if rec.search:
        report = SearchReport(rec.setup, rec.peaks, list(rec.search.values()))
        terminalreporter.write_line(rec.setup.line())
        for line in rec.peaks.lines():
            terminalreporter.write_line(line)
        terminalreporter.write_line(report.table())
    for title, (columns, rows) in rec.sections.items():
        terminalreporter.write_line("")
        terminalreporter.write_line(title)
        terminalreporter.write_line(table(rows, columns))


@pytest.fixture(scope="session")
def recorder(pytestconfig) -> Recorder:
    return pytestconfig.stash[RECORDER]


@pytest.fixture(scope="session")
def size(pytestconfig) -> BenchSize:
    return SIZES[pytestconfig.getoption("bench_size")]


@pytest.fixture(scope="session")
def data_kind(pytestconfig) -> str:
    return pytestconfig.getoption("bench_kind")


@pytest.fixture(scope="session")
def threads(pytestconfig) -> int:
    from ilias.benchmark import resolve_threads

    return resolve_threads(pytestconfig.getoption("bench_threads"))


@pytest.fixture(scope="session")
def data_dir(pytestconfig) -> Path:
    return pytestconfig.getoption("bench_data")


@pytest.fixture(scope="session")
def peaks(threads):
    """The machine's float32 FMA and int8 VNNI peaks, best of 3, once per session."""
    from ilias.benchmark import measure_peaks

    return measure_peaks(threads)


@pytest.fixture(scope="session")
def store(size, data_kind, data_dir):
    """The search and codes benchmarks' database (cached: made once per size and kind)."""
    from ilias.benchmark import make_store

    return make_store("bench", size.n, size.dim, data_kind, root=data_dir, progress=True)


@pytest.fixture(scope="session")
def vectors32(store):
    """The database as float32 in RAM, as faiss's flat indexes and refinement hold it."""
    pytest.importorskip("faiss")
    from ilias.benchmark import float32_vectors

    return float32_vectors(store)
