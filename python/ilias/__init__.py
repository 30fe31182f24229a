"""ilias-core: fast, faithful tools for the ILIAS instance-level retrieval benchmark.

Store embeddings in a memory-mapped float16 store, search all queries exactly with the Rust
core, and write results in our format or the official ones.
"""

from ._core import StoreFormatError, __version__, simd_paths
from .adapt import Adaptation, load_weights
from .database import Database, mini_ilias_keep
from .expand import expand_queries, search_codes_expanded, search_expanded
from .interop import export_hdf5, import_hdf5, import_npy
from .results import SearchResults, SearchStats
from .search import Tier, search, search_tiers
from .store import Store, StoreWriter, write_store

__all__ = [
    "Store",
    "StoreWriter",
    "StoreFormatError",
    "Database",
    "SearchResults",
    "SearchStats",
    "search",
    "search_tiers",
    "Tier",
    "mini_ilias_keep",
    "write_store",
    "import_hdf5",
    "export_hdf5",
    "import_npy",
    "simd_paths",
    "Adaptation",
    "load_weights",
    "expand_queries",
    "search_expanded",
    "search_codes_expanded",
    "__version__",
]
