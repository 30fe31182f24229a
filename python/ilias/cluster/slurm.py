"""Slurm resources for dask-jobqueue's SLURMCluster: from flags, or from a small YAML/JSON file.

    # slurm.yaml: every key optional; flags (--slurm-partition ...) override the file
    partition: gpu          # sbatch --partition
    account: my-project     # sbatch --account
    jobs: 8                 # Slurm jobs to run (each starts `gpus` workers, or one without GPUs)
    gpus: 4                 # GPUs per job (--gres=gpu:N); one worker process per GPU
    cores: 32               # CPU cores per job (shared among its workers)
    memory: 256GB           # memory per job
    walltime: "24:00:00"    # per job; tasks of a job that reaches it are given to other workers
    setup: ["module load cuda", "source ~/venv/bin/activate"]   # lines run before the workers start
    extra: ["--constraint=a100"]                                 # more #SBATCH lines
    local_directory: /tmp   # the workers' scratch space on the node

A worker with GPUs declares the resource GPU=1 and extraction tasks ask for it, so each GPU runs
one task at a time; the search tasks use CPU threads only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

WALLTIME = re.compile(r"^(\d+-)?\d{1,3}(:\d\d){0,2}$")
MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)$", re.IGNORECASE)


@dataclass
class SlurmOptions:
    partition: str | None = None
    account: str | None = None
    jobs: int = 1
    gpus: int = 0
    cores: int = 8
    memory: str = "32GB"
    walltime: str = "04:00:00"
    setup: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    local_directory: str | None = None

    @classmethod
    def load(cls, path: str | Path | None, **flags) -> "SlurmOptions":
        """The file's values (if any), then the flags that are not None; checked."""
        values: dict = {}
        if path is not None:
            values = _read(Path(path))
        values.update({k: v for k, v in flags.items() if v is not None})
        opts = cls(**values)
        opts.check(f"--cluster-config {path}" if path is not None else "--slurm")
        return opts

    def check(self, where: str) -> None:
        for name in ("jobs", "cores"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{where}: {name} must be a whole number of at least 1, got {getattr(self, name)!r}")
        if not isinstance(self.gpus, int) or self.gpus < 0:
            raise ValueError(f"{where}: gpus must be a whole number of at least 0, got {self.gpus!r}")
        if not WALLTIME.match(str(self.walltime)):
            raise ValueError(f"{where}: walltime {self.walltime!r}: expected [D-]HH:MM:SS")
        if not MEMORY.match(str(self.memory)):
            raise ValueError(f"{where}: memory {self.memory!r}: expected a size such as 64GB")
        for name in ("setup", "extra"):
            if not isinstance(getattr(self, name), list) or not all(isinstance(x, str) for x in getattr(self, name)):
                raise ValueError(f"{where}: {name} must be a list of lines")

    def cluster_kwargs(self, gpu: bool) -> dict:
        """The arguments of dask_jobqueue.SLURMCluster for these resources."""
        workers = max(self.gpus, 1) if gpu else 1
        directives = [f"--gres=gpu:{self.gpus}"] if self.gpus else []
        kwargs = dict(
            queue=self.partition,
            account=self.account,
            cores=self.cores,
            processes=workers,
            memory=self.memory,
            walltime=self.walltime,
            job_extra_directives=directives + list(self.extra),
            # workers may start decoding processes; GPU workers offer one GPU each
            job_script_prologue=["export DASK_DISTRIBUTED__WORKER__DAEMON=False", *self.setup],
            worker_extra_args=["--resources", "GPU=1"] if gpu and self.gpus else [],
        )
        if self.local_directory:
            kwargs["local_directory"] = self.local_directory
        return kwargs


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--cluster-config {path}: no such file")
    text = path.read_text()
    try:
        import yaml

        data = yaml.safe_load(text)
    except ImportError:  # JSON is YAML too
        data = json.loads(text)
    except Exception as e:  # yaml's errors have no common base with a useful message
        raise ValueError(f"--cluster-config {path}: not readable YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"--cluster-config {path}: expected a mapping of keys (partition, gpus, ...)")
    known = {f.name for f in fields(SlurmOptions)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"--cluster-config {path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    return data


def slurm_cluster(opts: SlurmOptions, gpu: bool):
    """A started SLURMCluster with `opts.jobs` jobs asked for."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ImportError("--cluster slurm needs the dist extra (dask-jobqueue is missing): "
                          "pip install 'ilias-core[dist]'") from None
    cluster = SLURMCluster(**opts.cluster_kwargs(gpu))
    cluster.scale(jobs=opts.jobs)
    return cluster
