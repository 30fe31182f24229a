"""Builds the image tower (and the text tower) of a registry entry as a torch module.

`pretrained=False` builds the same architecture with random weights: tests and benchmarks run the
real code paths without downloading anything. Weights otherwise come from the framework's usual
cache (Hugging Face hub for timm/open_clip, torch hub for torchvision and URLs) or from a local
file given with `weights=`; a failed download becomes one OSError that says how to supply them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .._extras import require
from .registry import ModelSpec, get_spec

torch = require("torch", "feature extraction", "models", "torch and friends")
nn = torch.nn
F = torch.nn.functional

_SUPPLY = (
    "To supply them: run once with network access (they are then cached under ~/.cache/huggingface "
    "or ~/.cache/torch/hub; set HF_HUB_OFFLINE=1 to use that cache offline), or pass a local "
    "state dict file with --weights PATH (python: weights=PATH)."
)


class GeM(nn.Module):
    """Generalised mean pooling over the spatial positions of a conv map (p = 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x):
        # computed in float32: x**3 of fp16 activations overflows
        x = x.float().clamp(min=self.eps).pow(self.p)
        return x.mean(dim=(-2, -1)).pow(1.0 / self.p)


class AnySizeAttnPool(nn.Module):
    """The attention pooling of CLIP ResNets at any input size.

    CLIP learned positional embeddings for a 7x7 map (224 px); at other sizes they are resized
    bicubically to the feature map, as the ILIAS reference does for RN50 at 384 px.
    """

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, x):
        p = self.pool
        _, _, h, w = x.shape
        pos = p.positional_embedding
        g = round((pos.shape[0] - 1) ** 0.5)
        grid = pos[1:].reshape(g, g, -1).permute(2, 0, 1)[None]
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0].flatten(1).T
        pos = torch.cat([pos[:1], grid])
        tokens = x.flatten(2).permute(2, 0, 1)  # (HW, N, C)
        tokens = torch.cat([tokens.mean(0, keepdim=True), tokens]) + pos[:, None].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=tokens, key=tokens, value=tokens,
            embed_dim_to_check=tokens.shape[-1],
            num_heads=p.num_heads,
            q_proj_weight=p.q_proj.weight, k_proj_weight=p.k_proj.weight, v_proj_weight=p.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([p.q_proj.bias, p.k_proj.bias, p.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=p.c_proj.weight, out_proj_bias=p.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )
        return out[0]


class ImageEncoder(nn.Module):
    """An image tower: `forward(x)` gives the pooled (not yet normalised) features of a batch.

    Attributes used by the extraction: `spec`, `mean`, `std`, `patch` (pad multiple or None),
    `dim` (output size), `backbone` (the framework's own module, for its own transform),
    `weights` (what the weights are: "pretrained", "random-init" or a file path).
    """

    def __init__(self, spec: ModelSpec, backbone: nn.Module, head, weights: str):
        super().__init__()
        self.spec, self.backbone, self.head, self.weights = spec, backbone, head, weights
        self.mean, self.std, self.patch = spec.mean, spec.std, spec.patch
        self.eval()
        with torch.inference_mode():
            side = 2 * spec.patch if spec.patch else 224
            self.dim = int(self(torch.zeros(1, 3, side, side)).shape[-1])

    def forward(self, x):
        return self.head(x)


def build_image_encoder(
    model: str | ModelSpec, pretrained: bool = True, weights: str | os.PathLike | None = None
) -> ImageEncoder:
    """The image tower of a registry entry (name or ModelSpec), on the CPU, in eval mode."""
    spec = get_spec(model) if isinstance(model, str) else model
    if not spec.buildable:
        raise ValueError(f"{spec.name}: cannot be built here: {spec.note}")
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"--weights: {weights}: no such file")
    label = str(weights) if weights else ("pretrained" if pretrained else "random-init")
    try:
        backbone, head = _BUILDERS[spec.framework](spec, pretrained and weights is None, weights)
    except ImportError:
        raise
    except Exception as e:  # a failed download surfaces as many exception types
        if not pretrained or weights is not None:
            raise
        raise OSError(
            f"{spec.name}: could not load the pretrained weights of {spec.hub_name} from {spec.weight_source} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {_SUPPLY}"
        ) from None
    return ImageEncoder(spec, backbone, head, label)


def _timm_model(arch, spec, pretrained, weights, **kwargs):
    import timm

    if spec.patch:
        kwargs["dynamic_img_size"] = True  # positional embeddings interpolated to any padded size
    if spec.global_pool:
        kwargs["global_pool"] = spec.global_pool
    if weights is not None:
        # timm's own loader applies the checkpoint conversions (e.g. OpenAI CLIP -> timm names)
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
        pretrained = True
    name = f"{arch}.{spec.tag}" if spec.tag else arch
    try:
        m = timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if weights is None or "state_dict" not in str(e):
            raise
        raise ValueError(f"--weights {weights}: not a checkpoint of {name}: {_key_mismatch(str(e))}") from None
    if spec.pos_embed == "hub":
        from .pos_embed import use_hub_rule

        use_hub_rule(m)
    return m


def _build_timm(spec, pretrained, weights):
    if spec.pooling in ("gem", "cls"):
        m = _timm_model(spec.arch, spec, pretrained, weights, num_classes=0)
        return m, nn.Sequential(_Call(m.forward_features), GeM() if spec.pooling == "gem" else _ClassToken())
    # vision-language towers keep their projection head; the others drop the classifier
    kwargs = {} if spec.text else {"num_classes": 0}
    m = _timm_model(spec.arch, spec, pretrained, weights, **kwargs)
    return m, m


def _build_open_clip(spec, pretrained, weights):
    import open_clip

    source = str(weights) if weights else (spec.tag if pretrained else None)
    visual = open_clip.create_model(spec.arch, pretrained=source).visual
    if hasattr(visual, "attnpool"):
        visual.attnpool = AnySizeAttnPool(visual.attnpool)
    return visual, visual


def _build_torchvision(spec, pretrained, weights):
    import torchvision

    m = getattr(torchvision.models, spec.arch)(weights=spec.tag if pretrained else None)
    if weights is not None:
        _load_state_dict(m, _read_state_dict(weights), spec)
    return m, _torchvision_head(m, spec)


def _build_url(spec, pretrained, weights):
    if spec.arch.startswith("timm:"):
        import timm

        m = timm.create_model(spec.arch[5:], pretrained=False, num_classes=0, dynamic_img_size=bool(spec.patch))
        head = m
    else:
        import torchvision

        m = getattr(torchvision.models, spec.arch)(weights=None)
        m.fc = nn.Identity()  # the SSL checkpoints carry no classifier: global average features
        head = _torchvision_head(m, spec)
    if weights is not None:
        state = _read_state_dict(weights)
    elif pretrained:
        state = torch.hub.load_state_dict_from_url(spec.url, map_location="cpu", progress=False)
    else:
        return m, head
    _load_state_dict(m, state, spec)
    return m, head


def _torchvision_head(m, spec):
    if spec.pooling == "gem":
        return nn.Sequential(m.features, GeM())
    return m


class _ClassToken(nn.Module):
    """The first token of a ViT's normed output sequence (official `cls` pooling)."""

    def forward(self, x):
        return x[:, 0]


class _Call(nn.Module):
    """A bound method as a module (a timm model's `forward_features`)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _read_state_dict(path):
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=False)


def _load_state_dict(m, state, spec):
    for key in ("state_dict", "model", "teacher"):  # checkpoints often nest the weights
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    if spec.prefix:
        state = {k[len(spec.prefix):]: v for k, v in state.items() if k.startswith(spec.prefix)}
    # classifiers and self-supervised training heads (SwAV's projection head and prototypes) are not
    # used: features come from before them
    unused = ("fc.", "head.", "projection_head.", "prototypes.")
    state = {k: v for k, v in state.items() if not k.startswith(unused)}
    expected = {k: v.shape for k, v in m.state_dict().items() if not k.startswith(unused)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"{len(keys)} {what} (first: {keys[0]})"
                 for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                    ("keys of another shape", wrong)) if keys]
        raise ValueError(f"{spec.name}: the weights are not of this architecture: {', '.join(parts)}")
    m.load_state_dict(state, strict=False)


def _key_mismatch(message: str) -> str:
    """One line out of torch's many-line report of a state dict that does not fit the model."""
    parts = []
    for label, pattern in (("missing keys", r"Missing key\(s\) in state_dict: (.*?)\.\s*$"),
                           ("unexpected keys", r"Unexpected key\(s\) in state_dict: (.*?)\.\s*$")):
        found = re.search(pattern, message, re.MULTILINE)
        if found:
            keys = [k.strip().strip('"') for k in found.group(1).split(",")]
            parts.append(f"{len(keys)} {label} (first: {keys[0]})")
    shapes = re.findall(r"size mismatch for ([^:]+):", message)
    if shapes:
        parts.append(f"{len(shapes)} keys of another shape (first: {shapes[0]})")
    return ", ".join(parts) or message.splitlines()[0]


_BUILDERS = {
    "timm": _build_timm,
    "open_clip": _build_open_clip,
    "torchvision": _build_torchvision,
    "url": _build_url,
}


class TextEncoder:
    """The open_clip text tower and tokenizer that match a vision-language entry."""

    def __init__(self, spec: ModelSpec, model, tokenizer, weights: str, tower: tuple[str, str] | None = None):
        self.spec, self.model, self.tokenizer, self.weights = spec, model, tokenizer, weights
        self.tower = tower or spec.text  # the open_clip (model, pretrained) it was built from

    @property
    def device(self):
        return next(self.model.parameters()).device

    def to(self, device) -> "TextEncoder":
        self.model.to(device)
        return self

    def encode(self, texts: list[str]):
        """L2-normalised float32 embeddings (numpy) of whole texts."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        use_amp = self.device.type == "cuda"
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            features = self.model.encode_text(tokens)
        return F.normalize(features.float(), dim=-1).cpu().numpy()


def build_text_encoder(
    model: str | ModelSpec,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    tower: str | None = None,
) -> TextEncoder:
    """The text tower of a vision-language entry (ValueError for image-only models).

    `tower` picks one of the entry's text towers by label: "published" (the default, the one the
    published numbers were computed with) or a label of `spec.text_variants`.
    """
    import open_clip

    spec = get_spec(model) if isinstance(model, str) else model
    arch, tag = spec.text_tower(tower)
    source = str(weights) if weights else (tag if pretrained else None)
    label = str(weights) if weights else ("pretrained" if pretrained else "random-init")
    try:
        clip = open_clip.create_model(arch, pretrained=source)
        tokenizer = open_clip.get_tokenizer(arch)
    except Exception as e:
        if not pretrained and weights is None and not isinstance(e, OSError):
            raise
        raise OSError(
            f"{spec.name}: could not load the text tower {arch}/{tag} or its tokenizer "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). {_SUPPLY}"
        ) from None
    clip.visual = None  # the text side only: halves the memory of big models
    clip.eval()
    return TextEncoder(spec, clip, tokenizer, label, (arch, tag))
