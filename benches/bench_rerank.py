"""Re-ranking costs on this machine, and what they make of a full ILIAS re-ranking.

    python benches/bench_rerank.py [--seconds 6] [--imsize 768]

- AMES pairs/s (random weights; the published shapes: 600 query and 50 database tokens, width
  128, 5 layers), binary and full precision, ours (attention computed only where the masks leave
  it open) against the published way (one masked attention over the whole sequence per layer,
  nn.MultiheadAttention with the masks), same pairs, same run; their logits are checked equal first.
- Local-descriptor extraction images/s: DINOv2 ViT-B/14 (registers) + the AMES detector at
  --imsize on a 4:3 photograph-sized input, and the weight-free SIFT describer on a 500 px image.
- The weight-free verifier's pairs/s (SIFT + RANSAC) on descriptors of real-sized keypoint sets.
- Store bytes per image of each variant (measured on disk), and the extrapolated cost of
  re-ranking the top 100 of ILIAS's 1,232 image queries (text queries have no image), and of
  2,232 lists if every query were re-ranked.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from ilias.rerank.ames import AMES
from ilias.rerank.locals_store import LocalsWriter
from ilias.rerank.workflow import _randomize

F = torch.nn.functional
IMAGE_QUERIES, ALL_QUERIES, TOP = 1232, 2232, 100


def ames_inputs(variant: str, pairs: int, q_tokens: int = 600, d_tokens: int = 50, seed: int = 0):
    """Random descriptors as the stores give them: +-1 bits (binary) or unit float vectors."""
    rng = np.random.default_rng(seed)
    nq, nd = max(1, pairs // 100), min(pairs, 100)
    dim = 128 if variant == "binary" else 768

    def make(n, t):
        x = rng.standard_normal((n, t, dim)).astype(np.float32)
        x = np.where(x >= 0, 1.0, -1.0).astype(np.float32) if variant == "binary" else x / np.linalg.norm(x, axis=-1, keepdims=True)
        mask = np.zeros((n, t), bool)
        mask[:, int(t * 0.9):] = True  # a tenth padding, as images with few patches have
        return x, mask

    (qx, qm), (dx, dm) = make(nq, q_tokens), make(nd, d_tokens)
    grid = np.stack(np.meshgrid(np.arange(nq), np.arange(nd), indexing="ij"), -1).reshape(-1, 2)[:pairs]
    return qx, qm, dx, dm, grid


def dense_logits(model: AMES, qx, qm, dx, dm, pairs, batch_size: int = 64) -> np.ndarray:
    """The published way: per layer, one attention over [token, query, database] with masks."""
    with torch.no_grad():
        q = model.remap(torch.from_numpy(qx), torch.from_numpy(qm), "query")
        d = model.remap(torch.from_numpy(dx), torch.from_numpy(dm), "db")
        qm_t, dm_t = torch.from_numpy(qm), torch.from_numpy(dm)
        nq, nd = q.shape[1], d.shape[1]
        n = 1 + nq + nd
        side = torch.cat([torch.tensor([0]), torch.ones(nq, dtype=torch.long), 2 * torch.ones(nd, dtype=torch.long)])
        same = side[:, None] == side[None, :]
        token = (side[:, None] == 0) | (side[None, :] == 0)
        self_block, cross_block = ~(same | token), ~(~same | token)  # True: not attended
        out = []
        for lo in range(0, len(pairs), batch_size):
            p = torch.from_numpy(pairs[lo:lo + batch_size])
            b = len(p)
            x = torch.cat([model.mtc_token.expand(b, 1, -1), q[p[:, 0]], d[p[:, 1]]], 1)
            pad = torch.cat([torch.zeros(b, 1, dtype=torch.bool), qm_t[p[:, 0]], dm_t[p[:, 1]]], 1)
            heads = model.decoder.layers[0].self_attn.num_heads
            # (B * heads, n, n), True where a token may not look: its block, or a padded key
            ms, mc = ((blk[None].expand(b, n, n) | pad[:, None, :]).repeat_interleave(heads, 0)
                      for blk in (self_block, cross_block))
            for layer in model.decoder.layers:
                x = layer.norm1(x + layer.self_attn(x, x, x, attn_mask=ms, need_weights=False)[0])
                x = layer.norm2(x + layer.cross_attn(x, x, x, attn_mask=mc, need_weights=False)[0])
                x = layer.norm3(x + layer.linear2(F.relu(layer.linear1(x))))
            out.append(model.classifier(x[:, 0]).squeeze(-1))
        return torch.cat(out).numpy()


def rate(fn, seconds: float, units: int) -> float:
    fn()  # warm-up
    done, t0 = 0, time.perf_counter()
    while True:
        fn()
        done += units
        if time.perf_counter() - t0 >= seconds:
            return done / (time.perf_counter() - t0)


def ames_rates(variant: str, pairs: int, seconds: float) -> tuple[float, float, float]:
    """(ours pairs/s, published-way pairs/s, max |logit difference|)."""
    model = AMES(variant)
    _randomize(model)
    qx, qm, dx, dm, grid = ames_inputs(variant, pairs)
    ours = model.score(qx, qm, dx, dm, pairs=grid, batch_size=64)
    ref = dense_logits(model, qx, qm, dx, dm, grid)
    diff = float(np.abs(ours - ref).max())
    a = rate(lambda: model.score(qx, qm, dx, dm, pairs=grid, batch_size=64), seconds, len(grid))
    b = rate(lambda: dense_logits(model, qx, qm, dx, dm, grid), seconds, len(grid))
    return a, b, diff


def photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth, textured RGB image of a photograph's size (what the describers' cost depends on)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    import cv2

    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)


def dino_rate(imsize: int, seconds: float) -> float:
    from ilias.rerank.local_features import DinoLocals

    d = DinoLocals(imsize=imsize, device="cpu", random_init=True)
    img = photo(768, 1024)
    return rate(lambda: d.describe(d.prepare(img), 700), seconds, 1)


def sift_rates(seconds: float) -> tuple[float, float, int]:
    """(SIFT describe images/s on a 500x375 image, verify pairs/s, real keypoints per image)."""
    from ilias.rerank import sift

    a, b = photo(375, 500, 1), photo(375, 500, 2)
    describe = rate(lambda: sift.describe(a, sift.TOKENS), seconds, 1)
    qm, qd = sift.describe(a, sift.TOKENS)
    dm, dd = sift.describe(b, sift.TOKENS)
    metas, descs = np.stack([qm, dm]), np.stack([qd, dd])
    pairs = np.array([[0, 1]] * 50)
    verify = rate(lambda: sift.verify_pairs(metas, descs, metas, descs, pairs), seconds, len(pairs))
    return describe, verify, int((qm[:, 3] == 0).sum())


def store_bytes_per_image(tokens: int, variant: str, images: int = 8) -> float:
    """Bytes on disk per image of a locals store (768-d descriptors, or 128 ITQ bits)."""
    rng = np.random.default_rng(0)
    meta = np.zeros((images, tokens, 5), np.float32)
    desc = rng.standard_normal((images, tokens, 768)).astype(np.float32)
    proj = np.linalg.qr(rng.standard_normal((768, 128)))[0].astype(np.float32) if variant == "binary" else None
    with tempfile.TemporaryDirectory() as tmp:
        with LocalsWriter(Path(tmp) / "s", "bench", tokens, 128 if proj is not None else 768, variant, projection=proj) as w:
            w.append(meta, desc, [f"i{i}" for i in range(images)])
        shards = Path(tmp) / "s" / "shards"
        return sum(f.stat().st_size for f in shards.iterdir()) / images


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=6)
    p.add_argument("--imsize", type=int, default=768)
    p.add_argument("--pairs", type=int, default=256)
    args = p.parse_args()
    threads = torch.get_num_threads()
    print(f"torch threads: {threads}, cpu: {os.cpu_count()} cores")
    results = {}
    for variant in ("binary", "full"):
        ours, ref, diff = ames_rates(variant, args.pairs, args.seconds)
        results[variant] = ours
        print(f"AMES {variant:6s} 600+50 tokens, cpu float32: ours {ours:7.1f} pairs/s, published masked attention "
              f"{ref:7.1f} pairs/s, ratio {ours / ref:.2f}x (max |logit diff| {diff:.1e})")
    dino = dino_rate(args.imsize, args.seconds)
    print(f"locals extraction DINOv2 ViT-B/14 reg + AMES detector, longer side {args.imsize}, cpu: {dino:.2f} images/s")
    describe, verify, kept = sift_rates(args.seconds)
    print(f"SIFT describer 500x375 ({kept} keypoints kept): {describe:.1f} images/s on 1 thread; verifier {verify:.0f} pairs/s")
    print("\nlocals store bytes per image (on disk):")
    for tokens, variant in ((700, "float16"), (700, "binary"), (100, "float16"), (100, "binary")):
        print(f"  {tokens:4d} tokens {variant:8s}: {store_bytes_per_image(tokens, variant) / 1024:8.1f} KiB")
    print(f"\nre-ranking the top {TOP} of ILIAS's lists on this machine (one process, {threads} threads):")
    for n in (IMAGE_QUERIES, ALL_QUERIES):
        pairs = n * TOP
        line = ", ".join(f"AMES {v} {pairs / r / 60:.1f} min" for v, r in results.items())
        print(f"  {n:,} queries x {TOP} = {pairs:,} pairs: {line}; SIFT verifier {pairs / verify / 60:.1f} min")
    images = IMAGE_QUERIES + IMAGE_QUERIES * TOP
    print(f"  describing at most {images:,} images (queries + distinct shortlisted ones): "
          f"DINOv2 {images / dino / 3600:.1f} h on this CPU; SIFT {images / describe / 60:.0f} min on one thread")


if __name__ == "__main__":
    main()
