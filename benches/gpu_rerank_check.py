"""One short GPU check of re-ranking (a few minutes on one GPU): AMES under fp16 autocast against
float32 on the CPU, AMES pairs/s, and local-descriptor extraction images/s.

    python benches/gpu_rerank_check.py [--pairs 20000] [--imsize 768]

1. AMES, binary and full precision (random weights, the same on both sides), 600 query and 50
   database tokens: the logits of 512 pairs on CUDA (fp16 autocast) against the CPU (float32):
   the worst absolute difference and the rank correlation within each query's 100 pairs.
2. AMES pairs/s on the GPU at batch sizes 256, 1024, 4096, and the cost of re-ranking the top 100
   of ILIAS's 1,232 image queries.
3. DINOv2 ViT-B/14 (registers) + AMES detector on the GPU at --imsize, one image at a time as the
   extraction runs it: images/s, and the hours for the 124,432 images that re-ranking needs at most.
Exits 1 if CUDA is missing or a difference is over the bound.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
from bench_rerank import IMAGE_QUERIES, TOP, ames_inputs, photo
from ilias.rerank.ames import AMES
from ilias.rerank.local_features import DinoLocals
from ilias.rerank.workflow import _randomize


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=20000)
    p.add_argument("--imsize", type=int, default=768)
    p.add_argument("--bound", type=float, default=0.05, help="largest |logit difference| accepted")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    print(torch.cuda.get_device_name(0))
    ok = True
    for variant in ("binary", "full"):
        cpu = AMES(variant)
        _randomize(cpu)
        gpu = AMES(variant)
        gpu.load_state_dict(cpu.state_dict())
        gpu.to("cuda")
        qx, qm, dx, dm, grid = ames_inputs(variant, 512)
        a = cpu.score(qx, qm, dx, dm, pairs=grid)
        b = gpu.score(qx, qm, dx, dm, pairs=grid)
        diff = float(np.abs(a - b).max())
        rho = min(spearman(a[grid[:, 0] == q], b[grid[:, 0] == q]) for q in np.unique(grid[:, 0]))
        ok &= diff <= args.bound
        print(f"AMES {variant}: fp16 cuda vs float32 cpu, max |logit diff| {diff:.2e}, worst per-query rank correlation {rho:.4f}")
        qx, qm, dx, dm, grid = ames_inputs(variant, args.pairs)
        for batch in (256, 1024, 4096):
            gpu.score(qx, qm, dx, dm, pairs=grid[:batch], batch_size=batch)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            gpu.score(qx, qm, dx, dm, pairs=grid, batch_size=batch)
            torch.cuda.synchronize()
            rate = len(grid) / (time.perf_counter() - t0)
            print(f"  batch {batch:5d}: {rate:10.0f} pairs/s; top {TOP} of {IMAGE_QUERIES:,} image queries: "
                  f"{IMAGE_QUERIES * TOP / rate:.1f} s")
    d = DinoLocals(imsize=args.imsize, device="cuda", random_init=True)
    img = photo(768, 1024)
    x = d.prepare(img)
    d.describe(x, 700)
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 20:
        d.describe(d.prepare(img), 700)
        n += 1
    rate = n / (time.perf_counter() - t0)
    need = IMAGE_QUERIES + IMAGE_QUERIES * TOP
    print(f"locals extraction at {args.imsize}: {rate:.1f} images/s (resize on the CPU included); "
          f"{need:,} images: {need / rate / 3600:.2f} h")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
