"""Feature extraction for the demo: the image files and tars -> stores, with the numpy model.

Order of work: the distractor images are read from the tars and described first, since the
model's whitening is learned on them (no labels used); then the image queries and positives (in
the order of the id files), the text queries, and the distractor store.

The distractor store holds at least a million rows, more than can be rendered in a few minutes,
so it has two parts: first the features of the real images from the tars (ids `<tar>/<key>`),
then rows *sampled from their distribution* (ids `sampled/<key>`): a smoothed bootstrap (a draw
from a Gaussian kernel density estimate) in the whitened space: pick a real distractor at random,
add Gaussian noise of the data's own per-axis spread times Scott's bandwidth n^(-1/(d+4)), and
L2-normalise. Sampled rows thus look like real distractor features (same mean, spread and
clusters), but no image stands behind them: the report shows their id instead of a thumbnail.
"""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

from ..extract.tar_index import webdataset_key
from ..store import StoreWriter
from . import png
from .descriptor import DIM, NAME, DemoModel, describe_raw

BATCH = 256
SAMPLED = "sampled"


def tar_images(tars: list[Path]) -> Iterator[tuple[str, bytes]]:
    """(id, encoded image) of the `png` member of every sample, tars in order."""
    for path in tars:
        try:
            with tarfile.open(path, "r:") as tar:
                for m in tar:
                    key, ext = webdataset_key(m.name)
                    if m.isfile() and ext.lower() == "png":
                        f = tar.extractfile(m)
                        yield f"{path.name}/{key}", f.read()
        except tarfile.ReadError as e:
            raise ValueError(f"{path}: not a readable tar file ({e})") from None


def raw_features(encoded: Iterator[tuple[str, bytes]], progress=None) -> tuple[list[str], np.ndarray]:
    """Decodes and describes images, batching those of one size; ids and rows keep input order."""
    ids, rows, pending = [], [], {}

    def flush(shape):
        batch = pending.pop(shape)
        for (pos, _), row in zip(batch, describe_raw(np.stack([img for _, img in batch]))):
            rows[pos] = row
        if progress:
            progress.update(len(batch))

    for item_id, data in encoded:
        try:
            image = png.decode(data)
        except ValueError as e:
            raise ValueError(f"{item_id}: {e}") from None
        ids.append(item_id)
        rows.append(None)
        pending.setdefault(image.shape, []).append((len(rows) - 1, image))
        if len(pending[image.shape]) == BATCH:
            flush(image.shape)
    for shape in list(pending):
        flush(shape)
    return ids, np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def core_files(core: Path, ids: list[str]) -> Iterator[tuple[str, bytes]]:
    for i in ids:
        path = core / i
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in image_ids/ but missing")
        yield i, path.read_bytes()


def sample_like(real: np.ndarray, n: int, rng: np.random.Generator, chunk: int = 100_000) -> Iterator[np.ndarray]:
    """`n` L2-normalised rows drawn from a Gaussian kernel density estimate of `real` (whitened,
    not normalised), in chunks: a smoothed bootstrap with Scott's bandwidth."""
    count, d = real.shape
    bandwidth = count ** (-1.0 / (d + 4))
    noise = (bandwidth * real.std(axis=0)).astype(np.float32)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        x = real[rng.integers(0, count, m)] + rng.standard_normal((m, d), dtype=np.float32) * noise
        yield (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def sampled_keys(n: int) -> list[str]:
    return [f"s{j:07d}" for j in range(n)]


def extract(data: Path, stores: Path, distractors: int, seed: int, progress=None) -> dict:
    """Writes `stores/{image_queries,positives,text_queries,distractors}` and `stores/model.npz`."""
    from ..groundtruth import read_id_list

    core, ids = data / "ilias_core", data / "image_ids"
    tars = sorted((data / "distractors").glob("*.tar"))
    tar_ids, raw_d = raw_features(tar_images(tars), progress)
    model = DemoModel.fit(raw_d)
    stores.mkdir(parents=True, exist_ok=True)
    model.save(stores / "model.npz")
    prov = {
        "model": NAME,
        "transform": "none (handcrafted descriptor, any size)",
        "resolution": None,
        "whitening": "PCA whitening learned on the distractor images of the tars",
        "complete": True,
    }

    def write(name, vectors, row_ids, dtype="float16"):
        with StoreWriter(stores / name, DIM, dtype=dtype, normalized=True, provenance=prov, resume=False) as w:
            w.append(vectors, row_ids)

    for name, listing in (("image_queries", "image_query_ids.txt"), ("positives", "positive_ids.txt")):
        item_ids, raw = raw_features(core_files(core, read_id_list(ids / listing)), progress)
        write(name, model.embed(raw), item_ids)
    text_ids = read_id_list(ids / "text_query_ids.txt")
    texts = [(core / t).read_text(encoding="utf-8").strip() for t in text_ids]
    write("text_queries", model.texts(texts), text_ids, dtype="float32")

    real = model.whiten(raw_d)
    extra = max(0, distractors - len(tar_ids))
    keys = sampled_keys(extra)
    rng = np.random.default_rng([seed, 2])
    sampled_prov = {
        **prov,
        "sampled": f"{extra} rows after the first {len(tar_ids)}: smoothed bootstrap of their features",
    }
    with StoreWriter(
        stores / "distractors", DIM, shard_rows=250_000, normalized=True, provenance=sampled_prov, resume=False
    ) as w:
        w.append(model.embed(raw_d), tar_ids)
        lo = 0
        for rows in sample_like(real, extra, rng):
            w.append(rows, [f"{SAMPLED}/{k}" for k in keys[lo : lo + len(rows)]])
            lo += len(rows)
            if progress:
                progress.update(len(rows))
    return {"distractor_images": len(tar_ids), "sampled": extra}
