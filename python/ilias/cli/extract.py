"""`ilias extract MODEL ...`: embed images (and text queries) into stores, as the ILIAS paper does.

    ilias extract MODEL --core ILIAS/ilias_core -o feats/MODEL       image_queries, positives, text_queries
    ilias extract MODEL --tars yfcc/ [--ids mini_ilias_yfcc100m_ids.txt] -o feats/MODEL/distractors
    ilias extract MODEL --folder photos/ -o feats/photos
    ilias extract --merge feats/MODEL/distractors                   join the parts of a split run

Resumable: run the same command again after an interruption. Split across machines with
--shard-id/--num-shards (or torchrun's RANK/WORLD_SIZE, or a SLURM array): each piece writes
OUT/part-<k>-of-<n>; search takes the parts folder as it is, or --merge makes it one store.
Or let Dask schedule the pieces (one per tar), retry them and merge them: --cluster local[:N],
--cluster slurm (--slurm-gpus 4 --slurm-jobs 8 ..., or --cluster-config slurm.yaml), or
--cluster tcp://HOST:PORT (a running scheduler); the store is the one a single process writes.
Weights come from the usual caches (Hugging Face, torch hub) or --weights PATH.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from .options import NON_NEGATIVE, POSITIVE, whole

ALL_CORE = "image_queries,positives,text_queries"


def add_parser(sub) -> None:
    p = sub.add_parser("extract", help="extract features into stores", description=__doc__,
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model name (see `ilias models`)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--core", metavar="DIR", help="the ILIAS core images (ilias_core/)")
    src.add_argument("--tars", nargs="+", metavar="TAR", help="webdataset tar shards, or folders of them")
    src.add_argument("--folder", metavar="DIR", help="a folder of images (recursively)")
    src.add_argument("--merge", metavar="OUT", help="join the finished parts of a split run into one store")
    p.add_argument("-o", "--out", help="output store (for --core: a folder of three stores)")
    p.add_argument("--ids", metavar="FILE", help="only these ids (first comma column; bare tar keys match too)")
    p.add_argument("--what", default=ALL_CORE,
                   help="with --core: which partitions (default: all three; text only for vision-language models)")
    p.add_argument("--weights", metavar="PATH", help="local weights file for the image tower")
    p.add_argument("--text-weights", metavar="PATH", help="local weights file for the open_clip text model")
    p.add_argument("--text-tower", metavar="LABEL",
                   help="which text tower where a model has several (`ilias models -v`; default: published)")
    p.add_argument("--random-init", action="store_true", help="random weights (testing, benchmarks)")
    p.add_argument("--transform", choices=["resize_large", "model"], default="resize_large",
                   help="the paper's RESIZE_LARGE (default) or the model's own eval transform")
    p.add_argument("--resolution", type=whole(16, 8192), help="larger image side (default: the model's test resolution)")
    p.add_argument("--batch-size", type=POSITIVE, default=32)
    p.add_argument("--workers", type=whole(0, 1024), default=4, help="DataLoader decoding processes (default 4)")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: this process's GPU, else cpu)")
    p.add_argument("--shard-rows", type=POSITIVE, default=1_000_000, help="rows per store shard (default 1,000,000)")
    p.add_argument("--shard-id", type=NON_NEGATIVE, help="this piece of a split run (0-based)")
    p.add_argument("--num-shards", type=POSITIVE, help="number of pieces of a split run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    from .cluster_args import add_cluster_options

    add_cluster_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.merge:
        from ..extract import merge_parts

        store = merge_parts(args.merge)
        print(f"{store.path}: {store.count:,} rows of dim {store.dim} in {store.num_shards} shard(s)")
        return 0
    if not args.model:
        raise ValueError("MODEL: give a model name (see `ilias models`)")
    if not (args.core or args.tars or args.folder):
        raise ValueError("give the images: --core DIR, --tars TAR..., or --folder DIR")
    if not args.out:
        raise ValueError("--out: give the output folder")
    from ..extract import (
        core_sources,
        extract_images,
        extract_texts,
        folder_sources,
        list_items,
        piece_from_env,
        select,
        tar_sources,
    )
    from ..groundtruth import read_id_list
    from ..models import build_image_encoder, build_text_encoder, get_spec

    spec = get_spec(args.model)
    wanted = read_id_list(args.ids) if args.ids else None
    sourced = []  # (output store, its sources, texts?, EXIF-transposed?, only these ids)
    if args.core:
        kinds = [k.strip() for k in args.what.split(",") if k.strip()]
        for kind in kinds:
            if kind == "text_queries" and spec.text is None:
                if args.what != ALL_CORE:
                    raise ValueError(f"--what text_queries: {spec.name} is not a vision-language model")
                continue
            ids = _for_kind(wanted, kind)
            if ids == []:
                continue  # the id list names none of this partition
            sourced.append((Path(args.out) / kind, core_sources(args.core, kind, ids), kind == "text_queries", True, None))
    else:
        sources = tar_sources(args.tars) if args.tars else folder_sources(args.folder)
        sourced.append((Path(args.out), sources, False, False, wanted))
    from .cluster_args import cluster_options

    cluster = cluster_options(args, gpu=None if args.device is None else args.device.startswith("cuda"))
    if cluster is not None:
        return _on_cluster(args, spec, cluster, sourced)
    piece = piece_from_env(args.shard_id, args.num_shards)
    jobs = []  # (output store, items)
    for out, sources, text, exif, ids in sourced:
        items = list_items(piece.slice(sources), exif=exif, text=text)
        jobs.append((out, items if ids is None else select(items, ids)))
    common = dict(device=args.device, shard_rows=args.shard_rows, progress=not args.quiet,
                  provenance={"piece": piece.name})
    encoder = text_encoder = None
    with warnings.catch_warnings():
        warnings.showwarning = _warn
        for out, items in jobs:
            dest = piece.out_dir(out)
            if items.text:
                if text_encoder is None:
                    _seed(args)
                    text_encoder = build_text_encoder(spec, pretrained=not args.random_init, weights=args.text_weights,
                                                      tower=args.text_tower)
                store = extract_texts(items, text_encoder, dest, **common)
            else:
                if encoder is None:
                    _seed(args)
                    encoder = build_image_encoder(spec, pretrained=not args.random_init, weights=args.weights)
                store = extract_images(items, encoder, dest, transform=args.transform, resolution=args.resolution,
                                       batch_size=args.batch_size, workers=args.workers, **common)
            _report(store)
    return 0


def _seed(args) -> None:
    if args.random_init:
        import torch

        torch.manual_seed(0)  # the same random weights in every run (and on every cluster worker)


def _report(store) -> None:
    skipped = len(store.manifest.provenance.get("skipped", []))
    note = f", {skipped} skipped (listed in the manifest)" if skipped else ""
    print(f"{store.path}: {store.count:,} rows of dim {store.dim}{note}")


def _on_cluster(args, spec, cluster, sourced) -> int:
    """The extraction as Dask tasks (one per tar, or per range of images), merged into the stores."""
    from ..cluster import Recipe, Settings, StoreJob, extract_on_cluster

    if args.shard_id is not None or args.num_shards is not None:
        raise ValueError("--cluster: the cluster splits the run itself; leave out --shard-id/--num-shards")
    absolute = lambda p: None if p is None else str(Path(p).resolve())  # noqa: E731 (workers may start elsewhere)
    recipe = Recipe(spec, pretrained=not args.random_init, weights=absolute(args.weights),
                    text_weights=absolute(args.text_weights), text_tower=args.text_tower)
    settings = Settings(transform=args.transform, resolution=args.resolution, batch_size=args.batch_size,
                        workers=args.workers, device=args.device or ("cuda" if cluster.gpu else "cpu"),
                        shard_rows=args.shard_rows)
    jobs = [StoreJob(out.resolve(), sources, text, exif, absolute(args.ids) if ids is not None else None)
            for out, sources, text, exif, ids in sourced]
    with warnings.catch_warnings():
        warnings.showwarning = _warn
        for store in extract_on_cluster(cluster, recipe, jobs, settings):
            _report(store)
    return 0


def _for_kind(wanted, kind):
    """The ids of one core partition from a mixed list (queries are Q*, texts T*, positives P*)."""
    if wanted is None:
        return None
    folder, prefix = {"image_queries": ("query", "Q"), "positives": ("pos", "P"), "text_queries": ("query", "T")}[kind]
    return [i for i in wanted if i.split("/")[1:2] == [folder] and i.rsplit("/", 1)[-1].startswith(prefix)]


def _warn(message, *_args, **_kwargs) -> None:
    print(f"ilias extract: warning: {message}", file=sys.stderr)
