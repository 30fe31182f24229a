"""Linear adaptation: `normalize(W x + b)` on every query and database vector, and its training.

ILIAS finds that a linear layer trained with multi-domain class supervision (UnED) improves
retrieval, most of all for vision-language models; the official code trains such layers and
publishes one per model (`<model>.pth`, a torch state_dict with `layer.weight` (out x in) and
`layer.bias`). Here:

- `load_weights` reads an official (or our) `.pth` with torch, or an `.npz` with the same keys
  (numpy only), and checks it: the keys, shapes, finite values; its sha256 names it.
- `apply` writes the adapted copy of a store: shard by shard through StoreWriter (float32 math,
  the source's dtype on disk: float16 for image features), resumable after its last complete
  shard, marked incomplete until every row is written (a database refuses it until then). Its
  provenance records the weights (name, sha256, shapes) and the source store (path, fingerprint,
  provenance); adapting into a store made with other weights or from another store is an error.
  The rows are a GEMM (numpy's BLAS), so `threads` sizes the BLAS pool.
- `train` is the official recipe (ILIAS_SPEC.md, "Linear adaptation (training)"): Linear(d ->
  512, bias; Xavier init) + L2 norm, a bias-free cosine classifier over the (label, domain)
  classes, cross-entropy on 16 x cosine, Adam (lr 1e-3, weight decay 1e-6), batch 128 (the last
  partial batch dropped, as there), seeded, on CPU or CUDA; it writes the official layout.

An adapted database is searched like any other: one pass, all tiers. Queries and database must
carry the same adaptation (`adaptation_of` says which one a database has).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ._io import atomic_path, atomic_write
from .database import Database
from .progress import Progress
from .store import Manifest, Store, StoreWriter, file_sha256, open_stores, part_dirs

MODELS_EXTRA = "pip install 'ilias-core[models]'"
WEIGHT_KEY, BIAS_KEY = "layer.weight", "layer.bias"
# torch.nn.functional.normalize's eps: a zero row stays zero instead of becoming NaN
NORM_EPS = 1e-12
CHUNK_ROWS = 32768


@dataclass(frozen=True)
class Adaptation:
    """A linear adaptation layer: `normalize(x @ weight.T + bias)`. `weight` (out, in) float32,
    `bias` (out,) float32 or None (bias-free); `path`, `sha256` identify the file it came from."""

    weight: np.ndarray
    bias: np.ndarray | None
    path: str
    sha256: str

    @property
    def in_dim(self) -> int:
        return int(self.weight.shape[1])

    @property
    def out_dim(self) -> int:
        return int(self.weight.shape[0])

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def label(self) -> str:
        """How results and reports name it: the file name and the first 12 hex digits of its sha256."""
        return f"{self.name}@{self.sha256[:12]}"

    def describe(self) -> dict:
        return {"weights": self.name, "path": self.path, "sha256": self.sha256, "in_dim": self.in_dim,
                "out_dim": self.out_dim, "bias": self.bias is not None}

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The adapted rows of `x` (n, in_dim), float32, unit length (zero rows stay zero)."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"{self.path}: the layer takes {self.in_dim}-d input, got an array of shape {x.shape}")
        y = np.asarray(x, dtype=np.float32) @ self._wt
        if self.bias is not None:
            y += self.bias
        norms = np.sqrt(np.einsum("ij,ij->i", y, y))
        y /= np.maximum(norms, NORM_EPS)[:, None]
        return y

    @property
    def _wt(self) -> np.ndarray:
        # (in, out), C order: x @ W.T as one sgemm without a transposed copy per chunk
        wt = self.__dict__.get("_wt_cache")
        if wt is None:
            wt = np.ascontiguousarray(self.weight.T)
            object.__setattr__(self, "_wt_cache", wt)
        return wt


def load_weights(path: str | os.PathLike) -> Adaptation:
    """Reads an adaptation layer: a torch state_dict (`.pth`, `.pt`; needs torch) or an `.npz`
    with `layer.weight` (out x in) and, optionally, `layer.bias` (out). Every problem is a
    ValueError (FileNotFoundError, ImportError without torch) naming the file."""
    if isinstance(path, Adaptation):
        return path
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such weights file")
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                state = {k: np.asarray(z[k]) for k in z.files}
        except (OSError, ValueError, EOFError) as e:
            raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
    else:
        state = _torch_state(path)
    extra = sorted(set(state) - {WEIGHT_KEY, BIAS_KEY})
    if WEIGHT_KEY not in state or extra:
        found = ", ".join(sorted(state)[:8]) + (" ..." if len(state) > 8 else "") or "none"
        raise ValueError(f"{path}: expected a linear adaptation state_dict with the keys {WEIGHT_KEY} (out x in) "
                         f"and optionally {BIAS_KEY} (the official layout); found: {found}")
    weight = _float_array(state[WEIGHT_KEY], path, WEIGHT_KEY)
    if weight.ndim != 2 or 0 in weight.shape:
        raise ValueError(f"{path}: {WEIGHT_KEY} has shape {weight.shape}, expected (out, in)")
    bias = None
    if BIAS_KEY in state:
        bias = _float_array(state[BIAS_KEY], path, BIAS_KEY)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{path}: {BIAS_KEY} has shape {bias.shape}, expected ({weight.shape[0]},) for a "
                             f"{WEIGHT_KEY} of shape {weight.shape}")
    return Adaptation(np.ascontiguousarray(weight), bias, str(path), file_sha256(path))


def _torch_state(path: Path) -> dict:
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a torch .pth file needs torch: {MODELS_EXTRA} "
                          "(or convert it to an .npz with the same keys)") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not one of its own
        raise ValueError(f"{path}: not a readable torch file ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state_dict (a dict of tensors), found a {type(state).__name__}")
    out = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor: not a state_dict")
        out[str(k)] = v.detach().to(torch.float32).cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
    return out


def _float_array(a, path: Path, key: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype.kind != "f":
        raise ValueError(f"{path}: {key} holds {a.dtype} values, expected floating point")
    a = a.astype(np.float32)
    bad = int(np.count_nonzero(~np.isfinite(a)))
    if bad:
        raise ValueError(f"{path}: {key} holds {bad:,} NaN or infinite value(s)")
    return a


# ---------------------------------------------------------------------------------------------
# applying to stores


def adaptation_of(database) -> dict | None:
    """The adaptation (the `adaptation` entry of the provenance: weights name, sha256, shapes) that
    the stores of `database` were made with, None for plain features. Stores of one database made
    with different adaptations (or some without) are an error."""
    stores = database.stores if isinstance(database, Database) else Database.of(database).stores
    found = {}
    for s in stores:
        a = s.manifest.provenance.get("adaptation")
        found.setdefault(a["sha256"] if a else None, (s, a))
    if len(found) > 1:
        parts = [f"{s.path} ({a['weights'] + ' ' + a['sha256'][:12] if a else 'not adapted'})" for s, a in found.values()]
        raise ValueError(f"stores of different adaptations searched together: {', '.join(parts)}")
    return next(iter(found.values()))[1]


def check_same_adaptation(queries, database) -> dict | None:
    """The adaptation shared by the query stores and the database; a mismatch (adapted queries
    against plain features, or two weights files) is an error naming both."""
    q, db = adaptation_of(queries), adaptation_of(database)
    if (q or {}).get("sha256") != (db or {}).get("sha256"):
        say = lambda a: f"adapted with {a['weights']} (sha256 {a['sha256'][:12]})" if a else "not adapted"  # noqa: E731
        raise ValueError(f"the queries are {say(q)} but the database is {say(db)}: adapt both with the same weights")
    return db


def apply(
    weights,
    store,
    out: str | os.PathLike,
    *,
    dtype: str | None = None,
    replace: bool = False,
    threads: int = 0,
    chunk_rows: int = CHUNK_ROWS,
    progress: bool = False,
) -> Store:
    """Writes `normalize(W x + b)` of every row of `store` (a Store or its path) to a new store at
    `out`, with the same ids, in the source's dtype unless `dtype` is given.

    Resumable: rerun on an interrupted output, it continues after its last complete shard; a
    complete output made from the same store with the same weights is returned as it is. An
    output made with other weights or from another store is an error unless `replace` (which
    writes it anew beside the old one and swaps them when done)."""
    ad = load_weights(weights)
    src = store if isinstance(store, Store) else Store.open(store)
    out = Path(out)
    if src.dim != ad.in_dim:
        raise ValueError(f"{ad.path}: the layer takes {ad.in_dim}-d features but {src.path} holds {src.dim}-d ones "
                         "(weights of another model?)")
    if not src.manifest.complete:
        raise ValueError(f"{src.path}: incomplete store (its writer did not finish): finish it before adapting it")
    if out.resolve() == src.path.resolve():
        raise ValueError(f"{out}: the output must not be the source store")
    dtype = dtype or src.manifest.dtype
    source = {"adaptation_sha256": ad.sha256, "from_fingerprint": src.fingerprint, "from_count": src.count}
    if (out / "manifest.json").exists() and not replace:
        old = Manifest.read(out)
        had = old.provenance.get("adaptation") or {}
        if had.get("sha256") != ad.sha256:
            what = f"{had['weights']} (sha256 {had['sha256'][:12]})" if had else "no adaptation (plain features)"
            raise ValueError(f"{out}: holds vectors made with {what}, not {ad.name} (sha256 {ad.sha256[:12]}); "
                             "choose another output or pass --replace")
        if old.source != source:
            made = (old.provenance.get("adapted_from") or {}).get("path", "?")
            raise ValueError(f"{out}: holds {ad.name}-adapted vectors of another store ({made}, fingerprint "
                             f"{(old.source or {}).get('from_fingerprint')}), not of {src.path}; choose another "
                             "output or pass --replace")
        if old.complete and old.count == src.count and old.provenance.get("complete"):
            return Store.open(out)
    prov_src = {k: v for k, v in src.manifest.provenance.items() if k not in ("skipped", "complete", "window")}
    provenance = {
        "adaptation": ad.describe(),
        "adapted_from": {"path": str(src.path.resolve()), "fingerprint": src.fingerprint, "count": src.count,
                         "provenance": prov_src},
        "complete": False,
    }
    for key in ("model", "tag", "framework"):
        if key in src.manifest.provenance:
            provenance[key] = src.manifest.provenance[key]
    shard_rows = max([sh.count for sh in src.manifest.shards] + [1])
    writer = StoreWriter(out, ad.out_dim, dtype=dtype, shard_rows=shard_rows, normalized=True,
                         provenance=provenance, source=source, expected=src.count, replace=replace)
    start = writer.committed
    with _blas_threads(threads), writer, Progress(f"adapt {out.name}", total=src.count - start, enabled=progress) as bar:
        done = 0
        for vectors, ids in _chunks_from(src, start, chunk_rows):
            writer.append(ad(vectors), ids)
            done += len(vectors)
            bar.set(done)
        writer.manifest.provenance["complete"] = True  # saved by close() with the final manifest
    return Store.open(out)


def _chunks_from(src: Store, start: int, rows: int):
    """(vectors, ids) of `src` from global row `start` on, at most `rows` at a time."""
    base = 0
    for i in range(src.num_shards):
        v, ids = src.vectors(i), src.ids(i)
        n = len(v)
        lo = max(start - base, 0)
        for a in range(lo, n, rows):
            yield v[a : a + rows], ids[a : a + rows]
        base += n


@contextlib.contextmanager
def _blas_threads(threads: int):
    """Holds numpy's BLAS pool to `threads` (0: as it is) where threadpoolctl is installed."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        threadpool_limits = None
    if not threads or threadpool_limits is None:
        yield
        return
    with threadpool_limits(threads):
        yield


def blas_hint() -> str | None:
    """A line for the user when numpy's OpenBLAS runs AVX2 kernels on a CPU with AVX-512 (by
    its own detection or because OPENBLAS_CORETYPE says so): the adaptation is a GEMM, and
    OpenBLAS's AVX-512 kernels (OPENBLAS_CORETYPE=SkylakeX, set before Python starts) ran it
    1.5-1.9x faster on the AMD EPYC it was measured on. None when unknown or nothing to gain."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    from . import simd_paths

    arch = next((i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"), None)
    if arch in ("Haswell", "Zen") and "avx512" in simd_paths():
        why = f" (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set)" if os.environ.get("OPENBLAS_CORETYPE") else ""
        return (f"numpy's OpenBLAS runs its {arch} (AVX2) kernels on this AVX-512 CPU{why}; "
                "OPENBLAS_CORETYPE=SkylakeX selects its AVX-512 ones (a faster GEMM)")
    return None


def apply_many(weights, stores: Sequence[str | os.PathLike], out_dir: str | os.PathLike, **kwargs) -> list[Path]:
    """`apply` for each store to `out_dir/<its name>`; a store written in parts (a folder of
    part-XXXXX-of-XXXXX stores) becomes the same parts under its name. Returns the outputs."""
    ad = load_weights(weights)
    out_dir = Path(out_dir)
    outputs = []
    names = [Path(s).name for s in stores]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"stores: several are named {sorted(dup)[0]!r}; their outputs in {out_dir} would collide")
    for s in stores:  # every input checked before the first row is written
        for st in open_stores(s):
            if st.dim != ad.in_dim:
                raise ValueError(f"{ad.path}: the layer takes {ad.in_dim}-d features but {st.path} holds "
                                 f"{st.dim}-d ones (weights of another model?)")
    for s in map(Path, stores):
        dest = out_dir / s.name
        if (s / "manifest.json").exists() or not s.is_dir():
            apply(ad, s, dest, **kwargs)
        else:
            for part in part_dirs(s):
                apply(ad, part, dest / part.name, **kwargs)
        outputs.append(dest)
    return outputs


def adapted_database(weights, stores: Sequence, out_dir: str | os.PathLike, **kwargs) -> list[Path]:
    """`apply_many`, skipping stores that are already adapted with these weights (returned as
    they are): what `ilias search --adapt` and `ilias run --adapt` call."""
    ad = load_weights(weights)
    done, todo = {}, []
    for s in stores:
        opened = open_stores(s)
        found = [st.manifest.provenance.get("adaptation") for st in opened]
        if all(a and a["sha256"] == ad.sha256 for a in found):
            done[str(s)] = Path(s)
            continue
        todo.append(s)
    made = dict(zip(map(str, todo), apply_many(ad, todo, out_dir, **kwargs))) if todo else {}
    return [done.get(str(s)) or made[str(s)] for s in stores]


def default_adapted_dir(weights: Adaptation, root: str | os.PathLike) -> Path:
    """Where `--adapt` puts adapted stores: `<root>/adapted/<weights stem>-<sha256[:12]>`."""
    return Path(root) / "adapted" / f"{Path(weights.path).stem}-{weights.sha256[:12]}"


# ---------------------------------------------------------------------------------------------
# training


@dataclass(frozen=True)
class Recipe:
    """The official training recipe (ILIAS linear_adaptation): defaults as published."""

    dim: int = 512
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-6
    scale: float = 16.0
    seed: int = 0


def read_label_list(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """A `path,label,domain` list (UnED's, as the official code reads it): the paths and one class
    per line, numbered by first appearance of its (label, domain) pair."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such label list")
    paths, classes, index = [], [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(",", 2)
            if len(parts) != 3:
                raise ValueError(f"{path}:{n}: expected path,label,domain, got {line[:80]!r}")
            try:
                pair = (int(parts[1]), int(parts[2]))
            except ValueError:
                if n == 1 and not paths:
                    continue  # a header line
                raise ValueError(f"{path}:{n}: label and domain must be whole numbers, got {line[:80]!r}") from None
            paths.append(parts[0])
            classes.append(index.setdefault(pair, len(index)))
    if not paths:
        raise ValueError(f"{path}: the label list is empty")
    return paths, np.array(classes, dtype=np.int64)


def align_labels(store: Store, list_path: str | os.PathLike, paths: list[str], classes: np.ndarray) -> np.ndarray:
    """The class of each row of `store`: by id when the store's ids are the list's paths (in any
    order), else by position (with a warning) when the ids are something else."""
    if len(paths) != store.count:
        raise ValueError(f"{list_path}: {len(paths):,} labelled lines for the {store.count:,} rows of {store.path}; "
                         "the list and the features must describe the same images")
    ids = store.all_ids()
    if ids == paths:
        return classes
    where = {p: i for i, p in enumerate(paths)}
    if len(where) != len(paths):
        raise ValueError(f"{list_path}: some paths are listed twice")
    hits = [where.get(i) for i in ids]
    matched = sum(h is not None for h in hits)
    if matched == len(ids):
        return classes[np.array(hits, dtype=np.int64)]
    if matched:
        missing = next(i for i, h in zip(ids, hits) if h is None)
        raise ValueError(f"{list_path}: {len(ids) - matched:,} of the {len(ids):,} ids of {store.path} are not in the "
                         f"list (e.g. {missing!r})")
    warnings.warn(f"{store.path}: its ids are not the paths of {list_path}; rows and lines are matched by position",
                  stacklevel=2)
    return classes


def train(
    features,
    labels: str | os.PathLike,
    out: str | os.PathLike,
    recipe: Recipe = Recipe(),
    *,
    device: str | None = None,
    progress: bool = False,
    say=None,
) -> dict:
    """Trains an adaptation layer on `features` (a store or its path: e.g. the UnED training
    subset's features) labelled by the `path,label,domain` list `labels`, writes its state_dict
    (`layer.weight`, `layer.bias`: the official layout) to `out` (atomically) and a record of the
    run beside it (`<out>.json`). Needs torch. Returns the record."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        raise ImportError(f"adapt train needs torch: {MODELS_EXTRA}") from None
    store = features if isinstance(features, Store) else Store.open(features)
    paths, classes = read_label_list(labels)
    y_np = align_labels(store, labels, paths, classes)
    n, d = store.count, store.dim
    if n < recipe.batch_size:
        raise ValueError(f"{store.path}: {n:,} rows, fewer than one batch of {recipe.batch_size}")
    for name in ("dim", "epochs", "batch_size"):
        if getattr(recipe, name) < 1:
            raise ValueError(f"{name}: must be at least 1, got {getattr(recipe, name)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_classes = int(y_np.max()) + 1
    t0 = time.monotonic()
    with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
        torch.manual_seed(recipe.seed)
        # the official modules, in the official order of creation (the same random draws)
        layer = torch.nn.Linear(d, recipe.dim)
        torch.nn.init.xavier_uniform_(layer.weight)
        torch.nn.init.constant_(layer.bias, 0.0)
        classifier = torch.nn.Linear(recipe.dim, n_classes, bias=False)
        layer, classifier = layer.to(dev), classifier.to(dev)
        x_all = torch.from_numpy(np.ascontiguousarray(store.read_all())).to(dev)  # the stored dtype: half the RAM of float32
        y_all = torch.from_numpy(y_np).to(dev)
        opt = torch.optim.Adam([*layer.parameters(), *classifier.parameters()], lr=recipe.lr,
                               weight_decay=recipe.weight_decay)
        steps = n // recipe.batch_size  # the last partial batch is dropped, as in the official sampler
        losses = []
        with Progress("adapt train", total=steps * recipe.epochs, unit="steps", enabled=progress) as bar:
            for epoch in range(recipe.epochs):
                # what the official BatchSampler(RandomSampler(...)) draws each epoch: a seed from the
                # global generator, then a permutation from a generator seeded with it; so a seed
                # here gives the official script's batches run after torch.manual_seed(seed)
                epoch_seed = int(torch.empty((), dtype=torch.int64).random_().item())
                order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed)).to(dev)
                total = 0.0
                for s in range(steps):
                    idx = order[s * recipe.batch_size : (s + 1) * recipe.batch_size]
                    x = x_all[idx].float()
                    a = F.normalize(layer(x), p=2, dim=-1)
                    logits = a @ F.normalize(classifier.weight, p=2, dim=1).T
                    loss = F.cross_entropy(recipe.scale * logits, y_all[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    total += float(loss.detach())
                    bar.update(1)
                losses.append(total / steps)
                if say:
                    say(f"epoch {epoch + 1}/{recipe.epochs}: mean loss {losses[-1]:.4f}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {WEIGHT_KEY: layer.weight.detach().float().cpu().contiguous(),
             BIAS_KEY: layer.bias.detach().float().cpu().contiguous()}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    record = {
        "weights": str(out), "sha256": file_sha256(out), "recipe": vars(recipe), "in_dim": d, "out_dim": recipe.dim,
        "classes": n_classes, "rows": n, "steps_per_epoch": steps, "epoch_losses": losses, "device": str(dev),
        "features": {"path": str(store.path), "fingerprint": store.fingerprint,
                     "model": store.manifest.provenance.get("model")},
        "labels": {"path": str(labels), "sha256": file_sha256(labels)},
        "seconds": round(time.monotonic() - t0, 3), "torch": torch.__version__,
    }
    atomic_write(out.with_name(out.name + ".json"), json.dumps(record, indent=1))
    return record


def adaptation_label(db: Database) -> str | None:
    """How results name the adaptation of `db` ("<weights>@<sha256[:12]>"), None for plain
    features, "mixed" when its stores disagree (`adaptation_of` is the check that refuses it)."""
    found = {(a["weights"], a["sha256"]) if a else None
             for a in (s.manifest.provenance.get("adaptation") for s in db.stores)}
    if len(found) > 1:
        return "mixed"
    one = found.pop()
    return f"{one[0]}@{one[1][:12]}" if one else None
