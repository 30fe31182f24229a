"""What to embed: ILIAS core folders, webdataset tar shards of distractors, plain image folders.

Every input becomes an ordered list of *sources* (one image file, or one tar), so that work can be
split across machines before anything is read (a piece lists only its own tars), and then a flat
`Items` table: one row per image (or text) with its id and where its bytes are. The order is
deterministic (sorted paths; tar member order; or the order of a given id list for core images),
which is what makes resuming and splitting exact.

Ids:
- core: the path relative to `ilias_core/`, e.g. `bold_bimp_000/query/Q000_00.jpg`, `.../T000.txt`;
- tars: `<tar file name>/<__key__>` with the webdataset key (member path up to the first dot of its
  file name), the `jpg` member of each sample;
- folders: the path relative to the folder.

Decoding: core images are EXIF-transposed (phone photos), distractors are not (the reference does
not); everything is converted to RGB. A file that does not decode is reported, not raised.
"""

from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

from .tar_index import tar_files, webdataset_key

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
CORE_KINDS = ("image_queries", "positives", "text_queries")


@dataclass
class Source:
    path: str
    kind: str  # "file" or "tar"
    id: str | None = None  # for files: the item id


@dataclass
class Items:
    """A flat table of items: ids, and where the bytes are (a file, or an offset/size in a tar)."""

    ids: list[str]
    paths: list[str]  # the file or tar of each item (shared strings)
    offsets: np.ndarray  # int64, -1 for plain files
    sizes: np.ndarray  # int64
    exif: bool = False  # apply EXIF orientation (core images)
    text: bool = False  # items are text files
    provenance: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, index) -> "Items":
        index = np.asarray(index, dtype=np.int64)
        return Items(
            [self.ids[i] for i in index], [self.paths[i] for i in index], self.offsets[index], self.sizes[index],
            self.exif, self.text, dict(self.provenance),
        )

    def read_bytes(self, i: int, handles: dict | None = None) -> bytes:
        if self.offsets[i] < 0:
            with open(self.paths[i], "rb") as f:
                return f.read()
        # tar members are read by offset: a worker keeps its tar files open between items
        handles = {} if handles is None else handles
        f = handles.get(self.paths[i])
        if f is None:
            f = handles[self.paths[i]] = open(self.paths[i], "rb")
        f.seek(int(self.offsets[i]))
        return f.read(int(self.sizes[i]))

    def load_image(self, i: int, handles: dict | None = None) -> Image.Image:
        """The RGB image of item i; raises on a file that does not decode."""
        img = Image.open(io.BytesIO(self.read_bytes(i, handles)))
        img.load()  # decode now: a truncated file fails here, not later in a transform
        img = img.convert("RGB")
        return ImageOps.exif_transpose(img) if self.exif else img

    def load_text(self, i: int) -> str:
        return self.read_bytes(i).decode("utf-8").strip()


# ---- sources


def core_sources(root: str | Path, kind: str, ids: Sequence[str] | None = None) -> list[Source]:
    """The files of one core partition: `image_queries`, `positives` or `text_queries`.

    `root` is the `ilias_core` folder (or its parent). With `ids` (e.g. the lines of
    image_ids/positive_ids.txt) the files are those, in that order; otherwise all, sorted.
    """
    if kind not in CORE_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(CORE_KINDS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected the ILIAS core images, ilias_core/)")
    if (root / "ilias_core").is_dir():
        root = root / "ilias_core"
    if ids is not None:
        missing = [i for i in ids if not (root / i).is_file()]
        if missing:
            raise FileNotFoundError(f"{root}: {len(missing)} of {len(ids)} listed files are missing (first: {missing[0]})")
        found = list(ids)
    else:
        sub, pick = {
            "image_queries": ("query", lambda p: p.suffix.lower() in IMAGE_SUFFIXES),
            "positives": ("pos", lambda p: p.suffix.lower() in IMAGE_SUFFIXES),
            "text_queries": ("query", lambda p: p.suffix == ".txt" and p.name.startswith("T")),
        }[kind]
        found = sorted(p.relative_to(root).as_posix() for p in root.glob(f"*/{sub}/*") if pick(p))
    if not found:
        raise ValueError(f"{root}: no {kind.replace('_', ' ')} found (expected <instance>/query/Q*.jpg, "
                         f"<instance>/query/T*.txt, <instance>/pos/P*.jpg)")
    return [Source(str(root / i), "file", i) for i in found]


def folder_sources(folder: str | Path) -> list[Source]:
    """Every image under a folder (recursively), sorted by relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not found:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return [Source(str(p), "file", p.relative_to(folder).as_posix()) for p in found]


def tar_sources(paths: Sequence[str | Path]) -> list[Source]:
    """Tar shards, in the order given; a folder stands for its *.tar files, sorted."""
    out = [Source(str(t), "tar") for t in tar_files(paths)]
    if not out:
        raise ValueError("no tar files given")
    return out


# ---- items


def list_items(sources: Sequence[Source], exif: bool = False, text: bool = False) -> Items:
    """The items of some sources, in order (tars are scanned for their `jpg` members)."""
    ids, paths, offsets, sizes = [], [], [], []
    for s in sources:
        if s.kind == "file":
            ids.append(s.id)
            paths.append(s.path)
            offsets.append(-1)
            sizes.append(-1)
            continue
        name = Path(s.path).name
        try:
            with tarfile.open(s.path, "r:") as tar:
                for m in tar:
                    key, ext = webdataset_key(m.name)
                    if m.isfile() and ext.lower() == "jpg":  # webdataset lower-cases extensions
                        ids.append(f"{name}/{key}")
                        paths.append(s.path)
                        offsets.append(m.offset_data)
                        sizes.append(m.size)
        except tarfile.ReadError as e:
            raise ValueError(f"{s.path}: not a readable tar file ({e})") from None
    return Items(ids, paths, np.array(offsets, np.int64), np.array(sizes, np.int64), exif, text)


def select(items: Items, wanted: Sequence[str]) -> Items:
    """The items whose id, or bare tar key (the mini-ILIAS lists), is in `wanted`; order kept."""
    wanted = set(wanted)
    keep = [i for i, x in enumerate(items.ids) if x in wanted or x.split("/", 1)[-1] in wanted]
    return items.take(keep)
