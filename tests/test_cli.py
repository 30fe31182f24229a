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
    for cmd in ("import", "export", "info", "search", "evaluate", "demo"):
        proc = subprocess.run([sys.executable, "-m", "ilias", cmd, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: ilias" in proc.stdout
