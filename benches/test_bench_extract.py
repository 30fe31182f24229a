"""Extraction throughput on CPU (bench_extract.py as pytest-benchmark cases): decode + RESIZE_LARGE
of JPEG photographs on one core, and the forward pass of small random-weight models."""

from __future__ import annotations

import itertools

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
pytest.importorskip("skimage")
pytest.importorskip("PIL")
import bench_extract as bx  # noqa: E402  (imports torch)
from common import run_case  # noqa: E402

RESOLUTION = 384
TITLE = "extraction on CPU (bench_extract.py)"
COLUMNS = ["case", "images/s"]


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a case that sets it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("side", [500, 1500])
def test_decode(benchmark, recorder, torch_threads, side):
    torch_threads(1)
    tf = bx.transform(RESOLUTION)
    images = itertools.cycle(bx.jpegs(side))
    out = benchmark(lambda: bx.decode(tf, next(images)))
    assert out.shape[0] == 3 and max(out.shape[1:]) == RESOLUTION
    if benchmark.stats:
        rate = 1 / benchmark.stats.stats.median
        benchmark.extra_info.update(images_per_s=rate, side=side, resolution=RESOLUTION, threads=1)
        recorder.add_row(TITLE, COLUMNS, {"case": f"decode+resize_large {side}px JPEG -> R={RESOLUTION}, 1 core",
                                          "images/s": f"{rate:.0f}"})


@pytest.mark.parametrize("arch, patch", [("vit_tiny_patch16_224", 16), ("resnet18", None)])
@pytest.mark.parametrize("threads", ["1", "all"])
def test_forward(benchmark, recorder, torch_threads, size, arch, patch, threads):
    n = 1 if threads == "1" else max(1, torch.multiprocessing.cpu_count())
    torch_threads(n)
    enc = bx.encoder(arch, RESOLUTION, patch)
    x, (w, h) = bx.batch_of(RESOLUTION, patch, size.forward_batch)
    with torch.inference_mode():
        enc(x)  # warm-up
        t, out = run_case(benchmark, lambda: enc(x), 3)
    assert out.shape[0] == size.forward_batch and torch.isfinite(out).all()
    rate = size.forward_batch / t
    benchmark.extra_info.update(images_per_s=rate, arch=arch, width=w, height=h, batch=size.forward_batch, threads=n)
    recorder.add_row(TITLE, COLUMNS, {"case": f"forward {arch} float32 cpu {w}x{h}, {n} thread(s)",
                                      "images/s": f"{rate:.1f}"})
