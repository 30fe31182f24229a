"""Re-ranking costs (bench_rerank.py as pytest cases): AMES pairs/s, ours against the published
masked attention with equal logits, and the bytes per image of each locals-store variant."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cv2")
import bench_rerank as br  # noqa: E402  (imports torch)

TITLE = "re-ranking on CPU (bench_rerank.py)"
COLUMNS = ["case", "value"]


@pytest.mark.parametrize("variant", ["binary", "full"])
def test_ames_pairs_per_second(recorder, variant):
    ours, published, diff = br.ames_rates(variant, pairs=16, seconds=0.2)
    assert diff < 1e-4  # the two attentions give the same logits
    recorder.add_row(TITLE, COLUMNS, {"case": f"AMES {variant} 600+50 tokens, ours / published masked attention",
                                      "value": f"{ours:.1f} / {published:.1f} pairs/s"})


@pytest.mark.parametrize("tokens, variant, most", [(700, "float16", 1_100_000), (100, "binary", 4_000)])
def test_store_bytes_per_image(recorder, tokens, variant, most):
    got = br.store_bytes_per_image(tokens, variant, images=2)
    # metadata 20 bytes a token, descriptors 1,536 (float16) or 16 (bits), plus the id
    per_token = 20 + (1536 if variant == "float16" else 16)
    assert tokens * per_token <= got <= most
    recorder.add_row(TITLE, COLUMNS, {"case": f"locals store, {tokens} tokens {variant}", "value": f"{got / 1024:.1f} KiB/image"})


def test_sift_rates(recorder):
    describe, verify, kept = br.sift_rates(seconds=0.2)
    assert kept > 0 and describe > 0 and verify > 0
    recorder.add_row(TITLE, COLUMNS, {"case": "SIFT describe 500x375 / verify", "value": f"{describe:.1f} images/s / {verify:.0f} pairs/s"})
