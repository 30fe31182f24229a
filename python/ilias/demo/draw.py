"""Procedural objects and scenes for the demo benchmark, drawn with numpy alone.

An *instance* is one made-up object: a shape (disc, star, ...), a body colour, a pattern (stripes,
dots, ...) in a second colour with its own frequency and angle, and an aspect ratio. Its colours
are jittered around named palette colours, so two instances with the same words still differ.

Views of an instance change what a camera changes: size, position, in-plane rotation, lighting
(a gain per image, a tint), and, in cluttered scenes, occlusion by other objects drawn on top.
Clutter objects are random combinations of the same vocabulary, so they look like instances
without being any of them: the hard negatives of the benchmark.

Images are float32 (H, W, 3) in [0, 1] while drawn, uint8 when done. Shapes are drawn inside the
bounding box of their rotated extent only, so a scene of a hundred small objects stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

# named colours (RGB in [0, 1]): the words of the text queries
PALETTE = {
    "red": (0.85, 0.1, 0.1),
    "orange": (0.95, 0.5, 0.05),
    "yellow": (0.95, 0.85, 0.1),
    "green": (0.15, 0.65, 0.2),
    "teal": (0.05, 0.55, 0.55),
    "blue": (0.1, 0.25, 0.85),
    "purple": (0.5, 0.15, 0.65),
    "pink": (0.95, 0.45, 0.7),
    "brown": (0.5, 0.3, 0.12),
    "black": (0.08, 0.08, 0.08),
    "white": (0.96, 0.96, 0.96),
    "grey": (0.5, 0.5, 0.5),
}
COLOURS = list(PALETTE)
SHAPES = ["disc", "square", "triangle", "diamond", "star", "cross", "ring", "hexagon"]
PATTERNS = ["plain", "stripes", "checks", "dots", "rings", "zigzags"]
# a scene of clutter value c (the ground truth's measure) shows about c / 6 other objects
CLUTTER_PER_OBJECT = 6


@dataclass(frozen=True)
class Instance:
    shape: str
    colour: str  # body colour name
    pattern: str
    pattern_colour: str
    body_rgb: tuple  # the instance's own shades of the named colours
    pattern_rgb: tuple
    frequency: float  # pattern cycles across the object
    angle: float  # pattern angle, radians
    aspect: float  # width / height

    def description(self) -> str:
        """The text query: what a person would write about the object."""
        if self.pattern == "plain":
            return f"a plain {self.colour} {self.shape}"
        return f"a {self.colour} {self.shape} with {self.pattern_colour} {self.pattern}"


def random_instance(rng: np.random.Generator, combo: tuple[str, str, str, str] | None = None) -> Instance:
    """An object with the words `combo` (shape, colour, pattern, pattern colour), or random ones."""
    if combo is None:
        shape, colour, pattern = rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(PATTERNS)
        pattern_colour = rng.choice([c for c in COLOURS if c != colour])
    else:
        shape, colour, pattern, pattern_colour = combo
    jitter = lambda name: tuple(np.clip(np.array(PALETTE[name]) + rng.normal(0, 0.06, 3), 0, 1).tolist())
    return Instance(
        str(shape),
        str(colour),
        str(pattern),
        str(pattern_colour),
        jitter(colour),
        jitter(pattern_colour),
        float(rng.uniform(2.0, 5.0)),
        float(rng.uniform(0, np.pi)),
        float(np.exp(rng.uniform(-0.3, 0.3))),
    )


def canonical_instance(shape: str, colour: str, pattern: str, pattern_colour: str) -> Instance:
    """The object that the words alone describe: palette colours, a middle frequency, no angle."""
    return Instance(shape, colour, pattern, pattern_colour, PALETTE[colour], PALETTE[pattern_colour], 3.5, 0.0, 1.0)


# ---- shapes and patterns, on object coordinates (u, v) in [-1, 1]


def _shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.hypot(u, v)
    if shape == "disc":
        return r <= 1
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.85
    if shape == "triangle":
        return (v <= 0.75) & (np.abs(u) * 1.75 <= v + 1.0)
    if shape == "diamond":
        return np.abs(u) + np.abs(v) <= 1
    if shape == "star":
        theta = np.arctan2(v, u)
        return r <= 0.5 + 0.5 * np.abs(np.cos(2.5 * theta)) ** 1.5
    if shape == "cross":
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    if shape == "ring":
        return (r <= 1) & (r >= 0.55)
    if shape == "hexagon":
        a = np.abs(u)
        return (np.abs(v) <= 0.85) & (a * 0.866 + np.abs(v) * 0.5 <= 0.85)
    raise ValueError(f"unknown shape {shape!r}")


def _pattern_mask(inst: Instance, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    f, p = inst.frequency, inst.pattern
    ca, sa = np.cos(inst.angle), np.sin(inst.angle)
    a, b = u * ca + v * sa, -u * sa + v * ca
    if p == "plain":
        return np.zeros(u.shape, bool)
    if p == "stripes":
        return np.sin(np.pi * f * a) > 0
    if p == "checks":
        return (np.floor(f * a / 2 + 8) + np.floor(f * b / 2 + 8)) % 2 == 1
    if p == "dots":
        fa, fb = (f * a / 2) % 1 - 0.5, (f * b / 2) % 1 - 0.5
        return fa * fa + fb * fb < 0.09
    if p == "rings":
        return np.sin(np.pi * f * np.hypot(u, v)) > 0
    if p == "zigzags":
        return (f * b / 2 + np.abs((f * a / 2) % 1 - 0.5)) % 1 < 0.5
    raise ValueError(f"unknown pattern {p!r}")


def draw_object(
    canvas: np.ndarray, inst: Instance, cx: float, cy: float, size: float, rotation: float, gain: float = 1.0
) -> tuple[int, int, int, int] | None:
    """Draws `inst` centred at (cx, cy), `size` pixels from centre to edge along its height.
    Returns the tight box (x, y, w, h) of the pixels drawn, None if none fell inside the canvas."""
    h_img, w_img = canvas.shape[:2]
    rx, ry = size * inst.aspect, size
    reach = float(np.hypot(rx, ry))
    x0, x1 = max(0, int(cx - reach)), min(w_img, int(np.ceil(cx + reach)) + 1)
    y0, y1 = max(0, int(cy - reach)), min(h_img, int(np.ceil(cy + reach)) + 1)
    if x0 >= x1 or y0 >= y1:
        return None
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xs + 0.5 - cx, ys + 0.5 - cy
    c, s = np.cos(rotation), np.sin(rotation)
    u, v = (dx * c + dy * s) / rx, (-dx * s + dy * c) / ry
    mask = _shape_mask(inst.shape, u, v)
    if not mask.any():
        return None
    body = np.asarray(inst.body_rgb, np.float32) * gain
    pattern = np.asarray(inst.pattern_rgb, np.float32) * gain
    colour = np.where(_pattern_mask(inst, u, v)[..., None], pattern, body)
    region = canvas[y0:y1, x0:x1]
    region[mask] = np.clip(colour[mask], 0, 1)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return x0 + int(cols[0]), y0 + int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)


# ---- images


def clean_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A studio background: near white, a faint tint and gradient."""
    tint = 0.9 + rng.uniform(-0.05, 0.06, 3)
    ramp = np.linspace(-0.04, 0.04, height, dtype=np.float32)[:, None, None]
    return np.clip(np.broadcast_to(tint, (height, width, 3)) + ramp, 0, 1).astype(np.float32)


def busy_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A scene's backdrop: a muted gradient between two random colours."""
    grey = rng.uniform(0.3, 0.8)
    a = grey + 0.35 * (rng.uniform(0, 1, 3) - 0.5)
    b = grey + 0.35 * (rng.uniform(0, 1, 3) - 0.5)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xs * np.cos(angle) + ys * np.sin(angle)) / max(height, width)
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = a + (b - a) * t[..., None]
    return np.clip(img, 0, 1).astype(np.float32)


def clutter_object(rng: np.random.Generator) -> Instance:
    """Everyday stuff: mostly plain, often dull objects, sometimes as patterned as an instance."""
    inst = random_instance(rng)
    if rng.random() < 0.8:
        inst = replace(inst, pattern="plain")
    dull = rng.uniform(0, 0.6)
    mute = lambda rgb: tuple((1 - dull) * np.asarray(rgb) + dull * float(np.mean(rgb)))
    return replace(inst, body_rgb=mute(inst.body_rgb), pattern_rgb=mute(inst.pattern_rgb))


def add_clutter(rng: np.random.Generator, canvas: np.ndarray, count: int, max_size: float) -> None:
    """`count` clutter objects, each up to `max_size` pixels from centre to edge."""
    h, w = canvas.shape[:2]
    for _ in range(count):
        size = max_size * rng.uniform(0.2, 1.0) ** 1.5
        draw_object(
            canvas,
            clutter_object(rng),
            rng.uniform(0, w),
            rng.uniform(0, h),
            max(size, 1.5),
            rng.uniform(0, 2 * np.pi),
            rng.uniform(0.7, 1.2),
        )


def query_view(rng: np.random.Generator, inst: Instance, side: int) -> tuple[np.ndarray, tuple]:
    """The object alone, large, on a clean background (as ILIAS image queries are)."""
    img = clean_background(rng, side, side)
    size = side * rng.uniform(0.28, 0.38)
    jitter = side * 0.06
    box = draw_object(
        img,
        inst,
        side / 2 + rng.uniform(-jitter, jitter),
        side / 2 + rng.uniform(-jitter, jitter),
        size,
        rng.uniform(-0.5, 0.5),
        rng.uniform(0.85, 1.15),
    )
    return to_uint8(img), box


def scene_view(
    rng: np.random.Generator, inst: Instance | None, height: int, width: int, scale: float, clutter: int
) -> tuple[np.ndarray, tuple | None]:
    """A cluttered scene: `clutter` other objects around, the object (if any) covering about
    `scale` of the image with its box, and a few objects drawn over it (occlusion)."""
    img = busy_background(rng, height, width)
    side = float(np.sqrt(height * width))
    drawn = (clutter + 2) // CLUTTER_PER_OBJECT
    behind = rng.binomial(drawn, 0.85)
    add_clutter(rng, img, behind, side * 0.15)
    box = None
    if inst is not None:
        size = 0.5 * side * np.sqrt(scale) / np.sqrt(inst.aspect) * 1.1
        size = max(size, 2.5)
        cx = rng.uniform(min(size, width / 2), max(width - size, width / 2))
        cy = rng.uniform(min(size, height / 2), max(height - size, height / 2))
        box = draw_object(img, inst, cx, cy, size, rng.uniform(0, 2 * np.pi), rng.uniform(0.75, 1.2))
    add_clutter(rng, img, drawn - behind, side * 0.08)
    return to_uint8(img), box


def to_uint8(img: np.ndarray) -> np.ndarray:
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
