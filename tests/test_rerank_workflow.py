"""Re-ranking end to end: images by id, AMES's local descriptors, resumable extraction of only the
images a results file needs, the re-ranked results file, the commands and `ilias run --rerank`."""

import io
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
cv2 = pytest.importorskip("cv2")

from ilias import SearchResults, pipeline  # noqa: E402
from ilias.pipeline import RunConfig  # noqa: E402
from ilias.rerank import extract as rx  # noqa: E402
from ilias.rerank.ames import AMES  # noqa: E402
from ilias.rerank.images import ImageNotFound, ImageSource, decode_image  # noqa: E402
from ilias.rerank.local_features import PATCH, Detector, DinoLocals, load_detector, resize_to_patches  # noqa: E402
from ilias.rerank.locals_store import LocalsStore  # noqa: E402
from ilias.rerank.rerank import AmesScorer, LocalsMissing, rerank  # noqa: E402
from ilias.rerank.workflow import Method, RerankConfig, _randomize, rerank_results  # noqa: E402

from .test_extract import TINY_VIT  # noqa: E402
from .test_run import make_run_dir  # noqa: E402

IMSIZE = 56  # 4 x 4 patches at most: the real backbone, small inputs


@pytest.fixture(scope="module")
def ilias_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("ilias"))


@pytest.fixture(scope="module")
def run_dir(ilias_dir, tmp_path_factory):
    """A plain `ilias run` whose results the tests re-rank."""
    out = tmp_path_factory.mktemp("run")
    cfg = RunConfig(model="tiny-vit", data=str(ilias_dir), out=str(out), tars=[str(ilias_dir / "tars")], k=8,
                    random_init=True, workers=0, batch_size=4, threads=1)
    pipeline.run(cfg, spec=TINY_VIT, say=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def describer():
    torch.manual_seed(0)
    return DinoLocals(imsize=IMSIZE, device="cpu", random_init=True)


def source(ilias_dir):
    return ImageSource(ilias_dir, [ilias_dir / "tars"])


# ---- images by id


def test_images_come_from_the_core_folder_and_from_tars_by_key(ilias_dir, tmp_path):
    src = source(ilias_dir)
    core = "bold_bimp_000/pos/P000_01.jpg"
    assert src.read(core) == (ilias_dir / "ilias_core" / core).read_bytes()
    with tarfile.open(ilias_dir / "tars" / "00001.tar") as t:
        sequential = t.extractfile("000001003.jpg").read()
    assert src.read("00001.tar/000001003") == sequential
    assert src.box("bold_bimp_000/query/Q000_00.jpg") == (1, 2, 4, 6)  # "1 2 3 4" is x y w h
    assert src.box(core) is None
    # other image members than jpg (the demo's tars hold png)
    png = cv2.imencode(".png", np.full((9, 7, 3), 200, np.uint8))[1].tobytes()
    with tarfile.open(tmp_path / "p.tar", "w") as t:
        info = tarfile.TarInfo("k1.png")
        info.size = len(png)
        t.addfile(info, io.BytesIO(png))
    assert ImageSource(None, [tmp_path / "p.tar"]).read("p.tar/k1") == png
    for missing in ("00001.tar/nope", "bold_bimp_000/pos/none.jpg"):
        assert not src.has(missing)
        with pytest.raises(ImageNotFound, match="nope|none.jpg"):
            src.read(missing)
    assert src.missing([core, "00001.tar/nope"]) == ["00001.tar/nope"]


def test_many_tars_are_read_with_a_few_open(tmp_path, monkeypatch):
    from ilias.rerank import images

    monkeypatch.setattr(images, "OPEN_TARS", 3)
    want = {}
    for t in range(8):
        with tarfile.open(tmp_path / f"{t:05d}.tar", "w") as tar:
            for k in range(2):
                data = bytes([t, k]) * (100 + t)
                info = tarfile.TarInfo(f"{t}{k}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                want[f"{t:05d}.tar/{t}{k}"] = data
    src = ImageSource(None, [tmp_path])
    for _ in range(2):  # evicted indexes are opened again
        for item_id, data in want.items():
            assert src.read(item_id) == data
            assert len(src._open) <= 3


def test_decode_cuts_the_query_box_and_gives_rgb():
    img = np.zeros((20, 30, 3), np.uint8)
    img[5:9, 10:20] = (255, 0, 0)  # red in RGB
    data = cv2.imencode(".png", img[:, :, ::-1])[1].tobytes()
    out = decode_image(data, (10, 5, 20, 9))
    assert out.shape == (4, 10, 3) and (out == (255, 0, 0)).all()
    with pytest.raises(ValueError, match="outside"):
        decode_image(data, (40, 40, 50, 50), "q.png")
    with pytest.raises(ValueError, match="does not decode"):
        decode_image(b"not an image", None, "bad.jpg")


# ---- AMES's descriptors


@pytest.mark.parametrize("h, w, imsize", [(480, 640, 768), (100, 37, 768), (1000, 120, 224), (50, 50, None), (13, 3, 28)])
def test_resize_to_patches_follows_the_recipe(h, w, imsize):
    img = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    out = resize_to_patches(img, imsize)
    scale = 1.0 if imsize is None else imsize / max(h, w)
    # each side: the scaled side rounded to whole patches (at least one)
    want = tuple(max(round(scale * s / PATCH), 1) * PATCH for s in (h, w))
    assert out.shape[:2] == want
    shrink = want[0] < h or want[1] < w
    sx, sy = want[1] / w, want[0] / h
    ref = cv2.resize(img, (want[1], want[0]), fx=sx, fy=sy, interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    if want != (h, w):
        assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1


def test_detector_checkpoint_in_the_published_layout_loads_strictly(tmp_path):
    torch.manual_seed(1)
    det = Detector()
    state = {k: torch.randn_like(v.float()).to(v.dtype) if v.dtype.is_floating_point else v for k, v in det.state_dict().items()}
    state["bn.running_var"] = state["bn.running_var"].abs() + 0.5
    assert sorted(state) == sorted(["conv1.weight", "conv1.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                    "bn.num_batches_tracked", "conv2.weight", "conv2.bias"])
    assert tuple(state["conv1.weight"].shape) == (768, 768, 1, 1) and tuple(state["conv2.weight"].shape) == (1, 768, 1, 1)
    torch.save({"state": state}, tmp_path / "det.pt")
    loaded = load_detector(tmp_path / "det.pt")
    # the detector from its definition, in numpy (float64)
    x = np.random.default_rng(2).standard_normal((1, 9, 768)).astype(np.float32)
    s = {k: v.double().numpy() for k, v in state.items() if v.dtype.is_floating_point}
    y = x[0].astype(np.float64) @ s["conv1.weight"][:, :, 0, 0].T + s["conv1.bias"]
    y = (y - s["bn.running_mean"]) / np.sqrt(s["bn.running_var"] + 1e-5) * s["bn.weight"] + s["bn.bias"]
    want_desc = y / np.linalg.norm(y, axis=1, keepdims=True)
    z = np.maximum(y, 0) @ s["conv2.weight"][0, :, 0, 0] + s["conv2.bias"][0]
    want_w = np.log1p(np.exp(z))
    with torch.no_grad():
        desc, weight = loaded(torch.from_numpy(x))
    np.testing.assert_allclose(desc[0].numpy(), want_desc, atol=1e-5)
    np.testing.assert_allclose(weight[0].numpy(), want_w, rtol=1e-4, atol=1e-4)
    # another layout: one line naming the file and the keys
    torch.save({"state": {k: v for k, v in state.items() if not k.startswith("conv2")}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"bad\.pt.*missing keys: conv2"):
        load_detector(tmp_path / "bad.pt")
    torch.save(state, tmp_path / "flat.pt")
    with pytest.raises(ValueError, match=r"flat\.pt.*under 'state'"):
        load_detector(tmp_path / "flat.pt")


def test_describe_keeps_the_strongest_tokens_with_their_patch_centres(describer):
    img = np.random.default_rng(3).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    x = describer.prepare(img)
    h, w = x.shape[1] // PATCH, x.shape[2] // PATCH
    assert (h, w) == (3, 4)
    meta, desc = describer.describe(x, 20)
    # the same from the backbone's tokens and the detector, written out here
    with torch.no_grad():
        tokens = describer.backbone.forward_features(x[None])[:, describer.backbone.num_prefix_tokens:]
        all_desc, all_w = describer.detector(tokens)
    order = np.argsort(-all_w[0].numpy(), kind="stable")
    n = h * w
    assert (meta[:n, 3] == 0).all() and (meta[n:, 3] == 1).all() and (desc[n:] == 0).all()
    np.testing.assert_allclose(meta[:n, 4], all_w[0].numpy()[order], rtol=1e-5)
    assert (np.diff(meta[:n, 4]) <= 0).all()
    got = meta[:n, :2]
    rows, cols = order // w, order % w
    np.testing.assert_allclose(got[:, 0], (rows * PATCH + PATCH / 2) / (h * PATCH), rtol=1e-6)
    np.testing.assert_allclose(got[:, 1], (cols * PATCH + PATCH / 2) / (w * PATCH), rtol=1e-6)
    np.testing.assert_allclose(desc[:n], all_desc[0].numpy()[order], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(desc[:n], axis=1), 1, atol=1e-5)


# ---- extraction of what a results file needs


def test_needed_is_the_image_queries_and_the_union_of_their_heads(run_dir):
    res = SearchResults.load(run_dir / "results.all.npz")
    queries, db = rx.needed(res, 3)
    assert queries == [q for q in res.query_ids if not q.endswith(".txt")] and len(queries) == 2
    want = sorted({i for q in range(len(res.query_ids)) if not res.query_ids[q].endswith(".txt") for i in res.ids(q)[:3]})
    assert sorted(db) == want


def test_an_interrupted_extraction_resumes_to_the_same_store(ilias_dir, run_dir, describer, tmp_path, monkeypatch):
    res = SearchResults.load(run_dir / "results.all.npz")
    _, ids = rx.needed(res, 8)
    assert len(ids) >= 9
    whole = rx.extract_locals(ids, source(ilias_dir), describer, tmp_path / "whole", 12, shard_images=3, progress=False)
    real_read = ImageSource.read
    calls = []

    def failing(self, item_id):
        calls.append(item_id)
        if len(calls) == 8:
            raise KeyboardInterrupt
        return real_read(self, item_id)

    monkeypatch.setattr(ImageSource, "read", failing)
    with pytest.raises(KeyboardInterrupt):
        rx.extract_locals(ids, source(ilias_dir), describer, tmp_path / "cut", 12, shard_images=3, threads=1, progress=False)
    assert 0 < LocalsStore.open(tmp_path / "cut").count < len(ids)
    monkeypatch.setattr(ImageSource, "read", real_read)
    done = rx.extract_locals(ids, source(ilias_dir), describer, tmp_path / "cut", 12, shard_images=3, progress=False)
    assert done.all_ids() == whole.all_ids() == ids
    a, b = whole.read(np.arange(len(ids))), done.read(np.arange(len(ids)))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    # a deeper shortlist later adds only the new images
    more = ids + ["00000.tar/000000004"] if "00000.tar/000000004" not in ids else ids
    grown = rx.extract_locals(more, source(ilias_dir), describer, tmp_path / "cut", 12, shard_images=3, progress=False)
    assert grown.all_ids()[: len(ids)] == ids and grown.count == len(set(more))


def test_a_store_of_other_settings_or_images_without_files_are_errors(ilias_dir, describer, tmp_path):
    ids = ["bold_bimp_000/pos/P000_00.jpg"]
    rx.extract_locals(ids, source(ilias_dir), describer, tmp_path / "s", 12, progress=False)
    with pytest.raises(ValueError, match="tokens"):
        rx.extract_locals(ids, source(ilias_dir), describer, tmp_path / "s", 30, progress=False)
    other = DinoLocals(imsize=28, device="cpu", random_init=True)
    with pytest.raises(ValueError, match=r"other settings.*imsize"):
        rx.extract_locals(ids, source(ilias_dir), other, tmp_path / "s", 12, progress=False)
    with pytest.raises(FileNotFoundError, match=r"1 of 2 images.*00000.tar/nope"):
        rx.extract_locals(ids + ["00000.tar/nope"], source(ilias_dir), describer, tmp_path / "t", 12, progress=False)
    assert not (tmp_path / "t" / "manifest.json").exists()


# ---- re-ranking


@pytest.fixture(scope="module")
def ames():
    model = AMES("binary")
    _randomize(model)
    return model


class TokenDot:
    """A scorer whose raw scores are exact in float64: the sum of the products of the two images'
    +-1 bits (the stores' own values), so that the test can recompute them pair by pair."""

    label = "token dot"

    def check(self, q_store, d_store):
        pass

    def __call__(self, q_store, q_rows, d_store, d_rows, pairs):
        qv, qm = q_store.model_inputs(q_rows)
        dv, dm = d_store.model_inputs(d_rows)
        qs, ds = np.where(qm[..., None], 0, qv).sum(1), np.where(dm[..., None], 0, dv).sum(1)
        return np.array([qs[a] @ ds[b] for a, b in pairs], np.float64)


def test_rerank_changes_only_the_heads_by_the_fusion_formula(ilias_dir, run_dir, describer, ames, tmp_path):
    res = SearchResults.load(run_dir / "results.all.npz")
    top, lam, gamma = 5, 0.1, 1e-3  # raw scores in the thousands
    qids, dids = rx.needed(res, top)
    proj = ames.projection
    q = rx.extract_locals(qids, source(ilias_dir), describer, tmp_path / "q", 20, variant="binary", projection=proj, progress=False)
    d = rx.extract_locals(dids, source(ilias_dir), describer, tmp_path / "d", 10, variant="binary", projection=proj, progress=False)
    out = rerank(res, q, d, TokenDot(), top, lam, gamma, chunk=1, progress=False)
    assert out.reranking.startswith("token dot, top 5")
    changed = 0
    for row, qid in enumerate(res.query_ids):
        if qid.endswith(".txt"):  # text queries: unchanged
            assert np.array_equal(out.indices[row], res.indices[row]) and np.array_equal(out.scores[row], res.scores[row])
            continue
        head_ids = res.ids(row)[:top]
        # the raw scores pair by pair from the stores, and the fusion written out
        qv, qm = q.model_inputs(q.rows_of([qid]))
        raw = []
        for i in head_ids:
            dv, dm = d.model_inputs(d.rows_of([i]))
            raw.append(float(np.where(qm[0][:, None], 0, qv[0]).sum(0) @ np.where(dm[0][:, None], 0, dv[0]).sum(0)))
        fused = lam * res.scores[row, :top].astype(np.float64) + (1 - lam) / (1 + np.exp(-gamma * np.array(raw)))
        order = np.argsort(-fused, kind="stable")
        assert out.ids(row)[:top] == [head_ids[i] for i in order]
        np.testing.assert_allclose(out.scores[row, :top], fused[order], rtol=1e-12)
        assert out.ids(row)[top:] == res.ids(row)[top:]  # the rest keeps its order, below the head
        assert out.scores[row, top:].max() < out.scores[row, :top].min()
        changed += out.ids(row)[:top] != head_ids
    assert changed  # the test data does reorder some heads
    # a results file of the same format: saved, loaded, evaluated
    out.save(tmp_path / "r.npz")
    back = SearchResults.load(tmp_path / "r.npz")
    assert back.reranking == out.reranking and "re-ranked" in back.variant
    # the AMES scorer on the same stores: one logit per pair, the pairs of each chunk batched
    scorer = AmesScorer(ames, query_tokens=20, db_tokens=10)
    amesed = rerank(res, q, d, scorer, top, progress=False)
    row = next(r for r, qid in enumerate(res.query_ids) if not qid.endswith(".txt"))
    logits = ames.score(*q.model_inputs(q.rows_of([res.query_ids[row]]), 20), *d.model_inputs(d.rows_of(res.ids(row)[:top]), 10))[0]
    fused = 0.35 * res.scores[row, :top].astype(np.float64) + 0.65 / (1 + np.exp(-0.1 * logits.astype(np.float64)))
    np.testing.assert_allclose(np.sort(amesed.scores[row, :top])[::-1], np.sort(fused)[::-1], rtol=1e-6)


def test_missing_locals_name_the_store_and_how_many(ilias_dir, run_dir, describer, ames, tmp_path):
    res = SearchResults.load(run_dir / "results.all.npz")
    qids, dids = rx.needed(res, 4)
    proj = ames.projection
    q = rx.extract_locals(qids, source(ilias_dir), describer, tmp_path / "q", 20, variant="binary", projection=proj, progress=False)
    d = rx.extract_locals(dids[:-2], source(ilias_dir), describer, tmp_path / "d", 10, variant="binary", projection=proj, progress=False)
    with pytest.raises(LocalsMissing, match=rf"{tmp_path / 'd'}: 2 of {len(dids)} shortlisted images have no local descriptors"):
        rerank(res, q, d, AmesScorer(ames, 20, 10), 4, progress=False)
    # a store packed with another projection, or too few tokens: clear errors naming the store
    other = rx.extract_locals(dids, source(ilias_dir), describer, tmp_path / "o", 10, variant="binary",
                              projection=np.ascontiguousarray(proj[:, ::-1]), progress=False)
    with pytest.raises(ValueError, match="projection"):
        rerank(res, q, other, AmesScorer(ames, 20, 10), 4, progress=False)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'd'}: holds 10 tokens"):
        rerank(res, q, d, AmesScorer(ames, 20, 50), 4, progress=False)


def test_workflow_describes_what_is_missing_then_reranks(ilias_dir, run_dir, tmp_path):
    res = SearchResults.load(run_dir / "results.all.npz")
    cfg = RerankConfig(method="ames", random_init=True, imsize=IMSIZE, top=4, query_tokens=16, db_tokens=8, threads=1)
    [out] = rerank_results(cfg, [res], tmp_path / "locals", source(ilias_dir), progress=False)
    q, d = LocalsStore.open(tmp_path / "locals" / "queries"), LocalsStore.open(tmp_path / "locals" / "db")
    assert q.tokens == 700 and d.tokens == 100 and q.variant == d.variant == "binary"
    assert set(d.all_ids()) == set(rx.needed(res, 4)[1])
    # without a source the stores must hold everything: a deeper head is an error, not a shorter re-ranking
    with pytest.raises(LocalsMissing, match="ilias locals extract"):
        rerank_results(replace(cfg, top=8), [res], tmp_path / "locals", None, progress=False)
    assert Method(cfg).weights == (0.35, 0.10)


def test_commands_extract_then_rerank_and_fail_in_one_line(ilias_dir, run_dir, tmp_path):
    results = str(run_dir / "results.all.npz")
    common = ["--method", "ames", "--random-init", "--imsize", str(IMSIZE), "--top", "3", "--query-tokens", "16",
              "--db-tokens", "8", "--threads", "1"]
    cli = [sys.executable, "-m", "ilias"]
    missing = subprocess.run([*cli, "rerank", results, "--locals", str(tmp_path / "L"), "--out", str(tmp_path / "r.npz"), *common],
                             capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1
    assert "no locals store" in missing.stderr and "ilias locals extract" in missing.stderr
    done = subprocess.run([*cli, "locals", "extract", results, "--data", str(ilias_dir), "--tars", str(ilias_dir / "tars"),
                           "--locals", str(tmp_path / "L"), *common], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    ok = subprocess.run([*cli, "rerank", results, "--locals", str(tmp_path / "L"), "--out", str(tmp_path / "r.npz"), *common],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    ev = subprocess.run([*cli, "evaluate", str(tmp_path / "r.npz"), "--gt", str(ilias_dir), "--k", "8"], capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    info = subprocess.run([*cli, "locals", "info", str(tmp_path / "L" / "db")], capture_output=True, text=True)
    assert info.returncode == 0 and "binary" in info.stdout and "KiB per image" in info.stdout
    noweights = subprocess.run([*cli, "rerank", results, "--locals", str(tmp_path / "L"), "--out", str(tmp_path / "x.npz")],
                               capture_output=True, text=True)
    assert noweights.returncode == 1 and "--weights" in noweights.stderr


def test_run_with_rerank_reports_global_and_reranked_side_by_side(ilias_dir, tmp_path):
    rc = RerankConfig(method="ames", random_init=True, imsize=IMSIZE, top=4, query_tokens=16, db_tokens=8, threads=1)
    cfg = RunConfig(model="tiny-vit", data=str(ilias_dir), out=str(tmp_path / "w"), tars=[str(ilias_dir / "tars")], k=8,
                    random_init=True, workers=0, batch_size=4, threads=1, rerank=rc)
    record = pipeline.run(cfg, spec=TINY_VIT, say=lambda *_: None)
    assert "rerank ames" in record["steps"]
    label = next(v for v in record["variants"] if "re-ranked" in v)
    assert 0 <= record["variants"][label]["all"]["i2i"] <= 100
    html = (tmp_path / "w" / "report.html").read_text()
    assert "Re-ranking" in html and "AMES binary, top 4" in html
    assert (tmp_path / "w" / "results.all.rerank-ames.npz").exists()
    again = pipeline.run(cfg, spec=TINY_VIT, say=lambda *_: None)
    assert again["steps"]["rerank ames"]["done"] == "current"
    # any setting the scores depend on, not only those the label shows, means re-ranking again
    fewer = pipeline.run(replace(cfg, rerank=replace(rc, db_tokens=6)), spec=TINY_VIT, say=lambda *_: None)
    assert fewer["steps"]["rerank ames"]["done"] != "current"
    # a tier name the run does not have is an error before any search, never a partial re-ranking
    with pytest.raises(ValueError, match=r"rerank tiers: \+9k is not a tier of this run"):
        pipeline.run(replace(cfg, rerank_tiers=("all", "+9k")), spec=TINY_VIT, say=lambda *_: None)
    # nor is an empty choice a silent run without re-ranking
    with pytest.raises(ValueError, match=r"rerank tiers: expected at least one"):
        pipeline.run(replace(cfg, rerank_tiers=()), spec=TINY_VIT, say=lambda *_: None)
    shutil.rmtree(tmp_path / "w")
