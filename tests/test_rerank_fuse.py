"""Fusion of global and local scores over the top M (rerank/fuse.py) against a plain-Python reference."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from ilias.rerank.fuse import default_weights, fuse
from ilias.results import DatabasePart, SearchResults


def _results(scores, indices):
    nq, k = scores.shape
    rows = np.unique(indices[indices >= 0])
    ids = np.array([f"img{r}".encode() for r in rows], dtype="S16")
    return SearchResults(scores=scores, indices=indices, query_ids=[f"q{i}" for i in range(nq)], k=k,
                         database=[DatabasePart("db", 1000, "f" * 32)], _rows=(rows, ids))


def _reference(g, s, idx, lam, gamma):
    """One list, written out: fused scores of the valid head, sorted descending, ties in list order."""
    items = [(lam * float(gj) + (1 - lam) / (1 + math.exp(-gamma * float(sj))), j) for j, (gj, sj, ij) in
             enumerate(zip(g, s, idx)) if ij >= 0]
    items.sort(key=lambda t: (-t[0], t[1]))
    return [idx[j] for _, j in items], [f for f, _ in items]


@st.composite
def case(draw):
    nq, k = draw(st.integers(1, 5)), draw(st.integers(1, 12))
    m = draw(st.integers(1, k))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    # few distinct values: many ties, in the global and in the local scores
    g = np.sort(rng.choice([0.9, 0.5, 0.5, 0.3, 0.1], (nq, k)).astype(np.float32), axis=1)[:, ::-1].copy()
    idx = np.stack([rng.permutation(1000)[:k] for _ in range(nq)]).astype(np.int64)
    short = draw(st.integers(0, k))  # one list may hold fewer than k items
    idx[0, short:] = -1
    g[0, short:] = -np.inf
    s = rng.choice([-8.0, -1.0, 0.0, 0.0, 2.5, 30.0], (nq, m))
    lam, gamma = draw(st.sampled_from([(0.35, 0.10), (0.55, 0.30), (0.0, 1.0), (1.0, 0.5)]))
    return g, idx, s, lam, gamma


@given(case())
def test_only_the_first_m_change_and_equal_the_formula(c):
    g, idx, s, lam, gamma = c
    res = _results(g, idx)
    m = s.shape[1]
    out = fuse(res, s, lam, gamma, rest="keep")
    assert out.indices.shape == idx.shape and out.query_ids == res.query_ids and out.k == res.k
    np.testing.assert_array_equal(out.indices[:, m:], idx[:, m:])
    np.testing.assert_array_equal(out.scores[:, m:], g[:, m:].astype(np.float64))
    for q in range(len(g)):
        want_idx, want_scores = _reference(g[q, :m], s[q], idx[q, :m], lam, gamma)
        n = len(want_idx)
        assert out.indices[q, :n].tolist() == want_idx
        np.testing.assert_allclose(out.scores[q, :n], want_scores, rtol=1e-12, atol=0)
        assert (out.indices[q, n:m] == -1).all()
    # the input is left as it was
    np.testing.assert_array_equal(res.indices, idx)


@given(case())
def test_shifted_rest_keeps_order_ties_and_gaps_and_ranks_below(c):
    g, idx, s, lam, gamma = c
    m = s.shape[1]
    keep = fuse(_results(g, idx), s, lam, gamma, rest="keep")
    out = fuse(_results(g, idx), s, lam, gamma)
    np.testing.assert_array_equal(out.indices, keep.indices)
    np.testing.assert_array_equal(out.scores[:, :m], keep.scores[:, :m])
    for q in range(len(g)):
        head = out.scores[q, :m][out.indices[q, :m] >= 0]
        tail_ok = out.indices[q, m:] >= 0
        tail, old = out.scores[q, m:][tail_ok], keep.scores[q, m:][tail_ok]
        if len(tail):
            shift = old - tail
            assert (shift == shift[0]).all() and shift[0] >= 0  # one exact constant per query
            if len(head):
                assert tail.max() < head.min()
        # what the evaluation does (a stable sort by descending score) gives back the list's order
        valid = out.indices[q] >= 0
        order = np.argsort(-out.scores[q][valid], kind="stable")
        assert (order == np.arange(valid.sum())).all()


def test_fused_results_save_and_load(tmp_path, rng):
    g = np.sort(rng.random((3, 8)).astype(np.float32), axis=1)[:, ::-1].copy()
    idx = np.stack([rng.permutation(50)[:8] for _ in range(3)]).astype(np.int64)
    out = fuse(_results(g, idx), rng.standard_normal((3, 4)) * 5, 0.35, 0.10)
    back = SearchResults.load(out.save(tmp_path / "r.npz"))
    np.testing.assert_array_equal(back.indices, out.indices)
    np.testing.assert_array_equal(back.scores, out.scores)
    assert back.ids(0) == [f"img{r}" for r in out.indices[0]]


def test_published_defaults():
    assert default_weights("dinov2", "binary") == (0.35, 0.10)
    assert default_weights("dinov2", "float16") == (0.55, 0.30)
    with pytest.raises(ValueError, match="no published fusion weights for cvnet/binary"):
        default_weights("cvnet", "binary")


def test_bad_input():
    res = _results(np.ones((2, 4), np.float32), np.arange(8).reshape(2, 4))
    with pytest.raises(ValueError, match=r"local scores: expected shape \(2, M\)"):
        fuse(res, np.zeros((3, 2)), 0.5, 0.1)
    with pytest.raises(ValueError, match="local scores: expected"):
        fuse(res, np.zeros((2, 5)), 0.5, 0.1)
    with pytest.raises(ValueError, match="NaN or infinite for query 'q1'"):
        fuse(res, np.array([[0.0, 1.0], [np.nan, 0.0]]), 0.5, 0.1)
    with pytest.raises(ValueError, match="lambda"):
        fuse(res, np.zeros((2, 2)), 1.5, 0.1)
