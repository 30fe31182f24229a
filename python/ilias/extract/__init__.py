"""Feature extraction: datasets (core folders, webdataset tars, image folders), the paper's
preprocessing, and a resumable, splittable loop that writes stores.

>>> from ilias.extract import core_sources, list_items, extract_images     # doctest: +SKIP
>>> from ilias.models import build_image_encoder
>>> items = list_items(core_sources("ILIAS/ilias_core", "positives"), exif=True)
>>> extract_images(items, build_image_encoder("dinov2_vitb14"), "feats/dinov2_vitb14/positives")
"""

try:  # a core install lacks these: say which extra brings them
    import PIL  # noqa: F401
    import torch  # noqa: F401
except ImportError as e:
    raise ImportError(f"feature extraction needs the models extra ({e.name} is missing): pip install 'ilias-core[models]'") from None

from ..store import open_stores as open_parts
from .datasets import (
    Items,
    Source,
    core_sources,
    folder_sources,
    list_items,
    select,
    tar_sources,
    webdataset_key,
)
from .loop import default_device, extract_images, extract_texts
from .parts import Piece, merge_parts, piece_from_env
from .transforms import ResizeLarge, make_transform, pad_amounts, padded_size, resize_large_size

__all__ = [
    "Items", "Source", "core_sources", "folder_sources", "tar_sources", "list_items", "select",
    "webdataset_key", "extract_images", "extract_texts", "default_device", "Piece", "piece_from_env",
    "open_parts", "merge_parts", "ResizeLarge", "make_transform", "resize_large_size", "pad_amounts", "padded_size",
]
