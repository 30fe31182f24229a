"""Runs on Dask: extraction and search as tasks on a LocalCluster of 2 worker processes give the
single-process stores and results bit for bit, also when a worker is killed (SIGKILL) in the
middle; a rerun after an interrupted run does only the missing tasks; the Slurm path, with the
job script dask-jobqueue writes and a stand-in `sbatch` that runs it here."""

import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
pytest.importorskip("dask_jobqueue")
torch = pytest.importorskip("torch")
pytest.importorskip("timm")

from ilias import Database, SearchResults, Store, write_store  # noqa: E402
from ilias.cluster import (  # noqa: E402
    ClusterError,
    ClusterOptions,
    ClusterSpec,
    Recipe,
    Settings,
    SlurmOptions,
    StoreJob,
    extract_on_cluster,
    merge_top,
    search_codes_on_cluster,
    search_tiers_on_cluster,
)
from ilias.extract import extract_images, folder_sources, list_items, tar_sources  # noqa: E402
from ilias.index import build_index, search_codes  # noqa: E402
from ilias.models import build_image_encoder  # noqa: E402
from ilias.search import Tier, search_tiers  # noqa: E402

from .conftest import unit_rows  # noqa: E402
from .test_bad_input import cli, one_line_error  # noqa: E402
from .test_extract import TINY_VIT, _many_images, make_tars  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes of one thread, shared by the tests (reached by address, as a running cluster is)."""
    import dask

    with dask.config.set({"distributed.worker.daemon": False}):
        c = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                     silence_logs=40)
    client = distributed.Client(c)
    client.run(lambda: __import__("timm"))  # the workers' imports, once, before any test times out on them
    yield c, client
    client.close()
    c.close()


def options(cluster) -> ClusterOptions:
    return ClusterOptions(ClusterSpec.parse(cluster[0].scheduler_address), progress=False)


def kill_once(marker: Path, prefix: str, when=None):
    """A worker plugin that SIGKILLs its worker process the first time a task whose key starts
    with `prefix` begins (after `when()` turns true, checked every 20 ms, if given)."""

    class KillOnce(distributed.WorkerPlugin):
        name = "kill-once"

        def transition(self, key, start, finish, **kwargs):
            if finish != "executing" or not str(key).startswith(prefix):
                return
            try:
                os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                return

            def kill():
                while when is not None and not when():
                    time.sleep(0.02)
                os.kill(os.getpid(), signal.SIGKILL)

            threading.Thread(target=kill, daemon=True).start()

    return KillOnce()


# ---------------------------------------------------------------- search


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """Positives and distractors in 14 shards of unequal sizes; duplicated rows across shards tie."""
    root = tmp_path_factory.mktemp("db")
    rng = np.random.default_rng(5)
    x = unit_rows(rng, 5000, 64)
    x[[150, 2100, 4999]] = x[3000]  # equal scores in 4 shards: the larger global row ranks first
    pos = write_store(root / "pos", x[:300], [f"inst/pos/P{i}.jpg" for i in range(300)], shard_rows=100)
    dis = write_store(root / "dis", x[300:], [f"0.tar/{i:07d}" for i in range(4700)], shard_rows=430)
    q = write_store(root / "q", np.concatenate([unit_rows(rng, 23, 64), x[3000:3001]]),
                    [f"inst/query/Q{i}.jpg" for i in range(24)])
    keep = rng.random(5000) < 0.25
    tiers = [Tier("+1k", 1300), Tier("mini", None, keep), Tier("all")]
    return q, Database.of([pos, dis]), tiers


def same(a: SearchResults, b: SearchResults) -> None:
    assert np.array_equal(a.indices, b.indices)
    assert np.array_equal(a.scores.view(np.uint32), b.scores.view(np.uint32))  # the same bits
    assert a.ids(0) == b.ids(0) and a.tier_rows == b.tier_rows


def test_merged_top_lists_keep_the_core_tie_order():
    # equal scores: larger row first; -0 equals +0; padding (-inf, -1) after every real hit, even -inf ones
    a = (np.array([[1.0, 0.0, -np.inf]], np.float32), np.array([[4, 2, -1]]))
    b = (np.array([[1.0, -0.0, -np.inf]], np.float32), np.array([[9, 7, 3]]))
    scores, rows = merge_top(a, b, 5)
    assert rows.tolist() == [[9, 4, 7, 2, 3]]
    assert np.signbit(scores[0, 2]) and scores[0, 4] == -np.inf
    assert merge_top(None, a, 4)[1].tolist() == [[4, 2, -1, -1]]


def test_exact_search_on_the_cluster_equals_one_process(cluster, database):
    q, db, tiers = database
    one = search_tiers(q, db, tiers, k=40)
    for tasks in (3, 14):  # groups of shards, and one shard per task
        two = search_tiers_on_cluster(options(cluster), q, db, tiers, k=40, tasks=tasks)
        for name in one:
            same(one[name], two[name])
    assert one["all"].indices[-1][:4].tolist() == [4999, 3000, 2100, 150]  # the planted ties, in order


@pytest.mark.parametrize("kind, shortlist", [("sq8", 90), ("pq16x4", 200)])
def test_codes_search_on_the_cluster_equals_one_process(cluster, database, kind, shortlist):
    q, db, tiers = database
    build_index(db, kind)
    keep = tiers[1].keep
    for rerank in (True, False):
        one = search_codes(q, db, kind, 30, shortlist=shortlist, rerank=rerank, keep=keep)
        two = search_codes_on_cluster(options(cluster), q, db, kind, 30, shortlist=shortlist, rerank=rerank, keep=keep,
                                      tasks=5)
        same(one, two)


def test_a_worker_killed_mid_search_changes_nothing(cluster, database, tmp_path):
    q, db, tiers = database
    one = search_tiers(q, db, tiers, k=40)
    client = cluster[1]
    client.register_plugin(kill_once(tmp_path / "killed", "ilias-search-00002"))
    try:
        two = search_tiers_on_cluster(options(cluster), q, db, tiers, k=40, tasks=14)
    finally:
        client.unregister_worker_plugin("kill-once")
    assert (tmp_path / "killed").exists()  # a worker died holding a task, which ran again elsewhere
    for name in one:
        same(one[name], two[name])
    client.wait_for_workers(2, timeout=60)  # the nanny restarted it


def test_cli_search_on_a_local_cluster_writes_the_same_results(database, tmp_path):
    q, db, _ = database
    common = ["search", "--queries", q.path, "--db", *[s.path for s in db.stores], "-k", 25]
    assert cli(*common, "--out", tmp_path / "one.npz").returncode == 0
    proc = cli(*common, "--out", tmp_path / "two.npz", "--cluster", "local:2")
    assert proc.returncode == 0, proc.stderr
    assert "Dask dashboard at http" in proc.stderr
    assert re.search(r"search \((\d+)/\1 tasks\): .* rows .*/s .*left", proc.stderr)  # tasks done, rate, ETA
    one, two = SearchResults.load(tmp_path / "one.npz"), SearchResults.load(tmp_path / "two.npz")
    assert np.array_equal(one.indices, two.indices) and np.array_equal(one.scores, two.scores)
    assert np.array_equal(one.returned_rows()[1], two.returned_rows()[1])


# ---------------------------------------------------------------- extraction


def reference(items, out, batch_size, shard_rows):
    """The single-process store. On the CPU torch's sums depend on its thread count: a worker
    runs one thread, so the reference does too (on a GPU the thread count does not matter)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        encoder = build_image_encoder(TINY_VIT, pretrained=False)
        return extract_images(items, encoder, out, batch_size=batch_size, workers=0, shard_rows=shard_rows,
                              progress=False)
    finally:
        torch.set_num_threads(threads)


def same_store(a: Store, b: Store) -> None:
    assert a.all_ids() == b.all_ids()
    assert np.array_equal(a.read_all(), b.read_all())
    assert a.manifest.provenance["skipped"] == b.manifest.provenance["skipped"]
    assert b.manifest.complete and b.manifest.provenance["complete"]


RECIPE = Recipe(TINY_VIT, pretrained=False)


def test_extraction_on_the_cluster_equals_one_process(cluster, tmp_path):
    tars = tar_sources([make_tars(tmp_path / "yfcc", n_tars=3, per_tar=5)])
    (_many_images(tmp_path / "imgs", n=23) / "019.jpg").write_bytes(b"broken too")  # one in each range
    folder = folder_sources(tmp_path / "imgs")
    # batch 1: windows of 16 images, so the folder runs as two tasks (16 + 7) and each tar as one
    settings = Settings(batch_size=1, workers=0, shard_rows=4, device="cpu", items_per_task=16)
    jobs = [StoreJob(tmp_path / "tars", tars), StoreJob(tmp_path / "folder", folder)]
    made = extract_on_cluster(options(cluster), RECIPE, jobs, settings)
    with pytest.warns(UserWarning, match="skipped 0(05|19).jpg"):
        want = [reference(list_items(tars), tmp_path / "one-tars", 1, 4),
                reference(list_items(folder), tmp_path / "one-folder", 1, 4)]
    for a, b in zip(want, made):
        same_store(a, b)
    assert made[0].manifest.provenance["merged_from"] == 3 and made[1].manifest.provenance["merged_from"] == 2
    assert not list((tmp_path / "tars").glob("part-*"))


def test_a_worker_killed_mid_extraction_changes_nothing(cluster, tmp_path):
    tars = tar_sources([make_tars(tmp_path / "yfcc", n_tars=2, per_tar=8)])
    out = tmp_path / "tars"
    settings = Settings(batch_size=1, workers=0, shard_rows=1, device="cpu")
    first_part = out / "part-00000-of-00002" / "shards"
    # killed once the first part has written some of its shards (one row each), not all
    wrote = lambda: first_part.is_dir() and len(list(first_part.glob("*.ids.npy"))) >= 2  # noqa: E731
    client = cluster[1]
    client.register_plugin(kill_once(tmp_path / "killed", "ilias-extract-0-part-00000", wrote))
    try:
        made = extract_on_cluster(options(cluster), RECIPE, [StoreJob(out, tars)], settings)
    finally:
        client.unregister_worker_plugin("kill-once")
    assert (tmp_path / "killed").exists()
    same_store(reference(list_items(tars), tmp_path / "one", 1, 1), made[0])
    client.wait_for_workers(2, timeout=60)


def test_a_rerun_after_an_interrupted_run_does_only_the_missing_parts(cluster, tmp_path, monkeypatch):
    import ilias.cluster.engine as engine
    import ilias.cluster.extract as extract

    tars = tar_sources([make_tars(tmp_path / "yfcc", n_tars=4, per_tar=3)])
    out = tmp_path / "tars"
    settings = Settings(batch_size=3, workers=0, shard_rows=2, device="cpu")
    job = [StoreJob(out, tars)]

    class Interrupted(engine.Progress):
        def update(self, n):  # Ctrl-C in this process as the first task is reported done
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "Progress", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_on_cluster(options(cluster), RECIPE, job, settings)
    monkeypatch.undo()
    client = cluster[1]
    # a cancelled task that was running goes on to the end of its part on its worker
    while any(client.run(lambda dask_worker: dask_worker.state.executing_count).values()):
        time.sleep(0.05)
    done = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in out.glob("part-*")
            if Store.open(p).manifest.complete}
    assert 1 <= len(done) < 4 and not (out / "manifest.json").exists()

    ran = []
    real = extract.run_tasks
    monkeypatch.setattr(extract, "run_tasks", lambda client, tasks, *a, **kw: (ran.extend(t.key for t in tasks),
                                                                                 real(client, tasks, *a, **kw)))
    made = extract_on_cluster(options(cluster), RECIPE, job, settings)
    assert len(ran) == 4 - len(done) and not any(name in key for key in ran for name in done)
    same_store(reference(list_items(tars), tmp_path / "one", 3, 2), made[0])


def test_the_whole_run_on_the_cluster_equals_one_process(cluster, tmp_path):
    from ilias import pipeline
    from ilias.pipeline import RunConfig

    from .test_run import make_run_dir

    data = make_run_dir(tmp_path / "ilias")  # 2 tars of 5 images: the first 7 distractors cut the second
    runs = {}
    for name, on in (("one", None), ("two", options(cluster))):
        cfg = RunConfig(model="tiny-vit", data=str(data), out=str(tmp_path / name), tars=[str(data / "tars")], k=8,
                        distractors="7", random_init=True, workers=0, batch_size=4, threads=1)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as a worker (see `reference`)
        try:
            runs[name] = pipeline.run(cfg, spec=TINY_VIT, say=lambda *_: None, cluster=on)
        finally:
            torch.set_num_threads(threads)
    assert runs["one"]["results"] == runs["two"]["results"]
    assert runs["two"]["steps"]["features"]["done"] == {"image_queries": 2, "positives": 6, "distractors": 7}
    for kind in ("image_queries", "positives", "distractors"):
        same_store(Store.open(tmp_path / "one" / "stores" / kind), Store.open(tmp_path / "two" / "stores" / kind))
    same(SearchResults.load(tmp_path / "one" / "results.all.npz"), SearchResults.load(tmp_path / "two" / "results.all.npz"))


# ---------------------------------------------------------------- Slurm, without Slurm


def test_the_slurm_job_script_carries_the_asked_resources(tmp_path):
    from dask_jobqueue import SLURMCluster

    (tmp_path / "slurm.yaml").write_text(
        "partition: gpu\naccount: ilias-proj\ngpus: 4\ncores: 32\nmemory: 256GB\nwalltime: '24:00:00'\n"
        "setup: ['module load cuda/12']\nextra: ['--constraint=a100']\njobs: 2\n")
    opts = SlurmOptions.load(tmp_path / "slurm.yaml", jobs=8, walltime="12:00:00")  # flags win
    assert (opts.jobs, opts.walltime, opts.gpus) == (8, "12:00:00", 4)
    with SLURMCluster(**opts.cluster_kwargs(gpu=True)) as c:
        script = c.job_script()
    for line in ("#SBATCH -p gpu", "#SBATCH -A ilias-proj", "#SBATCH --gres=gpu:4", "#SBATCH --constraint=a100",
                 "#SBATCH --cpus-per-task=32", "#SBATCH -t 12:00:00", "module load cuda/12",
                 "DASK_DISTRIBUTED__WORKER__DAEMON=False", "--nworkers 4", "--resources GPU=1"):
        assert line in script, (line, script)
    assert "#SBATCH --mem=239G" in script  # 256 GB, as dask-jobqueue writes it (GiB)
    with SLURMCluster(**SlurmOptions(cores=2).cluster_kwargs(gpu=False)) as c:
        script = c.job_script()
    assert "--gres" not in script and "GPU=1" not in script and "#SBATCH -p" not in script


def test_the_slurm_path_runs_a_search_with_a_stand_in_sbatch(database, tmp_path):
    """`--cluster slurm` end to end: dask-jobqueue writes the job script and calls `sbatch`, here a
    stand-in that runs it on this machine (and `scancel`, which stops it)."""
    q, db, _ = database
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/bin/bash\nscript=$(mktemp)\ncp "$1" "$script"\n'
                                    'setsid bash "$script" > "$script.log" 2>&1 < /dev/null &\n'
                                    'echo "Submitted batch job $!"\n')
    (bin_dir / "scancel").write_text('#!/bin/bash\nfor id in "$@"; do kill -TERM -- "-$id" 2>/dev/null; done\nexit 0\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    common = ["search", "--queries", q.path, "--db", *[s.path for s in db.stores], "-k", 25]
    assert cli(*common, "--out", tmp_path / "one.npz").returncode == 0
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "ilias", *map(str, common), "--out", tmp_path / "two.npz",
                           "--cluster", "slurm", "--slurm-cores", "1", "--slurm-memory", "2GB", "--slurm-jobs", "2"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 job(s) submitted" in proc.stderr
    one, two = SearchResults.load(tmp_path / "one.npz"), SearchResults.load(tmp_path / "two.npz")
    assert np.array_equal(one.indices, two.indices) and np.array_equal(one.scores, two.scores)


# ---------------------------------------------------------------- bad input: one line, exit code 1, nothing written


def test_a_scheduler_that_does_not_answer_is_one_line(database, tmp_path):
    q, db, _ = database
    proc = cli("search", "--queries", q.path, "--db", db.stores[0].path, "--out", tmp_path / "r.npz", "-k", 5,
               "--cluster", "tcp://127.0.0.1:9", "--cluster-timeout", "1")
    one_line_error(proc, "tcp://127.0.0.1:9", "no Dask scheduler answered")
    assert not (tmp_path / "r.npz").exists()


@pytest.mark.parametrize("argv, named", [
    (["--cluster", "yarn"], "tcp://HOST:PORT"),
    (["--slurm-gpus", "2"], "--slurm-gpus"),
    (["--cluster", "slurm", "--slurm-walltime", "forever"], "walltime"),
    (["--cluster", "local:2", "--qe", "2"], "--qe"),
])
def test_bad_cluster_options_are_one_line(database, tmp_path, argv, named):
    q, db, _ = database
    proc = cli("search", "--queries", q.path, "--db", db.stores[0].path, "--out", tmp_path / "r.npz", "-k", 5, *argv)
    one_line_error(proc, named)
    assert not (tmp_path / "r.npz").exists()


def test_a_bad_slurm_config_file_is_one_line(database, tmp_path):
    q, db, _ = database
    (tmp_path / "slurm.yaml").write_text("partition: gpu\ngpu: 4\n")  # a typo of gpus
    proc = cli("search", "--queries", q.path, "--db", db.stores[0].path, "--out", tmp_path / "r.npz",
               "--cluster", "slurm", "--cluster-config", tmp_path / "slurm.yaml")
    one_line_error(proc, "slurm.yaml", "'gpu'")


def test_a_worker_without_the_package_is_named(tmp_path, database):
    """A worker whose Python does not have ilias (here: a stand-in package that fails to import)."""
    import subprocess

    q, db, _ = database
    fake = tmp_path / "fake" / "ilias"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('ilias is not installed here')\n")
    scheduler = distributed.LocalCluster(n_workers=0, dashboard_address=":0", silence_logs=40)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", scheduler.scheduler_address,
                               "--nthreads", "1", "--no-nanny"], env={**os.environ, "PYTHONPATH": str(fake.parent)},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc = cli("search", "--queries", q.path, "--db", db.stores[0].path, "--out", tmp_path / "r.npz", "-k", 5,
                   "--cluster", scheduler.scheduler_address)
        line = one_line_error(proc, "cannot run ilias tasks", "install ilias-core")
        assert "worker tcp://" in line and not (tmp_path / "r.npz").exists()
    finally:
        worker.kill()
        worker.wait()
        scheduler.close()


def test_a_gpu_asked_of_workers_without_one_is_one_line(cluster, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the workers would offer one")
    make_tars(tmp_path / "yfcc", n_tars=1, per_tar=2)
    proc = cli("extract", "alexnet.tv_in1k", "--random-init", "--tars", tmp_path / "yfcc", "-o", tmp_path / "out",
               "--device", "cuda", "--cluster", cluster[0].scheduler_address)
    one_line_error(proc, "no CUDA GPU", "--device")
    assert not (tmp_path / "out").exists()


def test_stores_a_worker_cannot_see_are_named(cluster, database, tmp_path):
    q, db, tiers = database
    rng = np.random.default_rng(2)
    moved = write_store(tmp_path / "db", unit_rows(rng, 300, 64), [f"d{i}" for i in range(300)], shard_rows=100)
    local = Database.of([moved])  # opened here; then gone from where the workers look
    os.rename(tmp_path / "db", tmp_path / "elsewhere")
    with pytest.raises(ClusterError, match=r"cannot access .*db/shards/00000.npy .*storage every worker sees"):
        search_tiers_on_cluster(options(cluster), q, local, [Tier("all")], k=5)
