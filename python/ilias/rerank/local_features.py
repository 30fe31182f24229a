"""AMES's local descriptors: DINOv2 ViT-B/14 (with registers) patch tokens through the AMES detector.

The recipe, as AMES's extraction defines it:

- the image (a query: its box) is decoded by OpenCV and resized so that its longer side is
  `imsize` (None: kept), each side then rounded to a whole number of 14-pixel patches (the scale
  of each side adjusted on its own); INTER_AREA when shrinking, INTER_LINEAR when enlarging;
  pixels / 255, normalised by the ImageNet mean and deviation, RGB;
- the backbone's last-layer normalised patch tokens (768-d, registers and class token dropped);
- the detector, a 1x1 convolution 768 -> 768 and a batch norm: the L2-normalised output is the
  descriptor; ReLU -> 1x1 convolution 768 -> 1 -> softplus gives each token's weight (without
  detector weights: the raw tokens, weighted by their norm, as AMES does then);
- the `tokens` tokens of largest weight, strongest first; each with its patch centre (row and
  column, as fractions of the resized height and width: AMES's files keep this order in their
  first two columns), scale 0 (one scale), mask 0 and its weight. Fewer patches than `tokens`:
  the rest is padding (mask 1), as in AMES's files.

The detector's parameter names are the published checkpoint's (`conv1`, `bn`, `conv2`, weights
under `state`), loaded strictly. CUDA runs the backbone under float16 autocast, the detector in
float32.

Default size: AMES's script keeps each image's size (its datasets hold images up to 1024 px);
ILIAS's core images are photos of several megapixels, whose native size would give tens of
thousands of tokens, so the longer side is 768 px by default (`imsize`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._extras import require
from ..store import file_tag

torch = require("torch", "local-descriptor extraction", "rerank")
cv2 = require("cv2", "local-descriptor extraction", "rerank", "OpenCV (opencv-python-headless)")
nn = torch.nn
F = torch.nn.functional

NAME = "dinov2_vitb14_reg+ames-detector"
BACKBONE = "dinov2_vitb14_reg"
PATCH = 14
DIM = 768
DEFAULT_IMSIZE = 768
# ImageNet statistics, RGB
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


def resize_to_patches(img: np.ndarray, imsize: int | None, patch: int = PATCH) -> np.ndarray:
    """AMES's resize: longer side to `imsize`, then each side to a whole number of patches."""
    h, w = img.shape[:2]
    scale = 1.0 if imsize is None else imsize / max(h, w)

    def side_scale(side: int) -> float:
        new = scale * side
        return scale / ((new / patch) / max(round(new / patch), 1.0))

    sx, sy = side_scale(w), side_scale(h)
    if sx < 1.0 or sy < 1.0:
        return cv2.resize(img, dsize=(0, 0), fx=sx, fy=sy, interpolation=cv2.INTER_AREA)
    if sx > 1.0 or sy > 1.0:
        return cv2.resize(img, dsize=(0, 0), fx=sx, fy=sy, interpolation=cv2.INTER_LINEAR)
    return img


def to_tensor(img: np.ndarray) -> "torch.Tensor":
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ImageNet-normalised."""
    x = (img.astype(np.float32) / 255.0 - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class Detector(nn.Module):
    """AMES's token detector: descriptor = normalize(bn(conv1(x))), weight = softplus(conv2(relu(bn(conv1(x)))))."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1, 1)
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, 1, 1, 1)
        self.eval()

    def forward(self, tokens):
        """(B, N, D) tokens -> descriptors (B, N, D), weights (B, N)."""
        # a 1x1 convolution and an eval-mode batch norm act on each token alone: the tokens are
        # laid out as a (N, 1) map, whatever the patch grid was
        x = self.bn(self.conv1(tokens.transpose(1, 2)[..., None]))
        desc = F.normalize(x, p=2, dim=1, eps=1e-15)
        weight = F.softplus(self.conv2(F.relu(x)), beta=1, threshold=20)
        return desc[..., 0].transpose(1, 2), weight[:, 0, :, 0]


def load_detector(path: str | os.PathLike, dim: int = DIM) -> Detector:
    """The published detector checkpoint (a torch file, weights under `state`), loaded strictly."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such detector checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several kinds for a file that is not a checkpoint
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from None
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict with the detector's weights under 'state' (the published AMES layout)")
    det = Detector(dim)
    want = det.state_dict()
    missing, unexpected = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    wrong = sorted(k for k in want.keys() & state.keys() if tuple(state[k].shape) != tuple(want[k].shape))
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(keys[:4])}" for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                                                  ("keys of another shape", wrong)) if keys]
        raise ValueError(f"{path}: not an AMES detector for {dim}-d tokens ({'; '.join(parts)})")
    det.load_state_dict(state, strict=True)
    return det.eval()


class DinoLocals:
    """Describes images with DINOv2 ViT-B/14 (registers) tokens and the AMES detector.

    `weights`: a local backbone checkpoint (else the pretrained weights, downloaded once);
    `detector`: the AMES detector checkpoint (None: raw tokens weighted by their norm);
    `random_init`: random backbone and detector (tests, benchmarks)."""

    name = NAME
    dim = DIM

    def __init__(self, detector: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
                 imsize: int | None = DEFAULT_IMSIZE, device=None, random_init: bool = False):
        from ..models.factory import _timm_model
        from ..models.registry import get_spec

        if imsize is not None and imsize < PATCH:
            raise ValueError(f"imsize: at least one {PATCH}-pixel patch, got {imsize}")
        spec = get_spec(BACKBONE)
        # the backbone is built (and its pretrained weights fetched) on the first image described:
        # a store that already holds every image needs only this object's identity
        self._build_backbone = lambda: _timm_model(spec.arch, spec, not random_init and weights is None, weights,
                                                   num_classes=0).eval().to(self.device)
        self._backbone = None
        if detector is not None:
            self.detector: Detector | None = load_detector(detector)
        elif random_init:
            self.detector = Detector()
            with torch.no_grad():  # a random batch norm that is not the identity
                self.detector.bn.running_mean.normal_(0, 0.1)
                self.detector.bn.running_var.uniform_(0.5, 2.0)
        else:
            self.detector = None
        self.imsize = imsize
        self.device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.detector is not None:
            self.detector.to(self.device)
        self.identity = {
            "backbone": "random-init" if random_init else (file_tag(weights) if weights else spec.hub_name),
            "detector": "random-init" if random_init and detector is None else (file_tag(detector) if detector else None),
            "imsize": imsize,
        }

    @property
    def backbone(self):
        if self._backbone is None:
            self._backbone = self._build_backbone()
        return self._backbone

    def prepare(self, img: np.ndarray) -> "torch.Tensor":
        """CPU work, safe in worker threads: RGB uint8 -> the normalised, patch-aligned tensor."""
        return to_tensor(resize_to_patches(img, self.imsize))

    @torch.no_grad()
    def describe(self, x: "torch.Tensor", tokens: int) -> tuple[np.ndarray, np.ndarray]:
        """A prepared image (3, H, W) -> (meta float32 [tokens, 5], descriptors float32 [tokens, 768])."""
        h, w = x.shape[1] // PATCH, x.shape[2] // PATCH
        x = x[None].to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            feats = self.backbone.forward_features(x)
        patches = feats[:, self.backbone.num_prefix_tokens:].float()
        if patches.shape[1] != h * w:
            raise RuntimeError(f"the backbone gave {patches.shape[1]} patch tokens for a {h}x{w} grid")
        if self.detector is not None:
            desc, weight = self.detector(patches)
        else:
            desc, weight = patches, patches.norm(dim=-1)
        n = min(tokens, h * w)
        top_w, top_i = torch.topk(weight[0], n)
        meta = np.zeros((tokens, 5), np.float32)
        out = np.zeros((tokens, desc.shape[-1]), np.float32)
        ids = top_i.cpu().numpy()
        meta[:n, 0] = (ids // w * PATCH + PATCH / 2) / (h * PATCH)  # the patch centre's row, then column
        meta[:n, 1] = (ids % w * PATCH + PATCH / 2) / (w * PATCH)
        meta[:n, 4] = top_w.cpu().numpy()
        meta[n:, 3] = 1.0
        out[:n] = desc[0, top_i].cpu().numpy()
        return meta, out
