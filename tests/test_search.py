import json
import pickle
import signal
import subprocess
import sys
import time

import ilias
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ilias import SearchResults, mini_ilias_keep, search, write_store

from .conftest import unit_rows

PATHS = ilias.simd_paths()


def brute_force(q, x, k, keep=None):
    """The obviously-right reference: float32 matmul, then a full sort by (score desc, index desc)."""
    s = q.astype(np.float32) @ x.astype(np.float32).T
    idx = np.arange(x.shape[0])
    out_s, out_i = [], []
    for row in s:
        cand = idx if keep is None else idx[keep]
        order = np.lexsort((-cand, -row[cand]))[:k]
        sel = cand[order]
        pad = k - len(sel)
        out_s.append(np.concatenate([row[sel], np.full(pad, -np.inf, np.float32)]))
        out_i.append(np.concatenate([sel, np.full(pad, -1)]))
    return np.array(out_s, np.float32), np.array(out_i, np.int64), s


def split_store(tmp_path, x, cuts, name="db"):
    """x written as several stores (cut at `cuts`) with small shards: one global row space."""
    bounds = [0, *cuts, len(x)]
    stores = []
    for j, (lo, hi) in enumerate(zip(bounds, bounds[1:])):
        if hi > lo:
            stores.append(
                write_store(tmp_path / f"{name}{j}", x[lo:hi], [f"s{j}/{i}" for i in range(lo, hi)], shard_rows=37)
            )
    return stores


@settings(max_examples=40, deadline=None)
@given(
    nq=st.integers(1, 19),
    n=st.integers(1, 260),
    d=st.integers(1, 70),
    k_frac=st.floats(0, 1),
    threads=st.integers(1, 3),
    simd=st.sampled_from(PATHS),
    cut=st.floats(0, 1),
    seed=st.integers(0, 2**32 - 1),
)
def test_integer_data_matches_brute_force_exactly(tmp_path_factory, nq, n, d, k_frac, threads, simd, cut, seed):
    # small integers: every partial sum is exact in float32, so scores and tie order must agree
    # exactly with the reference whatever the summation order; few values means many ties
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, (n, d)).astype(np.float16)
    q = rng.integers(-2, 3, (nq, d)).astype(np.float32)
    k = max(1, int(k_frac * n))
    stores = split_store(tmp_path_factory.mktemp("db"), x, [int(cut * n)])
    got = search(q, stores, k=k, threads=threads, simd=simd)
    want_s, want_i, _ = brute_force(q, x, k)
    np.testing.assert_array_equal(got.scores, want_s)
    np.testing.assert_array_equal(got.indices, want_i)


@settings(max_examples=25, deadline=None)
@given(
    nq=st.integers(1, 30),
    n=st.integers(1, 400),
    d=st.sampled_from([3, 32, 64, 100, 768]),
    k=st.integers(1, 50),
    simd=st.sampled_from(PATHS),
    seed=st.integers(0, 2**32 - 1),
)
def test_float_data_matches_brute_force_up_to_summation_order(tmp_path_factory, nq, n, d, k, simd, seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, n, d, np.float16)
    q = unit_rows(rng, nq, d)
    k = min(k, n)
    stores = split_store(tmp_path_factory.mktemp("db"), x, [n // 3])
    got = search(q, stores, k=k, simd=simd)
    want_s, _, full = brute_force(q, x, k)
    tol = 1e-5
    # tie-aware: the returned scores are the true k best, each returned row has that true score,
    # and every row clearly better than the k-th is returned
    np.testing.assert_allclose(got.scores, want_s, atol=tol)
    for r in range(nq):
        np.testing.assert_allclose(full[r, got.indices[r]], got.scores[r], atol=tol)
        assert len(set(got.indices[r].tolist())) == k
        must = np.nonzero(full[r] > want_s[r, -1] + 2 * tol)[0]
        assert set(must.tolist()) <= set(got.indices[r].tolist())


def test_paths_and_threads_agree(tmp_path, rng):
    x = unit_rows(rng, 3000, 96, np.float16)
    q = unit_rows(rng, 40, 96)
    store = write_store(tmp_path / "db", x, [str(i) for i in range(3000)], shard_rows=1000)
    ref = search(q, store, k=100, simd="scalar", threads=1)
    for simd in PATHS:
        for threads in (1, 2, 4):
            got = search(q, store, k=100, simd=simd, threads=threads)
            np.testing.assert_allclose(got.scores, ref.scores, atol=1e-5)


def test_large_k_and_float32_store(tmp_path, rng):
    x = unit_rows(rng, 12000, 16)
    q = unit_rows(rng, 3, 16)
    store = write_store(tmp_path / "db", x, [str(i) for i in range(12000)], dtype="float32", shard_rows=5000)
    got = search(q, store, k=10000)
    want_s, want_i, _ = brute_force(q, x, 10000)
    np.testing.assert_allclose(got.scores, want_s, atol=1e-6)
    assert (got.indices == want_i).mean() > 0.999  # float ties aside


def test_keep_filter(tmp_path, rng):
    x = rng.integers(-2, 3, (500, 8)).astype(np.float16)
    q = rng.integers(-2, 3, (6, 8)).astype(np.float32)
    store = write_store(tmp_path / "db", x, [str(i) for i in range(500)], shard_rows=64)
    keep = rng.random(500) < 0.1
    got = search(q, store, k=80, keep=keep)
    want_s, want_i, _ = brute_force(q, x, 80, keep)
    np.testing.assert_array_equal(got.indices, want_i)
    np.testing.assert_array_equal(got.scores, want_s)
    assert (got.indices == -1).any()  # fewer kept rows than k: padded


def test_mini_ilias_keep(tmp_path, rng):
    pos = write_store(tmp_path / "pos", unit_rows(rng, 3, 4), ["a/pos/P0.jpg", "a/pos/P1.jpg", "b/pos/P0.jpg"])
    dis = write_store(
        tmp_path / "dis",
        unit_rows(rng, 5, 4),
        ["t0.tar/key1", "t0.tar/key22", "t1.tar/key3", "t1.tar/key333", "t2.tar/k"],
        shard_rows=2,
    )
    with pytest.warns(UserWarning, match="1 of 3 keys are not in the database"):
        keep = mini_ilias_keep([pos, dis], ["key3", "key22", "absent"], min_share=0.5)
    assert keep.tolist() == [True, True, True, False, True, True, False, False]
    # ids of another form than the keys (tar/key.jpg against bare keys) match nothing: an error
    # that shows both sides, never a "mini-ILIAS" of the positives alone
    with pytest.raises(ValueError, match=r"only 0 of 2 keys match .*'key1.jpg'.*'t0.tar/key1'"):
        mini_ilias_keep([pos, dis], ["key1.jpg", "key3.jpg"])
    with pytest.raises(ValueError, match="only 2 of 3 keys"):
        mini_ilias_keep([pos, dis], ["key3", "key22", "absent"])
    with pytest.raises(ValueError, match="the list is empty"):
        mini_ilias_keep([pos, dis], [])


def test_results_roundtrip_and_official_formats(tmp_path, rng):
    x = unit_rows(rng, 200, 8, np.float16)
    ids = [f"inst/pos/P{i:03d}.jpg" for i in range(100)] + [f"t.tar/{i}" for i in range(100)]
    stores = [write_store(tmp_path / "a", x[:100], ids[:100]), write_store(tmp_path / "b", x[100:], ids[100:])]
    q = write_store(tmp_path / "q", unit_rows(rng, 5, 8), [f"inst/query/Q{i}.jpg" for i in range(5)])
    res = search(q, stores, k=20)
    assert res.query_ids == q.all_ids()
    assert res.ids(0) == [ids[i] for i in res.indices[0]]
    loaded = SearchResults.load(res.save(tmp_path / "r.npz"))
    np.testing.assert_array_equal(loaded.scores, res.scores)
    assert [loaded.ids(i) for i in range(5)] == [res.ids(i) for i in range(5)]
    assert loaded.database == res.database

    official = json.loads(res.write_official_json(tmp_path / "r.json").read_text())
    assert list(official) == res.query_ids
    first = official[res.query_ids[2]]
    assert list(first) == res.ids(2)  # keys in rank order
    np.testing.assert_allclose(list(first.values()), res.scores[2], rtol=1e-6)

    with open(res.write_official_pickle(tmp_path / "r.pkl"), "rb") as f:
        p = pickle.load(f)
    assert p["query_ids"] == res.query_ids and p["sims"].dtype == np.float32
    assert [list(p["db_ids"][p["ranks"][i]]) for i in range(5)] == [res.ids(i) for i in range(5)]


def test_bad_arguments_are_clear(tmp_path, rng):
    store = write_store(tmp_path / "db", unit_rows(rng, 10, 8), [str(i) for i in range(10)])
    q = unit_rows(rng, 2, 8)
    with pytest.raises(ValueError, match=r"k = 11 is larger than the database \(10 rows\)"):
        search(q, store, k=11)
    with pytest.raises(ValueError, match="k must be at least 1"):
        search(q, store, k=0)
    with pytest.raises(ValueError, match="queries have dimension 7 but the database has dimension 8"):
        search(q[:, :7], store, k=1)
    bad = q.copy()
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"queries: row 1 holds a non-finite value"):
        search(bad, store, k=1)
    bad[1, 3] = np.inf
    with pytest.raises(ValueError, match=r"queries: row 1"):
        search(bad, store, k=1)
    with pytest.raises(ValueError, match="keep: 3 flags for a database of 10 rows"):
        search(q, store, k=1, keep=np.ones(3, bool))
    with pytest.raises(ValueError, match="simd: unknown path"):
        search(q, store, k=1, simd="sse9")
    empty = ilias.StoreWriter(tmp_path / "empty", dim=8).close()
    with pytest.raises(ValueError, match="empty"):
        search(q, empty, k=1)
    with pytest.raises(FileNotFoundError):
        search(q, tmp_path / "missing", k=1)


def test_ctrl_c_stops_a_search_quickly(tmp_path, rng):
    # about 600 GFLOP: several seconds on one thread
    x = unit_rows(rng, 150000, 256, np.float16)
    write_store(tmp_path / "db", x, [str(i) for i in range(150000)])
    write_store(tmp_path / "q", unit_rows(rng, 8000, 256), [str(i) for i in range(8000)])
    cmd = [sys.executable, "-m", "ilias", "search", "--queries", str(tmp_path / "q"), "--db", str(tmp_path / "db")]
    proc = subprocess.Popen(cmd + ["--out", str(tmp_path / "r.npz"), "--threads", "1"], stderr=subprocess.PIPE)
    # the first progress line (within ~0.1 s of the start) says the search is under way
    seen = b""
    while b"search:" not in seen:
        line = proc.stderr.readline()
        assert line, f"the search ended before reporting progress: {seen!r}"
        seen += line
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    stopped = time.monotonic() - t0
    assert proc.returncode == 130, seen + err
    assert b"interrupted" in err
    assert stopped < 5  # generous: a stop within about a second is the design
    assert not (tmp_path / "r.npz").exists()


# ---- the int8 first pass: results must be identical to the float32 path, bit for bit

# "exact" steps aside while the pass does not pay; "int8" runs this CPU's kernel from the first
# row (the one that goes with the float32 path: AVX-VNNI with avx2 where the CPU has it)
INT8_METHODS = ["int8-scalar"] + (["exact", "int8"] if len(ilias._core.int8_kernels()) > 1 else [])


def assert_identical(a, b):
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))


@settings(max_examples=30, deadline=None)
@given(
    nq=st.integers(1, 20),
    n=st.integers(1, 2500),
    d=st.sampled_from([1, 7, 64, 100, 256]),
    k=st.integers(1, 40),
    spread=st.sampled_from([0.0, 1.0, 3.0]),
    dup=st.booleans(),
    method=st.sampled_from(INT8_METHODS),
    simd=st.sampled_from(PATHS),
    seed=st.integers(0, 2**32 - 1),
)
def test_int8_pass_is_identical_to_float32(tmp_path_factory, nq, n, d, k, spread, dup, method, simd, seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, n, d)
    x *= 10 ** rng.uniform(-spread, spread, (n, 1)).astype(np.float32)  # very different norms
    if dup and n > 1:
        x[rng.integers(0, n, n // 3)] = x[0]  # exact duplicates: ties
    q = unit_rows(rng, nq, d) * 10 ** rng.uniform(-spread, spread, (nq, 1)).astype(np.float32)
    if dup and n > 1:
        q[0] = x[0]  # a query sitting on a duplicated row
    stores = split_store(tmp_path_factory.mktemp("db"), x.astype(np.float16), [n // 2])
    k = min(k, n)
    plain = search(q, stores, k=k, simd=simd, method="float32")
    fast = search(q, stores, k=k, simd=simd, method=method)
    assert_identical(plain, fast)


def test_int8_pass_runs_and_handles_near_ties_and_large_k(tmp_path, rng):
    base = unit_rows(rng, 40, 128)
    # near-ties: copies of 40 vectors nudged by about one float16 step
    x = np.repeat(base, 150, axis=0) + rng.standard_normal((6000, 128)).astype(np.float32) * 1e-3
    store = write_store(tmp_path / "db", x.astype(np.float16), [str(i) for i in range(6000)], shard_rows=1000)
    q = base[:9] + 1e-4
    for k in (1, 50, 6000):
        plain = search(q, store, k=k, method="float32")
        fast = search(q, store, k=k, method="int8-scalar")
        assert_identical(plain, fast)
    assert fast.stats.int8_pairs > 0 or k == 6000
    small_k = search(q, store, k=5, method="int8-scalar", threads=1)
    st = small_k.stats
    # a forced pass scores every (query, row) pair, and its bound spares most of them rescoring
    assert st.int8_pairs == 9 * 6000 and st.float_pairs == 0
    assert 0 < st.rescored_pairs < st.int8_pairs / 2


@pytest.mark.parametrize("method", INT8_METHODS)
def test_int8_pass_with_k_10000_over_many_shards(tmp_path, rng, method):
    # duplicates, near-ties and norms over four orders of magnitude, in 40 shards
    base = unit_rows(rng, 3000, 48)
    x = np.concatenate([base, base, base[:6000 - 3000] + 1e-3, base * 10 ** rng.uniform(-2, 2, (3000, 1))])
    x = x[rng.permutation(len(x))].astype(np.float16)
    store = write_store(tmp_path / "db", x, [str(i) for i in range(len(x))], shard_rows=300)
    q = np.concatenate([unit_rows(rng, 5, 48), x[:2].astype(np.float32)])
    for k in (1, 10_000):
        assert_identical(search(q, store, k=k, method="float32"), search(q, store, k=k, method=method))


def test_int8_pass_with_nan_and_inf_rows(tmp_path, rng):
    # a foreign shard may hold non-finite values: those rows are always rescored exactly
    x = unit_rows(rng, 3000, 32, np.float16)
    x[5, 3] = np.nan
    x[700, 0] = np.inf
    x[1500, 1] = -np.inf
    store = write_store(tmp_path / "db", unit_rows(rng, 3000, 32, np.float16), [str(i) for i in range(3000)])
    np.save(store.shard_path(0), x)  # same shape and dtype, now with non-finite rows
    # ...in a store written without fast checksums (else the search refuses the changed shard)
    m = json.loads((store.path / "manifest.json").read_text())
    m["shards"][0].pop("fast_checksum")
    (store.path / "manifest.json").write_text(json.dumps(m))
    store = ilias.Store.open(store.path)
    q = unit_rows(rng, 4, 32)
    with np.errstate(invalid="ignore"):
        assert_identical(search(q, store, k=10, method="float32"), search(q, store, k=10, method="int8-scalar"))


def test_unknown_method(tmp_path, rng):
    store = write_store(tmp_path / "db", unit_rows(rng, 10, 8), [str(i) for i in range(10)])
    with pytest.raises(ValueError, match="method: unknown"):
        search(unit_rows(rng, 1, 8), store, k=1, method="int4")


# ---- several databases from one pass


@pytest.mark.parametrize("method", ["float32", *INT8_METHODS])
def test_tiers_equal_separate_searches(tmp_path, rng, method):
    x = unit_rows(rng, 5000, 48, np.float16)
    q = unit_rows(rng, 12, 48)
    stores = [
        write_store(tmp_path / "pos", x[:300], [f"i/pos/P{i}.jpg" for i in range(300)]),
        write_store(tmp_path / "dis", x[300:], [f"t.tar/{i}" for i in range(4700)], shard_rows=1000),
    ]
    subset = rng.random(5000) < 0.3
    subset[:300] = True
    tiers = [
        ilias.Tier("positives", 300),
        ilias.Tier("+1k", 1300),
        ilias.Tier("subset", None, subset),
        ilias.Tier("subset of +2k", 2300, subset),
        ilias.Tier("all"),
    ]
    together = ilias.search_tiers(q, stores, tiers, k=60, method=method)
    for t in tiers:
        rows = 5000 if t.rows is None else t.rows
        mask = np.zeros(5000, bool)
        mask[:rows] = True if t.keep is None else t.keep[:rows]
        # the reference: that database alone, every score in float32
        alone = search(q, stores, k=60, keep=mask, method="float32")
        assert_identical(together[t.name], alone)
        assert together[t.name].tier_rows == mask.sum()
    with pytest.raises(ValueError, match=r"tiers\[0\]: 6000 rows"):
        ilias.search_tiers(q, stores, [ilias.Tier("x", 6000)], k=5)
