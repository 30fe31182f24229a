"""`ilias run`: the whole benchmark for one model, each step resumable and skipped when current.

Steps, in a work folder:
1. features: `stores/{image_queries,positives,text_queries}` from `ilias_core/`, and
   `stores/distractors` from the webdataset tars (all of them, the mini-ILIAS subset, or the first N);
   a store counts as done when its manifest says the extraction completed (a killed extraction
   resumes at shard granularity);
2. search: image and text queries in one pass over positives + distractors, answering every
   database size at once (tiers: positives + the first N, mini-ILIAS when its list is at hand, all):
   `results.<tier>.npz`, skipped when present and made from the current stores and k;
3. evaluation and reports: `report.<tier>.json|md`, and `report.html` with the mAP-versus-
   distractors curve (cheap: always redone);
4. `run.json`: the configuration, library versions, hardware and the time of each step.

Every output is written atomically, so a run interrupted at any point and started again ends with
the same files as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ._io import atomic_write
from .database import Database
from .store import Store

if TYPE_CHECKING:
    from .rerank.workflow import RerankConfig

MINI_LIST = "image_ids/mini_ilias_yfcc100m_ids.txt"


@dataclass
class RunConfig:
    model: str
    data: str  # the ILIAS folder: ilias_core/, image_ids/, taxonomy.json
    out: str
    tars: list[str] | None = None  # distractor tars (none: positives only)
    distractors: str = "full"  # full | mini | a number of distractors
    k: int = 1000
    random_init: bool = False
    weights: str | None = None
    text_weights: str | None = None
    text_tower: str | None = None  # a label of the model's text towers (default: the published one)
    device: str | None = None
    batch_size: int = 32
    workers: int = 4
    threads: int = 0
    prefixes: tuple[int, ...] = (10**6, 10**7)  # tiers: positives plus the first N distractors
    published: bool = True  # place the results among the published models (False: data that is not ILIAS)
    adapt: str | None = None  # a linear adaptation layer (.pth): adapted results as their own rows
    qe: int | None = None  # query expansion with this many neighbours (on the adapted search when adapting)
    qe_alpha: float = 1.0
    rerank: "RerankConfig | None" = None  # re-rank the plain search's image-query lists (rerank/)
    rerank_tiers: tuple[str, ...] | None = None  # the tiers re-ranked (None: all)


def _text_tower(path: Path) -> str | None:
    """The text tower a finished text store was made with."""
    return Store.open(path).manifest.provenance.get("text_tower")


def _complete(path: Path) -> bool:
    try:
        return bool(Store.open(path).manifest.provenance.get("complete"))
    except (OSError, ValueError):
        return False


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("ilias-core", "numpy", "torch", "timm", "open_clip_torch", "pillow"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _hardware() -> dict:
    from . import simd_paths

    hw = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
          "simd": simd_paths()}
    try:
        import torch

        if torch.cuda.is_available():
            hw["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        pass
    return hw


def _write_json(path: Path, data) -> None:
    atomic_write(path, json.dumps(data, indent=1))


def run(cfg: RunConfig, spec=None, say=print, features=None, cluster=None) -> dict:
    """Runs (or finishes) the benchmark described by `cfg`; `spec` overrides the registry entry
    of `cfg.model` (a ModelSpec, e.g. a small model for tests). `features(stores_dir)`, when
    given, replaces the extraction step (the demo's numpy model): it makes sure that the stores
    are there and returns what it did. `cluster` (an `ilias.cluster.ClusterOptions`): extraction
    and the plain search run there as Dask tasks (same stores, same results). Returns the run record."""
    from .evaluate import evaluate
    from .groundtruth import load_ground_truth, read_id_list
    from .report import build_report, write_html, write_json, write_markdown
    from .results import SearchResults, write_all
    from .search import Tier, search_tiers, tier_name

    data, out = Path(cfg.data), Path(cfg.out)
    core = data / "ilias_core"
    if not core.is_dir():
        raise FileNotFoundError(f"--data {data}: no ilias_core/ folder")
    if cfg.distractors not in ("full", "mini") and not str(cfg.distractors).isdigit():
        raise ValueError(f"--distractors: full, mini or a number, got {cfg.distractors!r}")
    mini_list = data / MINI_LIST
    if cfg.distractors == "mini" and cfg.tars and not mini_list.exists():
        raise FileNotFoundError(f"--distractors mini: {mini_list} is missing")
    if cfg.adapt:
        from .adapt import load_weights

        load_weights(cfg.adapt)  # a bad weights file is an error before any work
    if cfg.qe is not None:
        from .expand import Expansion

        Expansion(cfg.qe, cfg.qe_alpha)
        if cfg.qe > cfg.k:
            raise ValueError(f"--qe {cfg.qe}: more neighbours than the k = {cfg.k} results of the first pass")
    out.mkdir(parents=True, exist_ok=True)
    record = {"config": asdict(cfg), "versions": _versions(), "hardware": _hardware(), "steps": {}}

    def step(name, fn):
        t0 = time.monotonic()
        result = fn()
        record["steps"][name] = {"seconds": round(time.monotonic() - t0, 3), "done": result}
        _write_json(out / "run.json", record)
        return result

    stores = out / "stores"
    if features is not None:
        step("features", lambda: features(stores))
    else:
        step("features", lambda: _extract(cfg, spec, core, stores, mini_list, say, cluster))
    gt = load_ground_truth(data)
    queries = [Store.open(stores / k) for k in ("image_queries", "text_queries") if (stores / k).exists()]
    db = Database.of([stores / "positives"] + ([stores / "distractors"] if (stores / "distractors").exists() else []))
    n_pos, total = db.stores[0].count, db.count

    tiers = [Tier.prefix(tier_name(n), db, n) for n in cfg.prefixes if n_pos + n < total]
    if cfg.distractors == "full" and len(db.stores) > 1 and mini_list.exists():
        tiers.append(Tier.mini(db, read_id_list(mini_list)))
    tiers.append(Tier("all", setting="mini" if cfg.distractors == "mini" else None))
    if not cfg.published:
        tiers = [replace(t, setting="") for t in tiers]
    rerank_names = _rerank_names(cfg, tiers) if cfg.rerank is not None else []  # checked before any search

    def search_step():
        paths = {t.name: out / f"results.{t.name}.npz" for t in tiers}
        current = [p for p in paths.values() if _current(p, db, cfg.k)]
        if len(current) == len(paths):
            return "current"
        if cluster is None:
            found = search_tiers(queries, db, tiers, cfg.k, threads=cfg.threads, progress=True)
        else:
            from .cluster import search_tiers_on_cluster

            found = search_tiers_on_cluster(cluster, queries, db, tiers, cfg.k)
        write_all([(paths[name], res) for name, res in found.items()])  # all tiers together, or none
        return f"{len(queries)} query stores x {total:,} rows, {len(tiers)} tier(s)"

    step("search", search_step)
    variants = _variant_steps(cfg, out, stores, queries, db, tiers, step)
    reranked = _rerank_step(cfg, out, data, db, rerank_names, step) if cfg.rerank is not None else None

    def report_step():
        # per variant ("" for the plain search): (the curve over the tiers, the report of "all")
        found, shown = {}, None
        for suffix in ["", *variants, *([reranked] if reranked else [])]:
            curve, reports = [], {}
            for t in tiers:
                name = f"{t.name}.{suffix}" if suffix else t.name
                if suffix == reranked and t.name not in rerank_names:
                    continue  # re-ranking may cover some tiers only (where the images are)
                res = SearchResults.load(out / f"results.{name}.npz")
                ev = evaluate(res, gt, cfg.k, threads=cfg.threads)
                rep = build_report(ev, config={"model": cfg.model, "tier": t.name})
                write_json(rep, out / f"report.{name}.json")
                write_markdown(rep, out / f"report.{name}.md")
                curve.append({"name": t.name, "rows": res.tier_rows, **{k: v["map"] for k, v in rep["tasks"].items()}})
                reports[t.name] = rep
                if not suffix and t.name == "all":
                    shown = _qualitative(res, gt, core, cfg.tars)
            curve.sort(key=lambda c: c["rows"])
            found[suffix] = (curve, reports.get("all") or reports[curve[-1]["name"]])
        curve, main = found.pop("")
        # re-ranking may cover some tiers only: its table pairs each re-ranked tier with its global row
        rerank_rows = None
        if reranked:
            r_curve, r_rep = found.pop(reranked)
            plain = {c["name"]: c for c in curve}
            rerank_rows = {"label": r_rep["config"]["variant"],
                           "tiers": [{"name": c["name"], "rows": c["rows"], "global": plain[c["name"]], "reranked": c} for c in r_curve]}
        write_html(main, out / "report.html", tiers=curve if len(curve) > 1 else None, qualitative=shown,
                   variants=[{"label": rep["config"]["variant"], "report": rep} for _, rep in found.values()],
                   reranking=rerank_rows)
        summary = lambda c: {x["name"]: {k: x[k] for k in ("rows", "i2i", "t2i") if k in x} for x in c}  # noqa: E731
        record["variants"] = {rep["config"]["variant"]: summary(c) for c, rep in found.values()}
        if rerank_rows:
            record["variants"][rerank_rows["label"]] = summary([t["reranked"] for t in rerank_rows["tiers"]])
        return summary(curve)

    record["results"] = step("evaluate", report_step)
    _write_json(out / "run.json", record)
    return record


def variant_suffix(adapt: bool, qe: int | None, alpha: float = 1.0) -> str:
    """The results and report file names' part for a variant: "adapt", "qe2", "adapt-qe2-a3"."""
    parts = ["adapt"] if adapt else []
    if qe:
        parts.append(f"qe{qe}" + (f"-a{alpha:g}" if alpha != 1 else ""))
    return "-".join(parts)


def _variant_steps(cfg: RunConfig, out: Path, stores: Path, queries, db: Database, tiers, step) -> list[str]:
    """The searches added to the plain one, as steps: adapted (`--adapt`: the stores adapted, then
    searched like the plain ones), and expanded (`--qe`: on top of the adapted search when there
    is one, else of the plain one, its results serving as the first pass). Returns the suffixes of
    their results files (results.<tier>.<suffix>.npz), each skipped when current."""
    from .adapt import adapted_database, default_adapted_dir, load_weights
    from .expand import search_expanded
    from .results import SearchResults, write_all
    from .search import search_tiers

    suffixes, base_q, base_db, base = [], queries, db, ""
    if cfg.adapt:
        ad = load_weights(cfg.adapt)
        given = [s.path for s in queries] + [s.path for s in db.stores]
        target = default_adapted_dir(ad, out)

        def adapt_step():
            before = {str(p): (p / "manifest.json").exists() for p in (target / Path(g).name for g in given)}
            adapted_database(ad, given, target, threads=cfg.threads, progress=True)
            return "current" if all(before.values()) else f"{len(given)} stores with {ad.label}"

        step("adapt", adapt_step)
        base_q = [Store.open(target / Path(g).name) for g in given[: len(queries)]]
        base_db = Database.of([target / Path(g).name for g in given[len(queries):]])
        base = "adapt"

        def adapted_search():
            paths = {t.name: out / f"results.{t.name}.adapt.npz" for t in tiers}
            if all(_current(p, base_db, cfg.k) for p in paths.values()):
                return "current"
            found = search_tiers(base_q, base_db, tiers, cfg.k, threads=cfg.threads, progress=True)
            write_all([(paths[name], res) for name, res in found.items()])
            return f"{len(base_q)} query stores x {base_db.count:,} adapted rows, {len(tiers)} tier(s)"

        step("search adapt", adapted_search)
        suffixes.append("adapt")
    if cfg.qe:
        suffix = variant_suffix(bool(cfg.adapt), cfg.qe, cfg.qe_alpha)

        def expanded_search():
            paths = {t.name: out / f"results.{t.name}.{suffix}.npz" for t in tiers}
            if all(_current(p, base_db, cfg.k, (cfg.qe, cfg.qe_alpha)) for p in paths.values()):
                return "current"
            first = {t.name: SearchResults.load(out / f"results.{t.name}{base and '.' + base}.npz") for t in tiers}
            found = search_expanded(base_q, base_db, tiers, cfg.k, n=cfg.qe, alpha=cfg.qe_alpha, first=first,
                                    threads=cfg.threads, progress=True)
            write_all([(paths[name], res) for name, res in found.items()])
            st = next(iter(found.values())).stats
            return f"QE {cfg.qe}: {st.qe_passes} scan(s) of {st.qe_queries:,} expanded queries"

        step(f"search {suffix}", expanded_search)
        suffixes.append(suffix)
    return suffixes


def _rerank_names(cfg: RunConfig, tiers) -> list[str]:
    """The names of the tiers to re-rank: `cfg.rerank_tiers`, each a tier of this run, or all."""
    have = [t.name for t in tiers]
    if cfg.rerank_tiers is not None and not cfg.rerank_tiers:
        raise ValueError(f"rerank tiers: expected at least one of this run's tiers ({', '.join(have)}), or None for all")
    unknown = [n for n in cfg.rerank_tiers or () if n not in have]
    if unknown:
        raise ValueError(f"rerank tiers: {', '.join(unknown)} is not a tier of this run ({', '.join(have)})")
    return [n for n in have if cfg.rerank_tiers is None or n in cfg.rerank_tiers]


def _rerank_step(cfg: RunConfig, out: Path, data: Path, db: Database, names: list[str], step) -> str:
    """Re-ranks the plain search's results of the tiers `names` (`results.<tier>.rerank-<method>.npz`),
    describing the queries and shortlisted images missing from `locals-<method>/`. Returns the
    results' suffix."""
    from .rerank.images import ImageSource
    from .rerank.rerank import label_of
    from .rerank.workflow import Method, rerank_results
    from .results import SearchResults, write_all

    rc = cfg.rerank
    suffix = f"rerank-{rc.method}"

    def rerank_step():
        method = Method(rc)
        label = label_of(method.scorer, rc.top, *method.weights)
        paths = {n: out / f"results.{n}.{suffix}.npz" for n in names}
        key = method.key()
        if all(_current(p, db, cfg.k) and SearchResults.load(p).reranking_key == key for p in paths.values()):
            return "current"
        base = [SearchResults.load(out / f"results.{n}.npz") for n in names]
        found = rerank_results(rc, base, out / f"locals-{rc.method}", ImageSource(data, cfg.tars or ()), method=method)
        write_all(list(zip(paths.values(), found)))
        return f"{label}: {len(names)} tier(s)"

    step(f"rerank {rc.method}", rerank_step)
    return suffix


def _qualitative(res, gt, core: Path, tars, queries: int = 6, top: int = 8) -> list[dict]:
    """The first image query of a few instances with its top results, images read from the core
    folders and the distractor tars (only the members shown), for the report's thumbnails; an
    image that cannot be read shows its id instead."""
    from .rerank.images import ImageNotFound, ImageSource

    try:
        source = ImageSource(core if core.is_dir() else None, tars or ())
    except (OSError, ValueError):
        source = ImageSource(core if core.is_dir() else None)

    def image(item_id: str) -> bytes | None:
        try:
            return source.read(item_id)
        except (ImageNotFound, OSError, ValueError):
            return None

    positives = set(gt.positives)
    rows, seen = [], set()
    for r, q in enumerate(res.query_ids):
        inst = q.split("/", 1)[0]
        if gt.task_of(q) != "i2i" or inst in seen:
            continue
        seen.add(inst)
        ranked = res.ranked(r)[:top]
        rows.append({
            "query_id": q,
            "query_image": image(q),
            "results": [{"id": i, "score": s, "positive": i in positives and i.split("/", 1)[0] == inst, "image": image(i)}
                        for i, s in ranked],
        })
        if len(rows) == queries:
            break
    return rows


def _current(path: Path, db: Database, k: int, qe: tuple[int, float] | None = None) -> bool:
    """Whether a results file exists and was made from exactly these stores with this k (and,
    for expanded results, this query expansion)."""
    from .results import SearchResults

    if not path.exists():
        return False
    try:
        res = SearchResults.load(path)
    except (OSError, ValueError):
        return False
    made = (res.stats.qe, res.stats.qe_alpha) if res.stats is not None and res.stats.qe else None
    return (res.k == k and [p.fingerprint for p in res.database] == [p.fingerprint for p in db.parts]
            and made == (tuple(qe) if qe else None))


def _extract(cfg: RunConfig, spec, core: Path, stores: Path, mini_list: Path, say, cluster=None) -> dict:
    from .extract import core_sources, extract_images, extract_texts, list_items, select, tar_sources
    from .groundtruth import read_id_list
    from .models import build_image_encoder, build_text_encoder, get_spec

    spec = spec or get_spec(cfg.model)

    def build(factory, weights, **kwargs):
        if cfg.random_init:
            import torch

            torch.manual_seed(0)  # the same random weights in every run, so that resumed runs agree
        return factory(spec, pretrained=not cfg.random_init, weights=weights, **kwargs)

    jobs = [("image_queries", False), ("positives", False)] + ([("text_queries", True)] if spec.text else [])
    done = {}
    encoder = text_encoder = None
    common = dict(device=cfg.device, progress=True)
    tower = "/".join(spec.text_tower(cfg.text_tower)) if spec.text else None
    queued = {}  # with a cluster: the stores to extract there, by name
    for kind, is_text in jobs:
        if _complete(stores / kind) and (not is_text or _text_tower(stores / kind) == tower):
            done[kind] = "current"
            continue
        if cluster is not None:
            from .cluster import StoreJob

            queued[kind] = StoreJob(stores / kind, core_sources(core, kind), text=is_text, exif=True)
            continue
        items = list_items(core_sources(core, kind), exif=True, text=is_text)
        if is_text:
            text_encoder = text_encoder or build(build_text_encoder, cfg.text_weights, tower=cfg.text_tower)
            extract_texts(items, text_encoder, stores / kind, **common)
        else:
            encoder = encoder or build(build_image_encoder, cfg.weights)
            extract_images(items, encoder, stores / kind, batch_size=cfg.batch_size, workers=cfg.workers, **common)
        done[kind] = len(items)
    if cfg.tars:
        sources = tar_sources(cfg.tars)
        # which distractors: a store made from another selection must not pass for this one
        selection = {"distractors": str(cfg.distractors), "tars": [Path(s.path).name for s in sources]}
        dest = stores / "distractors"
        if (dest / "manifest.json").exists():
            made = Store.open(dest).manifest.provenance.get("selection")
            if made != selection:
                raise ValueError(
                    f"{dest} holds distractors selected otherwise ({made}); "
                    f"use another --out, or remove that store to extract {selection['distractors']}"
                )
        if _complete(dest):
            done["distractors"] = "current"
        elif cluster is not None:
            from .cluster import StoreJob

            queued["distractors"] = StoreJob(
                dest, sources, ids_file=str(mini_list) if cfg.distractors == "mini" else None,
                limit=None if cfg.distractors in ("full", "mini") else int(cfg.distractors),
                provenance={"selection": selection})
        else:
            items = list_items(sources)
            if cfg.distractors == "mini":
                items = select(items, read_id_list(mini_list))
            elif cfg.distractors != "full":
                items = items.take(range(min(int(cfg.distractors), len(items))))
            encoder = encoder or build(build_image_encoder, cfg.weights)
            extract_images(items, encoder, dest, batch_size=cfg.batch_size, workers=cfg.workers,
                           provenance={"selection": selection}, **common)
            done["distractors"] = len(items)
    else:
        say("no --tars given: the database is the positives alone")
    if queued:
        from .cluster import Recipe, Settings, extract_on_cluster

        recipe = Recipe(spec, pretrained=not cfg.random_init, weights=cfg.weights, text_weights=cfg.text_weights,
                        text_tower=cfg.text_tower)
        settings = Settings(batch_size=cfg.batch_size, workers=cfg.workers,
                            device=cfg.device or ("cuda" if cluster.gpu else "cpu"))
        made = extract_on_cluster(cluster, recipe, list(queued.values()), settings)
        done.update({kind: s.count + len(s.manifest.provenance.get("skipped", [])) for kind, s in zip(queued, made)})
    return done
