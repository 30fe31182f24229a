"""Progressive codes for exact search: results must equal method="float32" bit for bit, on every
SIMD path, for every kind of data; stale or changed inputs are refused."""

import json
import subprocess
import sys

import ilias
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ilias import _core, search, write_store
from ilias.index import build_index, plan_progressive

from .conftest import unit_rows

PATHS = ilias.simd_paths()


def assert_identical(a, b):
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))


def anisotropic(rng, n, d, decay=1.0, mean=0.0):
    """Rows with a decaying spectrum around a shared mean direction, as real embeddings have."""
    scales = (np.arange(1, d + 1, dtype=np.float32) ** -decay) * rng.permutation(np.linspace(0.5, 1.5, d)).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32) * scales
    x += mean * rng.standard_normal(d).astype(np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def stores_of(tmp_path, x, shard_rows=1000, cut=None):
    cut = len(x) // 3 if cut is None else cut
    parts = [(0, cut), (cut, len(x))]
    return [
        write_store(tmp_path / f"s{j}", x[lo:hi], [f"s{j}/{i}" for i in range(lo, hi)], shard_rows=shard_rows)
        for j, (lo, hi) in enumerate(parts)
        if hi > lo
    ]


def both(q, stores, k, simd=None, **kw):
    plain = search(q, stores, k=k, simd=simd, method="float32", **kw)
    fast = search(q, stores, k=k, simd=simd, method="progressive", **kw)
    assert fast.stats.path == "progressive" and fast.stats.stage_pairs[0] > 0
    return plain, fast


@settings(max_examples=30, deadline=None)
@given(
    nq=st.integers(1, 20),
    n=st.integers(1, 2500),
    d=st.sampled_from([32, 48, 100, 256]),
    k=st.integers(1, 40),
    kind=st.sampled_from(["random", "structured", "clip"]),
    spread=st.sampled_from([0.0, 1.0, 3.0]),
    dup=st.booleans(),
    simd=st.sampled_from(PATHS),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_progressive_is_identical_to_float32(tmp_path_factory, nq, n, d, k, kind, spread, dup, simd, threads, seed):
    rng = np.random.default_rng(seed)
    x = unit_rows(rng, n, d) if kind == "random" else anisotropic(rng, n, d, mean=3.0 if kind == "clip" else 0.0)
    x *= 10 ** rng.uniform(-spread, spread, (n, 1)).astype(np.float32)  # norms over orders of magnitude
    if dup and n > 1:
        x[rng.integers(0, n, n // 3)] = x[0]  # exact duplicates: ties
    q = x[rng.integers(0, n, nq)] + 0.05 * unit_rows(rng, nq, d)
    q *= 10 ** rng.uniform(-spread, spread, (nq, 1)).astype(np.float32)
    if dup and n > 1:
        q[0] = x[0]
    stores = stores_of(tmp_path_factory.mktemp("db"), x.astype(np.float16), shard_rows=333)
    build_index(stores, "progressive")
    assert_identical(*both(q, stores, min(k, n), simd=simd, threads=threads))


@pytest.mark.parametrize("simd", PATHS)
def test_near_ties_and_k_from_1_to_all_rows(tmp_path, rng, simd):
    base = anisotropic(rng, 40, 128)
    # near-ties: copies of 40 vectors nudged by about one float16 step
    x = np.repeat(base, 150, axis=0) + rng.standard_normal((6000, 128)).astype(np.float32) * 1e-3
    stores = stores_of(tmp_path, x.astype(np.float16))
    build_index(stores, "progressive")
    q = base[:9] + 1e-4
    for k in (1, 50, 6000):
        plain, fast = both(q, stores, k, simd=simd)
        assert_identical(plain, fast)
    # the stages spare most pairs the exact score
    assert fast.stats.rescored_pairs < 9 * 6000 or k == 6000
    plain, fast = both(q, stores, 5, simd=simd, threads=1)
    assert fast.stats.rescored_pairs < fast.stats.stage_pairs[0] / 2


@pytest.mark.parametrize("simd", PATHS)
def test_k_10000_over_many_shards(tmp_path, rng, simd):
    # duplicates, near-ties and norms over four orders of magnitude, in 40 shards
    base = anisotropic(rng, 3000, 64, mean=3.0)
    x = np.concatenate([base, base, base[:3000] + 1e-3, base * 10 ** rng.uniform(-2, 2, (3000, 1))])
    x = x[rng.permutation(len(x))].astype(np.float16)
    stores = stores_of(tmp_path, x, shard_rows=300)
    build_index(stores, "progressive")
    q = np.concatenate([anisotropic(rng, 5, 64, mean=3.0), x[:2].astype(np.float32)])
    for k in (1, 10_000):
        assert_identical(*both(q, stores, k, simd=simd))


@pytest.mark.parametrize("simd", PATHS)
def test_tiers_in_one_pass(tmp_path, rng, simd):
    x = anisotropic(rng, 5000, 64, mean=3.0).astype(np.float16)
    q = anisotropic(rng, 12, 64, mean=3.0)
    stores = [
        write_store(tmp_path / "pos", x[:300], [f"i/pos/P{i}.jpg" for i in range(300)]),
        write_store(tmp_path / "dis", x[300:], [f"t.tar/{i}" for i in range(4700)], shard_rows=1000),
    ]
    build_index(stores, "progressive")
    subset = rng.random(5000) < 0.3
    subset[:300] = True
    tiers = [
        ilias.Tier("positives", 300),
        ilias.Tier("+1k", 1300),
        ilias.Tier("subset", None, subset),
        ilias.Tier("subset of +2k", 2300, subset),
        ilias.Tier("all"),
    ]
    together = ilias.search_tiers(q, stores, tiers, k=60, method="progressive", simd=simd)
    for t in tiers:
        rows = 5000 if t.rows is None else t.rows
        mask = np.zeros(5000, bool)
        mask[:rows] = True if t.keep is None else t.keep[:rows]
        alone = search(q, stores, k=60, keep=mask, method="float32", simd=simd)
        assert_identical(together[t.name], alone)


def test_nan_and_inf_rows(tmp_path, rng):
    # a foreign shard may hold non-finite values: such rows are always rescored exactly
    x = anisotropic(rng, 3000, 64).astype(np.float16)
    x[5, 3] = np.nan
    x[700, 0] = np.inf
    x[1500, 1] = -np.inf
    store = write_store(tmp_path / "db", anisotropic(rng, 3000, 64).astype(np.float16), [str(i) for i in range(3000)])
    np.save(store.shard_path(0), x)
    m = json.loads((store.path / "manifest.json").read_text())
    m["shards"][0].pop("fast_checksum")
    (store.path / "manifest.json").write_text(json.dumps(m))
    store = ilias.Store.open(store.path)
    build_index(store, "progressive")
    q = anisotropic(rng, 4, 64)
    for simd in PATHS:
        with np.errstate(invalid="ignore"):
            assert_identical(*both(q, store, 10, simd=simd))


def test_exact_uses_the_codes_where_they_pay_and_steps_aside_on_flat_spectra(tmp_path, rng):
    # (a steep spectrum: at this small size and dimension the plain pass is cheap to beat only so)
    x = anisotropic(rng, 20000, 256, decay=1.0).astype(np.float16)
    store = write_store(tmp_path / "clip", x, [str(i) for i in range(len(x))], shard_rows=7000)
    q = x[:20].astype(np.float32) + 0.05 * unit_rows(rng, 20, 256)
    before = search(q, store, k=20)
    assert before.stats.path != "progressive" and "no progressive codes" in before.stats.path_reason
    build_index(store, "progressive", k=20)
    fast = search(q, store, k=20)
    assert fast.stats.path == "progressive" and "pay" in fast.stats.path_reason
    assert_identical(fast, before)
    # whitened (isotropic) features: the codes record that they do not pay and exact search
    # takes its usual path
    flat = write_store(tmp_path / "flat", unit_rows(rng, 20000, 256, np.float16), [str(i) for i in range(20000)])
    build_index(flat, "progressive", k=20)
    r = search(q, flat, k=20)
    assert r.stats.path != "progressive" and "step aside" in r.stats.path_reason
    assert_identical(r, search(q, flat, k=20, method="progressive"))


def test_the_plan_finds_the_principal_axes(rng):
    x = anisotropic(rng, 4000, 192, decay=1.0, mean=0.8)
    plan = plan_progressive(x, 1_000_000)
    r = plan["rotation"].astype(np.float64)
    np.testing.assert_allclose(r @ r.T, np.eye(192), atol=1e-5)
    assert plan["pays"] and plan["energy"][0] > 0.5 and plan["survival"] == sorted(plan["survival"], reverse=True)
    assert all(b % 32 == 0 for b in plan["boundaries"]) and len(plan["boundaries"]) <= 4
    flat = plan_progressive(unit_rows(rng, 4000, 192), 1_000_000)
    assert not flat["pays"]


def test_stale_changed_and_missing_codes_are_refused(tmp_path, rng):
    x = anisotropic(rng, 3000, 64).astype(np.float16)
    store = write_store(tmp_path / "db", x, [str(i) for i in range(3000)], shard_rows=1000)
    q = anisotropic(rng, 3, 64)
    with pytest.raises(FileNotFoundError, match="no progressive codes.*ilias index build --codes progressive"):
        search(q, store, k=5, method="progressive")
    path = build_index(store, "progressive")
    # a damaged codes file is refused before anything is returned
    good = path.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 1
    path.write_bytes(bytes(bad))
    with pytest.raises(ilias.StoreFormatError, match="checksum mismatch in section"):
        search(q, store, k=5, method="progressive")
    path.write_bytes(good)
    # a store that grew since: its codes are older than it
    with ilias.StoreWriter(store.path, 64) as w:
        w.append(x[:100], [f"n{i}" for i in range(100)])
    with pytest.raises(ValueError, match="older than the database"):
        search(q, store.path, k=5)
    # codes of another set of stores: exact search runs without them, progressive refuses
    other = write_store(tmp_path / "other", x[:500], [f"o{i}" for i in range(500)])
    (other.path / "codes").mkdir()
    (other.path / "codes" / "progressive.codes").write_bytes(path.read_bytes())
    r = search(q, other, k=5)
    assert r.stats.path != "progressive" and "another database" in r.stats.path_reason
    with pytest.raises(ValueError, match="different database"):
        search(q, other, k=5, method="progressive")


def test_a_changed_block_of_the_store_is_seen(tmp_path, rng):
    # rows read for rescoring are checked against the block hashes the codes recorded
    x = anisotropic(rng, 3000, 64).astype(np.float16)
    store = write_store(tmp_path / "db", x, [str(i) for i in range(3000)], shard_rows=3000)
    build_index(store, "progressive")
    y = x.copy()
    y[:, :] = y[::-1]
    np.save(store.shard_path(0), y)
    with pytest.raises(ilias.StoreFormatError, match="00000.npy.*checksum mismatch"):
        search(x[:5].astype(np.float32), store, k=5, method="progressive")


def test_cli_builds_and_says_which_path_ran(tmp_path, rng):
    x = anisotropic(rng, 5000, 64, mean=3.0).astype(np.float16)
    write_store(tmp_path / "db", x, [str(i) for i in range(5000)])
    write_store(tmp_path / "q", x[:7], [f"q{i}" for i in range(7)])

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "ilias", *argv], capture_output=True, text=True)

    p = run("search", "--queries", str(tmp_path / "q"), "--db", str(tmp_path / "db"), "--out", str(tmp_path / "r.npz"),
            "-k", "10", "--method", "progressive")
    assert p.returncode == 1 and p.stderr.count("\n") == 1 and "no progressive codes" in p.stderr, p.stderr
    p = run("index", "build", str(tmp_path / "db"), "--codes", "progressive")
    assert p.returncode == 0 and "stages (" in p.stdout and "energy" in p.stdout, p.stderr
    p = run("search", "--queries", str(tmp_path / "q"), "--db", str(tmp_path / "db"), "--out", str(tmp_path / "r.npz"),
            "-k", "10", "--method", "progressive")
    assert p.returncode == 0 and "path: progressive (forced" in p.stdout and "progressive stages" in p.stdout, p.stderr
    p = run("index", "info", str(tmp_path / "db" / "codes" / "progressive.codes"))
    assert p.returncode == 0 and "expected work" in p.stdout


def test_the_cost_model_adds_up_the_stages_and_the_rescoring():
    work = _core.progressive_work
    first = work([1.0], [248], 0.0, 768)
    assert first > 248  # the products and the bound of every pair
    assert work([1.0, 0.0], [248, 480], 0.0, 768) == first
    later = work([1.0, 0.5], [248, 480], 0.0, 768) - first
    assert later > 0 and work([1.0, 1.0], [248, 480], 0.0, 768) - first == pytest.approx(2 * later)
    rescored = work([1.0], [248], 0.25, 768) - first
    assert rescored > 0 and work([1.0], [248], 0.5, 768) - first == pytest.approx(2 * rescored)
    with pytest.raises(ValueError, match="entered: 2 stages for 1 widths"):
        work([1.0, 0.1], [248], 0.0, 768)
