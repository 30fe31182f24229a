"""Writes the demo benchmark's files, in the layout and formats of the real ILIAS (ILIAS_SPEC.md):

    <data>/ilias_core/<instance>/query/Qiii_jj.png (+ Qiii_jj_bbox.txt), Tiii.txt
    <data>/ilias_core/<instance>/pos/Piii_jj.png (+ Piii_jj_bbox.txt)
    <data>/image_ids/image_query_ids.txt, text_query_ids.txt, positive_ids.txt (id,scale,clutter),
                     distractor_ids.txt.gz (<tar>/<key>)
    <data>/taxonomy.json                  {coarse: {mid: {fine: [instances]}}}
    <data>/distractors/distractors_iiiii.tar   webdataset shards: <key>.png + <key>.json per sample

Images are PNG, not JPEG: the core install has no JPEG codec (see png.py). Scale is the area of
the object's box over the image's, clutter the scene's clutter value (about six times the number
of other objects drawn), both drawn so that the real group boundaries split them about evenly.
The mini-ILIAS list is written later, with the distractor store (it names sampled rows too).
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._io import atomic_write
from . import draw, png

ADJECTIVES = [
    "bold",
    "brisk",
    "calm",
    "dapper",
    "eager",
    "fuzzy",
    "gentle",
    "humble",
    "jolly",
    "keen",
    "lucky",
    "mellow",
    "nimble",
    "plucky",
    "quirky",
    "rustic",
    "snappy",
    "tidy",
    "witty",
    "zippy",
]
NOUNS = [
    "bimp",
    "dorble",
    "fizzwick",
    "glimmer",
    "hobnob",
    "jibber",
    "kerfuffle",
    "lollop",
    "mumble",
    "noodle",
    "pompom",
    "quibble",
    "rumpus",
    "snickle",
    "tootle",
    "wobble",
    "yodel",
    "zootlenibble",
]
QUERY_SIDE = 96  # image queries: square
SCENE_SIZE = (96, 128)  # positives and distractors: landscape or portrait
PER_TAR = 1000


@dataclass(frozen=True)
class Shape:
    """How big the benchmark is (the demo's defaults, in `DemoConfig`, are the real ILIAS's)."""

    instances: int
    image_queries: int
    positives: int
    distractor_images: int  # rendered into the tars


def _split(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` items over `parts` owners, each at least one."""
    if total < parts:
        raise ValueError(f"{total} items cannot give each of {parts} instances one")
    return np.ones(parts, dtype=int) + np.bincount(rng.integers(0, parts, total - parts), minlength=parts)


def scale_and_clutter(rng: np.random.Generator) -> tuple[float, int]:
    """A target scale (box area / image area) and clutter value; the medians and quartiles follow
    the group boundaries of the real ground truth (0.069 / 0.135 / 0.273 and 18 / 33 / 53)."""
    scale = float(np.clip(rng.lognormal(np.log(0.136), 1.0), 0.01, 0.85))
    clutter = int(np.clip(rng.lognormal(np.log(32), 0.8), 0, 160))
    return scale, clutter


def _scene_size(rng: np.random.Generator) -> tuple[int, int]:
    h, w = SCENE_SIZE
    return (h, w) if rng.random() < 0.7 else (w, h)


def _instances(n: int, rng: np.random.Generator) -> list[draw.Instance]:
    """n objects with distinct words (shape, colours, pattern): each text query names one object."""
    combos = [(s, c, "plain", c) for s in draw.SHAPES for c in draw.COLOURS]
    combos += [
        (s, c, p, pc)
        for s in draw.SHAPES
        for c in draw.COLOURS
        for p in draw.PATTERNS
        if p != "plain"
        for pc in draw.COLOURS
        if pc != c
    ]
    if n > len(combos):
        raise ValueError(f"at most {len(combos)} instances, got {n}")
    picked = rng.choice(len(combos), n, replace=False)
    return [draw.random_instance(rng, combos[i]) for i in picked]


def _write_image(path: Path, image: np.ndarray, box) -> None:
    path.write_bytes(png.encode(image))
    path.with_name(path.stem + "_bbox.txt").write_text("{} {} {} {}\n".format(*box))


def write_core(data: Path, shape: Shape, seed: int, progress=None) -> list[draw.Instance]:
    """The instances, their queries and positives, the id files and the taxonomy."""
    rng = np.random.default_rng(seed)
    insts = _instances(shape.instances, rng)
    names = [f"{ADJECTIVES[i % 20]}_{NOUNS[(i // 20) % 18]}_{i:03d}" for i in range(len(insts))]
    q_per = _split(shape.image_queries, len(insts), rng)
    p_per = _split(shape.positives, len(insts), rng)
    core = data / "ilias_core"
    query_ids, text_ids, positive_rows = [], [], []
    taxonomy: dict = {}
    for i, (inst, name) in enumerate(zip(insts, names)):
        folder = core / name
        (folder / "query").mkdir(parents=True, exist_ok=True)
        (folder / "pos").mkdir(exist_ok=True)
        for j in range(q_per[i]):
            image, box = draw.query_view(rng, inst, QUERY_SIDE)
            _write_image(folder / "query" / f"Q{i:03d}_{j:02d}.png", image, box)
            query_ids.append(f"{name}/query/Q{i:03d}_{j:02d}.png")
        (folder / "query" / f"T{i:03d}.txt").write_text(inst.description() + "\n")
        text_ids.append(f"{name}/query/T{i:03d}.txt")
        for j in range(p_per[i]):
            h, w = _scene_size(rng)
            box = None
            while box is None:  # an object placed wholly outside the picture: place it again
                scale, clutter = scale_and_clutter(rng)
                image, box = draw.scene_view(rng, inst, h, w, scale, clutter)
            _write_image(folder / "pos" / f"P{i:03d}_{j:02d}.png", image, box)
            positive_rows.append((f"{name}/pos/P{i:03d}_{j:02d}.png", box[2] * box[3] / (h * w), clutter))
        # categories: coarse = the shape, mid = its body colour, fine = its pattern
        coarse, mid = f"{inst.shape}s", f"{inst.colour} {inst.shape}s"
        taxonomy.setdefault(coarse, {}).setdefault(mid, {}).setdefault(f"{inst.pattern} {mid}", []).append(name)
        if progress:
            progress.update(1 + q_per[i] + p_per[i])
    ids = data / "image_ids"
    ids.mkdir(parents=True, exist_ok=True)
    atomic_write(ids / "image_query_ids.txt", "".join(f"{q},{q.split('/')[0]}\n" for q in query_ids))
    atomic_write(ids / "text_query_ids.txt", "".join(t + "\n" for t in text_ids))
    atomic_write(ids / "positive_ids.txt", "".join(f"{p},{s!r},{c}\n" for p, s, c in positive_rows))
    atomic_write(data / "taxonomy.json", json.dumps(taxonomy, indent=1))
    return insts


def distractor_image(rng: np.random.Generator) -> np.ndarray:
    """A photo that holds none of the instances: a scene of everyday clutter, sometimes with one
    prominent object of the instances' kind (the hard negatives), sometimes a product shot."""
    h, w = _scene_size(rng)
    kind = rng.random()
    scale, clutter = scale_and_clutter(rng)
    if kind < 0.1:
        image, _ = draw.scene_view(rng, draw.random_instance(rng), h, w, scale, clutter)
    elif kind < 0.15:
        image, _ = draw.query_view(rng, draw.random_instance(rng), QUERY_SIDE)
    else:
        image, _ = draw.scene_view(rng, None, h, w, scale, clutter)
    return image


def write_tars(data: Path, count: int, seed: int, progress=None) -> list[str]:
    """`count` distractor images in webdataset tars of PER_TAR samples; returns their ids."""
    rng = np.random.default_rng([seed, 1])
    folder = data / "distractors"
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for t, lo in enumerate(range(0, count, PER_TAR)):
        name = f"distractors_{t:05d}.tar"
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for _ in range(lo, min(count, lo + PER_TAR)):
                key = f"{rng.integers(1 << 40):010x}"
                image = distractor_image(rng)
                meta = json.dumps({"key": key, "height": image.shape[0], "width": image.shape[1]}).encode()
                for member, body in ((f"{key}.png", png.encode(image)), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(member)
                    info.size, info.mtime, info.mode = len(body), 0, 0o644
                    tar.addfile(info, io.BytesIO(body))
                ids.append(f"{name}/{key}")
                if progress:
                    progress.update(1)
        atomic_write(folder / name, buf.getvalue())
    with gzip.open(data / "image_ids" / "distractor_ids.txt.gz", "wt", encoding="utf-8") as f:
        f.write("".join(i + "\n" for i in ids))
    return ids
