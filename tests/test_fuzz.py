"""Fuzzing the files a search reads: shards, ids, manifests and codes files are damaged at
random (bytes flipped, ranges zeroed, files cut short or lengthened), and a search over the
damaged copy must either stop with a clear error (ValueError or OSError, as the command line
shows user errors) or give exactly the undamaged results: never a panic, a traceback from
inside the package, a hang, or a plausible wrong number. Seeded and bounded in time; it runs in
a subprocess so that a hang or an abort fails the test instead of stopping the suite."""

import json
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

SECONDS = 20


def _mutate(path: Path, rng) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(["flip", "zero", "cut", "grow"])
    if kind == "flip" and data:
        for pos in rng.integers(0, len(data), size=int(rng.integers(1, 16))):
            data[pos] ^= 1 << int(rng.integers(0, 8))
    elif kind == "zero" and data:
        lo = int(rng.integers(0, len(data)))
        data[lo : lo + int(rng.integers(1, 4096))] = bytes(min(len(data) - lo, 4096))[: len(data[lo : lo + 4096])]
    elif kind == "cut":
        del data[int(rng.integers(0, max(len(data), 1))) :]
    else:
        data += rng.integers(0, 256, size=int(rng.integers(1, 512)), dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return kind


def _run(root: Path, q: np.ndarray) -> tuple:
    from ilias import Database, search
    from ilias.index import search_codes

    db = Database.of(root / "db")
    exact = search(q, db, k=20, threads=1)
    codes = search_codes(q, db, root / "db" / "codes" / "sq8.codes", k=20, threads=1)
    return (exact.indices, exact.scores, [exact.ids(i) for i in range(len(q))],
            codes.indices, codes.scores, [codes.ids(i) for i in range(len(q))])


def fuzz(work: Path, seconds: float, seed: int) -> dict:
    from ilias import write_store
    from ilias.index import build_index

    rng = np.random.default_rng(seed)
    pristine = work / "pristine"
    x = rng.standard_normal((900, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_store(pristine / "db", x, [f"t{i // 300}.tar/key{i}" for i in range(900)], shard_rows=300)
    build_index(pristine / "db", "sq8")
    q = x[rng.choice(900, 8, replace=False)] + 0.01
    want = _run(pristine, q)
    files = sorted(p.relative_to(pristine) for p in pristine.rglob("*") if p.is_file() and p.name != ".lock")
    cases, failures, outcomes = 0, [], {"error": 0, "unchanged": 0}
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        copy = work / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(pristine, copy)
        target = files[int(rng.integers(0, len(files)))]
        kind = _mutate(copy / target, rng)
        cases += 1
        try:
            got = _run(copy, q)
        except (ValueError, OSError):
            outcomes["error"] += 1
            continue
        except BaseException:  # noqa: B036 - a panic is a BaseException: exactly what must not happen
            failures.append(f"{target} ({kind}): {traceback.format_exc(limit=3)}")
            continue
        same = all(np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b for a, b in zip(got, want))
        if same:
            outcomes["unchanged"] += 1
        else:
            failures.append(f"{target} ({kind}): a different result without an error")
    return {"cases": cases, "failures": failures[:20], "n_failures": len(failures), **outcomes}


def test_damaged_files_give_a_clear_error_or_the_same_result(tmp_path):
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent.parent)!r}); "
            f"from tests.test_fuzz import fuzz; from pathlib import Path; "
            f"print(json.dumps(fuzz(Path({str(tmp_path)!r}), {SECONDS}, 0)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=SECONDS + 120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["cases"] > 50
    assert report["n_failures"] == 0, "\n".join(report["failures"])
    # damage was met; "unchanged" is rare now that every byte a search reads is checksummed
    # (vector shards as exact search streams them, ids when read, codes sections at open): only
    # bytes nothing reads (header padding, unused manifest keys) can change harmlessly
    assert report["error"] > 0
