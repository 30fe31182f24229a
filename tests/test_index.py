"""Quantized codes: exact rescoring equals exact search, approximate scores equal a numpy model
of the codes (decoded from the documented file layout), recall, and bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ilias import search, write_store
from ilias.cli import main
from ilias.index import build_index, measure_recall, search_codes
from ilias.store import Store, StoreFormatError, StoreWriter

from .test_search import brute_force, split_store

HEADER = 256


def clustered(rng, n, d, clusters=20, dtype=np.float16):
    """Anisotropic, clustered rows like real embeddings: a decaying spectrum around centres."""
    spectrum = (np.arange(1, d + 1) ** -0.6).astype(np.float32)
    centres = rng.standard_normal((clusters, d)).astype(np.float32) * spectrum * 2
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32) * spectrum
    return x.astype(dtype)


def decode_pq(path, n, d, m, bits):
    """Reconstructed rows from a PQ codes file, read with numpy from the documented layout."""
    raw = np.fromfile(path, np.uint8)
    ksub, dsub = 1 << bits, d // m
    cent_bytes = m * ksub * dsub * 4
    cent = raw[HEADER : HEADER + cent_bytes].view(np.float32).reshape(m, ksub, dsub)
    body = raw[HEADER + cent_bytes :]
    if bits == 8:
        codes = body.reshape(n, m)
    else:
        m_even = m + m % 2
        blocks = body.reshape(-1, m_even, 16)[:, :m]
        codes = np.concatenate([np.concatenate([(b & 15).T, (b >> 4).T]) for b in blocks])[:n]
    return np.concatenate([cent[g][codes[:, g]] for g in range(m)], axis=1)


def sq8_model(q, x):
    """The SQ8 approximate scores, written from the definition: per-row scale max|x|/127,
    codes rounded to nearest (ties to even), queries quantized the same way."""

    def quantize(a):
        s = np.abs(a).max(axis=1, keepdims=True) / np.float32(127)
        c = np.rint(a / np.where(s > 0, s, 1)).astype(np.float64)
        return s.astype(np.float64), c

    (t, u), (s, c) = quantize(q.astype(np.float32)), quantize(x.astype(np.float32))
    return (u @ c.T) * t * s.T


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    d=st.sampled_from([4, 8, 12, 24]),
    nq=st.integers(1, 12),
    kind=st.sampled_from(["sq8", "pq4", "pq2x4", "pq3x4", "pq6x4"]),
    k_frac=st.floats(0, 1),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
)
def test_a_full_shortlist_rescored_equals_exact_search(tmp_path_factory, n, d, nq, kind, k_frac, threads, seed):
    if d % int(kind[2:].split("x")[0] if kind != "sq8" else 1):
        return
    tmp = tmp_path_factory.mktemp("full")
    rng = np.random.default_rng(seed)
    # few distinct values: many exact ties, whose order must be the reference's
    x = rng.integers(-3, 4, (n, d)).astype(np.float16)
    q = rng.integers(-3, 4, (nq, d)).astype(np.float32)
    stores = split_store(tmp, x, [n // 2])
    k = max(1, int(k_frac * n))
    path = build_index(stores, kind, tmp / "c.codes", threads=threads, iters=3)
    got = search_codes(q, stores, path, k, shortlist=n, threads=threads)
    want_s, want_i, _ = brute_force(q, x, k)
    np.testing.assert_array_equal(got.indices, want_i)
    np.testing.assert_array_equal(got.scores, want_s)


def test_sq8_rescored_scores_equal_exact_search(tmp_path, rng):
    x = clustered(rng, 3000, 96)
    q = clustered(rng, 40, 96).astype(np.float32)
    s = write_store(tmp_path / "db", x, [f"r{i}" for i in range(len(x))], shard_rows=1000)
    build_index(s, "sq8")
    got = search_codes(q, s, "sq8", 50)
    exact = search(q, s, 50, method="float32")
    assert measure_recall(got, q, s, sample=40)["recall"] == 1.0
    # rescoring uses exact search's single-pair kernel: the same bits for the same rows
    for i in range(len(q)):
        common, a, b = np.intersect1d(got.indices[i], exact.indices[i], return_indices=True)
        assert len(common) > 0
        np.testing.assert_array_equal(got.scores[i][a].view(np.uint32), exact.scores[i][b].view(np.uint32))


def test_sq8_approximate_scores_follow_the_definition(tmp_path, rng):
    x = clustered(rng, 500, 40, dtype=np.float32)
    q = clustered(rng, 9, 40, dtype=np.float32)
    s = write_store(tmp_path / "db", x, [str(i) for i in range(len(x))], dtype="float32")
    build_index(s, "sq8")
    got = search_codes(q, s, "sq8", 30, rerank=False)
    model = sq8_model(q, x)
    for i in range(len(q)):
        np.testing.assert_allclose(got.scores[i], model[i][got.indices[i]], rtol=1e-5, atol=1e-6)
        # and they are the model's best: the 30th model score bounds every other row
        assert model[i].max() <= got.scores[i][0] * (1 + 1e-5) + 1e-6
        assert np.sort(model[i])[::-1][29] == pytest.approx(got.scores[i][-1], rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind,m,bits", [("pq8", 8, 8), ("pq16x4", 16, 4), ("pq5x4", 5, 4)])
def test_pq_approximate_scores_are_table_sums_of_the_codes(tmp_path, rng, kind, m, bits):
    n, d = 700, 80
    x = clustered(rng, n, d)
    q = clustered(rng, 6, d).astype(np.float32)
    s = write_store(tmp_path / "db", x, [str(i) for i in range(n)])
    path = build_index(s, kind, iters=5)
    rec = decode_pq(path, n, d, m, bits)
    # reconstruction is far better than nothing: the codebooks were trained
    err = np.mean((rec - x.astype(np.float32)) ** 2) / np.mean((x.astype(np.float32) - x.mean(0)) ** 2)
    assert err < 0.5
    got = search_codes(q, s, path, 20, rerank=False)
    model = q @ rec.T
    for i in range(len(q)):
        # 4-bit tables are rounded to u8: each of the m lookups is off by at most half a step
        table = np.stack([q[i, g * (d // m) : (g + 1) * (d // m)] @ rec[:, g * (d // m) : (g + 1) * (d // m)].T
                          for g in range(m)])
        step = (table.max(1) - table.min(1)).max() / 255
        tol = 1e-4 if bits == 8 else m * step / 2 + 1e-4
        np.testing.assert_allclose(got.scores[i], model[i][got.indices[i]], atol=tol, rtol=1e-5)


def test_pq_fast_scan_with_rescoring_finds_the_neighbours(tmp_path, rng):
    x = clustered(rng, 20000, 64)
    q = clustered(rng, 50, 64).astype(np.float32)
    s = write_store(tmp_path / "db", x, [str(i) for i in range(len(x))], shard_rows=7000)
    build_index(s, "pq32x4", sample=8000)
    got = search_codes(q, s, "pq32x4", 100, shortlist=2000)
    r = measure_recall(got, q, s, sample=50)
    assert r["recall"] >= 0.95, r
    # returned scores are exact dot products
    exact = q @ x.astype(np.float32).T
    for i in range(len(q)):
        np.testing.assert_allclose(got.scores[i], exact[i][got.indices[i]], rtol=1e-5, atol=1e-5)


def test_training_is_seeded(tmp_path, rng):
    x = clustered(rng, 2000, 16)
    s = write_store(tmp_path / "db", x, [str(i) for i in range(len(x))])
    a = build_index(s, "pq4", tmp_path / "a.codes", seed=5, iters=4, threads=1)
    b = build_index(s, "pq4", tmp_path / "b.codes", seed=5, iters=4, threads=2)
    c = build_index(s, "pq4", tmp_path / "c.codes", seed=6, iters=4)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_bad_codes_are_refused_clearly(tmp_path, rng):
    x = clustered(rng, 300, 16)
    q = clustered(rng, 2, 16).astype(np.float32)
    s = write_store(tmp_path / "db", x, [str(i) for i in range(300)])
    path = build_index(s, "sq8")
    # truncated
    data = path.read_bytes()
    bad = tmp_path / "short.codes"
    bad.write_bytes(data[:-3])
    with pytest.raises(StoreFormatError, match="short.codes.*truncated"):
        search_codes(q, s, bad, 5)
    with pytest.raises(StoreFormatError, match="ILIASCOD"):
        (tmp_path / "foreign.codes").write_bytes(b"\x93NUMPY" + bytes(300))
        search_codes(q, s, tmp_path / "foreign.codes", 5)
    # built from a different database
    other = write_store(tmp_path / "other", x[::-1].copy(), [str(i) for i in range(300)])
    with pytest.raises(ValueError, match="different database"):
        search_codes(q, other, path, 5)
    # the store grew (an extraction resumed) after the codes were built
    grown = write_store(tmp_path / "db2", x, [str(i) for i in range(300)], shard_rows=100)
    old = build_index(grown, "sq8")
    with StoreWriter(grown.path, dim=16, shard_rows=100) as w:
        w.append(x[:10], [f"new{i}" for i in range(10)])
    with pytest.raises(ValueError, match="older than the database: built when it held 300 rows, it now holds 310"):
        search_codes(q, Store.open(grown.path), old, 5)
    with pytest.raises(ValueError, match="unknown kind"):
        build_index(s, "pq4x3")
    with pytest.raises(ValueError, match="not a multiple of 5"):
        build_index(s, "pq5")
    with pytest.raises(FileNotFoundError, match="ilias index build"):
        search_codes(q, s, "pq8x4", 5)
    with pytest.raises(ValueError, match="shortlist"):
        search_codes(q, s, path, 5, shortlist=3)
    # nothing half-written was left behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["sq8.codes"]


def test_cli_builds_searches_and_measures_recall(tmp_path, rng, capsys):
    x = clustered(rng, 4000, 32)
    q = clustered(rng, 30, 32)
    db = write_store(tmp_path / "db", x, [f"d{i}" for i in range(len(x))])
    write_store(tmp_path / "q", q, [f"q{i}" for i in range(len(q))])
    assert main(["index", "build", str(db.path), "--codes", "sq8"]) == 0
    assert main(["index", "build", "--codes", "sq8"]) == 1
    assert "sq8 codes" in capsys.readouterr().out
    assert main(["index", "info", str(db.path / "codes" / "sq8.codes")]) == 0
    assert "4,000 rows x 32" in capsys.readouterr().out
    out = tmp_path / "r.npz"
    argv = ["search", "--queries", str(tmp_path / "q"), "--db", str(db.path), "--out", str(out), "-k", "10"]
    assert main([*argv, "--codes", "sq8", "--measure-recall", "30"]) == 0
    printed = capsys.readouterr().out
    assert "recall@10 against exact search on 30 queries: 1.0000" in printed
    exact = tmp_path / "e.npz"
    assert main([*argv[:-4], "--out", str(exact), "-k", "10"]) == 0
    a, b = np.load(out), np.load(exact)
    np.testing.assert_array_equal(a["indices"], b["indices"])
    assert main([*argv, "--codes", "pq8x4"]) == 1
    assert "ilias index build" in capsys.readouterr().err
