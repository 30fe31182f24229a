"""CPU throughput of extraction: decode + RESIZE_LARGE per core, and a small model's forward pass.

    python benches/bench_extract.py [--resolutions 384,512,724] [--seconds 8]

Decode + resize runs in one process (one core), on JPEG photographs (scikit-image samples,
re-encoded at ~500 px like the YFCC distractors and at ~1500 px like phone photos). The forward
pass uses random weights and synthetic batches at the padded size of a 4:3 image. The same
cases run as `pytest benches/test_bench_extract.py`.
"""

import argparse
import io
import time

import torch
from ilias.extract import ResizeLarge, padded_size
from ilias.models import ModelSpec, build_image_encoder
from ilias.models.registry import HALF
from PIL import Image


def jpegs(side):
    import skimage.data as d

    out = []
    for a in (d.astronaut(), d.chelsea(), d.coffee()):
        img = Image.fromarray(a)
        s = side / max(img.size)
        img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def transform(resolution):
    return ResizeLarge(resolution, HALF[0], HALF[1], 16)


def decode(tf, data):
    """One image as extraction reads it: decode, RGB, RESIZE_LARGE and normalisation."""
    return tf(Image.open(io.BytesIO(data)).convert("RGB"))


def decode_rate(data, tf, seconds):
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for b in data:
            decode(tf, b)
            n += 1
    return n / (time.perf_counter() - t0)


def encoder(arch, res, patch):
    """A random-weight image encoder of `arch` at resolution `res`."""
    return build_image_encoder(ModelSpec(arch, "timm", arch, None, res, patch=patch, mean=HALF[0], std=HALF[1]),
                               pretrained=False)


def batch_of(res, patch, batch):
    """A synthetic batch at the padded size of a 640 x 480 image: (tensor, (w, h))."""
    w, h = padded_size(640, 480, res, patch)
    return torch.randn(batch, 3, h, w), (w, h)


def forward_rate(arch, res, patch, batch, seconds):
    enc = encoder(arch, res, patch)
    x, (w, h) = batch_of(res, patch, batch)
    with torch.inference_mode():
        enc(x)  # warm-up
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            enc(x)
            n += batch
    return n / (time.perf_counter() - t0), (w, h)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--resolutions", default="384,512,724", help="larger image sides (the paper's test resolutions)")
    p.add_argument("--seconds", type=float, default=8)
    args = p.parse_args()
    resolutions = [int(r) for r in args.resolutions.split(",")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for res in resolutions:
        tf = transform(res)
        for side in (500, 1500):
            print(f"decode+resize_large {side}px JPEG -> R={res}: "
                  f"{decode_rate(jpegs(side), tf, args.seconds):.0f} images/s per core")
    cores = max(1, torch.multiprocessing.cpu_count())
    torch.set_num_threads(cores)
    # the benchmark's backbones at their real sizes: ViT-B/16 (CLIP, SigLIP, DINO), ViT-B/14 (DINOv2), ResNet-50
    for arch, patch in (("vit_base_patch16_224", 16), ("vit_base_patch14_dinov2", 14), ("resnet50", None)):
        for res in resolutions:
            rate, (w, h) = forward_rate(arch, res, patch, 2, args.seconds)
            print(f"forward {arch} float32 cpu {w}x{h}, {cores} thread(s): {rate:.2f} images/s")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
