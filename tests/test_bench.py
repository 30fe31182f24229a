"""`ilias bench` and ilias.benchmark: the search benchmark at a tiny size, through the real paths."""

import re
import subprocess
import sys

import numpy as np
import pytest
from ilias import _core
from ilias import benchmark as b
from ilias.cli import main

TINY = ["--n", "5_000", "--dim", "64", "--queries", "50", "-k", "10"]


def table_rows(out: str) -> dict[str, list[str]]:
    """The printed table as {method: the other cells}, read by the header's column widths."""
    lines = out.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("method  "))
    widths = [len(dashes) for dashes in lines[top + 1].split("  ")]
    rows = {}
    for line in lines[top + 2:]:
        if not line.strip():
            break
        cells, pos = [], 0
        for w in widths:
            cells.append(line[pos:pos + w].strip())
            pos += w + 2
        rows[cells[0]] = cells[1:]
    return rows


def test_bench_prints_the_table(tmp_path, capsys):
    assert main(["bench", *TINY, "--peers", "numpy", "--data", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "bench data:" in captured.err  # progress of the data generation
    assert "data: 5,000 x 64 float16 (random), 50 queries, k=10" in out
    assert "machine float32 FMA peak" in out
    assert "ilias exact: results identical to ilias float32: True" in out
    assert "numpy: " in out and "overlap of result sets with ilias float32 1.00000" in out
    header = next(line for line in out.splitlines() if line.startswith("method  ")).split()
    assert header[:4] == ["method", "seconds", "GFLOP/s", "%"] and header[-4:] == ["time", "vs", "ilias", "exact"]
    rows = table_rows(out)
    assert list(rows) == ["ilias float32", "ilias exact", "numpy sgemm + argpartition (float32)"]
    assert rows["ilias exact"][-1] == "1.00x"
    for cells in rows.values():
        assert float(cells[0]) >= 0 and cells[-1].endswith("x")
    # a second run finds the data made by the first
    assert main(["bench", *TINY, "--peers", "", "--methods", "exact", "--data", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "bench data:" not in captured.err and list(table_rows(captured.out)) == ["ilias exact"]


def test_bench_with_codes_prints_the_stages_and_what_stage_1_alone_costs(tmp_path, capsys):
    args = ["bench", "--n", "20_000", "--dim", "128", "--queries", "64", "-k", "10", "--kind", "structured",
            "--peers", "", "--methods", "exact,progressive", "--threads", "1", "--data", str(tmp_path)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "ilias progressive: results identical to ilias exact: True" in out
    width = int(re.search(r"progressive codes: .*?; stages (\d+) dims", out).group(1)) - _core.PROGRESSIVE_HEAD
    pairs = int(re.search(r"pairs entering each stage 100\.000%.* of the ([\d,]+) of stage 1", out).group(1).replace(",", ""))
    assert pairs == 64 * 20_000  # forced: every pair enters stage 1
    peak = re.search(r"machine int8 maddubs peak \(avx2, 1 threads\): (\d+) GOP/s", out)
    assert (peak is not None) == ("avx2" in _core.simd_paths())
    if peak and "avx2" in out.split("stage 1 is")[0]:
        ops = float(re.search(r"stage 1 is ([\d.,]+) G int8 ops", out).group(1).replace(",", ""))
        assert ops == pytest.approx(2 * pairs * width / 1e9, rel=0.01)


def test_the_maddubs_peak_is_measured_where_the_cpu_has_avx2():
    got = _core.maddubs_peak_gops(1, 20)
    assert (got is not None and got > 0) if "avx2" in _core.simd_paths() else got is None


def test_numpy_peer_finds_our_results(tmp_path):
    store = b.make_store("bench", 5000, 64, root=tmp_path)
    q = b.queries(50, 64)
    ours = b.ilias_search(store, "exact", 0)(q, 10)
    scores, rows = b.peer_search("numpy", store, 0)(q, 10)
    for i in range(len(q)):
        assert set(store.ids_of(rows[i]).tolist()) == set(ours.ids(i))
    np.testing.assert_allclose(scores, ours.scores, atol=1e-5)
    assert b.overlap(rows, ours.indices) == 1.0


def test_bench_runs_on_the_core_install(tmp_path):
    """No faiss, torch, pytest or threadpoolctl: the command runs, and a note says how to add faiss."""
    code = ("import sys\n"
            "for m in ('faiss', 'torch', 'pytest', 'threadpoolctl', 'sklearn'):\n"
            "    sys.modules[m] = None  # import fails\n"
            "from ilias.cli import main\n"
            f"sys.exit(main(['bench', *{TINY!r}, '--data', {str(tmp_path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "faiss peers (faiss-flat) skipped: faiss is not installed (pip install faiss-cpu adds it)" in proc.stdout
    assert list(table_rows(proc.stdout)) == ["ilias float32", "ilias exact", "numpy sgemm + argpartition (float32)"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--n", "5", "-k", "10"], "--n: 5 rows are fewer than -k 10"),
        (["--kind", "gaussian"], "--kind: expected random or structured or clip, got 'gaussian'"),
        (["--peers", "numpy,annoy"], "--peers: unknown 'annoy' (known: faiss-flat, faiss-sq-fp16, numpy)"),
        (["--methods", "fast"], "--methods: unknown 'fast'"),
        (["--methods", ""], "--methods: give at least one ilias method"),
        (["--queries", "0"], "argument --queries: expected at least 1, got 0"),
        (["--threads", "-1"], "argument --threads: expected 0 to 1,024, got -1"),
    ],
)
def test_bench_user_errors_name_the_flag(tmp_path, flags, message):
    proc = subprocess.run([sys.executable, "-m", "ilias", "bench", "--data", str(tmp_path), *flags],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ilias bench: error: ") and message in lines[0], proc.stderr
    assert not any(tmp_path.iterdir())  # checked before any data is made


def test_interrupted_store_resumes_with_the_same_rows(tmp_path, monkeypatch):
    fresh = b.make_store("t", 1000, 8, "structured", root=tmp_path / "a", chunk=300, shard_rows=400)
    calls = []
    draw = b.unit_vectors

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return draw(*args)

    monkeypatch.setattr(b, "unit_vectors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        b.make_store("t", 1000, 8, "structured", root=tmp_path / "b", chunk=300, shard_rows=400)
    monkeypatch.setattr(b, "unit_vectors", draw)
    assert b.Store.open(tmp_path / "b" / "t-structured-1000x8").count == 400  # one complete shard kept
    resumed = b.make_store("t", 1000, 8, "structured", root=tmp_path / "b", chunk=300, shard_rows=400)
    np.testing.assert_array_equal(resumed.read_all(), fresh.read_all())
    assert resumed.all_ids() == fresh.all_ids() == [f"row{i}" for i in range(1000)]


def test_overlap_counts_shared_rows_and_ignores_absent_ones():
    a = np.array([[1, 2, 3], [4, 5, -1]])
    t = np.array([[3, 2, 9], [5, -1, -1]])
    assert b.overlap(a, t) == pytest.approx((2 / 3 + 1 / 3) / 2)
