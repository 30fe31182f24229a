"""PNG files with numpy and zlib only: the core install has no image library.

The demo writes 8-bit RGB PNGs with the "Up" filter on every row (each row stored as its difference
to the row above: flat and vertically smooth drawings compress well, and both directions are one
numpy operation). The reader takes what the writer makes and, more slowly, any other 8-bit
grey/RGB/RGBA non-interlaced PNG; other kinds are a clear ValueError. Browsers show these files
as they are, so the report can embed them without re-encoding.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_CHANNELS = {0: 1, 2: 3, 6: 4}  # colour type -> channels (grey, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode(image: np.ndarray, level: int = 6) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    rows = image.reshape(h, w * 3)
    up = np.empty_like(rows)
    up[0] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=up[1:])  # uint8 arithmetic wraps modulo 256, as PNG wants
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + _chunk(b"IEND", b"")
    )


def decode(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, 3) uint8 RGB (grey is repeated, alpha dropped)."""
    if not data.startswith(SIGNATURE):
        raise ValueError("not a PNG file")
    pos, header, idat = len(SIGNATURE), None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise ValueError("truncated PNG file (no header or no image data)")
    w, h, depth, colour, _, _, interlace = header
    if depth != 8 or colour not in _CHANNELS or interlace:
        raise ValueError(
            f"unsupported PNG (bit depth {depth}, colour type {colour}, interlace {interlace}); "
            "the demo reads 8-bit grey, RGB and RGBA, not interlaced"
        )
    c = _CHANNELS[colour]
    try:
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except zlib.error as e:
        raise ValueError(f"corrupt PNG data ({e})") from None
    if raw.size != h * (w * c + 1):
        raise ValueError(f"corrupt PNG data ({raw.size} bytes for a {w}x{h} image)")
    raw = raw.reshape(h, w * c + 1)
    filters, rows = raw[:, 0], raw[:, 1:].copy()
    if (filters == 2).all():
        np.cumsum(rows, axis=0, dtype=np.uint8, out=rows)
    else:
        _unfilter(rows, filters, c)
    img = rows.reshape(h, w, c)
    if c == 1:
        return np.repeat(img, 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


def _unfilter(rows: np.ndarray, filters: np.ndarray, c: int) -> None:
    """Undoes the PNG filters row by row, in place (the general, slower path)."""
    prev = np.zeros(rows.shape[1], np.int32)
    for y, f in enumerate(filters):
        row = rows[y].astype(np.int32)
        if f == 1:
            for x in range(c, len(row)):
                row[x] = (row[x] + row[x - c]) & 255
        elif f == 2:
            row = (row + prev) & 255
        elif f == 3:
            for x in range(len(row)):
                left = row[x - c] if x >= c else 0
                row[x] = (row[x] + (left + prev[x]) // 2) & 255
        elif f == 4:
            for x in range(len(row)):
                a = row[x - c] if x >= c else 0
                b, cc = prev[x], prev[x - c] if x >= c else 0
                p = a + b - cc
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
                row[x] = (row[x] + (a if pa <= pb and pa <= pc else b if pb <= pc else cc)) & 255
        elif f != 0:
            raise ValueError(f"corrupt PNG data (filter type {f})")
        rows[y] = row
        prev = row
