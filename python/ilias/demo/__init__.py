"""A built-in, ILIAS-shaped benchmark of real images that needs no download: the default main job.

`run(root)` builds once (cached under `root`) a small ILIAS with the real benchmark's files:
- 1,000 made-up object instances (draw.py: shapes, colours, patterns), 1,232 image queries (the
  object alone on a clean background) and 4,715 positives (the object in a cluttered scene, at
  scales and clutter values spread like the real ground truth), each with its bounding box; a text
  query per instance that names its colours, shape and pattern;
- `ilias_core/`, `image_ids/*.txt`, `taxonomy.json` and a mini-ILIAS key list in the official
  formats, as PNG images (dataset.py);
- webdataset tars of distractor images (scenes without any instance, some with look-alike objects);
then runs `ilias run`'s pipeline on it (`ilias.pipeline.run`) with a model that needs neither a
download nor torch: a handcrafted numpy descriptor with a text tower in its space (descriptor.py).
The distractor store holds the features of the tar images followed by rows sampled from their
distribution up to a million or more (features.py says how). One search pass answers several
database sizes (positives plus 1k, 10k, 100k distractors, a mini subset of a tenth, everything),
each evaluated with the official semantics; `report.html` shows the mAP table, the curve, the
category, scale and clutter plots and thumbnails of chosen queries with their top results.

Everything is cached: the data (`ILIAS/`, keyed by the data settings), the stores (keyed by all
settings) and the search results (keyed by the stores); a second run only evaluates and reports.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .._io import atomic_write
from .descriptor import NAME as MODEL_NAME

__all__ = ["DemoConfig", "MODEL_NAME", "build", "run"]

DATA_VERSION = 1  # bump when the generated files change
PREFIX_TIERS = (1_000, 10_000, 100_000)
RERANK_TIER = "+1k"  # positives plus the first 1,000 distractors, all images of the tars


@dataclass(frozen=True)
class DemoConfig:
    instances: int = 1000
    image_queries: int = 1232
    positives: int = 4715
    distractor_images: int = 6000  # rendered into webdataset tars
    distractors: int = 1_000_000  # rows of the distractor store (images first, then sampled rows)
    mini_fraction: float = 0.1
    seed: int = 0

    def check(self) -> None:
        if self.instances < 1 or self.image_queries < self.instances or self.positives < self.instances:
            raise ValueError("each instance needs at least one image query and one positive")
        if self.distractor_images < 1000:
            raise ValueError(f"distractor_images: at least 1000 (they teach the model), got {self.distractor_images}")
        if self.distractors < self.distractor_images:
            raise ValueError(
                f"distractors: at least the {self.distractor_images} distractor images, got {self.distractors}"
            )


def _stamp_matches(path: Path, want: dict) -> bool:
    try:
        return json.loads(path.read_text()) == want
    except (OSError, ValueError):
        return False


def build(root: str | Path, config: DemoConfig = DemoConfig(), progress: bool = True) -> Path:
    """Writes the demo benchmark's files under `root/ILIAS` (skipped when already there with
    these settings; an interrupted build starts again). Returns that folder."""
    from ..progress import Progress
    from . import dataset as files
    from .features import sampled_keys

    config.check()
    data = Path(root) / "ILIAS"
    stamp = data / "demo.json"
    want = {"version": DATA_VERSION, **asdict(config)}
    if _stamp_matches(stamp, want):
        return data
    if data.exists():
        shutil.rmtree(data)
    data.mkdir(parents=True)
    shape = files.Shape(config.instances, config.image_queries, config.positives, config.distractor_images)
    n_core = config.instances + config.image_queries + config.positives
    with Progress("demo images", total=n_core + config.distractor_images, unit="images", enabled=progress) as bar:
        files.write_core(data, shape, config.seed, bar)
        tar_ids = files.write_tars(data, config.distractor_images, config.seed, bar)
    # mini-ILIAS: a tenth of all distractors, real and sampled, as bare keys
    import numpy as np

    keys = [i.split("/", 1)[1] for i in tar_ids] + sampled_keys(config.distractors - len(tar_ids))
    rng = np.random.default_rng([config.seed, 3])
    mini = np.sort(rng.choice(len(keys), int(config.mini_fraction * len(keys)), replace=False))
    atomic_write(data / "image_ids" / "mini_ilias_yfcc100m_ids.txt", "".join(keys[i] + "\n" for i in mini))
    atomic_write(stamp, json.dumps(want))
    return data


def _features_step(data: Path, config: DemoConfig, progress: bool):
    """The pipeline's feature step for the demo model (numpy): extracts unless current."""
    from ..progress import Progress
    from .features import extract

    def step(stores: Path):
        stamp = stores / "demo.json"
        want = {"version": DATA_VERSION, "model": MODEL_NAME, **asdict(config)}
        if _stamp_matches(stamp, want):
            return {"all": "current"}
        if stores.exists():
            shutil.rmtree(stores)
        n_images = config.distractor_images + config.image_queries + config.positives
        total = n_images + config.distractors - config.distractor_images
        with Progress("demo features", total=total, unit="rows", enabled=progress) as bar:
            done = extract(data, stores, config.distractors, config.seed, bar)
        atomic_write(stamp, json.dumps(want))
        return done

    return step


def _weight_free_rerank(say, threads: int):
    """The SIFT verifier's re-ranking of the top 100, when OpenCV is installed (the `sift` extra)."""
    import importlib.util

    if importlib.util.find_spec("cv2") is None:
        say("re-ranking skipped: the weight-free verifier needs OpenCV: pip install 'ilias-core[sift]'")
        return None
    from ..rerank.workflow import RerankConfig

    return RerankConfig(method="sift", top=100, threads=threads or os.cpu_count() or 1)


def run(
    root: str | Path, config: DemoConfig = DemoConfig(), threads: int = 0, progress: bool = True, say=print
) -> dict:
    """Builds (once) and runs the demo; returns the pipeline's run record plus `seconds`."""
    from ..pipeline import RunConfig
    from ..pipeline import run as run_pipeline

    root = Path(root)
    t0 = time.monotonic()
    data = build(root, config, progress)
    rerank = _weight_free_rerank(say, threads)
    prefixes = tuple(n for n in PREFIX_TIERS if n < config.distractors)
    cfg = RunConfig(
        model=MODEL_NAME,
        data=str(data),
        out=str(root),
        tars=[str(data / "distractors")],
        threads=threads,
        prefixes=prefixes,
        published=False,  # generated data: its numbers do not compare with the paper's
        rerank=rerank,
        # the tier whose every row has an image: the sampled rows after the tar images have none
        # (with only 1,000 distractors there is no +1k prefix: everything is images then)
        rerank_tiers=(RERANK_TIER if 1_000 in prefixes else "all",),
    )
    record = run_pipeline(cfg, say=say, features=_features_step(data, config, progress))
    record["seconds"] = time.monotonic() - t0
    return record
