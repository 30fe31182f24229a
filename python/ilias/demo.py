"""A built-in, ILIAS-shaped benchmark that needs no download: the default main job.

It has the real benchmark's shape and files: 1,000 instances in a coarse/mid/fine taxonomy,
1,232 image queries, 1,000 text queries, 4,715 positives with scale and clutter values, the
official `image_ids/` files and `taxonomy.json`, a mini subset list, and distractors named like
YFCC100M webdataset samples. The vectors are synthetic embeddings (no model is run): each
instance has a centre; image queries sit close to it, positives further away the smaller and
more cluttered the object, text queries across a modality gap; distractors cluster around the
categories, so that the hard negatives resemble real ones. Retrieval is then meaningful: mAP is
clearly above zero and falls as distractors are added, as on the real benchmark.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .store import Store, StoreWriter, write_store

ADJECTIVES = ["bold", "brisk", "calm", "dapper", "eager", "fuzzy", "gentle", "humble", "jolly", "keen",
              "lucky", "mellow", "nimble", "plucky", "quirky", "rustic", "snappy", "tidy", "witty", "zippy"]
NOUNS = ["bimp", "dorble", "fizzwick", "glimmer", "hobnob", "jibber", "kerfuffle", "lollop", "mumble",
         "noodle", "pompom", "quibble", "rumpus", "snickle", "tootle", "wobble", "yodel", "zootlenibble"]
COARSE = ["art", "clothing", "electronics", "furniture", "household", "landmark", "sports", "vehicles"]

N_INSTANCES, N_IMAGE_QUERIES, N_POSITIVES = 1000, 1232, 4715


@dataclass(frozen=True)
class DemoConfig:
    distractors: int = 1_000_000
    dim: int = 256
    mini_fraction: float = 0.1
    seed: int = 0


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _split(total: int, parts: int, rng) -> np.ndarray:
    """`total` items over `parts` owners, each at least one."""
    counts = np.ones(parts, dtype=int)
    counts += np.bincount(rng.integers(0, parts, total - parts), minlength=parts)
    return counts


def build(root: str | Path, config: DemoConfig = DemoConfig(), progress=None) -> Path:
    """Writes the demo benchmark under `root` (skipped when already there with this config)."""
    root = Path(root)
    stamp = root / "demo.json"
    if stamp.exists() and json.loads(stamp.read_text()) == vars(config):
        return root
    rng = np.random.default_rng(config.seed)
    d = config.dim
    noise = lambda n, s: rng.standard_normal((n, d), dtype=np.float32) * (s / np.sqrt(d))  # noqa: E731

    # taxonomy: 8 coarse categories, 6 mid each, a fine level below
    names = [f"{ADJECTIVES[i % 20]}_{NOUNS[(i // 20) % 18]}_{i:03d}" for i in range(N_INSTANCES)]
    coarse_of = rng.integers(0, len(COARSE), N_INSTANCES)
    mid_of = rng.integers(0, 6, N_INSTANCES)
    taxonomy: dict = {}
    for i, name in enumerate(names):
        c, m = COARSE[coarse_of[i]], f"{COARSE[coarse_of[i]]}_group{mid_of[i]}"
        taxonomy.setdefault(c, {}).setdefault(m, {}).setdefault(f"{m}_kind{i % 2}", []).append(name)

    # geometry: category centres, instance centres near their category
    cat_centre = _unit(rng.standard_normal((len(COARSE) * 6, d), dtype=np.float32))
    cat_of = coarse_of * 6 + mid_of
    centre = _unit(0.55 * cat_centre[cat_of] + noise(N_INSTANCES, 1.0))
    text_gap = _unit(rng.standard_normal((1, d), dtype=np.float32))

    q_per = _split(N_IMAGE_QUERIES, N_INSTANCES, rng)
    p_per = _split(N_POSITIVES, N_INSTANCES, rng)
    q_inst = np.repeat(np.arange(N_INSTANCES), q_per)
    p_inst = np.repeat(np.arange(N_INSTANCES), p_per)
    q_ids = [f"{names[i]}/query/Q{i:03d}_{j:02d}.jpg" for i, n in enumerate(q_per) for j in range(n)]
    t_ids = [f"{names[i]}/query/T{i:03d}.txt" for i in range(N_INSTANCES)]
    p_ids = [f"{names[i]}/pos/P{i:03d}_{j:02d}.jpg" for i, n in enumerate(p_per) for j in range(n)]
    # object scale (fraction of the image) and clutter (objects around it), as in positive_ids.txt
    scale = np.clip(rng.lognormal(np.log(0.14), 0.9, N_POSITIVES), 0.005, 1.0)
    clutter = rng.poisson(30, N_POSITIVES) + rng.integers(0, 40, N_POSITIVES)
    signal = 0.45 + 0.5 * np.sqrt(scale) - 0.003 * clutter

    image_q = _unit(centre[q_inst] + noise(len(q_inst), 0.8))
    text_q = _unit(0.8 * centre + 0.5 * text_gap + noise(N_INSTANCES, 1.0))
    positives = _unit(signal[:, None] * centre[p_inst] + noise(N_POSITIVES, 1.0))

    stores = root / "stores"
    if stores.exists():  # from another configuration or an interrupted build: start afresh
        shutil.rmtree(stores)
    root.mkdir(parents=True, exist_ok=True)
    prov = {"model": "synthetic (ilias demo)", "seed": config.seed}
    write_store(stores / "image_queries", image_q, q_ids, provenance=prov)
    write_store(stores / "text_queries", text_q, t_ids, dtype="float32", provenance=prov)
    write_store(stores / "positives", positives, p_ids, provenance=prov)

    keys = []
    with StoreWriter(stores / "distractors", dim=d, shard_rows=250_000, provenance=prov, resume=False) as w:
        chunk = 100_000
        for lo in range(0, config.distractors, chunk):
            n = min(chunk, config.distractors - lo)
            around = cat_centre[rng.integers(0, len(cat_centre), n)]
            x = _unit(0.55 * around + noise(n, 1.1))
            key = [f"{rng.integers(1 << 40):010x}" for _ in range(n)]
            keys += key
            w.append(x, [f"yfcc100m_{(lo + j) // 100_000:06d}.tar/{k}" for j, k in enumerate(key)])
            if progress:
                progress.update(n)

    ids = root / "image_ids"
    ids.mkdir(exist_ok=True)
    (ids / "image_query_ids.txt").write_text("".join(f"{q},{names[i]}\n" for q, i in zip(q_ids, q_inst)))
    (ids / "text_query_ids.txt").write_text("".join(t + "\n" for t in t_ids))
    (ids / "positive_ids.txt").write_text("".join(f"{p},{s!r},{c}\n" for p, s, c in zip(p_ids, scale.tolist(), clutter.tolist())))
    mini = rng.choice(len(keys), int(config.mini_fraction * len(keys)), replace=False)
    (ids / "mini_ilias_yfcc100m_ids.txt").write_text("".join(keys[i] + "\n" for i in sorted(mini)))
    (root / "taxonomy.json").write_text(json.dumps(taxonomy, indent=1))
    stamp.write_text(json.dumps(vars(config)))
    return root


def run(root: str | Path, config: DemoConfig = DemoConfig(), threads: int = 0, say=print) -> dict:
    """Builds (once) and runs the demo: one search pass answering several database sizes
    (tiers: positives plus growing prefixes of the distractors, the mini subset, everything),
    evaluation of each, reports for mini and full, and the mAP-versus-distractors curve."""
    from .evaluate import evaluate, load_ground_truth, read_id_list
    from .progress import Progress
    from .report import build_report, write_html, write_json, write_markdown
    from .search import Tier, mini_ilias_keep, search_tiers

    root = Path(root)
    t0 = time.monotonic()
    with Progress("demo data", total=config.distractors, unit="distractors") as bar:
        build(root, config, progress=bar)
    stores = root / "stores"
    queries = [Store.open(stores / "image_queries"), Store.open(stores / "text_queries")]
    db = [Store.open(stores / "positives"), Store.open(stores / "distractors")]
    gt = load_ground_truth(root)
    keys = read_id_list(root / "image_ids" / "mini_ilias_yfcc100m_ids.txt")
    n_pos = db[0].count
    tiers = [Tier(f"+{n:,}", n_pos + n, setting="") for n in (1_000, 10_000, 100_000) if n < config.distractors]
    tiers += [Tier("mini", None, mini_ilias_keep(db, keys), setting="mini"), Tier("full")]
    n_queries = sum(q.count for q in queries)
    say(f"searching {n_queries:,} queries against {len(tiers)} database sizes in one pass over {n_pos + config.distractors:,} vectors")
    found = search_tiers(queries, db, tiers, k=1000, threads=threads, progress=True)
    curve, reports = [], {}
    for name, res in found.items():
        ev = evaluate(res, gt, 1000, threads=threads)
        config_used = {"model": "synthetic embeddings (ilias demo)", "demo": vars(config), "tier": name}
        report = build_report(ev, setting=None, config=config_used | {"rows": res.info["tier_rows"]})
        curve.append({"name": name, "rows": res.info["tier_rows"], **{t: r["map"] for t, r in report["tasks"].items()}})
        if name in ("mini", "full"):
            res.save(root / f"results_{name}.npz")
            write_json(report, root / f"report_{name}.json")
            write_markdown(report, root / f"report_{name}.md")
            reports[name] = report
    curve.sort(key=lambda c: c["rows"])
    (root / "curve.json").write_text(json.dumps(curve, indent=1))
    write_html(reports["full"], root / "report.html", tiers=curve)
    return {"curve": curve, "seconds": time.monotonic() - t0}
