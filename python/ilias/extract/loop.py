"""The extraction loop: items -> batches -> model -> L2-normalised rows in a store.

How it works, and why:
- DataLoader workers decode and preprocess (the CPU-bound part); the main process only batches,
  runs the model and writes. A file that does not decode is skipped with a warning and listed in
  the manifest's provenance (`skipped`: id, position, error); it never stops the run.
- RESIZE_LARGE gives images of different sizes, so items are processed in *windows* of a fixed
  number of consecutive items; inside a window, images of equal (padded) size are batched together
  (a batch runs as soon as it is full, the rest at the window's end), and the window's rows are then
  written in item order. The store is thus always in item order, and memory is bounded by the window.
- Windows start at fixed positions: every `window` items from the first item of each tar (plain
  files: from the first item of the list), never spanning two tars. So a run resumed after an
  interruption forms exactly the same batches as an uninterrupted one, and a piece made of whole
  tars (`--num-shards`, a cluster task) the same batches as a run over all tars: the same rows, bit
  for bit. Resuming restarts at the window holding the first row not yet in a complete shard
  (`StoreWriter.committed`) and drops the rows it already has.
- CUDA runs under fp16 autocast; the CPU path runs in float32. Features are normalised in float32,
  image stores hold float16 (the official files do), text stores float32 (as the reference keeps them).
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np

from .._io import atomic_write
from ..models.factory import torch
from ..progress import Progress
from ..store import DEFAULT_SHARD_ROWS, Manifest, Store, StoreWriter
from .datasets import Items
from .transforms import make_transform

F = torch.nn.functional

_BYTES_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")
# provenance keys that must agree before a store is resumed: other values would mix features
_IDENTITY = ("model", "weights", "transform", "resolution", "pooling")


def default_device() -> "torch.device":
    """The GPU of this process (LOCAL_RANK under torchrun) if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def default_window(resolution: int, batch_size: int) -> int:
    """Items per window: about 2 GiB of float32 input tensors at most, 1 to 16 batches."""
    per_image = 3 * 4 * resolution * resolution
    return max(batch_size, min(16 * batch_size, (2 << 30) // per_image))


def library_versions() -> dict:
    import PIL

    from .. import __version__

    out = {"ilias": __version__, "torch": torch.__version__, "pillow": PIL.__version__, "numpy": np.__version__}
    for name, module in (("timm", "timm"), ("open_clip", "open_clip"), ("torchvision", "torchvision")):
        try:
            out[name] = __import__(module).__version__
        except ImportError:
            pass
    return out


def extract_images(
    items: Items,
    encoder,
    out: str | os.PathLike,
    *,
    transform: str = "resize_large",
    resolution: int | None = None,
    batch_size: int = 32,
    workers: int = 4,
    device=None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    window: int | None = None,
    progress: bool = True,
    provenance: dict | None = None,
) -> Store:
    """Embeds the images of `items` with `encoder` (an ImageEncoder) into the store at `out`.

    Resumes the store if it exists (same model, weights and transform only).
    """
    device = torch.device(device) if device is not None else default_device()
    tf = make_transform(encoder, transform, resolution)
    res = getattr(tf, "resolution", None)
    prov = {
        **_model_provenance(encoder),
        "transform": tf.name,
        "resolution": res,
        "pad_multiple": getattr(tf, "multiple", None),
        "exif_transpose": items.exif,
        "compute": "float16 autocast (cuda)" if device.type == "cuda" else "float32 (cpu)",
        **items.provenance,
        **(provenance or {}),
    }
    encoder = encoder.to(device).eval()

    def results(windows):
        return _image_results(items, encoder, tf, windows, batch_size, workers, device)

    default = window or default_window(res or 224, batch_size)
    return _write(items, out, encoder.dim, "float16", shard_rows, prov, default, results, progress, "images")


def extract_texts(
    items: Items,
    text_encoder,
    out: str | os.PathLike,
    *,
    batch_size: int = 256,
    device=None,
    shard_rows: int = DEFAULT_SHARD_ROWS,
    progress: bool = True,
    provenance: dict | None = None,
) -> Store:
    """Embeds text files (whole text, the model's open_clip tokenizer) into a float32 store."""
    device = torch.device(device) if device is not None else default_device()
    text_encoder.to(device)
    spec = text_encoder.spec
    prov = {
        "model": spec.name,
        "text_tower": "/".join(filter(None, text_encoder.tower)),
        "weights": text_encoder.weights,
        "transform": "open_clip tokenizer",
        "resolution": None,
        "pooling": "encode_text",
        "versions": library_versions(),
        **items.provenance,
        **(provenance or {}),
    }
    dim = int(text_encoder.encode(["a photo"]).shape[1])

    def results(windows):
        for lo, hi in windows:
            texts, done = [], []
            for pos in range(lo, hi):
                try:
                    texts.append(items.load_text(pos))
                    done.append(pos)
                except (OSError, UnicodeDecodeError) as e:
                    yield pos, None, f"{type(e).__name__}: {e}"
            if texts:
                yield from ((pos, v, None) for pos, v in zip(done, text_encoder.encode(texts)))

    return _write(items, out, dim, "float32", shard_rows, prov, batch_size, results, progress, "texts")


def _model_provenance(encoder) -> dict:
    spec = encoder.spec
    return {
        "model": spec.name,
        "framework": spec.framework,
        "architecture": spec.hub_name,
        "tag": spec.tag,
        "weights": encoder.weights,
        "pooling": spec.pooling,
        "versions": library_versions(),
    }


def _write(items, out, dim, dtype, shard_rows, prov, window, results, progress, unit) -> Store:
    out = Path(out)
    window = _check_resumable(out, prov, window)
    prov = {**prov, "window": window, "complete": False}
    writer = StoreWriter(out, dim, dtype=dtype, shard_rows=shard_rows, normalized=True, provenance=prov)
    start, skipped = _resume_point(writer, items)
    writer.manifest.provenance["skipped"] = skipped  # kept up to date: saved with every shard
    starts = window_starts(items, window)
    first = int(np.searchsorted(starts, start, side="right")) - 1  # the window holding `start`
    windows = list(zip(starts[first:].tolist(), [*starts[first + 1 :].tolist(), len(items)])) if start < len(items) else []
    ends = {hi for _, hi in windows}
    with writer, Progress(f"extract {out.name}", total=len(items) - start, unit=unit, enabled=progress) as bar:
        rows, ids = [], []
        for pos, vec, err in results(windows):
            if pos < start:
                continue  # already in the store: recomputed only to form the same batches
            if err is not None:
                warnings.warn(f"skipped {items.ids[pos]}: {err}", stacklevel=2)
                skipped.append({"id": items.ids[pos], "index": pos, "error": err})
            else:
                rows.append(vec)
                ids.append(items.ids[pos])
            if pos + 1 in ends:  # a window is complete
                if rows:
                    writer.append(np.stack(rows), ids)
                bar.update(pos + 1 - start - bar.done)
                rows, ids = [], []
        if rows:
            writer.append(np.stack(rows), ids)
        bar.set(len(items) - start)
        writer.manifest.provenance["complete"] = True
    # the writer saves the manifest only when it completes a shard: save the final provenance too
    atomic_write(out / "manifest.json", writer.manifest.to_json())
    return Store.open(out)


def window_starts(items: Items, window: int) -> np.ndarray:
    """The first position of every window of `items`: every `window` items from the first item of
    each tar, and from the first of each run of plain files."""
    if len(items) == 0:
        return np.zeros(1, dtype=np.int64)
    # a tar's items share one path string; plain files all count as one run
    source = [p if o >= 0 else None for p, o in zip(items.paths, items.offsets.tolist())]
    runs = [0] + [i for i in range(1, len(source)) if source[i] != source[i - 1]] + [len(items)]
    return np.concatenate([np.arange(lo, hi, window) for lo, hi in zip(runs[:-1], runs[1:])])


def _check_resumable(out: Path, prov: dict, window: int) -> int:
    """Refuses to append to a store of other features; returns the window size to keep using."""
    if not (out / "manifest.json").exists():
        return window
    old = Manifest.read(out).provenance
    for key in _IDENTITY:
        if key in old and old.get(key) != prov.get(key):
            raise ValueError(
                f"{out}: holds features with {key}={old.get(key)!r}, not {prov.get(key)!r}; "
                "choose another output folder (or delete this one to start again)"
            )
    return int(old.get("window", window))


def _resume_point(writer: StoreWriter, items: Items) -> tuple[int, list]:
    """(first item position not yet stored, the skipped items before it) for a reopened store."""
    committed = writer.committed
    if committed == 0:
        return 0, []
    store = Store.open(writer.path)
    last = store.ids(store.num_shards - 1)[-1].decode("utf-8")
    try:
        start = items.ids.index(last, committed - 1) + 1
    except ValueError:
        raise ValueError(f"{writer.path}: its rows are not from these inputs (id {last!r} is not among them)") from None
    skipped = [s for s in writer.manifest.provenance.get("skipped", []) if s["index"] < start]
    if start - len(skipped) != committed:
        raise ValueError(f"{writer.path}: its {committed} rows do not match the first {start} inputs")
    return start, skipped


# ---- images


class _Images(torch.utils.data.Dataset):
    """Items from position `begin` on, decoded and preprocessed in DataLoader workers."""

    def __init__(self, items: Items, transform, begin: int):
        self.items, self.transform, self.begin = items, transform, begin
        self._handles = {}  # per worker: open tar files

    def __len__(self) -> int:
        return len(self.items) - self.begin

    def __getitem__(self, j: int):
        pos = self.begin + j
        try:
            img = self.items.load_image(pos, self._handles)
        except Exception as e:  # any decoder failure means a bad file, never a bad run
            return pos, None, f"{type(e).__name__}: {_BYTES_REPR.sub('', str(e))}"
        return pos, self.transform(img), None


def _as_list(batch):
    return batch


def _one_thread(_worker_id):
    torch.set_num_threads(1)  # workers decode; the model's threads stay in the main process


def _image_results(items, encoder, transform, windows, batch_size, workers, device):
    """(position, feature, error) for every item of `windows` ((first, end) pairs, consecutive), in
    order (see the module notes)."""
    if not windows:
        return
    loader = torch.utils.data.DataLoader(
        _Images(items, transform, windows[0][0]),
        batch_size=4,
        collate_fn=_as_list,
        num_workers=workers,
        worker_init_fn=_one_thread if workers else None,
        pin_memory=device.type == "cuda",
    )
    buckets: dict[tuple, list] = {}
    done: dict[int, tuple] = {}

    def run(shape):
        batch = buckets.pop(shape)
        x = torch.stack([t for _, t in batch]).to(device, non_blocking=True)
        try:
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
                y = encoder(x)
        except RuntimeError as e:
            if "out of memory" in str(e):
                raise
            # e.g. a CNN given a 384 x 3 sliver of a panorama: those images are skipped, not the run
            for pos, _ in batch:
                done[pos] = (None, f"the model fails on a {shape[2]}x{shape[1]} input: {str(e).splitlines()[0]}")
            return
        y = F.normalize(y.float(), dim=-1).cpu().numpy()
        for (pos, _), v in zip(batch, y):
            done[pos] = (v, None)

    def finish_window():
        for shape in sorted(buckets, key=lambda s: buckets[s][0][0]):
            run(shape)
        for pos in sorted(done):
            yield (pos, *done[pos])
        done.clear()

    ends = iter(hi for _, hi in windows)
    window_end = next(ends)
    for chunk in loader:
        for pos, x, err in chunk:
            while pos >= window_end:
                yield from finish_window()
                window_end = next(ends)
            if err is not None:
                done[pos] = (None, err)
                continue
            bucket = buckets.setdefault(tuple(x.shape), [])
            bucket.append((pos, x))
            if len(bucket) == batch_size:
                run(tuple(x.shape))
    yield from finish_window()
