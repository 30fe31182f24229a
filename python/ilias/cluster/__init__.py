"""The benchmark on a cluster: extraction and search as Dask tasks, with the results of one machine.

>>> from ilias.cluster import ClusterOptions, ClusterSpec, search_tiers_on_cluster   # doctest: +SKIP
>>> opts = ClusterOptions(ClusterSpec.parse("local:2"))
>>> found = search_tiers_on_cluster(opts, queries, [positives, distractors], tiers, k=1000)

- `engine`: starting, reaching (a scheduler address) or submitting (Slurm, through dask-jobqueue)
  the cluster, checking its workers, running tasks with progress;
- `slurm`: the Slurm resources, from flags or a small file;
- `search`: exact and codes search over ranges of whole shards, merged bit for bit;
- `extract`: one task per tar (or range of images), each a part store, merged at the end.

Needs the `dist` extra (dask[distributed], dask-jobqueue); imported without it, the first use says so.
"""

from .engine import ClusterError, ClusterOptions, ClusterSpec, check_workers, open_cluster, run_tasks
from .extract import Recipe, Settings, StoreJob, extract_on_cluster
from .search import merge_top, search_codes_on_cluster, search_tiers_on_cluster, shard_ranges
from .slurm import SlurmOptions

__all__ = [
    "ClusterError", "ClusterOptions", "ClusterSpec", "SlurmOptions", "open_cluster", "check_workers", "run_tasks",
    "search_tiers_on_cluster", "search_codes_on_cluster", "merge_top", "shard_ranges",
    "Recipe", "Settings", "StoreJob", "extract_on_cluster",
]
