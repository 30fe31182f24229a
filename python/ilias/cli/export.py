"""`ilias export STORE --out FILE.hdf5`: a store as an official HDF5 feature file."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a store to the official HDF5 layout", description=__doc__)
    p.add_argument("store", help="store directory")
    p.add_argument("--out", required=True, help="HDF5 file to write (datasets 'features' and 'index')")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..interop import export_hdf5
    from ..progress import Progress
    from ..store import Store

    store = Store.open(args.store)
    with Progress("export") as bar:
        path = export_hdf5(store, args.out, progress=bar)
    print(f"{path}: {store.count:,} rows")
    return 0
