"""One short GPU check of extraction (about 10 minutes on one GPU): fp16 features against float32, and
whether JPEG decoding keeps the GPU busy.

    python benches/gpu_extract_check.py [--images 2000] [--workers 0,4,8,15]

1. For a ViT-B and a ViT-L of the registry (random weights, the same on both sides), the features
   extraction computes on CUDA under fp16 autocast against float32 on the CPU, per image, on images
   of several aspect ratios: the worst cosine (expected >= 0.9999).
2. The model alone on the GPU (synthetic batches at the padded size of a 4:3 image): images/s, the
   bound extraction cannot pass.
3. The whole extraction (`extract_images`: JPEG decode, RESIZE_LARGE, batching by size, fp16
   forward, store writes) over synthetic JPEG photographs with 0..N DataLoader workers: images/s.
   Where it stays well under (2), decoding is the bound; add CPU cores (workers) per GPU.
Exits 1 if CUDA is missing or a cosine is under the bound.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ilias.extract import ResizeLarge, extract_images, folder_sources, list_items, padded_size
from ilias.models import build_image_encoder, get_spec
from PIL import Image

MODELS = ["vit_base_patch16_siglip_384.v2_webli", "dinov2_vitl14"]  # a ViT-B/16 at 512, a ViT-L/14 at 724
SIZES = [(640, 480), (480, 640), (1000, 120), (500, 500), (1600, 1200)]
COSINE_BOUND = 0.9999


def photos(n: int, folder: Path) -> None:
    """n JPEGs of photograph-like content (smooth gradients plus texture), of the test sizes."""
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(xx / (37 + c * 11) + i) * np.cos(yy / (23 + c * 7)) for c in range(3)], -1)
        img = ((base * 0.4 + 0.5 + rng.normal(0, 0.08, (h, w, 3))) * 255).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=90)
        (folder / f"{i:06d}.jpg").write_bytes(buf.getvalue())


def fp16_against_float32(name: str, folder: Path) -> float:
    torch.manual_seed(0)
    enc = build_image_encoder(name, pretrained=False).eval()
    spec = get_spec(name)
    tf = ResizeLarge(spec.resolution, enc.mean, enc.std, enc.patch)
    xs = [tf(Image.open(p).convert("RGB"))[None] for p in sorted(folder.glob("*.jpg"))[: len(SIZES)]]
    with torch.inference_mode():
        ref = [torch.nn.functional.normalize(enc(x).float(), dim=-1) for x in xs]
        enc = enc.cuda()
        with torch.autocast("cuda", dtype=torch.float16):
            got = [torch.nn.functional.normalize(enc(x.cuda()).float(), dim=-1).cpu() for x in xs]
    worst = min(float((a * b).sum()) for a, b in zip(ref, got))
    print(f"{name}: fp16 autocast on CUDA vs float32 on CPU, worst cosine over {len(xs)} images: {worst:.6f}")
    return worst


def model_rate(name: str, batch: int = 64, seconds: float = 10.0) -> float:
    torch.manual_seed(0)
    enc = build_image_encoder(name, pretrained=False).cuda().eval()
    spec = get_spec(name)
    w, h = padded_size(640, 480, spec.resolution, spec.patch)
    x = torch.randn(batch, 3, h, w, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        enc(x)
        torch.cuda.synchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            enc(x)
            n += batch
        torch.cuda.synchronize()
    rate = n / (time.perf_counter() - t0)
    print(f"{name}: model alone on the GPU, fp16, {w}x{h}, batch {batch}: {rate:.0f} images/s")
    return rate


def pipeline_rate(name: str, folder: Path, workers: int, out: Path) -> float:
    torch.manual_seed(0)
    enc = build_image_encoder(name, pretrained=False)
    items = list_items(folder_sources(folder))
    t0 = time.perf_counter()
    extract_images(items, enc, out / f"{name}-{workers}", device="cuda", workers=workers, batch_size=64,
                   progress=False)
    rate = len(items) / (time.perf_counter() - t0)
    print(f"{name}: whole extraction, {workers} DataLoader workers: {rate:.0f} images/s")
    return rate


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--workers", default="0,4,8,15")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU", file=sys.stderr)
        return 1
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {torch.multiprocessing.cpu_count()} CPUs")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        folder, out = Path(tmp) / "jpegs", Path(tmp) / "stores"
        folder.mkdir()
        photos(args.images, folder)
        for name in MODELS:
            ok &= fp16_against_float32(name, folder) >= COSINE_BOUND
            model_rate(name)
            for w in (int(x) for x in args.workers.split(",")):
                pipeline_rate(name, folder, w, out)
    print("cosine bound", "met" if ok else f"NOT met (< {COSINE_BOUND})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
