"""Positional embeddings resized as the DINO and DINOv2 torch.hub code resizes them.

Those models (facebookresearch/dino, and facebookresearch/dinov2 without registers) learned a square
grid of M x M embeddings. For an input of gh x gw patches, their hub code resizes the grid bicubically,
without antialiasing, by the scale factors (gh + 0.1) / M and (gw + 0.1) / M rather than to the size
(gh, gw): the 0.1 keeps floor(M * scale) from falling one short of gh through float error. Since the
interpolation then places its samples by the scale factor it was given, not by gh / M, the result
is not a resize to (gh, gw), which is what timm does (and timm antialiases on top). The two differ
by about 1% on ordinary grids and by much more on elongated ones, so the features of a timm model
differ from the official ones unless it resizes by this rule. A grid of exactly M x M keeps the
learned embeddings unchanged, as in the hub code.

DINOv2 with registers resizes to the size with antialiasing, as timm does; DINOv3 has rotary
position embeddings computed for any grid. Neither needs this module.
"""

from __future__ import annotations

import types

from .factory import torch

F = torch.nn.functional

HUB_OFFSET = 0.1


def hub_resize(pos_embed, grid: tuple[int, int], num_prefix: int = 1, offset: float = HUB_OFFSET):
    """(1, num_prefix + M*M, C) learned embeddings -> (1, num_prefix + gh*gw, C) for a (gh, gw) grid."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    m = round(patches.shape[1] ** 0.5)
    if m * m != patches.shape[1]:
        raise ValueError(f"positional embeddings of {patches.shape[1]} patches are not a square grid")
    gh, gw = grid
    if (gh, gw) == (m, m):
        return pos_embed
    dim = patches.shape[-1]
    square = patches.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)
    scale = ((gh + offset) / m, (gw + offset) / m)
    resized = F.interpolate(square, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    if resized.shape[-2:] != (gh, gw):  # cannot happen for offset in (0, 1); a wrong grid would be silent
        raise RuntimeError(f"hub resize of a {m}x{m} grid gave {tuple(resized.shape[-2:])}, not {(gh, gw)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, gh * gw, dim).to(pos_embed.dtype)
    return torch.cat([prefix, resized], dim=1)


def use_hub_rule(model) -> None:
    """Makes a timm VisionTransformer (class token, no registers) add hub-resized embeddings."""
    if model.cls_token is None or model.reg_token is not None or model.no_embed_class or model.pos_embed is None:
        raise ValueError(f"{type(model).__name__}: the hub rule is for ViTs with a class token and no registers")
    if not model.dynamic_img_size:
        raise ValueError("the hub rule needs a timm model built with dynamic_img_size=True")
    model._pos_embed = types.MethodType(_pos_embed_by_hub_rule, model)


def _pos_embed_by_hub_rule(self, x):
    # x: (B, gh, gw, C) patch embeddings, as timm's dynamic-size patch embedding gives them
    b, gh, gw, c = x.shape
    pos = hub_resize(self.pos_embed, (gh, gw), self.num_prefix_tokens)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x.reshape(b, gh * gw, c)], dim=1)
    return self.pos_drop(x + pos)
