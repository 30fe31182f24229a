"""Query expansion against a numpy brute force (first pass, expanded queries, second pass) on small
databases with ties, per tier (prefixes, a mini-ILIAS-like subset, all), with codes, the official
formula, the scan plans, and the report rows of expanded and adapted results."""

import json

import numpy as np
import pytest
from ilias import Database, SearchResults, Tier, expand_queries, search_expanded, search_tiers, write_store
from ilias.cli import main
from ilias.expand import plan_scans, qe_weights, search_codes_expanded

D = 16


def brute_topk(q, x, k, allowed=None):
    """Exact top k (float64 scores of the stored vectors), ties: larger row first (the reference's
    order); only rows with `allowed` True."""
    s = q.astype(np.float64) @ x.astype(np.float64).T
    rows = np.arange(len(x))
    if allowed is not None:
        s, rows = s[:, allowed], rows[allowed]
    out_i, out_s = [], []
    for srow in s:
        order = np.lexsort((-rows, -srow))[:k]
        out_i.append(rows[order])
        out_s.append(srow[order])
    return np.array(out_i), np.array(out_s)


def reference_qe(q, x, k, n, alpha, allowed=None):
    """alpha-QE restated: first pass, q' = normalize(q + sum w_i x_i), w = s^alpha (sign kept; 1
    for alpha = 0), second pass over the same rows."""
    idx, s = brute_topk(q, x, n, allowed)
    w = np.ones_like(s) if alpha == 0 else np.sign(s) * np.abs(s) ** alpha
    e = q.astype(np.float64) + np.einsum("qn,qnd->qd", w, x[idx].astype(np.float64))
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    return brute_topk(e.astype(np.float32), x, k, allowed)


@pytest.fixture
def data(tmp_path):
    """Positives then distractors in shards of unequal sizes, float16 values, with exact
    duplicate rows (ties) among the distractors and with the positives."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1300, D)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float16)
    x[700:760] = x[200:260]  # distractors equal to other distractors
    x[1000:1010] = x[5:15]  # ...and to positives
    pos = write_store(tmp_path / "pos", x[:90], [f"inst/pos/P{i:03d}.jpg" for i in range(90)], shard_rows=50)
    dis = write_store(tmp_path / "dis", x[90:], [f"yfcc_000.tar/k{i}" for i in range(90, 1300)], shard_rows=333)
    q = rng.standard_normal((11, D)).astype(np.float32)
    q[:4] = x[[3, 220, 1005, 800]].astype(np.float32)  # queries on top of (duplicated) rows: tied neighbours
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return Database.of([pos, dis]), q, x.astype(np.float32)


def check(res, want_i, want_s, k):
    np.testing.assert_array_equal(res.indices, want_i)
    np.testing.assert_allclose(res.scores, want_s, atol=2e-6)
    assert res.k == k


@pytest.mark.parametrize("n, alpha", [(1, 1.0), (3, 1.0), (5, 0.0), (4, 3.0)])
def test_qe_equals_numpy_brute_force(data, n, alpha):
    db, q, x = data
    res = search_expanded(q, db, k=40, n=n, alpha=alpha, threads=1)["all"]
    check(res, *reference_qe(q, x, 40, n, alpha), 40)
    assert res.variant == f"QE {n}" + (f" (alpha {alpha:g})" if alpha != 1 else "")
    assert res.stats.qe == n and res.stats.qe_alpha == alpha and res.stats.qe_passes == 1


def test_each_tier_expands_with_its_own_rows_only(data):
    db, q, x = data
    keep = np.zeros(len(x), bool)
    keep[:90] = True  # positives, and a subset of the distractors (as mini-ILIAS keeps)
    keep[90::4] = True
    keep[1000:1010] = True
    tiers = [Tier("+300", rows=390), Tier("mini", keep=keep), Tier("+1000", rows=1090), Tier("all")]
    allowed = {"+300": np.arange(len(x)) < 390, "mini": keep, "+1000": np.arange(len(x)) < 1090, "all": None}
    for merge in ("auto", "none", "all"):
        found = search_expanded(q, db, tiers, k=30, n=3, threads=2, merge=merge)
        for t in tiers:
            res = found[t.name]
            check(res, *reference_qe(q, x, 30, 3, 1.0, allowed[t.name]), 30)
            if allowed[t.name] is not None:
                assert allowed[t.name][res.indices].all()  # only the tier's rows
            assert res.tier_rows == t.held(db)
    # the tiers' neighbours differ, so the expanded queries do: more than one per query was scored
    assert found["all"].stats.qe_queries > len(q)


def test_scan_plans():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 4)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    sizes = [100, 1000, 10_000]
    # every tier agrees: one scan of the plain query count, whatever the rule
    for merge in ("auto", "none", "all"):
        scans = plan_scans([a, a, a], sizes, merge)
        assert len(scans) == 1 and len(scans[0].entries) == 6 and scans[0].tiers == {0, 1, 2}
    # they all differ: one scan per tier, nq queries each (searching each tier alone)
    scans = plan_scans([a, b, -a], sizes, "auto")
    assert [(sorted(s.tiers), len(s.entries)) for s in scans] == [([0], 6), ([1], 6), ([2], 6)]
    # some agree: a vector shared by tiers 0 and 1 is scored once, in tier 1's scan
    mixed = b.copy()
    mixed[:3] = a[:3]
    none = plan_scans([a, mixed, b], sizes, "none")
    assert sorted(sorted(s.tiers) for s in none) == [[0], [0, 1], [1, 2], [2]]
    auto = plan_scans([a, mixed, b], sizes, "auto")
    assert len(auto) <= 3 and sum(len(s.entries) for s in auto) == 12
    for scan in auto:
        queries = [q for q, _, _ in scan.entries]
        assert len(queries) == len(set(queries)) <= 6  # no scan holds more than the first pass
    # one vector of six shared: not worth a list for every query of the larger scan; it is
    # scored again in the smaller tier's scan, which answers it alone
    few = b.copy()
    few[0] = a[0]
    scans = plan_scans([a, few], sizes[:2], "auto")
    assert [(sorted(s.tiers), len(s.entries)) for s in scans] == [([0], 6), ([1], 6)]
    assert all(sig == {1} for _, _, sig in scans[1].entries)
    with pytest.raises(ValueError, match="merge"):
        plan_scans([a], [10], "some")


def test_first_pass_results_can_be_reused(data):
    db, q, x = data
    tiers = [Tier("+500", rows=590), Tier("all")]
    first = search_tiers(q, db, tiers, k=25, threads=1)
    reused = search_expanded(q, db, tiers, k=25, n=2, first=first, threads=1)
    fresh = search_expanded(q, db, tiers, k=25, n=2, threads=1)
    for t in tiers:
        np.testing.assert_array_equal(reused[t.name].indices, fresh[t.name].indices)
        np.testing.assert_array_equal(reused[t.name].scores, fresh[t.name].scores)
    with pytest.raises(ValueError, match="k = 25 results, fewer than the 30 neighbours"):
        search_expanded(q, db, tiers, k=25, n=30, first=first)
    with pytest.raises(ValueError, match="no results for tier 'mini'"):
        search_expanded(q, db, [Tier("mini", keep=np.ones(len(x), bool))], k=25, n=2, first=first)
    other = Database.of(db.stores[:1])
    with pytest.raises(ValueError, match="another database"):
        search_expanded(q, other, [Tier("+500", rows=50), Tier("all")], k=25, n=2, first=first)


def test_expanded_queries_follow_the_official_formula(data):
    """knn_search/src/searcher.py: mean of [q, s_1 x_1, ..., s_n x_n], normalised (no adaptation)."""
    db, q, x = data
    res = search_tiers(q, db, [Tier("all")], k=5, threads=1)["all"]
    ours = expand_queries(q, db, res.indices, res.scores, 5, 1.0)
    stacked = np.concatenate([q[:, None, :], res.scores[:, :, None] * x[res.indices]], axis=1)
    official = stacked.mean(axis=1)
    official /= np.linalg.norm(official, axis=1, keepdims=True)
    np.testing.assert_allclose(ours, official, atol=1e-6)
    # alpha = 0: the plain average of the query and its neighbours
    plain = np.concatenate([q[:, None, :], x[res.indices]], axis=1).mean(axis=1)
    np.testing.assert_allclose(expand_queries(q, db, res.indices, res.scores, 5, 0.0),
                               plain / np.linalg.norm(plain, axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_array_equal(qe_weights(np.array([-0.25, 0.5]), 2.0), [-0.0625, 0.25])
    with pytest.raises(ValueError, match="--qe-alpha"):
        expand_queries(q, db, res.indices, res.scores, 2, -1.0)


def test_qe_with_codes_equals_the_brute_force(data, tmp_path):
    from ilias.index import build_index

    db, q, x = data
    codes = build_index(db, "sq8", tmp_path / "sq8.codes")
    keep = np.arange(len(x)) % 3 != 1
    keep[:90] = True
    # a shortlist of every row: the codes only pick candidates, the rescoring makes them exact
    res = search_codes_expanded(q, db, codes, 20, n=3, shortlist=len(x), keep=keep, threads=1)
    check(res, *reference_qe(q, x, 20, 3, 1.0, keep), 20)
    assert res.stats.qe == 3 and res.stats.method == "codes-sq8"


def test_cli_search_qe_and_the_report_rows(tmp_path, data):
    """`ilias search --qe` with tiers writes results labelled "QE 2"; evaluating them makes a
    report whose rows say so and whose placement names the published column (never the third)."""
    from ilias.report import build_report, to_markdown
    from ilias.report.html import to_html
    from ilias.report.published import VARIANT_NOTE

    from .test_evaluate import make_ilias

    db, q, x = data
    qs = write_store(tmp_path / "q", q, [f"inst/query/Q{i:03d}.jpg" for i in range(len(q))])
    argv = ["search", "--queries", str(qs.path), "--db", *(str(s.path) for s in db.stores), "--out",
            str(tmp_path / "r.npz"), "-k", "30", "--qe", "2", "--tier", "small=+400", "--tier", "full=all", "--threads", "1"]
    assert main(argv) == 0
    small, full = (SearchResults.load(tmp_path / f"r.{t}.npz") for t in ("small", "full"))
    q = qs.read_all().astype(np.float32)  # the queries as stored (float16)
    check(full, *reference_qe(q, x, 30, 2, 1.0), 30)
    check(small, *reference_qe(q, x, 30, 2, 1.0, np.arange(len(x)) < 490), 30)
    assert full.variant == "QE 2" and full.stats.qe_first_seconds is not None

    # the report of an expanded result: its own label, the published column named
    make_ilias(tmp_path / "ilias", np.random.default_rng(5))
    from ilias.evaluate import evaluate
    from ilias.groundtruth import load_ground_truth

    from .test_evaluate import random_results

    gt = load_ground_truth(tmp_path / "ilias")
    plain_ev = evaluate(random_results(np.random.default_rng(6), gt), gt, k=10)
    qe_ev = evaluate(random_results(np.random.default_rng(7), gt), gt, k=10)
    qe_ev.variant = "adapt + QE 2"
    plain, expanded = build_report(plain_ev, setting="full"), build_report(qe_ev, setting="full")
    assert expanded["config"]["variant"] == "adapt + QE 2" and plain["config"]["variant"] == ""
    for t in expanded["tasks"].values():
        assert t["placement"]["column"] == "map_100M" and VARIANT_NOTE in t["placement"]["text"]
        assert "map_third" not in json.dumps(t["placement"])
    assert "published column map_100M" in plain["tasks"]["i2i"]["placement"]["text"]
    assert "(adapt + QE 2)" in to_markdown(expanded).splitlines()[0]
    plain["config"]["model"] = "m"
    expanded["config"]["model"] = "m"
    html = to_html(plain, variants=[{"label": "adapt + QE 2", "report": expanded}])
    assert "image-to-image + adapt + QE 2" in html and "▶ m + adapt + QE 2" in html and "▶ m<" in html
    assert "not with the page's third, unlabelled column" in html
