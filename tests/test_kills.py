"""SIGKILL at random moments: import, extraction, index build and search are killed again and
again (kill -9, no chance to clean up), each kill followed by a look at what is on disk and a
rerun. Whatever a kill leaves, no final file is half-written, no incomplete store is searched
without a word, and the finished outputs equal those of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ilias import Database, SearchResults, Store
from ilias.database import IncompleteStoreError

from .conftest import unit_rows

KILLS = 4


def start(*argv) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "ILIAS_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "ilias", *map(str, argv)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)


def finish(*argv) -> None:
    proc = start(*argv)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err


def kill_at_random(argv, rng, seconds: float, check) -> int:
    """Starts `argv` KILLS times, each killed with SIGKILL after a random delay (up to `seconds`,
    about its whole run), and calls `check()` after each; returns how many kills hit a live process."""
    hits = 0
    for _ in range(KILLS):
        proc = start(*argv)
        time.sleep(float(rng.uniform(0.05, seconds)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            hits += 1
        proc.wait(timeout=300)
        proc.stderr.close()
        check()
    return hits


def store_is_whole_or_says_partial(path, reference: Store) -> None:
    """A killed writer leaves either nothing, or a valid store that is complete and equal to the
    reference, or one that says it is incomplete, which a search refuses."""
    if not (path / "manifest.json").exists():
        return
    store = Store.open(path)  # valid: every shard it lists is whole
    if store.manifest.complete:
        np.testing.assert_array_equal(store.read_all(), reference.read_all())
        assert store.all_ids() == reference.all_ids()
    else:
        with pytest.raises(IncompleteStoreError):
            Database([store])
        n = store.count
        np.testing.assert_array_equal(store.read_all(), reference.read_all()[:n])  # a true prefix


def test_import_killed_at_random_moments(tmp_path):
    rng = np.random.default_rng(11)
    np.save(tmp_path / "x.npy", unit_rows(rng, 400_000, 64))
    argv = lambda out: ["import", tmp_path / "x.npy", "--out", out, "--shard-rows", 20_000]  # noqa: E731
    t0 = time.monotonic()
    finish(*argv(tmp_path / "reference"))
    seconds = time.monotonic() - t0
    reference = Store.open(tmp_path / "reference")
    out = tmp_path / "killed"
    hits = kill_at_random(argv(out), rng, seconds, lambda: store_is_whole_or_says_partial(out, reference))
    assert hits >= 1
    finish(*argv(out))
    resumed = Store.open(out)
    assert resumed.manifest.complete and resumed.fingerprint == reference.fingerprint
    assert not [p for p in (out / "shards").iterdir() if p.name.startswith(".")]


def test_extraction_killed_at_random_moments(tmp_path):
    pytest.importorskip("torch")
    from PIL import Image

    rng = np.random.default_rng(12)
    (tmp_path / "imgs").mkdir()
    for i in range(48):
        Image.fromarray(rng.integers(0, 255, (40 + i % 7, 56, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i:03d}.png")
    argv = lambda out: ["extract", "alexnet.tv_in1k", "--random-init", "--folder", tmp_path / "imgs", "-o", out,  # noqa: E731
                        "--resolution", 64, "--batch-size", 4, "--workers", 0, "--shard-rows", 8, "--device", "cpu", "--quiet"]
    t0 = time.monotonic()
    finish(*argv(tmp_path / "reference"))
    seconds = time.monotonic() - t0
    reference = Store.open(tmp_path / "reference")
    out = tmp_path / "killed"
    assert kill_at_random(argv(out), rng, seconds, lambda: store_is_whole_or_says_partial(out, reference)) >= 1
    finish(*argv(out))
    resumed = Store.open(out)
    assert resumed.manifest.complete and resumed.all_ids() == reference.all_ids()
    np.testing.assert_array_equal(resumed.read_all(), reference.read_all())


@pytest.fixture
def database(tmp_path):
    from ilias import write_store

    rng = np.random.default_rng(13)
    write_store(tmp_path / "q", unit_rows(rng, 500, 64), [f"i/query/Q{i}.jpg" for i in range(500)])
    write_store(tmp_path / "db", unit_rows(rng, 300_000, 64), [f"t.tar/k{i}" for i in range(300_000)], shard_rows=50_000)
    return tmp_path


def test_index_build_killed_at_random_moments(database):
    rng = np.random.default_rng(14)
    tmp = database
    argv = lambda out: ["index", "build", tmp / "db", "--codes", "pq8", "--out", out, "--iters", 10, "--threads", 1]  # noqa: E731
    t0 = time.monotonic()
    finish(*argv(tmp / "reference.codes"))
    seconds = time.monotonic() - t0
    want = (tmp / "reference.codes").read_bytes()
    out = tmp / "killed.codes"

    def check():
        assert not out.exists() or out.read_bytes() == want  # the file appears whole or not at all

    assert kill_at_random(argv(out), rng, seconds, check) >= 1
    finish(*argv(out))
    assert out.read_bytes() == want


def test_search_killed_at_random_moments(database):
    rng = np.random.default_rng(15)
    tmp = database
    argv = lambda out: ["search", "--queries", tmp / "q", "--db", tmp / "db", "--out", out, "-k", 100,  # noqa: E731
                        "--tier", "small=+100000", "--tier", "all=all", "--threads", 1]
    t0 = time.monotonic()
    finish(*argv(tmp / "reference.npz"))
    seconds = time.monotonic() - t0
    want = {t: SearchResults.load(tmp / f"reference.{t}.npz") for t in ("small", "all")}
    out = tmp / "killed.npz"

    def check():
        present = [t for t in want if (tmp / f"killed.{t}.npz").exists()]
        for t in present:
            got = SearchResults.load(tmp / f"killed.{t}.npz")
            assert np.array_equal(got.indices, want[t].indices) and np.array_equal(got.scores, want[t].scores)

    assert kill_at_random(argv(out), rng, seconds, check) >= 1
    finish(*argv(out))
    check()
    assert all((tmp / f"killed.{t}.npz").exists() for t in want)
