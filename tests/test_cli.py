import subprocess
import sys

import numpy as np
import pytest
from ilias import SearchResults, Store
from ilias.cli import main

from .conftest import unit_rows


def test_import_info_search_export(tmp_path, rng, capsys):
    x = unit_rows(rng, 500, 16)
    np.save(tmp_path / "db.npy", x)
    (tmp_path / "ids.txt").write_text("".join(f"t.tar/k{i}\n" for i in range(500)))
    np.save(tmp_path / "q.npy", x[:7])
    assert main(["import", str(tmp_path / "db.npy"), "--ids", str(tmp_path / "ids.txt"), "--out", str(tmp_path / "db"), "--shard-rows", "200"]) == 0
    assert main(["import", str(tmp_path / "q.npy"), "--out", str(tmp_path / "q")]) == 0
    assert main(["info", str(tmp_path / "db"), "--verify"]) == 0
    assert "500 in 3 shard(s)" in capsys.readouterr().out
    assert main(["search", "--queries", str(tmp_path / "q"), "--db", str(tmp_path / "db"), "--out", str(tmp_path / "r.npz"), "-k", "10"]) == 0
    res = SearchResults.load(tmp_path / "r.npz")
    assert res.indices[:, 0].tolist() == list(range(7))  # each query finds itself first
    assert res.ids(3)[0] == "t.tar/k3"
    pytest.importorskip("h5py")
    assert main(["export", str(tmp_path / "db"), "--out", str(tmp_path / "db.hdf5")]) == 0
    assert main(["import", str(tmp_path / "db.hdf5"), "--out", str(tmp_path / "db2")]) == 0
    np.testing.assert_array_equal(Store.open(tmp_path / "db2").read_all(), Store.open(tmp_path / "db").read_all())


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "{tmp}/nowhere"], "no such store directory"),
        (["search", "--queries", "{tmp}/nowhere", "--db", "{tmp}/nowhere", "--out", "{tmp}/r.npz"], "no such store"),
        (["import", "{tmp}/missing.npy", "--out", "{tmp}/s"], "missing.npy: no such file"),
        (["import", "{tmp}/a.txt", "--out", "{tmp}/s"], "sources: give official .hdf5 files or exactly one .npy file"),
    ],
)
def test_user_errors_are_one_line(tmp_path, argv, message):
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "ilias", *argv], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_help_for_every_command():
    for cmd in ("import", "export", "info", "search", "index", "evaluate", "models", "extract", "run", "demo", "bench"):
        proc = subprocess.run([sys.executable, "-m", "ilias", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: ilias" in proc.stdout


def test_search_tiers_from_the_command_line(tmp_path, rng):
    from ilias import write_store

    pos = write_store(tmp_path / "pos", unit_rows(rng, 50, 8), [f"i/pos/P{i}.jpg" for i in range(50)])
    dis = write_store(tmp_path / "dis", unit_rows(rng, 400, 8), [f"t.tar/key{i}" for i in range(400)])
    q = write_store(tmp_path / "q", unit_rows(rng, 5, 8), [f"i/query/Q{i}.jpg" for i in range(5)])
    (tmp_path / "keys.txt").write_text("key3\nkey17\nkey399\n")
    base = ["search", "--queries", str(q.path), "--db", str(pos.path), str(dis.path), "-k", "20"]
    tiers = ["--tier", f"mini={tmp_path / 'keys.txt'}", "--tier", "small=+100", "--tier", "full=all"]
    assert main(base + tiers + ["--out", str(tmp_path / "r.npz")]) == 0
    assert main(base + ["--mini", str(tmp_path / "keys.txt"), "--out", str(tmp_path / "mini.npz")]) == 0
    assert main(base + ["--out", str(tmp_path / "full.npz")]) == 0
    for tier, alone in (("mini", "mini.npz"), ("full", "full.npz")):
        a, b = SearchResults.load(tmp_path / f"r.{tier}.npz"), SearchResults.load(tmp_path / alone)
        np.testing.assert_array_equal(a.indices, b.indices)
    small = SearchResults.load(tmp_path / "r.small.npz")
    assert small.indices.max() < 150
    mini = SearchResults.load(tmp_path / "r.mini.npz")
    assert {i for i in mini.ids(0)} <= {f"i/pos/P{i}.jpg" for i in range(50)} | {"t.tar/key3", "t.tar/key17", "t.tar/key399"}
    assert main(base + ["--tier", "bad", "--out", str(tmp_path / "x.npz")]) == 1


def test_search_takes_a_store_written_in_parts(tmp_path, rng):
    from ilias import write_store

    x = unit_rows(rng, 90, 8)
    for k, (lo, hi) in enumerate([(0, 40), (40, 90)]):
        write_store(tmp_path / "db" / f"part-{k:05d}-of-00002", x[lo:hi], [str(i) for i in range(lo, hi)],
                    provenance={"complete": True})
    write_store(tmp_path / "q", x[[5, 60]], ["a", "b"])
    argv = ["search", "--queries", str(tmp_path / "q"), "--db", str(tmp_path / "db"), "-k", "3"]
    assert main(argv + ["--out", str(tmp_path / "r.npz")]) == 0
    res = SearchResults.load(tmp_path / "r.npz")
    assert res.ids(0)[0] == "5" and res.ids(1)[0] == "60"
    assert main(["info", str(tmp_path / "db")]) == 0
    (tmp_path / "db" / "part-00001-of-00002" / "manifest.json").unlink()
    assert main(argv + ["--out", str(tmp_path / "r2.npz")]) == 1  # a missing piece is an error
