"""Reports (JSON, Markdown, placement among published numbers) and the `ilias evaluate` command."""

import json
import warnings

import numpy as np
import pytest
from ilias.cli import main
from ilias.evaluate import evaluate
from ilias.groundtruth import load_ground_truth
from ilias.report import build_report, infer_setting, place, published, to_markdown

from .test_evaluate import make_ilias, random_results


@pytest.fixture
def dataset(tmp_path):
    make_ilias(tmp_path / "ilias", np.random.default_rng(5))
    gt = load_ground_truth(tmp_path / "ilias")
    sims = random_results(np.random.default_rng(6), gt)
    (tmp_path / "r.json").write_text(json.dumps(sims))
    return tmp_path, gt, sims


def test_placement_among_published():
    table = published("i2i", "mini")
    assert len(table) == 64 and table == sorted(table, key=lambda m: -m[1])
    best = place(99.0, "i2i", "mini")
    assert (best.rank, best.of, best.above) == (1, 65, None) and best.below == table[0]
    # published numbers have one decimal: 27.46 rounds to 27.5 and ties with siglip_512 (27.5)
    p = place(27.46, "i2i", "mini")
    assert p.below == ("vit_base_patch16_siglip_512.webli", 27.5)
    assert p.above == ("vit_large_patch16_siglip_384.webli", 34.3) and p.rank == 2
    # t2i rows whose only score is in the unlabelled column have no setting: left out
    assert all(name != "convnext_base.clip_laion2b_augreg" for name, _ in published("t2i", "full"))
    assert infer_setting(5_004_715) == "mini" and infer_setting(100_004_715) == "full" and infer_setting(500) is None


def test_report_json_and_markdown(dataset):
    _, gt, sims = dataset
    ev = evaluate(sims, gt, k=10)
    report = build_report(ev, setting="full", config={"note": "test"})
    json.dumps(report)  # all JSON-able
    i2i = report["tasks"]["i2i"]
    assert i2i["map"] == pytest.approx(np.mean(i2i["per_query"]["ap"]))
    assert i2i["placement"]["setting"] == "full" and i2i["placement"]["rank"] >= 1
    assert report["config"]["k"] == 10 and report["config"]["note"] == "test"
    md = to_markdown(report)
    assert f"| image-to-image | 6 | {i2i['map']:.2f} |" in md
    assert "mAP per scale group" in md and "| animal-dog |" in md


@pytest.mark.parametrize("rows, setting", [(100_004_715, "mini"), (4_715, "mini"), (10_004_715, None), (5_004_715, "full")])
def test_a_setting_the_database_size_contradicts_is_not_placed(dataset, rows, setting):
    # e.g. a mini-ILIAS filter that matched no distractor leaves the positives alone: ranking
    # that among the published 5M numbers would be a plausible wrong answer
    _, gt, sims = dataset
    ev = evaluate(sims, gt, k=10)
    ev.database_rows = rows
    ev.setting = "mini" if setting is None else None  # a tier that says it is mini-ILIAS, or the user's --setting
    with pytest.warns(UserWarning, match=f"not placed among the published .*{rows:,} rows"):
        report = build_report(ev, setting=setting)
    assert all(t["placement"] is None for t in report["tasks"].values())
    assert report["config"]["setting"] is None
    assert any("not placed" in w for w in report["warnings"])


def test_a_database_of_neither_size_has_no_setting(dataset):
    _, gt, sims = dataset
    ev = evaluate(sims, gt, k=10)
    ev.database_rows = 10_004_715  # positives + the first 10M distractors: neither mini nor full ILIAS
    assert build_report(ev)["config"]["setting"] is None
    ev.database_rows = 5_001_000  # mini-ILIAS with a few unreadable images skipped
    assert build_report(ev)["config"]["setting"] == "mini"


def test_cli_evaluate(dataset, capsys):
    tmp, _, _ = dataset
    code = main(["evaluate", str(tmp / "r.json"), "--gt", str(tmp / "ilias"), "--k", "10",
                 "--json", str(tmp / "rep.json"), "--md", str(tmp / "rep.md"), "--setting", "mini"])
    out = capsys.readouterr()
    assert code == 0
    assert "image-to-image: mAP@10" in out.out and "text-to-image: mAP@10" in out.out and "rank" in out.out
    rep = json.loads((tmp / "rep.json").read_text())
    assert rep["config"]["setting"] == "mini" and rep["config"]["argv"]
    assert (tmp / "rep.md").read_text().startswith("# ILIAS evaluation")


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.json", "--gt", "ilias"], "missing.json: no such results file"),
        (["r.json", "--gt", "nowhere"], "--gt nowhere: no such directory"),
        (["r.json", "--gt", "ilias", "--k", "1000"], "fewer than k=1000"),
        (["r.json", "--gt", "ilias", "--k", "0"], "argument --k: expected 1 to 100,000, got 0"),
    ],
)
def test_cli_user_errors_are_one_line(dataset, capsys, monkeypatch, args, message):
    tmp, _, _ = dataset
    monkeypatch.chdir(tmp)
    monkeypatch.delenv("ILIAS_DEBUG", raising=False)
    assert main(["evaluate", *args]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ilias evaluate: error:") and message in err[-1]


def test_cli_warnings_are_plain_lines(dataset, capsys):
    tmp, gt, sims = dataset
    del sims[gt.image_queries[0]]
    (tmp / "part.json").write_text(json.dumps(sims))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["evaluate", str(tmp / "part.json"), "--gt", str(tmp / "ilias"), "--k", "10"]) == 0
    err = capsys.readouterr().err
    assert "ilias evaluate: warning:" in err and "1 of 6 image-to-image queries missing" in err
