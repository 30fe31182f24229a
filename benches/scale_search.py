"""Scale check: exact search of 2,232 queries (k=1000) against 1M and 10M float16 vectors.

    python benches/scale_search.py --sizes 1000000,10000000

Each search runs in a fresh process, so its peak RSS is its own. The data (15 GB at 10M x 768)
is made once under bench-data/. Prints wall time, GFLOP/s and peak RSS per size: peak RSS should
stay flat as the database grows (the search holds per-thread top-k buffers and a few chunks of
pages, never the database). The same cases run as `pytest benches/test_bench_scale.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))

COLUMNS = ["rows", "method", "store GB", "seconds", "GFLOP/s", "peak RSS GB", "int8 pairs", "rescored"]

CHILD = """
import json, sys, time
import ilias
from ilias.benchmark import peak_rss_gb, queries
store = ilias.Store.open(sys.argv[1])
q = queries(int(sys.argv[2]), store.dim)
t0 = time.perf_counter()
r = ilias.search(q, store, k=int(sys.argv[3]), threads=int(sys.argv[4]), method=sys.argv[5], progress=True)
ids = r.ids(0)
secs = time.perf_counter() - t0
s = r.stats
share = s.rescored_pairs / s.int8_pairs if s.int8_pairs else None
print(json.dumps({"seconds": secs, "rss_gb": peak_rss_gb(),
                  "int8_share": s.int8_pairs / (s.int8_pairs + s.float_pairs), "rescored": share}))
"""


def search_in_child(store, nq, k, threads, method) -> dict:
    """Searches `store` in a fresh Python process: its seconds, peak RSS (GB) and int8 pass shares."""
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(store.path), str(nq), str(k), str(threads), method],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(n, d, nq, method, m) -> dict:
    gflops = 2 * nq * n * d / m["seconds"] / 1e9
    return {
        "rows": f"{n:,}",
        "method": method,
        "store GB": f"{n * d * 2 / 1e9:.1f}",
        "seconds": f"{m['seconds']:.1f}",
        "GFLOP/s": f"{gflops:.0f}",
        "peak RSS GB": f"{m['rss_gb']:.2f}",
        "int8 pairs": f"{100 * m['int8_share']:.0f}%",
        "rescored": f"{100 * m['rescored']:.1f}%" if m["rescored"] is not None else "",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000000,10000000")
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--nq", type=int, default=2232)
    ap.add_argument("-k", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default="float32,exact", help="ilias search methods to run")
    args = ap.parse_args()
    from common import DATA
    from ilias.benchmark import make_store, table

    rows = []
    for n in map(int, args.sizes.split(",")):
        store = make_store("scale", n, args.d, root=DATA, chunk=100_000, progress=True)
        for method in args.methods.split(","):
            rows.append(row(n, args.d, args.nq, method, search_in_child(store, args.nq, args.k, args.threads, method)))
            print(rows[-1], flush=True)
    print(table(rows, COLUMNS))


if __name__ == "__main__":
    main()
