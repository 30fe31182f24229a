"""Feature extraction: datasets (core folders, webdataset tars, image folders), the paper's
preprocessing, and a resumable, splittable loop that writes stores.

>>> from ilias.extract import core_sources, list_items, extract_images     # doctest: +SKIP
>>> from ilias.models import build_image_encoder
>>> items = list_items(core_sources("ILIAS/ilias_core", "positives"), exif=True)
>>> extract_images(items, build_image_encoder("dinov2_vitb14"), "feats/dinov2_vitb14/positives")
"""

from importlib import import_module

# where each public name lives; imported on first use, so that the numpy-only parts (tar_index)
# load without torch
_WHERE = {
    **dict.fromkeys(["Items", "Source", "core_sources", "folder_sources", "tar_sources", "list_items", "select"], "datasets"),
    **dict.fromkeys(["extract_images", "extract_texts", "default_device"], "loop"),
    **dict.fromkeys(["Piece", "merge_parts", "piece_from_env"], "parts"),
    **dict.fromkeys(["ResizeLarge", "make_transform", "resize_large_size", "pad_amounts", "padded_size"], "transforms"),
    "webdataset_key": "tar_index",
}
__all__ = [*_WHERE, "open_parts"]


def __getattr__(name: str):
    if name == "open_parts":
        from ..store import open_stores

        return open_stores
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ilias.extract' has no attribute {name!r}")
    if module != "tar_index":
        try:  # a core install lacks these: say which extra brings them
            import PIL  # noqa: F401
            import torch  # noqa: F401
        except ImportError as e:
            raise ImportError(f"feature extraction needs the models extra ({e.name} is missing): pip install 'ilias-core[models]'") from None
    return getattr(import_module(f".{module}", __name__), name)
