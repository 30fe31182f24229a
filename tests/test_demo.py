import json

from ilias.cli import main


def test_demo_runs_end_to_end_and_distractors_lower_map(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--distractors", "30000"]) == 0
    out = capsys.readouterr().out
    assert "image-to-image" in out
    mini = json.loads((tmp_path / "report_mini.json").read_text())
    full = json.loads((tmp_path / "report_full.json").read_text())
    for task in ("i2i", "t2i"):
        assert mini["tasks"][task]["queries"] == {"i2i": 1232, "t2i": 1000}[task]
        assert 5 < full["tasks"][task]["map"] < mini["tasks"][task]["map"] < 100
    curve = json.loads((tmp_path / "curve.json").read_text())
    assert [c["rows"] for c in curve] == sorted(c["rows"] for c in curve)
    assert curve[0]["i2i"] > curve[-1]["i2i"]  # more distractors, lower mAP
    # the demo's files are the official ones: the evaluation read them through the real loader
    assert len((tmp_path / "image_ids" / "positive_ids.txt").read_text().splitlines()) == 4715
    # a second run reuses the data
    assert main(["demo", "--out", str(tmp_path), "--distractors", "30000"]) == 0
