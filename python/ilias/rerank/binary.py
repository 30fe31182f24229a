"""The binary variant of local descriptors: a fixed ITQ projection, the sign, packed bits.

AMES's binary model sees each 768-d descriptor as the signs of its projection onto 128
directions (an ITQ rotation, stored as an .npz with key `proj`, shape (768, 128), applied as
`x @ proj`). Stored as bits, a token takes 16 bytes instead of 1,536 in float16.

Conventions, shared by the store and the model so that both give the same signs:
- a component >= 0 is +1 (bit 1), below 0 is -1 (bit 0); torch.sign would give 0 for an exact 0,
  which no bit can hold, and which has probability zero on real descriptors;
- bits are packed with `np.packbits` along the last axis, most significant bit first: component 0
  is the top bit of byte 0. The number of bits must be a multiple of 8.
- the projection is applied to the descriptor as given: the sign of `x @ proj` does not depend on
  the length of x, so normalising first (as AMES does) changes nothing.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np


def load_projection(path: str | os.PathLike) -> np.ndarray:
    """The ITQ projection of an .npz file (key `proj`, shape (D, bits), bits a multiple of 8) as float32."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such projection file (expected an .npz with key 'proj')")
    try:
        z = np.load(path, allow_pickle=False)
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: not an .npz file (a single .npy array; expected an .npz with key 'proj')")
    with z:
        if "proj" not in z.files:
            raise ValueError(f"{path}: no 'proj' array (found {', '.join(z.files) or 'none'})")
        proj = z["proj"]
    return check_projection(proj, str(path))


def check_projection(proj: np.ndarray, what: str = "projection") -> np.ndarray:
    proj = np.asarray(proj)
    if proj.ndim != 2 or proj.dtype.kind != "f" or proj.shape[1] % 8 or not proj.shape[1]:
        raise ValueError(f"{what}: expected a float (D, bits) matrix with bits a multiple of 8, found {proj.dtype} {proj.shape}")
    if not np.isfinite(proj).all():
        raise ValueError(f"{what}: holds NaN or Inf")
    return np.ascontiguousarray(proj, dtype=np.float32)


def projection_sha256(proj: np.ndarray) -> str:
    """Identifies a projection by content (recorded by binary stores)."""
    p = np.ascontiguousarray(proj, dtype="<f4")
    return hashlib.sha256(repr(p.shape).encode() + p.tobytes()).hexdigest()[:32]


def pack_signs(descriptors: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Descriptors (..., D) -> the packed signs of `descriptors @ proj`, uint8 (..., bits / 8)."""
    x = np.asarray(descriptors, dtype=np.float32)
    if x.shape[-1] != proj.shape[0]:
        raise ValueError(f"descriptors: dimension {x.shape[-1]}, the projection expects {proj.shape[0]}")
    return np.packbits(x @ proj >= 0, axis=-1)


def unpack_signs(bits: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Packed bits uint8 (..., B / 8) -> +-1 (..., B): what the binary model reads."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint8:
        raise ValueError(f"bits: expected uint8 packed bits, got {bits.dtype}")
    signs = np.unpackbits(bits, axis=-1).astype(dtype)
    return signs * 2 - 1
