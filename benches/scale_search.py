"""Scale check: exact search of 2,232 queries (k=1000) against 1M and 10M float16 vectors.

    python benches/scale_search.py --sizes 1000000,10000000

Each search runs in a fresh process, so its peak RSS is its own. The data (15 GB at 10M x 768)
is made once under bench-data/. Prints wall time, GFLOP/s and peak RSS per size: peak RSS should
stay flat as the database grows (the search holds per-thread top-k buffers and a few chunks of
pages, never the database).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

CHILD = """
import json, resource, sys, time
import numpy as np
import ilias
from common import queries
store = ilias.Store.open(sys.argv[1])
q = queries(int(sys.argv[2]), store.dim)
t0 = time.perf_counter()
r = ilias.search(q, store, k=int(sys.argv[3]), threads=int(sys.argv[4]), method=sys.argv[5], progress=True)
ids = r.ids(0)
secs = time.perf_counter() - t0
i = r.info
share = i["rescored_pairs"] / i["int8_pairs"] if i["int8_pairs"] else None
print(json.dumps({"seconds": secs, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "int8_share": i["int8_pairs"] / (i["int8_pairs"] + i["float_pairs"]), "rescored": share}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--nq", type=int, default=2232)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="float32,exact", help="ilias search methods to run")
    args = ap.parse_args()
    from common import make_store, table

    rows = []
    for n in map(int, args.sizes.split(",")):
        store = make_store("scale", n, args.d, chunk=100_000)
        for method in args.methods.split(","):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(store.path), str(args.nq), str(args.k), str(args.threads), method],
                cwd=os.path.dirname(__file__),
                check=True,
                stdout=subprocess.PIPE,
                text=True,
            )
            m = json.loads(out.stdout.strip().splitlines()[-1])
            gflops = 2 * args.nq * n * args.d / m["seconds"] / 1e9
            rows.append(
                {
                    "rows": f"{n:,}",
                    "method": method,
                    "store GB": f"{n * args.d * 2 / 1e9:.1f}",
                    "seconds": f"{m['seconds']:.1f}",
                    "GFLOP/s": f"{gflops:.0f}",
                    "peak RSS GB": f"{m['rss_gb']:.2f}",
                    "int8 pairs": f"{100 * m['int8_share']:.0f}%",
                    "rescored": f"{100 * m['rescored']:.1f}%" if m["rescored"] is not None else "",
                }
            )
            print(rows[-1], flush=True)
    print(table(rows, ["rows", "method", "store GB", "seconds", "GFLOP/s", "peak RSS GB", "int8 pairs", "rescored"]))


if __name__ == "__main__":
    main()
