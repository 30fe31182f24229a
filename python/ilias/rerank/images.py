"""Where the image of an id is: the ILIAS core folder, or a member of a distractor tar.

Re-ranking describes only the images a results file needs (its queries and the first M of each
list), by the ids the stores and results carry:
- core ids, relative to `ilias_core/`: `<instance>/query/Q000_00.jpg`, `<instance>/pos/P000_00.jpg`;
- tar ids, `<tar file name>/<key>`: the image member of that key (`<key>.jpg`, as webdataset
  shards of ILIAS hold them, else `.jpeg`, `.png`, `.webp`), read by seeking to it through the
  tar's cached member index (`extract/tar_index.py`), never by walking the tar.

Image queries are described inside their bounding box (the first box of `Q..._bbox.txt`, `x y w h`
in pixels), as ILIAS does for the queries only; database images are described whole.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from .._extras import require
from ..extract.tar_index import TarIndex, tar_files

TAR_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ImageNotFound(KeyError):
    """An id that is neither a core file nor a member of a known tar."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


OPEN_TARS = 16


class ImageSource:
    """Reads the bytes (and the query box) of images by id.

    >>> src = ImageSource("ILIAS/ilias_core", ["distractors/"])        # doctest: +SKIP
    >>> src.read("00042.tar/000042137")                                 # one seek, one read
    """

    def __init__(self, core: str | os.PathLike | None = None, tars: Sequence[str | os.PathLike] = ()):
        self.core = None
        if core is not None:
            core = Path(core)
            if (core / "ilias_core").is_dir():
                core = core / "ilias_core"
            if not core.is_dir():
                raise FileNotFoundError(f"{core}: no such folder (expected the ILIAS core images, ilias_core/)")
            self.core = core
        self._tars: dict[str, Path] = {}
        for t in tar_files(tars):
            if t.name in self._tars and self._tars[t.name] != t:
                raise ValueError(f"{t}: two tars named {t.name} ({self._tars[t.name]}); ids <tar name>/<key> would be ambiguous")
            self._tars[t.name] = t
        self._open: OrderedDict[str, TarIndex] = OrderedDict()
        self._lock = threading.Lock()  # extraction reads from several threads: one index per tar

    def _tar(self, name: str) -> TarIndex:
        """The tar's index, kept among the `OPEN_TARS` used last (ids come in database order, so
        a shortlist reads its tars one after another: a few open at once, not a thousand)."""
        with self._lock:
            idx = self._open.get(name)
            if idx is None:
                idx = self._open[name] = TarIndex.open(self._tars[name])
                if len(self._open) > OPEN_TARS:
                    # dropped, not closed: a thread may still be reading it; its file closes with it
                    self._open.popitem(last=False)
            self._open.move_to_end(name)
            return idx

    def _member(self, tar: str, key: str) -> str | None:
        """The extension of the image member of `key` in `tar`, None if it has none."""
        idx = self._tar(tar)
        return next((ext for ext in TAR_IMAGE_EXTS if (key, ext) in idx), None)

    def has(self, item_id: str) -> bool:
        head, _, key = item_id.partition("/")
        if head in self._tars:
            return self._member(head, key) is not None
        return self.core is not None and (self.core / item_id).is_file()

    def read(self, item_id: str) -> bytes:
        """The file's bytes; ImageNotFound naming the id and where it was looked for."""
        head, _, key = item_id.partition("/")
        if head in self._tars:
            ext = self._member(head, key)
            if ext is None:
                raise ImageNotFound(f"{item_id}: no image member {key}.jpg (or .png, .webp) in {self._tars[head]}")
            return self._tar(head).read(key, ext)
        if self.core is not None and (self.core / item_id).is_file():
            return (self.core / item_id).read_bytes()
        where = [str(self.core)] if self.core is not None else []
        where += [f"{len(self._tars)} tar(s)"] if self._tars else []
        raise ImageNotFound(f"{item_id}: no such image (looked in {' and '.join(where) or 'nothing: no core folder or tars given'})")

    def box(self, item_id: str) -> tuple[int, int, int, int] | None:
        """(x0, y0, x1, y1) in pixels of an image query's first box; None for other images."""
        if self.core is None or "/query/" not in item_id:
            return None
        path = (self.core / item_id).with_suffix("")
        path = path.with_name(path.name + "_bbox.txt")
        if not path.is_file():
            return None
        first = path.read_text().split("\n", 1)[0].split()
        try:
            x, y, w, h = (int(round(float(v))) for v in first)
        except ValueError:
            raise ValueError(f"{path}: expected a box 'x y w h' in pixels on its first line, got {' '.join(first)!r}") from None
        if w <= 0 or h <= 0:
            raise ValueError(f"{path}: the box {x} {y} {w} {h} is empty")
        return max(x, 0), max(y, 0), x + w, y + h

    def missing(self, ids: Sequence[str]) -> list[str]:
        """The ids that have no image here."""
        return [i for i in ids if not self.has(i)]

    def close(self) -> None:
        for idx in self._open.values():
            idx.close()
        self._open.clear()


def decode_image(data: bytes, box: tuple[int, int, int, int] | None = None, what: str = "image") -> np.ndarray:
    """JPEG / PNG bytes -> (H, W, 3) uint8 RGB, cut to `box` (x0, y0, x1, y1) when given.

    OpenCV decodes, as AMES's extraction reads its images."""
    cv2 = require("cv2", "decoding images for re-ranking", "sift", "OpenCV (opencv-python-headless)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{what}: does not decode as an image ({len(data):,} bytes)")
    if box is not None:
        x0, y0, x1, y1 = box
        cut = img[y0:y1, x0:x1]
        if cut.size == 0:
            raise ValueError(f"{what}: its box {box} lies outside the {img.shape[1]}x{img.shape[0]} image")
        img = cut
    return np.ascontiguousarray(img[:, :, ::-1])
