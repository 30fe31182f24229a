"""`ilias info STORE...`: the manifest of each store (or of each part of a store written in parts),
validated, optionally checksummed."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="show and validate stores", description=__doc__)
    p.add_argument("stores", nargs="+", help="store directories")
    p.add_argument("--verify", action="store_true", help="also recompute every shard's checksum (reads all data)")
    p.add_argument("--json", action="store_true", help="print the manifests as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from ..store import open_stores

    for store in (s for path in args.stores for s in open_stores(path)):
        if args.verify:
            store.verify()
        m = store.manifest
        if args.json:
            print(m.to_json())
            continue
        gb = store.count * store.dim * store.dtype.itemsize / 1e9
        print(f"{store.path}: ilias store v1, valid{' (checksums verified)' if args.verify else ''}")
        print(f"  rows        {store.count:,} in {store.num_shards} shard(s)")
        print(f"  vectors     {store.dim}-d {m.dtype} ({gb:.2f} GB)")
        print(f"  normalized  {m.normalized}")
        print(f"  fingerprint {store.fingerprint}")
        if m.provenance:
            print(f"  provenance  {json.dumps(m.provenance)}")
    return 0
