"""`ilias import SRC... --out STORE`: official HDF5 feature files or a .npy matrix into a store.

Resumable: run the same command again after an interruption and it continues after the last
complete shard. The store records what it was imported from: importing other files into it is an
error unless --replace, which writes it anew beside the old one and swaps them when complete.
"""

from __future__ import annotations

from pathlib import Path

from .options import POSITIVE


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="import HDF5 feature files or a .npy matrix", description=__doc__)
    p.add_argument("sources", nargs="+", help="official .hdf5 feature files (in database order) or one .npy file")
    p.add_argument("--out", required=True, help="store directory to create or resume")
    p.add_argument("--ids", help="for .npy: a text file with one id per row (default: row numbers)")
    p.add_argument("--shard-rows", type=POSITIVE, default=1_000_000, help="rows per shard (default 1,000,000)")
    p.add_argument("--replace", action="store_true", help="replace a store imported from other files")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..interop import import_hdf5, import_npy
    from ..progress import Progress

    sources = [Path(s) for s in args.sources]
    suffixes = {s.suffix.lower() for s in sources}
    with Progress("import") as bar:
        if suffixes <= {".h5", ".hdf5"}:
            if args.ids:
                raise ValueError("--ids: HDF5 files carry their own ids (the 'index' dataset)")
            store = import_hdf5(sources, args.out, shard_rows=args.shard_rows, progress=bar, replace=args.replace)
        elif suffixes == {".npy"} and len(sources) == 1:
            ids = None
            if args.ids:
                ids = [line.rstrip("\n") for line in Path(args.ids).read_text(encoding="utf-8").splitlines()]
            store = import_npy(sources[0], args.out, ids=ids, shard_rows=args.shard_rows, progress=bar,
                               replace=args.replace)
        else:
            raise ValueError("sources: give official .hdf5 files or exactly one .npy file")
    print(f"{store.path}: {store.count:,} rows of dim {store.dim} in {store.num_shards} shard(s)")
    return 0
