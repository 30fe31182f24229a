"""Linear adaptation: applied stores against a numpy reference, the official weights layout, resumable
and atomic writing, bad input, and training with the official recipe (an independent restatement of
the official training loop as the reference; retrieval of held-back classes improves)."""

import hashlib
import json
import os
import sys

import numpy as np
import pytest
from ilias import Database, SearchResults, Store, search, write_store
from ilias import adapt as ad
from ilias.cli import main
from ilias.database import IncompleteStoreError

from .conftest import unit_rows
from .test_bad_input import cli, one_line_error

torch = pytest.importorskip("torch")


def reference(x, w, b):
    """normalize(W x + b) in float64 from the stored values."""
    y = np.asarray(x, dtype=np.float64) @ np.asarray(w, dtype=np.float64).T
    if b is not None:
        y += b
    n = np.linalg.norm(y, axis=1, keepdims=True)
    return y / np.maximum(n, 1e-12)


def save_official(path, w, b=None):
    """A state_dict as the official code saves it: a module whose Linear is named `layer`."""

    class LinearAdapter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)

    m = LinearAdapter()
    with torch.no_grad():
        m.layer.weight.copy_(torch.from_numpy(np.asarray(w, np.float32)))
        if b is not None:
            m.layer.bias.copy_(torch.from_numpy(np.asarray(b, np.float32)))
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture
def source(tmp_path, rng):
    x = unit_rows(rng, 1100, 32)
    x[17] = 0  # a zero row: stays zero, as torch's F.normalize leaves it
    return write_store(tmp_path / "src", x, [f"yfcc_000.tar/k{i}" for i in range(1100)], shard_rows=400)


@pytest.mark.parametrize("out_dim, bias, fmt", [(24, True, "pth"), (32, True, "npz"), (48, False, "pth"), (512, True, "pth")])
def test_applied_store_equals_numpy_reference(tmp_path, rng, source, out_dim, bias, fmt):
    w = rng.standard_normal((out_dim, 32)).astype(np.float32)
    b = rng.standard_normal(out_dim).astype(np.float32) * 0.1 if bias else None
    path = tmp_path / f"w.{fmt}"
    if fmt == "npz":
        np.savez(path, **{"layer.weight": w, **({"layer.bias": b} if bias else {})})
    else:
        save_official(path, w, b)
    out = ad.apply(path, source, tmp_path / "out", chunk_rows=150)
    got = out.read_all()
    assert got.dtype == np.float16 and got.shape == (1100, out_dim)
    want = reference(source.read_all(), w, b)
    # float16 rounding of the result (half an ulp, relative 2^-11) plus float32 arithmetic
    assert np.all(np.abs(got.astype(np.float64) - want) <= np.abs(want) * 2.0**-11 + 2e-6)
    if not bias:
        assert not got[17].any()
    assert out.all_ids() == source.all_ids()
    prov = out.manifest.provenance
    assert prov["adaptation"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["adaptation"]["out_dim"] == out_dim and prov["adaptation"]["bias"] == bias
    assert prov["adapted_from"]["fingerprint"] == source.fingerprint and prov["complete"] is True
    assert out.manifest.complete and out.manifest.normalized
    Database.of(out)  # searchable


def test_float32_stores_stay_float32(tmp_path, rng):
    # text queries are kept in float32 (as the reference does): their adapted copy too
    x = unit_rows(rng, 10, 16)
    src = write_store(tmp_path / "t", x, [f"inst/query/T{i:03d}.txt" for i in range(10)], dtype="float32")
    w = rng.standard_normal((8, 16)).astype(np.float32)
    out = ad.apply(save_official(tmp_path / "w.pth", w, np.zeros(8)), src, tmp_path / "o")
    assert out.manifest.dtype == "float32"
    np.testing.assert_allclose(out.read_all(), reference(x, w, np.zeros(8)), atol=2e-6)


def test_load_weights_matches_the_official_module(tmp_path, rng):
    """The layer as the official knn search builds it (LinearAdapter: Linear + F.normalize)."""
    w, b = rng.standard_normal((20, 32)).astype(np.float32), rng.standard_normal(20).astype(np.float32)
    layer = ad.load_weights(save_official(tmp_path / "w.pth", w, b))
    x = unit_rows(rng, 50, 32)
    lin = torch.nn.Linear(32, 20)
    lin.load_state_dict({k.removeprefix("layer."): v for k, v in torch.load(tmp_path / "w.pth").items()}, strict=True)
    with torch.no_grad():
        official = torch.nn.functional.normalize(lin(torch.from_numpy(x)), p=2, dim=-1).numpy()
    np.testing.assert_allclose(layer(x), official, atol=1e-6)
    assert (layer.in_dim, layer.out_dim) == (32, 20) and layer.label.startswith("w.pth@")


def test_interrupted_apply_resumes_and_is_never_searched_half_written(tmp_path, rng, source, monkeypatch):
    w = rng.standard_normal((24, 32)).astype(np.float32)
    weights = save_official(tmp_path / "w.pth", w, np.zeros(24, np.float32))
    whole = ad.apply(weights, source, tmp_path / "whole", chunk_rows=150)
    real = ad.Adaptation.__call__
    seen = []

    def dying(self, x):
        seen.append(len(x))
        if sum(seen) > 900:  # after two complete shards of 400
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(ad.Adaptation, "__call__", dying)
    with pytest.raises(KeyboardInterrupt):
        ad.apply(weights, source, tmp_path / "cut", chunk_rows=150)
    cut = Store.open(tmp_path / "cut")
    assert not cut.manifest.complete and cut.count == 800  # the complete shards only, valid
    with pytest.raises(IncompleteStoreError):
        Database.of(tmp_path / "cut")
    monkeypatch.setattr(ad.Adaptation, "__call__", lambda self, x: seen.append(-len(x)) or real(self, x))
    done = ad.apply(weights, source, tmp_path / "cut", chunk_rows=150)
    assert -sum(s for s in seen if s < 0) == 300  # only the rows after the complete shards
    np.testing.assert_array_equal(done.read_all(), whole.read_all())
    assert done.all_ids() == whole.all_ids() and done.fingerprint == whole.fingerprint


def test_killed_apply_leaves_whole_or_partial_stores_and_reruns_to_the_same(tmp_path, rng):
    from .test_kills import kill_at_random, store_is_whole_or_says_partial

    src = write_store(tmp_path / "src", unit_rows(rng, 60_000, 64), [f"t.tar/{i}" for i in range(60_000)], shard_rows=7_000)
    weights = save_official(tmp_path / "w.pth", rng.standard_normal((48, 64)), rng.standard_normal(48))
    whole = ad.apply(weights, src, tmp_path / "whole")
    argv = ["adapt", "apply", "--weights", weights, src.path, "--out", tmp_path / "cut"]
    kill_at_random(argv, rng, 2.0, lambda: store_is_whole_or_says_partial(tmp_path / "cut" / "src", whole))
    assert main([str(a) for a in argv]) == 0
    np.testing.assert_array_equal(Store.open(tmp_path / "cut" / "src").read_all(), whole.read_all())


def test_other_weights_into_an_adapted_store_is_an_error_unless_replaced(tmp_path, rng, source):
    a = save_official(tmp_path / "a.pth", rng.standard_normal((24, 32)), rng.standard_normal(24))
    b = save_official(tmp_path / "b.pth", rng.standard_normal((24, 32)), rng.standard_normal(24))
    first = ad.apply(a, source, tmp_path / "out").read_all()
    with pytest.raises(ValueError, match=r"out: holds vectors made with a\.pth .* not b\.pth .*--replace"):
        ad.apply(b, source, tmp_path / "out")
    np.testing.assert_array_equal(Store.open(tmp_path / "out").read_all(), first)  # untouched
    other = write_store(tmp_path / "other", unit_rows(rng, 50, 32), [f"x{i}" for i in range(50)])
    with pytest.raises(ValueError, match="of another store"):
        ad.apply(a, other, tmp_path / "out")
    again = ad.apply(b, source, tmp_path / "out", replace=True)
    assert again.manifest.provenance["adaptation"]["weights"] == "b.pth"
    np.testing.assert_allclose(again.read_all(), ad.load_weights(b)(source.read_all()), atol=1e-3)


def test_bad_weights_are_clear_errors_naming_the_file(tmp_path, rng, source):
    w = rng.standard_normal((24, 32)).astype(np.float32)
    torch.save({"weight": torch.from_numpy(w), "bias": torch.zeros(24)}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match=r"keys\.pth: expected .*layer\.weight.*found: bias, weight"):
        ad.load_weights(tmp_path / "keys.pth")
    w_nan = w.copy()
    w_nan[3, 4] = np.nan
    with pytest.raises(ValueError, match=r"nan\.pth: layer\.weight holds 1 NaN"):
        ad.load_weights(save_official(tmp_path / "nan.pth", w_nan, np.zeros(24)))
    with pytest.raises(ValueError, match=r"wide\.pth: the layer takes 48-d features but .*src holds 32-d"):
        ad.apply(save_official(tmp_path / "wide.pth", rng.standard_normal((24, 48))), source, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # checked before anything is written
    torch.save({"layer.weight": torch.from_numpy(w), "layer.bias": torch.zeros(7)}, tmp_path / "bias.pth")
    with pytest.raises(ValueError, match=r"bias\.pth: layer\.bias has shape \(7,\)"):
        ad.load_weights(tmp_path / "bias.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"junk\.pth: not a readable torch file"):
        ad.load_weights(tmp_path / "junk.pth")
    with pytest.raises(FileNotFoundError, match=r"missing\.pth: no such weights file"):
        ad.load_weights(tmp_path / "missing.pth")


def test_without_torch_a_pth_names_the_extra(tmp_path, rng, monkeypatch):
    path = save_official(tmp_path / "w.pth", rng.standard_normal((4, 8)))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match=r"w\.pth: .*pip install 'ilias-core\[models\]'"):
        ad.load_weights(path)


def test_cli_apply_then_search_equals_brute_force_of_adapted_vectors(tmp_path, rng, capsys):
    q = write_store(tmp_path / "queries", unit_rows(rng, 9, 32), [f"inst/query/Q{i}.jpg" for i in range(9)])
    pos = write_store(tmp_path / "positives", unit_rows(rng, 40, 32), [f"inst/pos/P{i}.jpg" for i in range(40)])
    dis = write_store(tmp_path / "distractors", unit_rows(rng, 500, 32), [f"t.tar/{i}" for i in range(500)], shard_rows=130)
    w, b = rng.standard_normal((16, 32)), rng.standard_normal(16) * 0.1
    weights = save_official(tmp_path / "w.pth", w, b)
    assert main(["search", "--queries", str(q.path), "--db", str(pos.path), str(dis.path), "--out", str(tmp_path / "r.npz"),
                 "-k", "25", "--adapt", str(weights), "--threads", "1"]) == 0
    res = SearchResults.load(tmp_path / "r.npz")
    assert res.variant == "adapt" and res.adaptation.startswith("w.pth@")
    adapted = tmp_path / "adapted" / f"w-{hashlib.sha256(weights.read_bytes()).hexdigest()[:12]}"
    assert sorted(p.name for p in adapted.iterdir()) == ["distractors", "positives", "queries"]
    aq = Store.open(adapted / "queries").read_all().astype(np.float32)
    adb = np.concatenate([Store.open(adapted / n).read_all() for n in ("positives", "distractors")]).astype(np.float32)
    # the adapted stores are the reference's vectors (float16), and the search is exact over them
    np.testing.assert_allclose(adb, reference(np.concatenate([pos.read_all(), dis.read_all()]), w, b), atol=1e-3)
    s = aq.astype(np.float64) @ adb.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :25]
    np.testing.assert_array_equal(res.indices, order)
    np.testing.assert_allclose(res.scores, np.take_along_axis(s, order, 1), atol=1e-5)
    # again: the adapted stores are current, nothing is rewritten
    mtime = (adapted / "distractors" / "manifest.json").stat().st_mtime_ns
    assert main(["adapt", "apply", "--weights", str(weights), str(pos.path), str(dis.path), "--out", str(adapted)]) == 0
    assert (adapted / "distractors" / "manifest.json").stat().st_mtime_ns == mtime
    assert main(["adapt", "info", str(weights)]) == 0
    assert "Linear(32 -> 16), with bias" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path, rng):
    q = write_store(tmp_path / "q", unit_rows(rng, 3, 32), [f"inst/query/Q{i}.jpg" for i in range(3)])
    db = write_store(tmp_path / "db", unit_rows(rng, 30, 32), [f"t.tar/{i}" for i in range(30)])
    wide = save_official(tmp_path / "wide.pth", rng.standard_normal((8, 64)))
    one_line_error(cli("adapt", "apply", "--weights", wide, db.path, "--out", tmp_path / "o"), "wide.pth", "64-d")
    torch.save({"weight": torch.zeros(8, 32)}, tmp_path / "keys.pth")
    one_line_error(cli("adapt", "apply", "--weights", tmp_path / "keys.pth", db.path, "--out", tmp_path / "o"),
                   "keys.pth", "layer.weight")
    # adapted queries against a plain database: refused, both named
    w = save_official(tmp_path / "w.pth", rng.standard_normal((32, 32)))
    ad.apply(w, q, tmp_path / "aq")
    one_line_error(cli("search", "--queries", tmp_path / "aq", "--db", db.path, "--out", tmp_path / "r.npz"),
                   "adapted with w.pth", "not adapted")
    one_line_error(cli("search", "--queries", q.path, "--db", db.path, "--out", tmp_path / "r.npz", "--qe-alpha", "2"),
                   "--qe-alpha")


# ---------------------------------------------------------------------------------------------
# training


def multi_domain(rng, classes, per_class, domains=3, d=32):
    """A separable multi-domain set: each (class, domain) has a centre in an 8-d signal subspace,
    hidden under a domain offset and strong noise in 24 nuisance dimensions (the raw features'
    neighbours are mostly nuisance); L2-normalised like real embeddings."""
    centres = rng.standard_normal((classes, domains, 8)) * 1.0
    offsets = rng.standard_normal((domains, d - 8)) * 2.0
    labels = np.repeat(np.arange(classes), per_class)
    dom = rng.integers(0, domains, len(labels))
    x = np.zeros((len(labels), d), np.float32)
    x[:, :8] = centres[labels, dom] + 0.15 * rng.standard_normal((len(labels), 8))
    x[:, 8:] = offsets[dom] + 2.0 * rng.standard_normal((len(labels), d - 8))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels, dom


def mean_ap(res, q_labels, db_labels):
    """mAP of exact search results: every database item of the query's (class, domain) is relevant."""
    aps = []
    for i, row in enumerate(res.indices):
        rel = db_labels[row] == q_labels[i]
        total = int((db_labels == q_labels[i]).sum())
        if not total:
            continue
        hits = np.cumsum(rel)
        aps.append(float((hits / np.arange(1, len(rel) + 1))[rel].sum() / total))
    return 100 * np.mean(aps)


def write_uned(tmp_path, x, labels, dom, name="uned"):
    ids = [f"domain{d}/class{c}/img{i:05d}.jpg" for i, (c, d) in enumerate(zip(labels, dom))]
    store = write_store(tmp_path / name, x, ids)
    (tmp_path / f"{name}.txt").write_text("".join(f"{p},{c},{d}\n" for p, c, d in zip(ids, labels, dom)))
    return store, tmp_path / f"{name}.txt"


def test_training_raises_mAP_of_held_back_classes_and_writes_the_official_layout(tmp_path):
    rng = np.random.default_rng(7)
    x, labels, dom = multi_domain(rng, 40, 30)
    store, listing = write_uned(tmp_path, x, labels, dom)
    record = ad.train(store, listing, tmp_path / "w.pth", ad.Recipe(epochs=25, seed=3), device="cpu")
    assert record["classes"] == len({(c, d) for c, d in zip(labels, dom)}) and record["out_dim"] == 512
    assert record["epoch_losses"][-1] < record["epoch_losses"][0]
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    assert sorted(state) == ["layer.bias", "layer.weight"] and state["layer.weight"].shape == (512, 32)

    class Official(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(32, 512)

    Official().load_state_dict(state, strict=True)
    torch.nn.Linear(32, 512).load_state_dict({k.removeprefix("layer."): v for k, v in state.items()}, strict=True)

    # held back: classes never seen in training, same kind of data (same signal and nuisance
    # subspaces): queries against a database of their own kind
    hx, hl, hd = multi_domain(np.random.default_rng(8), 30, 12)
    key = hl * 10 + hd
    qsel = np.zeros(len(hx), bool)
    qsel[::6] = True
    q_store = write_store(tmp_path / "hq", hx[qsel], [f"q{i}" for i in range(qsel.sum())])
    db_store = write_store(tmp_path / "hdb", hx[~qsel], [f"d{i}" for i in range(len(hx) - qsel.sum())])
    k = int((~qsel).sum())
    plain = mean_ap(search(q_store, db_store, k, threads=1), key[qsel], key[~qsel])
    aq = ad.apply(tmp_path / "w.pth", q_store, tmp_path / "aq")
    adb = ad.apply(tmp_path / "w.pth", db_store, tmp_path / "adb")
    adapted = mean_ap(search(aq, adb, k, threads=1), key[qsel], key[~qsel])
    assert adapted > plain + 20, (plain, adapted)


def test_training_follows_the_official_loop(tmp_path):
    """The official training (ILIAS linear_adaptation/src/lin_adapt.py) restated with torch
    modules: LinearAdapter (Linear + Xavier, bias 0, F.normalize), a bias-free classifier of
    normalised rows, CE on 16 x cosine, Adam(lr, weight decay) over both, BatchSampler over a
    RandomSampler (drop_last), run after torch.manual_seed(seed): the same weights as ours."""
    from torch.utils.data import BatchSampler, RandomSampler

    rng = np.random.default_rng(1)
    x, labels, dom = multi_domain(rng, 6, 50)
    store, listing = write_uned(tmp_path, x, labels, dom)
    recipe = ad.Recipe(dim=16, epochs=2, batch_size=32, seed=11)
    ad.train(store, listing, tmp_path / "w.pth", recipe, device="cpu")
    ours = torch.load(tmp_path / "w.pth", weights_only=True)

    torch.manual_seed(recipe.seed)
    layer = torch.nn.Linear(32, recipe.dim)
    torch.nn.init.xavier_uniform_(layer.weight)
    torch.nn.init.constant_(layer.bias, 0.0)
    pairs = {}
    y = torch.tensor([pairs.setdefault((int(c), int(d)), len(pairs)) for c, d in zip(labels, dom)])
    classifier = torch.nn.Linear(recipe.dim, len(pairs), bias=False)
    opt = torch.optim.Adam([*layer.parameters(), *classifier.parameters()], lr=1e-3, weight_decay=1e-6)
    X = torch.from_numpy(store.read_all()).float()
    sampler = BatchSampler(RandomSampler(range(len(X))), batch_size=recipe.batch_size, drop_last=True)
    for _ in range(recipe.epochs):
        for ind in sampler:
            a = torch.nn.functional.normalize(torch.nn.functional.normalize(layer(X[ind]), p=2, dim=-1), dim=-1)
            cos = a @ torch.nn.functional.normalize(classifier.weight, p=2, dim=1).T
            loss = torch.nn.functional.cross_entropy(16.0 * cos, y[ind])
            opt.zero_grad()
            loss.backward()
            opt.step()
    torch.testing.assert_close(ours["layer.weight"], layer.weight.detach(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours["layer.bias"], layer.bias.detach(), atol=1e-5, rtol=1e-4)
    # seeded: the same file again
    ad.train(store, listing, tmp_path / "again.pth", recipe, device="cpu")
    again = torch.load(tmp_path / "again.pth", weights_only=True)
    assert all(torch.equal(ours[k], again[k]) for k in ours)


def test_training_input_errors_name_the_file(tmp_path, rng):
    x, labels, dom = multi_domain(rng, 4, 40)
    store, listing = write_uned(tmp_path, x, labels, dom)
    short = tmp_path / "short.txt"
    short.write_text("".join(listing.read_text().splitlines(keepends=True)[:-3]))
    with pytest.raises(ValueError, match=r"short\.txt: 157 labelled lines for the 160 rows of .*uned"):
        ad.train(store, short, tmp_path / "w.pth", ad.Recipe(epochs=1))
    bad = tmp_path / "bad.txt"
    bad.write_text("a.jpg,1,0\nb.jpg,x,0\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: label and domain must be whole numbers"):
        ad.read_label_list(bad)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt: no such label list"):
        ad.train(store, tmp_path / "nope.txt", tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists()
    proc = cli("adapt", "train", store.path, "--labels", short, "--out", tmp_path / "w.pth", "--epochs", "1")
    one_line_error(proc, "short.txt", "160 rows")


def test_labels_are_matched_to_rows_by_id(tmp_path, rng):
    x, labels, dom = multi_domain(rng, 5, 8)
    store, listing = write_uned(tmp_path, x, labels, dom)
    lines = listing.read_text().splitlines()
    order = rng.permutation(len(lines))
    shuffled = tmp_path / "shuffled.txt"
    shuffled.write_text("path,label,domain\n" + "\n".join(lines[i] for i in order) + "\n")  # a header line, too
    paths, classes = ad.read_label_list(shuffled)
    got = ad.align_labels(store, shuffled, paths, classes)
    # the class of each store row is its own (label, domain), whatever the order of the list
    pair_of = {c: (int(lines[order[i]].split(",")[1]), int(lines[order[i]].split(",")[2])) for i, c in enumerate(classes)}
    assert [pair_of[c] for c in got] == [(int(c), int(d)) for c, d in zip(labels, dom)]


def test_cli_train_writes_weights_and_record(tmp_path, rng, capsys):
    x, labels, dom = multi_domain(rng, 4, 40)
    store, listing = write_uned(tmp_path, x, labels, dom)
    assert main(["adapt", "train", str(store.path), "--labels", str(listing), "--out", str(tmp_path / "m" / "w.pth"),
                 "--epochs", "2", "--dim", "64", "--seed", "5", "--device", "cpu"]) == 0
    assert "Linear(32 -> 64)" in capsys.readouterr().out
    assert ad.load_weights(tmp_path / "m" / "w.pth").out_dim == 64
    assert (tmp_path / "m" / "w.pth.json").exists() and not [p for p in os.listdir(tmp_path / "m") if ".tmp" in p]


def test_run_with_adapt_and_qe_adds_labelled_rows(tmp_path, rng):
    """`ilias run --adapt W.pth --qe 2`: the plain results as before, then the adapted search and
    QE on top of it, each its own results, reports and row; a rerun finds them all current."""
    pytest.importorskip("timm")
    from ilias import search_expanded
    from ilias.search import Tier

    from .test_run import _run

    root = _make_run_dir(tmp_path)
    plain = _run(root, tmp_path / "w")
    dim = Store.open(tmp_path / "w" / "stores" / "positives").dim
    weights = save_official(tmp_path / "w.pth", rng.standard_normal((24, dim)), rng.standard_normal(24) * 0.1)
    record = _run(root, tmp_path / "w", adapt=str(weights), qe=2)
    assert record["results"] == plain["results"]  # the plain rows are untouched
    assert set(record["variants"]) == {"adapt", "adapt + QE 2"}
    assert record["steps"]["search"]["done"] == "current"
    w = tmp_path / "w"
    adapted = SearchResults.load(w / "results.all.adapt.npz")
    expanded = SearchResults.load(w / "results.all.adapt-qe2.npz")
    assert adapted.variant == "adapt" and expanded.variant == "adapt + QE 2"
    # the same as the library calls on the adapted stores
    folder = next((w / "adapted").iterdir())
    q = [Store.open(folder / "image_queries")]
    db = Database.of([folder / "positives", folder / "distractors"])
    direct = search_expanded(q, db, [Tier("all")], k=8, n=2, threads=1)["all"]
    np.testing.assert_array_equal(expanded.indices, direct.indices)
    np.testing.assert_allclose(expanded.scores, direct.scores, atol=1e-6)
    html = (w / "report.html").read_text()
    assert "image-to-image + adapt + QE 2" in html and "image-to-image + adapt<" in html
    assert json.loads((w / "report.all.adapt-qe2.json").read_text())["config"]["variant"] == "adapt + QE 2"
    again = _run(root, tmp_path / "w", adapt=str(weights), qe=2)
    assert {again["steps"][s]["done"] for s in ("adapt", "search adapt", "search adapt-qe2")} == {"current"}
    assert again["variants"] == record["variants"]


def _make_run_dir(tmp_path):
    from .test_run import make_run_dir

    return make_run_dir(tmp_path / "ilias")
