"""The demo's "model": a handcrafted global image descriptor in numpy, and a text tower in its space.

No network, no torch, no labels. The raw descriptor (RAW_DIM = 1,092 values) joins three classic parts:
- colour histograms: each pixel softly assigned to 28 colour bins (12 hues x dark/bright for
  coloured pixels, 4 grey levels for the others, so a lighting change moves little; pixels are
  looked up in a table of 15-bit colours), pooled over the whole image and its 2x2 quadrants;
- a colour correlogram (Huang et al., 1997): how often colour bin a lies 2 or 4 pixels right of or
  below colour bin b (same-colour pairs weigh 0.1: flat areas would drown the rest). It sees "red
  next to blue" wherever the object is, which is what survives clutter and small scales;
- gradient orientation histograms (8 unsigned orientations, HOG-like) over 1x1, 2x2 and 4x4 cells:
  the pattern's direction and the outline.
Each part is square-rooted (Hellinger kernel) and L2-normalised, and the parts are weighted and
joined. The only learned step is PCA whitening to DIM dimensions, fitted without labels on the
distractor images (DemoModel.fit), as global descriptors usually are; the output is L2-normalised.
Of the three parts the correlogram carries most of the retrieval, the gradients the least.

The text tower reads the words of a description (colour, shape and pattern names, see draw.py),
draws the object those words describe (palette colours, a middle pattern frequency, upright, on a
clean background) and describes that drawing with the image descriptor: text and images share one
space because the text is turned into a picture. Words it does not know are ignored; missing
attributes take neutral defaults (a plain grey disc).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from . import draw

NAME = "demo-handcrafted"
DIM = 512
_HUES, _GREYS = 12, 4
_BINS = 2 * _HUES + _GREYS
_OFFSETS = (2, 4)  # correlogram distances, pixels
_SAME = 0.1  # weight of same-colour pairs in the correlogram: flat backgrounds would drown the rest
_WEIGHTS = {"hist": 0.8, "corr": 1.0, "hog": 0.7}
RAW_DIM = 5 * _BINS + _BINS * _BINS + 21 * 8


def _cells(n: int, h: int, w: int, grid: int) -> np.ndarray:
    """(N, H, W) index of each pixel's cell in an image-major grid x grid layout."""
    row = (np.arange(h) * grid // h)[:, None]
    col = (np.arange(w) * grid // w)[None, :]
    return (np.arange(n)[:, None, None] * grid + row) * grid + col


def _binned(cells: np.ndarray, bins: np.ndarray, weights: np.ndarray, n_cells: int, n_bins: int) -> np.ndarray:
    """Sums of `weights` per (cell, bin): (n_cells, n_bins)."""
    flat = (cells * n_bins + bins).ravel()
    return np.bincount(flat, weights=weights.ravel(), minlength=n_cells * n_bins).reshape(n_cells, n_bins)


def _colour_parts(rgb: np.ndarray):
    """Soft colour-bin assignment of every pixel of (..., 3) floats in [0, 1], as (bin, weight)
    pairs (two hues x two brightness levels, two grey levels), plus its hard bin (the largest)."""
    mx, mn = rgb.max(-1), rgb.min(-1)
    chroma = mx - mn
    sat = chroma / np.maximum(mx, 1e-6)
    coloured = np.clip((sat - 0.2) / 0.25, 0, 1) * np.clip((mx - 0.12) / 0.15, 0, 1)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    c = np.maximum(chroma, 1e-6)
    hue = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4)) / 6  # [0, 1)
    h = hue * _HUES
    lo = np.floor(h).astype(np.int64) % _HUES
    frac = h - np.floor(h)
    bright = np.clip((mx - 0.45) / 0.3, 0, 1)
    g_pos = np.clip(mx, 0, 1) * (_GREYS - 1)
    g_lo = np.minimum(np.floor(g_pos).astype(np.int64), _GREYS - 2)
    g_frac = g_pos - g_lo
    soft = []
    for hue_bin, w_hue in ((lo, 1 - frac), ((lo + 1) % _HUES, frac)):
        for level, w_level in ((0, 1 - bright), (1, bright)):
            soft.append((level * _HUES + hue_bin, coloured * w_hue * w_level))
    soft.append((2 * _HUES + g_lo, (1 - coloured) * (1 - g_frac)))
    soft.append((2 * _HUES + g_lo + 1, (1 - coloured) * g_frac))
    hard_hue = (bright >= 0.5) * _HUES + np.rint(h).astype(np.int64) % _HUES
    hard = np.where(coloured >= 0.5, hard_hue, 2 * _HUES + np.rint(g_pos).astype(np.int64))
    return soft, hard


@lru_cache(maxsize=1)
def _colour_table() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The colour bins of every 15-bit colour (5 bits a channel): pixels are looked up, not computed."""
    levels = (np.arange(32, dtype=np.float32) + 0.5) / 32
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    soft, hard = _colour_parts(grid)
    bins = np.stack([b for b, _ in soft], -1).astype(np.int32)
    weights = np.stack([w for _, w in soft], -1).astype(np.float32)
    return bins, weights, hard.astype(np.int32)


def _hellinger(blocks: np.ndarray) -> np.ndarray:
    """Each block (last axis) L1-normalised, square-rooted, then the whole row L2-normalised."""
    blocks = blocks / np.maximum(blocks.sum(-1, keepdims=True), 1e-9)
    flat = np.sqrt(blocks).reshape(len(blocks), -1)
    return flat / np.maximum(np.linalg.norm(flat, axis=1, keepdims=True), 1e-9)


def describe_raw(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 images of one size -> (N, RAW_DIM) float32 descriptors, before whitening."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected (N, H, W, 3) images, got shape {images.shape}")
    n, h, w, _ = images.shape

    bins, weights, hard = _colour_table()
    colour = (
        ((images[..., 0] >> 3).astype(np.int32) << 10)
        | ((images[..., 1] >> 3).astype(np.int32) << 5)
        | (images[..., 2] >> 3)
    )
    labels = hard[colour]
    cells = _cells(n, h, w, 2)[..., None]
    quads = _binned(cells, bins[colour], weights[colour], n * 4, _BINS).reshape(n, 4, _BINS)
    hist = np.concatenate([quads.sum(1, keepdims=True), quads], axis=1)

    pairs = []
    for d in _OFFSETS:
        pairs.append((labels[:, :, :-d] * _BINS + labels[:, :, d:]).reshape(n, -1))
        pairs.append((labels[:, :-d, :] * _BINS + labels[:, d:, :]).reshape(n, -1))
    codes = np.concatenate(pairs, axis=1) + (np.arange(n) * _BINS * _BINS)[:, None]
    corr = np.bincount(codes.ravel(), minlength=n * _BINS * _BINS).reshape(n, _BINS, _BINS).astype(np.float32)
    corr = corr + corr.transpose(0, 2, 1)
    corr[:, np.arange(_BINS), np.arange(_BINS)] *= _SAME / 2
    corr = corr.reshape(n, 1, -1)  # which side a colour is on does not matter

    lum = images @ np.array([0.299, 0.587, 0.114], np.float32) / 255
    gx = np.zeros_like(lum)
    gy = np.zeros_like(lum)
    gx[:, :, 1:-1] = lum[:, :, 2:] - lum[:, :, :-2]
    gy[:, 1:-1, :] = lum[:, 2:, :] - lum[:, :-2, :]
    mag = np.hypot(gx, gy)
    o = (np.arctan2(gy, gx) % np.pi) / np.pi * 8
    o_lo = np.floor(o).astype(np.int64) % 8
    o_frac = o - np.floor(o)
    cells = _cells(n, h, w, 4)
    fine = (
        _binned(cells, o_lo, mag * (1 - o_frac), n * 16, 8) + _binned(cells, (o_lo + 1) % 8, mag * o_frac, n * 16, 8)
    ).reshape(n, 4, 4, 8)
    quads = fine.reshape(n, 2, 2, 2, 2, 8).sum(axis=(2, 4)).reshape(n, 4, 8)
    hog = np.concatenate([fine.sum(axis=(1, 2))[:, None], quads, fine.reshape(n, 16, 8)], axis=1) + 1e-3

    raw = np.concatenate(
        [_WEIGHTS["hist"] * _hellinger(hist), _WEIGHTS["corr"] * _hellinger(corr), _WEIGHTS["hog"] * _hellinger(hog)],
        axis=1,
    )
    return raw.astype(np.float32)


# ---- text tower


def parse_description(text: str) -> tuple[str, str, str, str]:
    """(shape, colour, pattern, pattern colour) named in `text`; the first colour is the body's,
    a colour after "with" is the pattern's. Unknown words are ignored."""
    words = [w.strip(".,;:!?\"'()").lower() for w in text.split()]
    words = [
        {
            "gray": "grey",
            "circle": "disc",
            "stripe": "stripes",
            "dot": "dots",
            "check": "checks",
            "ring": "ring",
            "zigzag": "zigzags",
        }.get(w, w)
        for w in words
    ]
    after_with = words.index("with") if "with" in words else len(words)
    shape = next((w for w in words if w in draw.SHAPES), "disc")
    pattern = next((w for w in words[after_with:] if w in draw.PATTERNS), "plain")
    colour = next((w for w in words[:after_with] if w in draw.PALETTE), "grey")
    pattern_colour = next((w for w in words[after_with:] if w in draw.PALETTE), "white")
    return shape, colour, pattern, pattern_colour


def render_text(text: str, side: int = 96) -> np.ndarray:
    """The picture the text tower makes of a description (uint8, side x side)."""
    inst = draw.canonical_instance(*parse_description(text))
    img = np.full((side, side, 3), 0.92, np.float32)
    draw.draw_object(img, inst, side / 2, side / 2, side * 0.33, 0.0)
    return draw.to_uint8(img)


# ---- the model: raw descriptor + whitening


@dataclass(frozen=True)
class DemoModel:
    """The raw descriptor followed by PCA whitening (Jegou & Chum, 2012), learned without labels
    on distractor images: centre, rotate onto the DIM main axes, divide each by its spread, L2.
    Whitening turns histogram features, where every image looks alike, into ones that compare
    what sets images apart; the same map serves images and texts."""

    mean: np.ndarray  # (RAW_DIM,)
    projection: np.ndarray  # (RAW_DIM, DIM)

    @classmethod
    def fit(cls, raw: np.ndarray, dim: int = DIM) -> "DemoModel":
        if len(raw) <= dim:
            raise ValueError(f"whitening to {dim} dimensions needs more than {dim} distractor images, got {len(raw)}")
        raw = raw.astype(np.float64)
        mean = raw.mean(0)
        values, vectors = np.linalg.eigh(np.cov(raw - mean, rowvar=False))
        top = np.argsort(values)[::-1][:dim]
        # a floor on the spread: directions of almost no variance would only amplify noise
        spread = np.sqrt(np.maximum(values[top], 1e-4 * values[top[0]]))
        vectors = vectors[:, top] * np.sign(vectors[:, top].sum(0) + 1e-12)  # a fixed sign per axis
        return cls(mean.astype(np.float32), (vectors / spread).astype(np.float32))

    def whiten(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors -> whitened ones, not yet L2-normalised."""
        return (raw - self.mean) @ self.projection

    def embed(self, raw: np.ndarray) -> np.ndarray:
        return _l2(self.whiten(raw))

    def images(self, images: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 images of one size -> (N, DIM) float32, L2-normalised."""
        return self.embed(describe_raw(images))

    def texts(self, texts: list[str]) -> np.ndarray:
        """Descriptions -> (N, DIM) float32, L2-normalised, in the images' space."""
        if not texts:
            return np.zeros((0, self.projection.shape[1]), np.float32)
        return self.images(np.stack([render_text(t) for t in texts]))

    def save(self, path: str | Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, mean=self.mean, projection=self.projection)

    @classmethod
    def load(cls, path: str | Path) -> "DemoModel":
        with np.load(path) as z:
            return cls(z["mean"], z["projection"])


def _l2(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-9)).astype(np.float32)
