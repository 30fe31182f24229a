"""Re-ranking as users run it: describe what is missing, then re-rank each results file.

`RerankConfig` holds the choices (`method` "ames" or "sift", checkpoints, how deep, how many
tokens, the fusion weights); `rerank_results(cfg, results, locals_dir, source)` makes sure that the
two locals stores under `locals_dir` (`queries/`, `db/`) hold every image the results need
(describing only the missing ones when `source` can read them, else failing with the count) and
returns the re-ranked results. `ilias locals extract`, `ilias rerank` and `ilias run --rerank`
are this module with flags.

Defaults: AMES reads 600 query tokens and 50 database tokens (its published asymmetric use) of
stores that keep 700 and 100; fusion weights are AMES's published ones for the model's variant
(binary 0.35 / 0.10, full 0.55 / 0.30). The binary model's stores hold packed bits of its own ITQ
projection (16 bytes a token), the full model's float16 descriptors. The weight-free verifier
keeps SIFT's strongest keypoints on both sides; its fusion weights are in `sift.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from ..results import SearchResults
from ..store import file_tag
from .extract import extract_locals, needed
from .images import ImageSource
from .locals_store import LocalsStore

METHODS = ("ames", "sift")


@dataclass
class RerankConfig:
    method: str = "ames"
    weights: str | None = None  # the AMES checkpoint
    detector: str | None = None  # the AMES detector checkpoint (None: raw tokens weighted by their norm)
    backbone_weights: str | None = None  # a local DINOv2 checkpoint (else the pretrained weights)
    imsize: int | None = None  # AMES describer: longer side (None: local_features.DEFAULT_IMSIZE)
    top: int = 100
    query_tokens: int | None = None  # read per query (AMES 600; SIFT: all stored)
    db_tokens: int | None = None  # read per database image (AMES 50)
    lam: float | None = None
    gamma: float | None = None
    random_init: bool = False  # random AMES, backbone and detector: tests and benchmarks only
    device: str | None = None
    threads: int = 4
    chunk: int = 64
    batch_size: int = 256

    def check(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        if self.method == "ames" and self.weights is None and not self.random_init:
            raise ValueError("--method ames needs --weights AMES.pt (a published checkpoint, e.g. dinov2_ames_dist.pt)")
        if self.top < 1:
            raise ValueError(f"--top: must be at least 1, got {self.top}")
        if self.lam is not None and not 0 <= self.lam <= 1:
            raise ValueError(f"lambda (the global score's weight): between 0 and 1, got {self.lam}")
        if self.gamma is not None and not abs(self.gamma) < float("inf"):
            raise ValueError(f"gamma: a finite number, got {self.gamma}")


class Method:
    """What one method needs: a describer, the stores' token counts and variant, a scorer."""

    def __init__(self, cfg: RerankConfig):
        cfg.check()
        self.cfg = cfg
        if cfg.method == "sift":
            from . import sift
            from .extract import SiftLocals
            from .rerank import SiftScorer

            self._describer = SiftLocals(sift.TOKENS)
            self.store_tokens = (sift.TOKENS, sift.TOKENS)
            self.variant, self.projection = "float16", None
            self.scorer = SiftScorer(cfg.threads)
            self.weights = _weights(cfg, sift.LAMBDA, sift.GAMMA)
            self._scores_from = {"reads": "all"}
            return
        import torch

        from .ames import AMES, load_ames
        from .fuse import default_weights
        from .rerank import AmesScorer

        self.device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if cfg.weights is None:  # random_init (check() refused anything else)
            model = AMES("binary")
            _randomize(model)
            model.to(self.device)
        else:
            model = load_ames(cfg.weights, device=self.device)
        self.variant = "binary" if model.variant == "binary" else "float16"
        self.projection = model.projection
        q_read, d_read = cfg.query_tokens or 600, cfg.db_tokens or 50
        self.store_tokens = (max(700, q_read), max(100, d_read))
        self.scorer = AmesScorer(model, q_read, d_read, cfg.batch_size)
        self.weights = _weights(cfg, *default_weights("dinov2", self.variant))
        self._describer = None
        self._scores_from = {"model": file_tag(cfg.weights) if cfg.weights else "random-init", "reads": [q_read, d_read]}

    @property
    def describer(self):
        if self._describer is None:  # built on first use (it hashes the checkpoints it names)
            from .local_features import DEFAULT_IMSIZE, DinoLocals

            self._describer = DinoLocals(self.cfg.detector, self.cfg.backbone_weights,
                                         self.cfg.imsize or DEFAULT_IMSIZE, self.device, self.cfg.random_init)
        return self._describer

    def key(self) -> str:
        """A digest of what the re-ranked scores depend on: the model and the tokens it reads, the
        describer's settings, the depth and the fusion weights (a changed one means re-ranking again)."""
        what = {"label": self.scorer.label, **self._scores_from, "describer": self.describer.identity,
                "stores": list(self.store_tokens), "top": self.cfg.top, "weights": list(self.weights)}
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def stores(self, locals_dir: Path) -> tuple[Path, Path]:
        return locals_dir / "queries", locals_dir / "db"


def _weights(cfg: RerankConfig, lam: float, gamma: float) -> tuple[float, float]:
    """The fusion weights: the user's where given, else the method's defaults."""
    return (cfg.lam if cfg.lam is not None else lam, cfg.gamma if cfg.gamma is not None else gamma)


def _randomize(model) -> None:
    """Random weights that give spread-out logits (a zero-initialised model scores every pair alike)."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim < 2 else p.shape[-1] ** -0.5))


def ensure_locals(method: Method, results: Sequence[SearchResults], locals_dir: str | os.PathLike,
                  source: ImageSource | None, progress: bool = True) -> tuple[LocalsStore, LocalsStore]:
    """The two locals stores, holding every query and shortlisted image of `results` (the missing
    ones described from `source`; without a source, missing ones are an error)."""
    locals_dir = Path(locals_dir)
    q_ids: dict[str, None] = {}
    d_rows: dict[str, None] = {}
    for res in results:
        q, d = needed(res, method.cfg.top)
        q_ids.update(dict.fromkeys(q))
        d_rows.update(dict.fromkeys(d))
    q_path, d_path = method.stores(locals_dir)
    out = []
    for path, ids, tokens, boxes, label in ((q_path, list(q_ids), method.store_tokens[0], True, "query locals"),
                                            (d_path, list(d_rows), method.store_tokens[1], False, "database locals")):
        if source is None:
            if not (path / "manifest.json").exists():
                raise FileNotFoundError(f"{path}: no locals store; describe the images first (`ilias locals extract`, "
                                        "or give --data and --tars to describe the missing ones)")
            out.append(LocalsStore.open(path))
            continue
        out.append(extract_locals(ids, source, method.describer, path, tokens, variant=method.variant,
                                  projection=method.projection, boxes=boxes, threads=method.cfg.threads,
                                  progress=progress, label=label))
    return out[0], out[1]


def rerank_results(cfg: RerankConfig, results: Sequence[SearchResults], locals_dir: str | os.PathLike,
                   source: ImageSource | None = None, progress: bool = True, method: Method | None = None) -> list[SearchResults]:
    """Each results file re-ranked (see the module); `source` describes missing images first.
    `method`: the `Method(cfg)` a caller already built (its model loaded once)."""
    from .rerank import rerank

    method = method or Method(cfg)
    q_store, d_store = ensure_locals(method, results, locals_dir, source, progress)
    lam, gamma = method.weights
    key = method.key()
    return [replace(rerank(r, q_store, d_store, method.scorer, cfg.top, lam, gamma, cfg.chunk, progress), reranking_key=key)
            for r in results]
