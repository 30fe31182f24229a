"""`ilias demo` on a small configuration: generated images, webdataset tars, the real loaders, a
meaningful mAP that falls with distractors, thumbnails in the report; run as the core install
would (torch and Pillow unimportable)."""

import io
import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from ilias import SearchResults, Store
from ilias.demo import png
from ilias.demo.descriptor import DIM, parse_description
from ilias.demo.features import webdataset_key
from ilias.evaluate import SCALE_GROUPS
from ilias.groundtruth import load_ground_truth, read_id_list

ARGS = ["--instances", "40", "--distractor-images", "1000", "--distractors", "20000", "--threads", "2"]
# the core install: no torch, no Pillow (nor anything that needs them)
CORE_ONLY = (
    "import sys\n"
    "for name in ('torch', 'torchvision', 'timm', 'open_clip', 'PIL'):\n"
    "    sys.modules[name] = None\n"
    "from ilias.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _demo(out):
    return subprocess.run(
        [sys.executable, "-c", CORE_ONLY, "demo", "--out", str(out), *ARGS], capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    done = _demo(out)
    assert done.returncode == 0, done.stderr[-2000:]
    return out, done.stdout


def test_prints_the_summary(demo):
    _, stdout = demo
    assert "image-to-image" in stdout and "text-to-image" in stdout
    for tier in ("+1k", "+10k", "mini", "all"):
        assert f"\n{tier} " in stdout


def test_reranks_the_tier_whose_rows_all_have_images(demo):
    """The weight-free verifier re-ranks the image queries of +1k (OpenCV is installed with the
    test extras): a row of its own, beside the global one, in the summary and in the report."""
    out, stdout = demo
    line = next(x for x in stdout.splitlines() if "re-ranked (SIFT + RANSAC, top 100" in x)
    assert line.startswith("+1k ") and "(global " in line
    rec = json.loads((out / "run.json").read_text())
    [(label, found)] = rec["variants"].items()
    assert list(found) == ["+1k"] and 0 <= found["+1k"]["i2i"] <= 100
    assert set(rec["steps"]) >= {"rerank sift"}
    html = (out / "report.html").read_text()
    assert 'id="reranking"' in html and label in html
    reranked = SearchResults.load(out / "results.+1k.rerank-sift.npz")
    plain = SearchResults.load(out / "results.+1k.npz")
    text = [q for q, qid in enumerate(plain.query_ids) if qid.endswith(".txt")]
    assert np.array_equal(reranked.indices[text], plain.indices[text])  # text queries are not re-ranked
    image = [q for q in range(len(plain.query_ids)) if q not in set(text)]
    # only the heads move: the same set of ids in the first 100, the same tail
    for q in image[:20]:
        assert sorted(reranked.ids(q)[:100]) == sorted(plain.ids(q)[:100]) and reranked.ids(q)[100:] == plain.ids(q)[100:]


def test_core_images_exist_with_boxes(demo):
    out, _ = demo
    core = out / "ILIAS" / "ilias_core"
    gt = load_ground_truth(out / "ILIAS")
    for item in gt.image_queries + gt.positives:
        image = png.decode((core / item).read_bytes())
        assert image.dtype == np.uint8 and image.ndim == 3 and min(image.shape[:2]) >= 64
        x, y, w, h = map(int, (core / item.replace(".png", "_bbox.txt")).read_text().split())
        assert 0 <= x and 0 <= y and x + w <= image.shape[1] and y + h <= image.shape[0] and w * h > 0
    for text in gt.text_queries:
        assert parse_description((core / text).read_text())[0] in (core / text).read_text()


def test_tars_are_webdataset_shards(demo):
    out, _ = demo
    tars = sorted((out / "ILIAS" / "distractors").glob("*.tar"))
    assert len(tars) == 1
    keys = []
    with tarfile.open(tars[0]) as tar:
        members = tar.getmembers()
        for m in members:
            key, ext = webdataset_key(m.name)
            assert m.isfile() and ext in ("png", "json")
            if not keys or keys[-1] != key:
                keys.append(key)  # a sample's files are consecutive
            if ext == "png":
                image = png.decode(tar.extractfile(m).read())
                meta = json.loads(tar.extractfile(f"{key}.json").read())
                assert image.shape[:2] == (meta["height"], meta["width"])
    assert len(keys) == len(set(keys)) == 1000 and len(members) == 2000
    listed = read_id_list(out / "ILIAS" / "image_ids" / "distractor_ids.txt.gz")
    assert listed == [f"{tars[0].name}/{k}" for k in keys]


def test_ground_truth_loads_with_the_real_loader(demo):
    out, _ = demo
    gt = load_ground_truth(out / "ILIAS")
    assert (len(gt.image_queries), len(gt.text_queries), len(gt.positives)) == (49, 40, 188)
    assert {p.split("/")[0] for p in gt.positives} == {q.split("/")[0] for q in gt.image_queries}
    assert gt.taxonomy is not None and set(gt.taxonomy) == {p.split("/")[0] for p in gt.positives}
    assert ((gt.scale > 0) & (gt.scale <= 1)).all() and (gt.clutter >= 0).all()
    # the real scale groups are all populated
    for lo, hi in SCALE_GROUPS:
        assert ((gt.scale >= lo) & (gt.scale < hi)).sum() >= 10


def test_stores_hold_real_then_sampled_distractors(demo):
    out, _ = demo
    store = Store.open(out / "stores" / "distractors")
    assert store.count == 20000 and store.dim == DIM
    ids = store.all_ids()
    assert all("/" in i and not i.startswith("sampled/") for i in ids[:1000])
    assert all(i.startswith("sampled/") for i in ids[1000:])
    x = store.read_all().astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1, atol=2e-3)
    # sampled rows lie near real ones (a kernel density draw), unlike random directions
    real, sampled = x[:1000], x[1000:1500]
    rand = np.random.default_rng(0).standard_normal(sampled.shape).astype(np.float32)
    rand /= np.linalg.norm(rand, axis=1, keepdims=True)
    assert np.median((sampled @ real.T).max(1)) > 0.5 > 0.3 > np.median((rand @ real.T).max(1))
    queries = Store.open(out / "stores" / "text_queries")
    assert queries.count == 40 and queries.manifest.provenance["model"] == "demo-handcrafted"


def test_map_is_clearly_above_chance_and_falls_with_distractors(demo):
    out, _ = demo
    record = json.loads((out / "run.json").read_text())
    results = record["results"]
    prefixes = [results[t] for t in ("+1k", "+10k", "all")]
    assert [r["rows"] for r in prefixes] == [1188, 10188, 20188]
    # chance is about 100 * 188 / 1188 / 40 = 0.4 at +1k
    assert prefixes[0]["i2i"] > 25 and prefixes[0]["t2i"] > 15
    for task in ("i2i", "t2i"):
        maps = [r[task] for r in prefixes]
        assert maps[0] > maps[1] > maps[2] and maps[0] > 1.25 * maps[2]
    report = json.loads((out / "report.all.json").read_text())
    assert report["tasks"]["i2i"]["queries"] == 49 and report["tasks"]["t2i"]["queries"] == 40


def test_report_shows_thumbnails_with_positives_marked(demo):
    out, _ = demo
    html = (out / "report.html").read_text()
    # Pillow is absent: the PNG files go in as they are (queries, positives, distractors from the tars)
    assert html.count("data:image/png;base64,") >= 6
    assert 'class="item pos"' in html and 'id="qualitative"' in html and 'id="curve"' in html


def test_second_run_reuses_everything(demo):
    out, _ = demo
    again = _demo(out)
    assert again.returncode == 0, again.stderr[-2000:]
    record = json.loads((out / "run.json").read_text())
    assert record["steps"]["features"]["done"] == {"all": "current"}
    assert record["steps"]["search"]["done"] == "current"


def test_png_round_trip_and_other_writers():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(png.decode(png.encode(image)), image)
    with pytest.raises(ValueError, match="not a PNG"):
        png.decode(b"GIF89a")
    PIL = pytest.importorskip("PIL.Image")
    # Pillow reads ours, and we read Pillow's (other filters, grey and RGBA)
    np.testing.assert_array_equal(np.asarray(PIL.open(io.BytesIO(png.encode(image)))), image)
    for mode in ("RGB", "RGBA", "L"):
        buf = io.BytesIO()
        PIL.fromarray(image).convert(mode).save(buf, "PNG")
        expected = np.asarray(PIL.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        np.testing.assert_array_equal(png.decode(buf.getvalue()), expected)


def test_text_tower_reads_the_words():
    assert parse_description("a red star with blue stripes") == ("star", "red", "stripes", "blue")
    assert parse_description("A plain Gray circle.") == ("disc", "grey", "plain", "white")
    assert parse_description("something else entirely") == ("disc", "grey", "plain", "white")
