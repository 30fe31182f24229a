"""The benchmark's models: a registry (no torch needed) and a factory that builds them (torch).

>>> spec = get_spec("vit_base_patch16_siglip_384.webli")   # doctest: +SKIP
>>> encoder = build_image_encoder(spec)                     # pooled image features
>>> text = build_text_encoder(spec)                         # its open_clip text tower
"""

from .registry import REGISTRY, ModelSpec, get_spec, list_models

__all__ = ["REGISTRY", "ModelSpec", "get_spec", "list_models", "build_image_encoder", "build_text_encoder"]


def __getattr__(name):
    # the factory imports torch: only when asked for
    if name in ("build_image_encoder", "build_text_encoder", "ImageEncoder", "TextEncoder", "GeM"):
        from . import factory

        return getattr(factory, name)
    raise AttributeError(name)
