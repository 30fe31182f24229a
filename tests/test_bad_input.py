"""The bad-input matrix: every mistake a user can make with stores, results and options is a
clear error of a known class whose message names the file or the option, and nothing wrong is
ever computed from it silently. Command-line cases run the real `ilias` in a subprocess and
expect one line on stderr and exit code 1."""

import json
import os
import pickle
import subprocess
import sys
import warnings

import ilias
import ilias.evaluate
import ilias.groundtruth
import numpy as np
import pytest
from ilias import Database, SearchResults, Store, StoreFormatError, StoreWriter, search, write_store
from ilias.database import IncompleteStoreError
from ilias.store import MAX_ID_BYTES, StoreLockedError, StoreSourceError

from .conftest import unit_rows
from .test_evaluate import make_ilias  # the small synthetic ILIAS of the evaluation tests


def cli(*argv) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ILIAS_DEBUG"}
    return subprocess.run([sys.executable, "-m", "ilias", *map(str, argv)], capture_output=True, text=True, timeout=120, env=env)


def one_line_error(proc, *names) -> str:
    assert proc.returncode == 1, proc.stderr
    # progress lines may come first (evaluate says what it reads); the error is the last line, alone
    lines = proc.stderr.strip().splitlines()
    errors = [line for line in lines if ": error:" in line]
    assert errors == lines[-1:] and "Traceback" not in proc.stderr, proc.stderr
    for name in names:
        assert str(name) in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture
def stores(tmp_path, rng):
    q = write_store(tmp_path / "q", unit_rows(rng, 6, 16), [f"inst/query/Q{i}.jpg" for i in range(6)])
    db = write_store(tmp_path / "db", unit_rows(rng, 700, 16), [f"t.tar/key{i}" for i in range(700)], shard_rows=256)
    return tmp_path, q, db


# ---------------------------------------------------------------- stores know their source


def test_importing_another_file_into_a_store_is_an_error_unless_replaced(tmp_path, rng):
    a, b = unit_rows(rng, 300, 8), unit_rows(rng, 300, 8)
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    assert cli("import", tmp_path / "a.npy", "--out", tmp_path / "s", "--shard-rows", 100).returncode == 0
    one_line_error(cli("import", tmp_path / "b.npy", "--out", tmp_path / "s", "--shard-rows", 100), tmp_path / "s", "--replace")
    np.testing.assert_array_equal(Store.open(tmp_path / "s").read_all(), a.astype(np.float16))  # untouched
    # the same file again resumes (nothing to add); --replace swaps in a store of the new file
    assert cli("import", tmp_path / "a.npy", "--out", tmp_path / "s", "--shard-rows", 100).returncode == 0
    assert cli("import", tmp_path / "b.npy", "--out", tmp_path / "s", "--shard-rows", 100, "--replace").returncode == 0
    np.testing.assert_array_equal(Store.open(tmp_path / "s").read_all(), b.astype(np.float16))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary store left


def test_other_writer_parameters_are_another_source(tmp_path, rng):
    np.save(tmp_path / "a.npy", unit_rows(rng, 300, 8))
    ilias.import_npy(tmp_path / "a.npy", tmp_path / "s", shard_rows=100)
    with pytest.raises(StoreSourceError, match=str(tmp_path / "s")):
        ilias.import_npy(tmp_path / "a.npy", tmp_path / "s", shard_rows=50)


def test_an_interrupted_import_is_never_searched_silently(tmp_path, rng):
    x = unit_rows(rng, 500, 8)
    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "part", dim=8, shard_rows=100, expected=500) as w:
            w.append(x[:250], [f"r{i}" for i in range(250)])
            raise RuntimeError("killed")
    store = Store.open(tmp_path / "part")
    assert store.count == 200 and not store.manifest.complete
    with pytest.raises(IncompleteStoreError, match=r"part: incomplete store \(200 of 500 rows"):
        search(x[:3], store, k=5)
    with pytest.warns(UserWarning, match="incomplete store"):
        db = Database([store], allow_incomplete=True)
    res = search(x[:3], db, k=5)
    assert res.warnings and "200 of 500 rows" in res.warnings[0]
    res.save(tmp_path / "r.npz")
    assert SearchResults.load(tmp_path / "r.npz").warnings == res.warnings  # carried into the reports
    one_line_error(cli("search", "--queries", tmp_path / "part", "--db", tmp_path / "part", "--out", tmp_path / "r2.npz"),
                   tmp_path / "part", "--allow-incomplete")


def test_a_second_writer_of_a_store_fails_at_once(tmp_path, rng):
    w = StoreWriter(tmp_path / "s", dim=4)
    with pytest.raises(StoreLockedError, match=str(tmp_path / "s")):
        StoreWriter(tmp_path / "s", dim=4)
    # from another process too, while this one holds the store
    np.save(tmp_path / "x.npy", unit_rows(rng, 10, 4))
    one_line_error(cli("import", tmp_path / "x.npy", "--out", tmp_path / "s"), tmp_path / "s", "another process")
    w.close()
    StoreWriter(tmp_path / "s", dim=4).close()  # released


# ---------------------------------------------------------------- integrity


def test_corrupt_ids_are_refused_where_results_read_them(stores):
    tmp, q, db = stores
    path = db.ids_path(1)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # one id of the second shard changes its last characters
    path.write_bytes(bytes(raw))
    res = search(q, Store.open(tmp / "db"), k=700)  # every row returned: its ids are read
    with pytest.raises(StoreFormatError, match=r"00001.ids.npy: checksum mismatch"):
        res.returned_rows()
    one_line_error(cli("info", tmp / "db", "--verify"), "00001.ids.npy")


def test_non_finite_values_are_refused_naming_the_row(tmp_path):
    x = np.ones((5, 4), np.float32)
    x[3, 1] = np.inf
    with pytest.raises(ValueError, match="row 3 holds NaN or Inf"):
        write_store(tmp_path / "s", x, list("abcde"))
    np.save(tmp_path / "x.npy", x)
    one_line_error(cli("import", tmp_path / "x.npy", "--out", tmp_path / "s2"), "row 3")


def test_float16_underflow_is_a_warning_with_the_count(tmp_path, rng):
    x = unit_rows(rng, 10, 32)
    x[[2, 7]] *= 1e-6  # values of 1e-7: below float16's subnormals, the rows lose their direction
    with pytest.warns(UserWarning, match="2 rows lost more than 1% of their norm in float16"):
        write_store(tmp_path / "s", x, [str(i) for i in range(10)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_store(tmp_path / "s32", x, [str(i) for i in range(10)], dtype="float32")  # float32 holds them


def test_very_long_ids_are_refused_with_the_limit(tmp_path):
    with pytest.raises(ValueError, match=f"id 1 is 100,000 bytes long, over the limit of {MAX_ID_BYTES:,}"):
        write_store(tmp_path / "s", np.ones((2, 4)), ["ok", "x" * 100_000])
    assert not (tmp_path / "s" / "shards" / "00000.ids.npy").exists()


@pytest.mark.parametrize(
    "manifest, message",
    [
        ("[1, 2]", "expected a JSON object, found list"),
        ("not json", "unreadable manifest"),
        ('{"format": "ilias-store", "version": 1, "dim": 10000000, "dtype": "float16", "shards": []}', "dim 10000000 is out of range"),
        ('{"format": "ilias-store", "version": 1, "dim": 0, "dtype": "float16", "shards": []}', "dim 0 is out of range"),
        ('{"format": "ilias-store", "version": 1, "dim": "x", "dtype": "float16", "shards": []}', "unreadable manifest"),
        ('{"format": "ilias-store", "version": 1, "dim": 4, "dtype": "float16", "shards": [{"name": "../x", "count": 1}]}', "bad shard entry"),
        ('{"format": "ilias-store", "version": 1, "dim": 4, "dtype": "float16", "shards": {"a": 1}}', "unreadable manifest"),
    ],
)
def test_bad_manifests_are_clear_errors(tmp_path, manifest, message):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text(manifest)
    with pytest.raises(StoreFormatError, match=message):
        Store.open(tmp_path / "s")
    one_line_error(cli("info", tmp_path / "s"), "manifest.json")


def test_a_shard_that_is_a_fifo_is_refused_without_hanging(stores):
    tmp, q, db = stores
    path = db.shard_path(0)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(StoreFormatError, match="00000.npy: not a regular file"):
        Store.open(tmp / "db")
    one_line_error(cli("search", "--queries", tmp / "q", "--db", tmp / "db", "--out", tmp / "r.npz"), "00000.npy")


# ---------------------------------------------------------------- filters and settings


def test_a_mini_list_that_matches_no_distractor_is_an_error(stores):
    tmp, q, db = stores
    pos = write_store(tmp / "pos", unit_rows(np.random.default_rng(0), 5, 16), [f"inst/pos/P{i}.jpg" for i in range(5)])
    (tmp / "mini.txt").write_text("".join(f"key{i}.jpg\n" for i in range(50)))  # keys of another form
    msg = one_line_error(cli("search", "--queries", tmp / "q", "--db", pos.path, db.path, "--mini", tmp / "mini.txt",
                             "--out", tmp / "r.npz"), "only 0 of 50 keys")
    assert "'key0.jpg'" in msg and "'t.tar/key0'" in msg
    assert not (tmp / "r.npz").exists()


# ---------------------------------------------------------------- outputs, checked before the scan


def test_outputs_are_checked_before_the_search(stores):
    tmp, q, db = stores
    base = ["search", "--queries", tmp / "q", "--db", tmp / "db"]
    one_line_error(cli(*base, "--out", tmp / "r.txt"), "r.txt", "unknown results suffix")
    (tmp / "file").write_text("")
    one_line_error(cli(*base, "--out", tmp / "file" / "r.npz"), "file")
    (tmp / "adir.npz").mkdir()
    one_line_error(cli(*base, "--out", tmp / "adir.npz"), "adir.npz", "is a folder")


def test_the_tier_files_of_one_pass_are_written_together(stores):
    tmp, q, db = stores
    (tmp / "r.b.npz").mkdir()  # the second tier's file cannot be written
    proc = cli("search", "--queries", tmp / "q", "--db", tmp / "db", "--out", tmp / "r.npz",
               "--tier", "a=+100", "--tier", "b=all")
    one_line_error(proc, "r.b.npz")
    assert not (tmp / "r.a.npz").exists()  # not the first one alone either
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # and no temporary file left


# ---------------------------------------------------------------- options


@pytest.mark.parametrize(
    "argv, option",
    [
        (["search", "-k", "-1"], "argument -k"),
        (["search", "-k", "1000000000"], "argument -k"),
        (["search", "--threads", "5000"], "argument --threads"),
        (["search", "--threads", "two"], "argument --threads"),
        (["search", "--shortlist", "0"], "argument --shortlist"),
        (["index", "build", "x", "--codes", "sq8", "--sample", "-5"], "argument --sample"),
        (["index", "build", "x", "--codes", "sq8", "--iters", "0"], "argument --iters"),
        (["index", "build", "x", "--codes", "sq8", "--seed", "-1"], "argument --seed"),
        (["evaluate", "r.json", "--gt", "x", "--k", "0"], "argument --k"),
        (["import", "x.npy", "--out", "s", "--shard-rows", "0"], "argument --shard-rows"),
        (["search", "--qe", "-1"], "argument --qe"),
        (["search", "--qe", "two"], "argument --qe"),
        (["adapt", "train", "f", "--labels", "l.txt", "--out", "w.pth", "--epochs", "0"], "argument --epochs"),
        (["adapt", "train", "f", "--labels", "l.txt", "--out", "w.pth", "--lr", "-1e-3"], "argument --lr"),
        (["adapt", "train", "f", "--labels", "l.txt", "--out", "w.pth", "--lr", ""], "argument --lr"),
        (["adapt", "train", "f", "--labels", "l.txt", "--out", "w.pth", "--dim", "-5"], "argument --dim"),
        (["adapt", "train", "f", "--labels", "l.txt", "--out", "w.pth", "--scale", "0"], "argument --scale"),
        (["adapt", "apply", "s", "--weights", "w.pth", "--out", "o", "--threads", "-1"], "argument --threads"),
        (["demo", "--distractors", "-1"], "argument --distractors"),
        (["demo", "--threads", "x"], "argument --threads"),
        (["bench", "--n", "-10"], "argument --n"),
        (["run", "--model", "m", "--data", "d", "--out", "o", "-k", "0"], "argument -k"),
        (["run", "--model", "m", "--data", "d", "--out", "o", "--rerank", "sift", "--rerank-lambda", "1.5"], "lambda"),
        (["run", "--model", "m", "--data", "d", "--out", "o", "--rerank", "sift", "--rerank-top", "50", "-k", "10"],
         "--rerank-top"),
        (["run", "--model", "m", "--data", "d", "--out", "o", "--rerank-tiers", "all"], "--rerank-tiers"),
        (["run", "--model", "m", "--data", "d", "--out", "o", "--rerank", "sift", "--rerank-tiers"], "argument --rerank-tiers"),
        (["run", "--model", "m", "--data", "d", "--out", "o", "--rerank", "sift", "--rerank-gamma", "-1"], "argument --rerank-gamma"),
        (["rerank", "r.npz", "--locals", "L", "--out", "o.npz", "--method", "sift", "--threads", "-2"], "argument --threads"),
        (["rerank", "missing.npz", "--locals", "L", "--out", "o.npz", "--method", "sift"], "missing.npz"),
        (["rerank", "r.npz", "--locals", "L", "--out", "o.npz", "--method", "sift", "--lambda", "2"], "lambda"),
        (["rerank", "r.npz", "--locals", "L", "--out", "o.npz", "--method", "sift", "--top", "0"], "argument --top"),
    ],
)
def test_numeric_options_out_of_range_are_one_line(tmp_path, argv, option):
    if argv[0] == "search":
        argv = argv + ["--queries", "q", "--db", "db", "--out", "r.npz"]
    one_line_error(cli(*argv), option)


def test_unknown_codes_kinds_are_refused(stores):
    tmp, q, db = stores
    for kind in ("pq0", "pq32x4x", "pq", "sq4"):
        one_line_error(cli("index", "build", tmp / "db", "--codes", kind), kind)
    one_line_error(cli("index", "build", tmp / "db", "--codes", "pq32"), "pq32")  # 32 subquantizers > dim 16


def test_a_k_whose_buffers_do_not_fit_is_refused_before_allocating(stores, monkeypatch):
    tmp, q, db = stores
    # the module, not the function of the same name that the package exports
    monkeypatch.setattr(sys.modules["ilias.search"], "available_memory", lambda: 1 << 16)  # a 64 KiB machine
    with pytest.raises(ValueError, match=r"k = 500: 6 queries .* need about"):
        search(q, db, k=500, threads=2)


# ---------------------------------------------------------------- results files


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.json", b"", "not valid JSON"),
        ("trunc.json", b'{"a/query/Q0.jpg": {"x": 0.5', "not valid JSON"),
        ("list.json", b"[1, 2, 3]", "found a JSON list"),
        ("empty.pkl", b"", "not a readable pickle"),
        ("trunc.pkl", pickle.dumps({"query_ids": [1] * 100})[:40], "not a readable pickle"),
        ("list.pkl", pickle.dumps([1, 2]), "not an official similarity pickle"),
        ("empty.npz", b"", "not a readable ilias results file"),
        ("trunc.npz", b"PK\x03\x04garbage", "not a readable ilias results file"),
    ],
)
def test_bad_results_files_are_one_line(tmp_path, name, content, message):
    make_ilias(tmp_path / "ilias", np.random.default_rng(0))
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ilias.evaluate.evaluate(tmp_path / name, tmp_path / "ilias")
    one_line_error(cli("evaluate", tmp_path / name, "--gt", tmp_path / "ilias"), name)


def test_a_truncated_npz_of_ours(stores):
    tmp, q, db = stores
    search(q, db, k=5).save(tmp / "r.npz")
    raw = (tmp / "r.npz").read_bytes()
    (tmp / "cut.npz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.npz: not a readable ilias results file"):
        SearchResults.load(tmp / "cut.npz")


def test_json_results_with_values_that_are_not_objects(tmp_path):
    make_ilias(tmp_path / "ilias", np.random.default_rng(0))
    gt = ilias.groundtruth.load_ground_truth(tmp_path / "ilias")
    (tmp_path / "r.json").write_text(json.dumps({gt.image_queries[0]: [1, 2]}))
    one_line_error(cli("evaluate", tmp_path / "r.json", "--gt", tmp_path / "ilias"), "r.json", "expected {db_id: similarity}")


# ---------------------------------------------------------------- models


def test_model_mistakes_are_one_line(tmp_path):
    pytest.importorskip("timm")
    pytest.importorskip("open_clip")
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "imgs" / "a.jpg")
    folder = ("--folder", tmp_path / "imgs", "-o", tmp_path / "out", "--random-init", "--workers", 0, "--quiet")
    line = one_line_error(cli("extract", "dinov2_vitb4", *folder), "dinov2_vitb4")
    assert "did you mean dinov2_vitb14" in line
    one_line_error(cli("extract", "mocov3_vitb", *folder), "did you mean")
    # a text tower the model does not have, before any image is read
    core = tmp_path / "ILIAS" / "ilias_core" / "obj" / "query"
    core.mkdir(parents=True)
    (core / "T000.txt").write_text("a red mug")
    args = ("extract", "eva02_large_patch14_clip_336.merged2b", "--core", tmp_path / "ILIAS" / "ilias_core",
            "--what", "text_queries", "-o", tmp_path / "t", "--random-init", "--quiet", "--text-tower")
    one_line_error(cli(*args, "other"), "--text-tower", "'other'", "published, matching")
    assert not (tmp_path / "out").exists() and not (tmp_path / "t").exists()
