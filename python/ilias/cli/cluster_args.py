"""The --cluster options shared by `ilias run`, `ilias extract` and `ilias search`."""

from __future__ import annotations

import sys

from .options import NON_NEGATIVE, POSITIVE, number

SLURM_FLAGS = ("partition", "account", "jobs", "gpus", "cores", "memory", "walltime")


def add_cluster_options(p) -> None:
    g = p.add_argument_group("cluster (needs the dist extra)")
    g.add_argument("--cluster", metavar="WHERE",
                   help="run the work as Dask tasks: local[:N] (N worker processes here), slurm (jobs submitted "
                        "with dask-jobqueue), or tcp://HOST:PORT (a running Dask scheduler)")
    g.add_argument("--cluster-config", metavar="FILE", help="with --cluster slurm: the Slurm resources (YAML; see README)")
    g.add_argument("--slurm-partition", metavar="NAME", help="Slurm partition (overrides the config file)")
    g.add_argument("--slurm-account", metavar="NAME", help="Slurm account")
    g.add_argument("--slurm-jobs", type=POSITIVE, metavar="N", help="Slurm jobs to start (default 1)")
    g.add_argument("--slurm-gpus", type=NON_NEGATIVE, metavar="N", help="GPUs per job, one worker each (default 0)")
    g.add_argument("--slurm-cores", type=POSITIVE, metavar="N", help="CPU cores per job (default 8)")
    g.add_argument("--slurm-memory", metavar="SIZE", help="memory per job, e.g. 64GB (default 32GB)")
    g.add_argument("--slurm-walltime", metavar="HH:MM:SS", help="walltime per job (default 04:00:00)")
    g.add_argument("--cluster-timeout", type=number(0, strict=True), default=10.0, metavar="S",
                   help="seconds to wait for the scheduler (default 10)")
    g.add_argument("--cluster-retries", type=NON_NEGATIVE, default=2, metavar="N",
                   help="retries of a task that fails (default 2; a task whose worker died is rescheduled anyway)")
    g.add_argument("--cluster-tasks", type=POSITIVE, metavar="N",
                   help="search: ranges of shards to split the database into (default: two per worker thread)")


def cluster_options(args, gpu: bool | None = False):
    """The ClusterOptions the arguments ask for, or None without --cluster. `gpu`: whether tasks
    need a GPU; None: when the Slurm jobs have GPUs (extraction without --device)."""
    flags = {name: getattr(args, f"slurm_{name}") for name in SLURM_FLAGS}
    if args.cluster is None:
        given = [f"--slurm-{n}" for n, v in flags.items() if v is not None] + (["--cluster-config"] if args.cluster_config else [])
        if given:
            raise ValueError(f"{given[0]}: only with --cluster slurm")
        return None
    from ..cluster import ClusterOptions, ClusterSpec, SlurmOptions

    spec = ClusterSpec.parse(args.cluster)
    slurm = None
    if spec.kind == "slurm":
        slurm = SlurmOptions.load(args.cluster_config, **flags)
        gpu = slurm.gpus > 0 if gpu is None else gpu
    elif args.cluster_config or any(v is not None for v in flags.values()):
        raise ValueError(f"--cluster {args.cluster}: the Slurm options (--cluster-config, --slurm-*) need --cluster slurm")
    return ClusterOptions(spec, slurm=slurm, connect_timeout=args.cluster_timeout, retries=args.cluster_retries,
                          gpu=bool(gpu), progress=not getattr(args, "quiet", False),
                          say=lambda line: print(line, file=sys.stderr))
