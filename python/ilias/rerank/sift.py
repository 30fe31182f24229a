"""A weight-free re-ranker: OpenCV SIFT keypoints, opponent-colour descriptors, RANSAC verification.

For the built-in demo and for users without AMES checkpoints. Each image is described once into
a locals store (`describe`, `NAME` as the store's model, `dim()` its width); a (query, database
image) pair is then scored by geometric verification (`verify`, `verify_pairs`): the number of
matches a single similarity transform (rotation, uniform scale, translation) explains. `fuse.py`
turns that raw count s into `sigmoid(gamma * s)`.

Descriptors. Grey-level SIFT tells instances apart poorly where they share shapes and patterns
and differ in colour, as the demo's instances do (a prototype on the demo: AUC about 0.67 grey,
0.79 opponent-colour, for a query's positives against other instances' ones). So each keypoint,
found on the grey image, is also described on the two opponent-colour channels
O1 ~ R - G and O2 ~ R + G - 2B; the three 128-d SIFT blocks are each L2-normalised,
concatenated and normalised again (384-d), so that shape and colour weigh alike. The values
are rounded to float16 before they are returned: what the store keeps is then exactly what was
described, and a score from the store equals a score from memory (the norm is 1 within float16
rounding, about 1e-3).

Coordinates (our own convention, not AMES's fractions of width and height): x and y are in units
of the image's larger side L, in continuous pixel coordinates (the image spans [0, W/L] x
[0, H/L]), the image as given, before any resizing; `scale` is the keypoint's diameter over L;
`weight` is its detector response; `mask` 1 marks padding rows (all zero otherwise). Keeping one
unit for both axes keeps the geometry isotropic, so a similarity fits without knowing the
image's size, and the store needs no extra field; the RANSAC threshold is a fraction of the
database image's larger side.

Resizing. SIFT finds few stable keypoints in images a hundred pixels wide (the demo's), so the
image is enlarged by `upscale` (bicubic) before detection, but never beyond `max_side` pixels on
its larger side; an image larger than that is shrunk to it (INTER_AREA), which also bounds the
cost of photos of several megapixels.

Matching. Mutual nearest neighbours (cosine) among the real tokens of the two images that pass
Lowe's ratio test, then `cv2.estimateAffinePartial2D` with RANSAC. The matches are put in a
canonical order (by their coordinates) before RANSAC, and OpenCV's RANSAC seeds its own
generator on every call, so the score depends neither on the order of either image's tokens nor
on earlier calls. A 2-point similarity always explains the 2 matches it was drawn from, so the
score is the number of inliers beyond those 2 (0 with fewer than 3 matches): 0 means no
geometric evidence at all.
"""

from __future__ import annotations

import numpy as np

from .._extras import require

cv2 = require("cv2", "the SIFT verifier", "sift", "OpenCV (opencv-python-headless)")

NAME = "sift-opencv"
SIFT_DIM = 128
CHANNELS = 3  # grey, O1, O2
# the demo's images are about 100 px; 2x (SIFT doubles once more inside) is within 0.01 AUC of
# 3x and 4x on the demo's tuning half, at a third of the cost (about 25 ms per 128 px image)
UPSCALE = 2.0
# bounds the work per image: large photos are shrunk to this (about 0.1 s of SIFT at 512 px)
MAX_SIDE = 512
# loose: the demo's instances are small and their patterns repeat, so a strict test keeps too
# few true matches (0.8: AUC 0.75, 0.9: 0.81, 0.95: 0.82); RANSAC rejects the extra false ones
RATIO = 0.95
# 1.2% of the larger side (1.5 px of a 128 px image): wider thresholds gained nothing, and let
# more unrelated pairs score above 0
THRESHOLD = 0.012
# a similarity has 2 degrees of freedom per point pair: 2 matches always fit
MINIMAL = 2
# keypoints kept per image: the demo's images give 130-170, a 512-px photo a few hundred strong ones
TOKENS = 300
# fusion weights, chosen before any measurement and not tuned on the demo's queries: the global and
# the local term weigh alike; gamma = 0.5 puts 4 inliers beyond chance at sigmoid 0.88 (0: 0.5)
LAMBDA, GAMMA = 0.5, 0.5
# what `describe` was run with (a store resumed with other settings would mix two descriptions)
SETTINGS = {"upscale": UPSCALE, "max_side": MAX_SIDE, "descriptor": "opponent-sift", "float16": True}
_META = 5
_X, _Y, _SCALE, _MASK, _WEIGHT = range(_META)


def dim() -> int:
    """The width of the descriptors `describe` gives (and a locals store of them holds)."""
    return CHANNELS * SIFT_DIM


def _resized(image_rgb: np.ndarray, upscale: float, max_side: int) -> np.ndarray:
    h, w = image_rgb.shape[:2]
    f = min(upscale, max_side / max(h, w))
    size = (max(1, round(w * f)), max(1, round(h * f)))
    if size == (w, h):
        return image_rgb
    return cv2.resize(image_rgb, size, interpolation=cv2.INTER_CUBIC if f > 1 else cv2.INTER_AREA)


def _channels(rgb: np.ndarray) -> list[np.ndarray]:
    """Grey and the two opponent channels, uint8 (what SIFT reads), each spanning 0..255 exactly."""
    c = rgb.astype(np.float32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    # (R - G) / 2 and (R + G - 2B) / 4 span [-127.5, 127.5]: a plain shift, no clipping (the
    # constant factors do not matter, each descriptor block is normalised)
    o1 = np.rint((r - g) / 2 + 127.5).astype(np.uint8)
    o2 = np.rint((r + g - 2 * b) / 4 + 127.5).astype(np.uint8)
    return [grey, o1, o2]


def _unit(x: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(n, 1e-12)


def describe(image_rgb: np.ndarray, tokens: int, *, upscale: float = UPSCALE,
             max_side: int = MAX_SIDE) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 RGB -> (meta float32 (tokens, 5), descriptors float32 (tokens, dim())).

    The `tokens` keypoints of strongest response, strongest first (fewer: the rest padding,
    mask 1, zero elsewhere). meta columns x, y, scale, mask, weight: x, y and scale in units of
    the image's larger side (see the module's docstring), weight the detector response.
    Descriptors unit-norm, float16-exact. A uniform image gives all padding."""
    img = np.asarray(image_rgb)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or 0 in img.shape:
        raise ValueError(f"image: expected (H, W, 3) uint8 RGB, got {img.dtype} {img.shape}")
    if tokens < 1:
        raise ValueError(f"tokens: must be at least 1, got {tokens}")
    h, w = img.shape[:2]
    big = _resized(np.ascontiguousarray(img), upscale, max_side)
    fx, fy = big.shape[1] / w, big.shape[0] / h
    grey, *opponent = _channels(big)
    sift = cv2.SIFT_create(nfeatures=tokens)
    keypoints, grey_desc = sift.detectAndCompute(grey, None)
    meta = np.zeros((tokens, _META), np.float32)
    meta[:, _MASK] = 1
    desc = np.zeros((tokens, dim()), np.float32)
    if not keypoints:
        return meta, desc
    # strongest first; a stable sort so that equal responses keep OpenCV's order
    order = np.argsort([-k.response for k in keypoints], kind="stable")[:tokens]
    keypoints = [keypoints[i] for i in order]
    blocks = [grey_desc[order]]
    for channel in opponent:
        # the same keypoints (position, size, orientation) described on a colour channel
        kept, d = sift.compute(channel, keypoints)
        if d is None or len(kept) != len(keypoints):  # not seen with OpenCV's SIFT; refuse to misalign rows
            raise RuntimeError("OpenCV SIFT dropped provided keypoints while describing a colour channel")
        blocks.append(d)
    full = _unit(np.concatenate([_unit(b.astype(np.float32)) for b in blocks], axis=1))
    n = len(keypoints)
    side = max(h, w)
    pts = np.array([k.pt for k in keypoints], np.float64)
    # OpenCV's keypoints are in pixel-centre coordinates of the resized image: +0.5 gives the
    # continuous coordinate, which the resize maps back by its factor on each axis
    meta[:n, _X] = (pts[:, 0] + 0.5) / fx / side
    meta[:n, _Y] = (pts[:, 1] + 0.5) / fy / side
    meta[:n, _SCALE] = np.array([k.size for k in keypoints]) / np.sqrt(fx * fy) / side
    meta[:n, _MASK] = 0
    meta[:n, _WEIGHT] = [k.response for k in keypoints]
    desc[:n] = full.astype(np.float16).astype(np.float32)
    return meta, desc


def _real(meta: np.ndarray, desc: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y float32 (n, 2), descriptors float32 (n, D)) of an image's unmasked tokens."""
    meta, desc = np.asarray(meta), np.asarray(desc)
    if meta.ndim != 2 or meta.shape[1] != _META or desc.ndim != 2 or len(desc) != len(meta):
        raise ValueError(f"{what}: expected meta (N, 5) and descriptors (N, D), got {meta.shape} and {desc.shape}")
    keep = meta[:, _MASK] == 0
    return np.ascontiguousarray(meta[keep, :2], np.float32), np.ascontiguousarray(desc[keep], np.float32)


def _matches(qd: np.ndarray, dd: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(query rows, database rows) of the mutual nearest neighbours passing the ratio test."""
    sim = qd @ dd.T
    best = np.argmax(sim, axis=1)
    rows = np.arange(len(qd))
    mutual = np.argmax(sim, axis=0)[best] == rows
    if dd.shape[0] >= 2:
        # Lowe's test on distances: for unit vectors |a - b|^2 = 2 - 2 cos
        top2 = -np.partition(-sim, 1, axis=1)[:, :2]
        d1 = np.sqrt(np.maximum(2 - 2 * top2[:, 0], 0))
        d2 = np.sqrt(np.maximum(2 - 2 * top2[:, 1], 0))
        mutual &= d1 < ratio * d2
    return rows[mutual], best[mutual]


def _score(qxy, qd, dxy, dd, ratio: float, threshold: float, minimal: int) -> float:
    if len(qd) < minimal + 1 or len(dd) < minimal + 1:
        return 0.0
    qi, di = _matches(qd, dd, ratio)
    if len(qi) < minimal + 1:
        return 0.0
    src, dst = qxy[qi], dxy[di]
    # a canonical order: RANSAC's draws then depend on the matches, not on the tokens' order
    order = np.lexsort((dst[:, 1], dst[:, 0], src[:, 1], src[:, 0]))
    src, dst = src[order], dst[order]
    model, inliers = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold)
    if model is None or inliers is None:
        return 0.0
    return float(max(0, int(inliers.sum()) - minimal))


def verify(q_meta: np.ndarray, q_desc: np.ndarray, d_meta: np.ndarray, d_desc: np.ndarray, *,
           ratio: float = RATIO, threshold: float = THRESHOLD, minimal: int = MINIMAL) -> float:
    """The raw score of one (query, database image) pair: meta (N, 5) and descriptors (N, D) of
    each, as `describe` gives them or a locals store holds them (float16 is widened).

    RANSAC inliers of a similarity fitted to the mutual nearest neighbours that pass the ratio
    test, less the `minimal` any 2-point fit explains; 0 with fewer than minimal + 1 matches.
    `threshold`: the reprojection error allowed, as a fraction of the database image's larger side."""
    qxy, qd = _real(q_meta, q_desc, "query")
    dxy, dd = _real(d_meta, d_desc, "database image")
    return _score(qxy, qd, dxy, dd, ratio, threshold, minimal)


def verify_pairs(q_meta: np.ndarray, q_desc: np.ndarray, d_meta: np.ndarray, d_desc: np.ndarray,
                 pairs: np.ndarray, *, ratio: float = RATIO, threshold: float = THRESHOLD,
                 minimal: int = MINIMAL) -> np.ndarray:
    """Scores of many pairs: q_meta (nq, N, 5), q_desc (nq, N, D), d_meta (nd, N', 5),
    d_desc (nd, N', D), pairs int (P, 2) of (query row, database row) -> float64 (P,), each
    equal to `verify` of that pair. Each image's real tokens are gathered once."""
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or (pairs.size and pairs.dtype.kind not in "iu"):
        raise ValueError(f"pairs: expected integers of shape (P, 2), got {pairs.dtype} {pairs.shape}")
    nq, nd = len(q_meta), len(d_meta)
    if len(q_desc) != nq or len(d_desc) != nd:
        raise ValueError(f"{nq} query meta rows and {len(q_desc)} descriptor rows; "
                         f"{nd} and {len(d_desc)} for the database")
    if pairs.size and ((pairs.min(axis=0) < 0).any() or (pairs.max(axis=0) >= (nq, nd)).any()):
        raise IndexError(f"pairs: rows out of range ({nq} queries, {nd} database images)")
    queries = {int(q): _real(q_meta[q], q_desc[q], f"query {q}") for q in np.unique(pairs[:, 0])}
    dbs = {int(d): _real(d_meta[d], d_desc[d], f"database image {d}") for d in np.unique(pairs[:, 1])}
    out = np.zeros(len(pairs), np.float64)
    for p, (q, d) in enumerate(pairs.tolist()):
        out[p] = _score(*queries[q], *dbs[d], ratio, threshold, minimal)
    return out
