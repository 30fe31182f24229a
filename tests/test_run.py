"""`ilias run` end to end on a tiny ILIAS (real photographs, webdataset tars, a random-weight ViT)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("timm")

from ilias import SearchResults, pipeline  # noqa: E402
from ilias.pipeline import RunConfig  # noqa: E402

from .test_extract import TINY_VIT, make_core, make_tars  # noqa: E402


@pytest.fixture(scope="module")
def ilias_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("ilias"))


def make_run_dir(root):
    """A tiny ILIAS: core images, their id lists, and distractor tars."""
    make_core(root / "ilias_core")
    ids = root / "image_ids"
    ids.mkdir()
    core = sorted(p.relative_to(root / "ilias_core").as_posix() for p in (root / "ilias_core").rglob("*.jpg"))
    (ids / "image_query_ids.txt").write_text("".join(f"{c},x\n" for c in core if "/query/" in c))
    (ids / "text_query_ids.txt").write_text("")
    (ids / "positive_ids.txt").write_text("".join(f"{c},0.2,{10 * i}\n" for i, c in enumerate(c for c in core if "/pos/" in c)))
    make_tars(root / "tars")
    return root


def _run(ilias_dir, out, **kw):
    cfg = RunConfig(model="tiny-vit", data=str(ilias_dir), out=str(out), tars=[str(ilias_dir / "tars")], k=8,
                    random_init=True, workers=0, batch_size=4, threads=1, **kw)
    return pipeline.run(cfg, spec=TINY_VIT, say=lambda *_: None)


def test_run_end_to_end_and_skips_current_steps(ilias_dir, tmp_path):
    record = _run(ilias_dir, tmp_path / "w")
    assert set(record["steps"]) == {"features", "search", "evaluate"}
    assert record["steps"]["features"]["done"] == {"image_queries": 2, "positives": 6, "distractors": 10}
    assert 0 <= record["results"]["all"]["i2i"] <= 100
    for f in ("report.html", "report.all.json", "report.all.md", "results.all.npz", "run.json"):
        assert (tmp_path / "w" / f).exists()
    assert json.loads((tmp_path / "w" / "run.json").read_text())["hardware"]["simd"]
    html = (tmp_path / "w" / "report.html").read_text()
    # thumbnails of the queries and of their results, from the core folders and from the tars
    assert html.count("data:image/jpeg;base64,") >= 2 * (1 + 8)
    again = _run(ilias_dir, tmp_path / "w")
    assert again["steps"]["features"]["done"] == {k: "current" for k in ("image_queries", "positives", "distractors")}
    assert again["steps"]["search"]["done"] == "current"


@pytest.mark.parametrize("fail_in", ["extract_images", "search_tiers", "evaluate"])
def test_interrupted_run_finishes_like_an_uninterrupted_one(ilias_dir, tmp_path, monkeypatch, fail_in):
    whole = _run(ilias_dir, tmp_path / "whole")
    target = {"extract_images": "ilias.extract", "search_tiers": "ilias.search", "evaluate": "ilias.evaluate"}[fail_in]
    module = __import__(target, fromlist=[fail_in])
    real = getattr(module, fail_in)
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 or fail_in != "extract_images":
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, fail_in, interrupted)
    with pytest.raises(KeyboardInterrupt):
        _run(ilias_dir, tmp_path / "cut")
    monkeypatch.setattr(module, fail_in, real)
    finished = _run(ilias_dir, tmp_path / "cut")
    assert finished["results"] == whole["results"]
    a = SearchResults.load(tmp_path / "whole" / "results.all.npz")
    b = SearchResults.load(tmp_path / "cut" / "results.all.npz")
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
    assert [a.ids(i) for i in range(len(a))] == [b.ids(i) for i in range(len(b))]


def test_distractors_of_another_selection_are_not_reused(ilias_dir, tmp_path):
    _run(ilias_dir, tmp_path / "w", distractors="4")
    with pytest.raises(ValueError, match="selected otherwise"):
        _run(ilias_dir, tmp_path / "w")


def test_bad_arguments(ilias_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no ilias_core"):
        pipeline.run(RunConfig(model="x", data=str(tmp_path), out=str(tmp_path / "w")), spec=TINY_VIT)
    with pytest.raises(ValueError, match="--distractors"):
        _run(ilias_dir, tmp_path / "w", distractors="some")
