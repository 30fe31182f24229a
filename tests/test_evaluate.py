"""The evaluation against an independent reference: sklearn's average_precision_score with the
official scaling, and a plain re-statement of the official report loops."""

import json
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ilias import _core
from ilias.evaluate import CLUTTER_GROUPS, SCALE_GROUPS, evaluate
from ilias.groundtruth import load_ground_truth
from sklearn.metrics import average_precision_score

# ---------------------------------------------------------------- AP@k of one list


def sklearn_ap(scores, y, n_pos, k):
    """The official AP@k: stable sort, cut at k, sklearn AP times found / min(k, |G|)."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    y, s = np.asarray(y, bool)[order], np.asarray(scores, np.float64)[order]
    if not y.any():
        return 0.0, 0.0
    return average_precision_score(y, s) * y.sum() / min(k, n_pos), y.mean() * k / n_pos


def core_ap(scores, y, n_pos, k):
    ap, oracle = _core.average_precision(
        np.array([scores], np.float64), np.array([y], np.uint8), np.array([n_pos]), k
    )
    return ap[0], oracle[0]


def test_worked_example():
    ap, oracle = core_ap([0.9, 0.8, 0.8, 0.6, 0.5, 0.4], [1, 1, 0, 0, 0, 1], 4, 6)
    assert round(ap, 4) == 0.5417
    assert ap == pytest.approx(sklearn_ap([0.9, 0.8, 0.8, 0.6, 0.5, 0.4], [1, 1, 0, 0, 0, 1], 4, 6)[0], abs=1e-12)


@st.composite
def ranked_list(draw):
    n = draw(st.integers(1, 60))
    levels = draw(st.integers(1, 8))  # few distinct scores: many ties
    scores = draw(st.lists(st.integers(0, levels), min_size=n, max_size=n))
    p = draw(st.sampled_from([0.0, 0.05, 0.3, 0.9]))  # nothing found, few, some, many positives
    y = [draw(st.booleans()) if p else False for _ in range(n)]
    y = [b and draw(st.floats(0, 1)) < p for b in y] if p < 0.5 else y
    n_pos = sum(y) + draw(st.integers(0 if sum(y) else 1, 20))
    k = draw(st.integers(1, 80))  # smaller and larger than |G| and than the list
    return [s / levels for s in scores], y, n_pos, k


@settings(max_examples=400, deadline=None)
@given(ranked_list())
def test_ap_matches_sklearn(case):
    scores, y, n_pos, k = case
    ap, oracle = core_ap(scores, y, n_pos, k)
    want_ap, want_oracle = sklearn_ap(scores, y, n_pos, k)
    assert abs(ap - want_ap) < 1e-9
    assert abs(oracle - want_oracle) < 1e-9


def test_core_rejects_bad_input():
    with pytest.raises(ValueError, match="not finite"):
        core_ap([0.5, np.nan], [0, 1], 1, 5)
    with pytest.raises(ValueError, match="shapes"):
        _core.average_precision(np.zeros((2, 3)), np.zeros((2, 4), np.uint8), np.ones(2, np.int64), 5)
    with pytest.raises(ValueError, match="negative"):
        _core.average_precision(np.zeros((1, 3)), np.zeros((1, 3), np.uint8), np.array([-1]), 5)


# ---------------------------------------------------------------- an ILIAS-like dataset

INSTANCES = {"alpha_alp_000": ("animal", "dog"), "bold_bimp_001": ("animal", "cat"), "calm_cog_002": ("tool", "saw")}


def make_ilias(root, rng, n_pos=(3, 5, 2), with_ids=True):
    """A tiny ILIAS: per instance 2 image queries, 1 text query, some positives with random
    scale/clutter; image folders always, id files and taxonomy optionally."""
    image_q, text_q, pos = [], [], []
    for i, (inst, n) in enumerate(zip(INSTANCES, n_pos)):
        (root / "ilias_core" / inst / "query").mkdir(parents=True)
        (root / "ilias_core" / inst / "pos").mkdir(parents=True)
        for j in range(2):
            image_q.append(f"{inst}/query/Q{i:03d}_{j:02d}.jpg")
            (root / "ilias_core" / inst / "query" / f"Q{i:03d}_{j:02d}_bbox.txt").write_text("0 0 5 5\n")
        text_q.append(f"{inst}/query/T{i:03d}.txt")
        for j in range(n):
            pos.append((f"{inst}/pos/P{i:03d}_{j:02d}.jpg", float(rng.uniform(0, 0.5)), int(rng.integers(0, 80))))
    for item in [*image_q, *text_q, *(p[0] for p in pos)]:
        (root / "ilias_core" / item).write_text("x")
    if with_ids:
        (root / "image_ids").mkdir()
        (root / "image_ids" / "image_query_ids.txt").write_text("".join(f"{q},unused\n" for q in image_q))
        (root / "image_ids" / "text_query_ids.txt").write_text("".join(f"{q}\n" for q in text_q))
        (root / "image_ids" / "positive_ids.txt").write_text("".join(f"{p},{s!r},{c}\n" for p, s, c in pos))
        tree = {}
        for inst, (coarse, mid) in INSTANCES.items():
            tree.setdefault(coarse, {}).setdefault(mid, {})["fine"] = [inst]
        (root / "taxonomy.json").write_text(json.dumps(tree))
    return image_q, text_q, pos


def random_results(rng, gt, width=12, levels=4):
    """Official JSON results: each query gets a shuffled mix of positives (own and others') and
    distractors with coarse scores (ties)."""
    pool = [*gt.positives, *(f"yfcc_{t:03d}/{i}" for t in range(2) for i in range(30))]
    out = {}
    for q in [*gt.image_queries, *gt.text_queries]:
        picks = rng.choice(len(pool), size=width, replace=False)
        scores = np.sort(rng.integers(0, levels, width) / levels)[::-1]
        out[q] = {pool[i]: float(s) for i, s in zip(picks, scores)}
    return out


def reference_report(sims, root, k):
    """The official report loops, restated plainly with sklearn (per task)."""
    lines = lambda name: (root / "image_ids" / name).read_text().split()
    info = {line.split(",")[0]: (float(line.split(",")[1]), int(line.split(",")[2])) for line in lines("positive_ids.txt")}
    gt = {}
    for p in info:
        gt.setdefault(p.split("/")[0], set()).add(p)

    def ap_of(q, excluded=frozenset()):
        items = [(i, s) for i, s in sims[q].items() if i not in excluded]
        G = gt[q.split("/")[0]] - excluded
        ids, scores = [i for i, _ in items], np.array([s for _, s in items])
        return sklearn_ap(scores, [i in G for i in ids], len(G), k)

    out = {}
    for task, qs in (("i2i", [x.split(",")[0] for x in lines("image_query_ids.txt")]), ("t2i", lines("text_query_ids.txt"))):
        aps, oracles, inst_aps = [], [], {}
        groups = {"scale": {}, "clutter": {}}
        for q in qs:
            ap, oracle = ap_of(q)
            aps.append(100 * ap)
            oracles.append(100 * oracle)
            inst_aps.setdefault(q.split("/")[0], []).append(100 * ap)
            for name, col, bounds in (("scale", 0, SCALE_GROUPS), ("clutter", 1, CLUTTER_GROUPS)):
                for lo, hi in bounds:
                    G = gt[q.split("/")[0]]
                    excluded = frozenset(p for p in G if not lo <= info[p][col] < hi)
                    if G - excluded:
                        groups[name].setdefault(f"{lo}-{hi}", []).append(100 * ap_of(q, excluded)[0])
        cats, subs = {}, {}
        for inst, v in inst_aps.items():
            cats.setdefault(INSTANCES[inst][0], []).append(np.mean(v))
            subs.setdefault("-".join(INSTANCES[inst]), []).append(np.mean(v))
        out[task] = {
            "map": np.mean(aps),
            "oracle": np.mean(oracles),
            "categories": {c: np.mean(v) for c, v in cats.items()},
            "subcategories": {c: np.mean(v) for c, v in subs.items()},
            **{name: {g: np.mean(v) for g, v in d.items()} for name, d in groups.items()},
        }
    return out


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("k", [1, 3, 8, 12])
def test_full_report_matches_reference(tmp_path, seed, k):
    rng = np.random.default_rng(seed)
    make_ilias(tmp_path, rng)
    gt = load_ground_truth(tmp_path)
    sims = random_results(rng, gt)
    want = reference_report(sims, tmp_path, k)
    ev = evaluate(sims, gt, k=k)
    for task, ref in want.items():
        got = ev.tasks[task]
        assert got.map == pytest.approx(ref["map"], abs=1e-9)
        assert got.oracle_mean == pytest.approx(ref["oracle"], abs=1e-9)
        for key in ("categories", "subcategories", "scale", "clutter"):
            assert getattr(got, key).keys() == ref[key].keys()
            for g, v in ref[key].items():
                assert getattr(got, key)[g] == pytest.approx(v, abs=1e-9), (key, g)


def test_group_report_by_hand(tmp_path):
    """One query, 3 positives: small (scale .01), mid (.1), large (.4); clutter 5, 20, 60."""
    (tmp_path / "image_ids").mkdir()
    (tmp_path / "image_ids" / "image_query_ids.txt").write_text("a_000/query/Q000_00.jpg,x\n")
    (tmp_path / "image_ids" / "text_query_ids.txt").write_text("")
    (tmp_path / "image_ids" / "positive_ids.txt").write_text(
        "a_000/pos/P0.jpg,0.01,5\na_000/pos/P1.jpg,0.1,20\na_000/pos/P2.jpg,0.4,60\n"
    )
    ranked = {"a_000/query/Q000_00.jpg": {"d/1": 0.9, "a_000/pos/P2.jpg": 0.8, "d/2": 0.7, "a_000/pos/P0.jpg": 0.6}}
    with pytest.warns(UserWarning, match="taxonomy"):
        ev = evaluate(ranked, tmp_path, k=3)
    t = ev.tasks["i2i"]
    # whole list, top 3 = d1 P2 d2: AP = (1/2) / 3
    assert t.map == pytest.approx(100 / 6)
    # scale: small -> list d1 d2 P0 (P2 removed before the cut): (1/3)/1; mid: nothing found; large: (1/2)/1
    assert t.scale == pytest.approx({"0-0.06880213760855043": 100 / 3, "0.06880213760855043-0.13526567164179104": 0.0,
                                     "0.2729876723163842-inf": 50.0})
    assert t.clutter == pytest.approx({"0-18": 100 / 3, "18-33": 0.0, "53-inf": 50.0})
    assert t.categories is None


def test_ground_truth_from_ids_and_from_folders_agree(tmp_path):
    rng = np.random.default_rng(0)
    image_q, text_q, pos = make_ilias(tmp_path / "a", rng, with_ids=True)
    make_ilias(tmp_path / "b", np.random.default_rng(0), with_ids=False)
    a, b = load_ground_truth(tmp_path / "a"), load_ground_truth(tmp_path / "b")
    assert a.image_queries == b.image_queries == tuple(sorted(image_q))
    assert a.text_queries == b.text_queries == tuple(sorted(text_q))
    assert sorted(a.positives) == sorted(b.positives) == sorted(p for p, _, _ in pos)
    assert a.scale is not None and b.scale is None
    assert a.taxonomy["calm_cog_002"] == ("tool", "saw") and b.taxonomy is None
    assert a.task_of(text_q[0]) == "t2i" and a.task_of(image_q[0]) == "i2i"
    assert load_ground_truth(tmp_path / "b" / "ilias_core").positives == b.positives


def test_all_three_formats_give_the_same_numbers(tmp_path):
    from ilias import Store, search, write_store

    rng = np.random.default_rng(3)
    make_ilias(tmp_path / "ilias", rng)
    gt = load_ground_truth(tmp_path / "ilias")
    db_ids = [*gt.positives, *(f"yfcc_000/{i}" for i in range(40))]
    x = rng.standard_normal((len(db_ids), 8)).astype(np.float16)
    write_store(tmp_path / "db", x, db_ids)
    q = rng.standard_normal((len(gt.image_queries), 8)).astype(np.float32)
    res = search(q, [Store.open(tmp_path / "db")], k=10, query_ids=gt.image_queries)
    res.save(tmp_path / "r.npz")
    res.write_official_json(tmp_path / "r.json")
    res.write_official_pickle(tmp_path / "r.pkl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no text queries here: said in a warning
        maps = [evaluate(tmp_path / f"r.{ext}", gt, k=10).tasks["i2i"].ap for ext in ("npz", "json", "pkl")]
        maps.append(evaluate(res, gt, k=10).tasks["i2i"].ap)
    for m in maps[1:]:
        np.testing.assert_allclose(m, maps[0], atol=1e-9)


# ---------------------------------------------------------------- bad input


@pytest.fixture
def small(tmp_path):
    make_ilias(tmp_path, np.random.default_rng(1))
    gt = load_ground_truth(tmp_path)
    return tmp_path, gt, random_results(np.random.default_rng(2), gt)


def test_unknown_query_is_an_error(small):
    _, gt, sims = small
    sims["nobody_000/query/Q999_00.jpg"] = {"d/1": 0.5}
    with pytest.raises(ValueError, match="1 query id.*not in the ground truth.*nobody"):
        evaluate(sims, gt, k=5)


def test_missing_queries_are_counted(small):
    _, gt, sims = small
    del sims[gt.image_queries[0]], sims[gt.image_queries[1]]
    with pytest.warns(UserWarning, match="2 of 6 image-to-image queries missing"):
        ev = evaluate(sims, gt, k=5)
    assert ev.tasks["i2i"].missing == 2 and len(ev.tasks["i2i"].query_ids) == 4
    assert any("2 of 6" in w for w in ev.warnings)


def test_duplicate_ids_are_errors(small):
    root, gt, sims = small
    text = json.dumps(sims)
    q = gt.image_queries[0]
    first = next(iter(sims[q]))
    dup = text.replace(json.dumps(q) + ": {", json.dumps(q) + ": {" + json.dumps(first) + ": 0.1, ", 1)
    (root / "dup.json").write_text(dup)
    with pytest.raises(ValueError, match="dup.json.*duplicate id"):
        evaluate(root / "dup.json", gt, k=5)
    qids = list(sims)
    p = gt.positives[0]
    d = {"query_ids": qids, "db_ids": np.array([p, "a/2", p]), "sims": np.ones((len(qids), 2)), "ranks": np.tile([0, 2], (len(qids), 1))}
    with pytest.raises(ValueError, match="same database item twice"):
        evaluate(d, gt, k=2)
    d["ranks"] = np.tile([1, 1], (len(qids), 1))
    with pytest.raises(ValueError, match="same database item twice"):
        evaluate(d, gt, k=2)


def test_nan_scores_are_errors(small):
    _, gt, sims = small
    q = gt.text_queries[1]
    sims[q][next(iter(sims[q]))] = float("nan")
    with pytest.raises(ValueError, match=f"NaN.*{q}"):
        evaluate(sims, gt, k=5)


def test_results_k_below_evaluation_k_is_an_error(small):
    _, gt, sims = small
    with pytest.raises(ValueError, match="12 items per query, fewer than k=1000"):
        evaluate(sims, gt, k=1000)


def test_results_from_another_dataset(small, tmp_path):
    _, gt, sims = small
    q = gt.image_queries[0]
    sims[q]["zeta_zed_999/pos/P999_00.jpg"] = 0.99
    with pytest.raises(ValueError, match="look like ILIAS positives but are not in the ground truth"):
        evaluate(sims, gt, k=5)
    no_positives = {q: {f"yfcc/{i}": 1.0 - i / 10 for i in range(5)} for q in gt.image_queries}
    with pytest.warns(UserWarning, match="no query retrieved any ILIAS positive"):
        evaluate(no_positives, gt, k=5)


def test_file_errors_name_the_file(tmp_path, small):
    _, gt, _ = small
    with pytest.raises(FileNotFoundError, match="nope.json"):
        evaluate(tmp_path / "nope.json", gt)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        evaluate(tmp_path / "bad.json", gt)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_ground_truth(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="positive_ids.txt"):
        load_ground_truth(tmp_path / "empty")


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 40), width=st.integers(1, 12), threads=st.integers(1, 4), seed=st.integers(0, 2**32 - 1),
    as_bytes=st.booleans(),
)
def test_pickle_ranks_are_labelled_like_a_dict_lookup(n, width, threads, seed, as_bytes):
    # the official pickle layout: ranks index one table of ids; -1 is no item; only used ids are read
    rng = np.random.default_rng(seed)
    positives = [f"inst{i}/pos/P{i}.jpg" for i in range(6)]
    table = [*positives, "inst9/pos/unknown.jpg", *(f"{i:05d}.tar/{i}" for i in range(20))]
    rng.shuffle(table)
    ranks = rng.integers(-1, len(table), (n, width))
    ids = np.array([t.encode() if as_bytes else t for t in table], dtype=object)
    positive, foreign, first, dup = _core.label_official(ids, ranks, positives, threads)
    index = {p: i for i, p in enumerate(positives)}
    want = [[-2 if r < 0 else index.get(table[r], -1) for r in row] for row in ranks]
    np.testing.assert_array_equal(positive, want)
    used = {table[r] for r in ranks.ravel() if r >= 0}
    assert foreign == int("inst9/pos/unknown.jpg" in used)
    assert first == ("inst9/pos/unknown.jpg" if foreign else None)
    repeats = [sum(c - 1 for c in np.unique(row[row >= 0], return_counts=True)[1]) for row in ranks]
    if sum(repeats):
        assert dup == (int(np.flatnonzero(repeats)[0]), int(sum(repeats)))
    else:
        assert dup is None
