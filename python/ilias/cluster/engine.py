"""The engine: a Dask cluster started, reached or submitted to Slurm, checked, and its tasks run.

Why Dask distributed (and dask-jobqueue): it schedules, retries and tracks the tasks, moves their
small results, and shows a dashboard; Slurm, PBS, SGE and LSF clusters come from dask-jobqueue, a
running cluster from its scheduler's address. What stays ours is what makes the results exact:
how the work is cut (whole shards, whole tars) and how partial results merge.

- `--cluster local[:N]`: a LocalCluster of N worker processes (default: one per core), one
  thread each; `slurm`: dask-jobqueue's SLURMCluster with the asked resources, its jobs
  submitted and cancelled by the command; `tcp://HOST:PORT`: a scheduler already running.
- A task runs on one worker thread. A task whose worker dies (walltime, preemption, a crash) is
  given to another worker by the scheduler (up to `distributed.scheduler.allowed-failures`
  times); a task that raises is retried `retries` times; a task that still fails ends the run
  with its error, after the tasks already finished have written their outputs.
- Before any task, every worker is asked whether it imports this package at this version and
  sees the input paths (and has a GPU when one is asked for): a worker that cannot is an error
  naming it, before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from ..progress import Progress


class ClusterError(OSError):
    """The cluster cannot run the work: no scheduler, workers missing the package, a GPU or the files."""


def import_distributed():
    try:
        import distributed
    except ImportError as e:
        raise ImportError(f"--cluster needs the dist extra ({e.name} is missing): pip install 'ilias-core[dist]'") from None
    return distributed


@dataclass(frozen=True)
class ClusterSpec:
    """Where tasks run: `local` (N worker processes, None: one per core), `slurm`, or a scheduler `address`."""

    kind: str
    workers: int | None = None
    address: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ClusterSpec":
        if text in ("local", "slurm"):
            return cls(text)
        if text.startswith("local:"):
            n = text[len("local:"):]
            if not n.isdigit() or int(n) < 1:
                raise ValueError(f"--cluster {text!r}: expected local:N with N at least 1 worker")
            return cls("local", workers=int(n))
        scheme, sep, rest = text.partition("://")
        if sep and scheme in ("tcp", "tls") and rest.rpartition(":")[2].isdigit():
            return cls("address", address=text)
        raise ValueError(f"--cluster {text!r}: expected local, local:N, slurm or tcp://HOST:PORT (a Dask scheduler)")

    def __str__(self) -> str:
        if self.kind == "address":
            return str(self.address)
        return f"local:{self.workers}" if self.workers else self.kind


@dataclass
class ClusterOptions:
    """How to reach or start the cluster (`ilias ... --cluster`), and how to run its tasks."""

    spec: ClusterSpec
    slurm: Any = None  # a SlurmOptions, for spec.kind == "slurm"
    connect_timeout: float = 10.0  # seconds to reach a scheduler, or to see the first local worker
    retries: int = 2  # retries of a task that raised (a dead worker's task is rescheduled anyway)
    gpu: bool = False  # tasks need a GPU resource (workers are started with GPU=1 each)
    progress: bool = True
    say: Callable[[str], Any] = field(default=lambda line: print(line, file=sys.stderr))


@contextlib.contextmanager
def open_cluster(opts: ClusterOptions) -> Iterator[Any]:
    """A connected `distributed.Client`; workers started here are stopped when the block ends."""
    distributed = import_distributed()
    spec = opts.spec
    with contextlib.ExitStack() as stack:
        if spec.kind == "address":
            try:
                client = distributed.Client(spec.address, timeout=f"{opts.connect_timeout}s", set_as_default=False)
            except (OSError, TimeoutError) as e:
                raise ClusterError(
                    f"--cluster {spec.address}: no Dask scheduler answered within {opts.connect_timeout:g} s "
                    f"({type(e).__name__}); is it running and reachable from here?"
                ) from None
            stack.callback(client.close)
        else:
            cluster = stack.enter_context(_started(spec, opts))
            client = distributed.Client(cluster, set_as_default=False)
            stack.callback(client.close)
        if opts.progress and client.dashboard_link:
            opts.say(f"cluster {spec}: Dask dashboard at {client.dashboard_link}")
        yield client


@contextlib.contextmanager
def _started(spec: ClusterSpec, opts: ClusterOptions):
    import dask

    # decoding processes (torch DataLoader workers) need workers that may have children
    with dask.config.set({"distributed.worker.daemon": False, "distributed.scheduler.allowed-failures": 3}):
        if spec.kind == "local":
            from distributed import LocalCluster

            n = spec.workers or os.cpu_count() or 1
            cluster = LocalCluster(
                n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                resources={"GPU": 1} if opts.gpu else None, silence_logs=logging.ERROR,
            )
        else:
            from .slurm import slurm_cluster

            cluster = slurm_cluster(opts.slurm, gpu=opts.gpu)
            opts.say(f"cluster slurm: {opts.slurm.jobs} job(s) submitted; the run starts with the first worker")
        try:
            yield cluster
        finally:
            cluster.close()


def _probe(paths: Sequence[str], gpu: bool, writable: Sequence[str] = ()) -> dict:
    """Runs on each worker: what it can do (package version, CUDA GPUs) and which paths it cannot
    read (or, for `writable`, the nearest existing folder of which it cannot write)."""
    from .. import __version__

    missing = [p for p in paths if not os.access(p, os.R_OK)]
    missing += [p for p in writable if not os.access(_existing(Path(p)), os.W_OK)]
    gpus = None
    if gpu:
        try:
            import torch

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            gpus = 0
    return {"version": __version__, "missing": missing, "gpus": gpus, "host": os.uname().nodename}


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_workers(client, opts: ClusterOptions, paths: Sequence[str | os.PathLike],
                  writable: Sequence[str | os.PathLike] = ()) -> int:
    """Waits for the first worker, then asks every worker whether it can run the tasks; returns the
    number of worker threads. A worker that cannot is a ClusterError naming it and why."""
    from .. import __version__

    wait = None if opts.spec.kind == "slurm" else max(opts.connect_timeout, 60.0)
    try:
        client.wait_for_workers(1, timeout=wait)
    except TimeoutError:
        raise ClusterError(f"--cluster {opts.spec}: no worker joined within {wait:g} s") from None
    paths = [str(Path(p).resolve()) for p in paths]
    answers = client.run(_probe, paths, opts.gpu, [str(Path(p).resolve()) for p in writable], on_error="return")
    for worker, got in sorted(answers.items()):
        if isinstance(got, BaseException):
            raise ClusterError(
                f"worker {worker}: cannot run ilias tasks ({type(got).__name__}: {got}); "
                "install ilias-core (the same version) in the workers' Python environment"
            )
        if got["version"] != __version__:
            raise ClusterError(f"worker {worker} ({got['host']}): ilias-core {got['version']}, this command runs "
                               f"{__version__}; install the same version on every node")
        if got["missing"]:
            raise ClusterError(f"worker {worker} ({got['host']}): cannot access {got['missing'][0]} (stores, inputs "
                               "and outputs must be on storage every worker sees, at the same path)")
        if opts.gpu and not got["gpus"]:
            raise ClusterError(f"worker {worker} ({got['host']}): no CUDA GPU, and the tasks ask for one "
                               "(start GPU workers, or run on the CPU with --device cpu)")
    if opts.gpu and not any(r.get("GPU") for r in _worker_resources(client).values()):
        raise ClusterError("no worker offers the GPU resource the tasks ask for (start the workers with "
                           "`dask worker ... --resources GPU=1`)")
    return sum(client.nthreads().values())


def _worker_resources(client) -> dict:
    info = client.scheduler_info()
    return {w: d.get("resources", {}) for w, d in info.get("workers", {}).items()}


@dataclass(eq=False)
class Task:
    """One unit of work: `fn(*args)` on a worker; `size` (rows, images; None: known only from its
    result) counts its progress."""

    key: str
    fn: Callable
    args: tuple
    size: int | None


def run_tasks(client, tasks: Sequence[Task], opts: ClusterOptions, desc: str, unit: str,
              done: Callable[[Task, Any], None], count: Callable[[Any], int] | None = None,
              progress: bool = True) -> None:
    """Runs the tasks on the cluster, calling `done(task, result)` in this process as each finishes
    (in any order), with a progress line: tasks done, rate, time left. `count(result)` gives the
    size of a task known only from its result (the total is then estimated from the tasks done).
    The first error cancels the tasks not yet finished and is raised."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError

    if not tasks:
        return
    known = all(t.size is not None for t in tasks)
    run = uuid.uuid4().hex[:8]  # keys stay unique on a scheduler that outlives this command
    resources = {"GPU": 1} if opts.gpu else None
    futures = {
        client.submit(t.fn, *t.args, key=f"{t.key}-{run}", pure=False, retries=opts.retries, resources=resources): t
        for t in tasks
    }
    total = sum(t.size for t in tasks) if known else None
    with Progress(f"{desc} (0/{len(tasks)} tasks)", total=total, unit=unit, enabled=opts.progress and progress) as bar:
        finished = 0
        try:
            for fut in as_completed(futures, loop=client.loop):
                task = futures[fut]
                try:
                    result = fut.result()
                except FutureCancelledError:
                    raise ClusterError(f"{desc}: task {task.key} was cancelled (the scheduler or its workers went away)") from None
                except Exception as e:
                    raise _task_error(task, e) from None
                done(task, result)
                finished += 1
                bar.desc = f"{desc} ({finished}/{len(tasks)} tasks)"
                size = task.size if task.size is not None else count(result) if count else 1
                if not known:  # the total so far per task, times the tasks
                    bar.total = max(1, round((bar.done + size) * len(tasks) / finished))
                bar.update(size)
        finally:
            client.cancel(list(futures), force=True)


def _task_error(task: Task, e: Exception) -> Exception:
    """A task's failure as the error the command shows: a user error keeps its type and message."""
    from distributed import KilledWorker

    if isinstance(e, KilledWorker):
        return ClusterError(f"task {task.key}: its workers died repeatedly while running it (out of memory, "
                            "walltime, or a crash: see the workers' logs)")
    if isinstance(e, (ValueError, OSError, KeyError, ImportError, IndexError)):
        return e
    return RuntimeError(f"task {task.key} failed: {type(e).__name__}: {e}")
