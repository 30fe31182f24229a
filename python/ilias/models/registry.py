"""The benchmark's models: every checkpoint of the seed table, keyed by the table's `checkpoint` name,
and the newer ones the official extraction lists (DINOv3, Perception Encoder, SigLIP2).

An entry says how to build the image tower (framework + architecture + pretrained tag), at which
resolution the paper tested it, how its output is pooled, which patch multiple its input is padded
to, its normalisation, and for vision-language models which open_clip text tower shares its space.
Where the official scripts call a model by another name (`alexnet`, `swav`, `mocov3_vitb16`), that
name is an alias of the entry. `data/official_models.tsv` holds the official settings as data; a test
reads the registry against it. Nothing here imports torch: `ilias models` lists the table on a bare
install.

Choices that follow the reference extraction scripts rather than a general rule:
- Pooling is the model's own head (`head`: timm `num_classes=0`, CLIP/SigLIP projection kept) except
  AlexNet and VGG16, which the reference ran with GeM (p=3) on the last conv map. ResNet/DenseNet
  `*.tv_in1k` are the torchvision weights as timm serves them, with their head (global average).
- Self-supervised checkpoints whose weights timm also serves (DINO ViT, DINOv2, DINOv3) are built with
  timm; they are the same weights as the torch.hub entries and need no network access to the hub's
  code. The hub code resizes DINO and DINOv2 (no registers) positional embeddings by its own rule,
  which timm does not follow: `pos_embed="hub"` makes the timm model use the hub's rule
  (models/pos_embed.py). DINOv2 with registers resizes as timm does, and DINOv3 has rotary positions
  computed for any grid. DINOv3 is pooled on its CLS token as the hub model is (timm defaults to the
  average of the patch tokens).
- The published EVA02-L/14@336 text-to-image number was computed with the 224 px `EVA02-L-14` text
  tower (`merged2b_s4b_b131k`), a different training run from the image tower: that is the default,
  so that the published number reproduces; `text_tower="matching"` takes the tower trained with the
  image tower (`EVA02-L-14-336`, `merged2b_s6b_b61k`).
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))

# where a framework fetches its weights from (what `ilias models` shows)
WEIGHT_SOURCES = {
    "timm": "Hugging Face hub (timm)",
    "open_clip": "open_clip (Hugging Face hub / OpenAI)",
    "torchvision": "download.pytorch.org",
    "url": "public URL (torch hub cache)",
    None: "not served by a public hub",
}


@dataclass(frozen=True)
class ModelSpec:
    name: str  # the seed table's checkpoint name
    framework: str | None  # timm | open_clip | torchvision | url (torchvision/timm architecture + a state dict URL)
    arch: str  # the framework's name for the architecture
    tag: str | None  # pretrained tag (timm / open_clip) or torchvision weights enum name
    resolution: int  # test resolution R: the larger image side
    pooling: str = "head"  # head | gem | cls (the CLS token after the final norm, before any head)
    patch: int | None = None  # ViT patch size: inputs are padded to a multiple of it
    mean: tuple = IMAGENET[0]
    std: tuple = IMAGENET[1]
    text: tuple[str, str] | None = None  # open_clip (model, pretrained) of the matching text tower
    url: str | None = None  # state dict URL for framework "url"
    prefix: str = ""  # key prefix to strip from that state dict
    note: str = ""
    official: str | None = None  # the official scripts' name, where it differs from `name`
    pos_embed: str | None = None  # "hub": positional embeddings resized by the DINO / DINOv2 hub rule
    global_pool: str | None = None  # timm `global_pool` where the official pooling differs from timm's default
    # other text towers than `text`, by label (the default one is labelled "published")
    text_variants: tuple[tuple[str, tuple[str, str]], ...] = ()

    @property
    def buildable(self) -> bool:
        return self.framework is not None

    @property
    def hub_name(self) -> str:
        """The name the framework knows (timm `arch.tag`, open_clip `arch/tag`)."""
        if self.framework == "timm" and self.tag:
            return f"{self.arch}.{self.tag}"
        if self.framework == "open_clip":
            return f"{self.arch}/{self.tag}"
        return self.arch

    @property
    def weight_source(self) -> str:
        return WEIGHT_SOURCES[self.framework]

    def text_tower(self, variant: str | None = None) -> tuple[str, str]:
        """The open_clip (model, pretrained) of a text tower: `text`, or one of `text_variants` by label."""
        if self.text is None:
            raise ValueError(f"{self.name}: not a vision-language model, it has no text tower")
        if variant in (None, "published"):
            return self.text
        towers = dict(self.text_variants)
        if variant not in towers:
            labels = ", ".join(["published", *towers])
            raise ValueError(f"--text-tower: {self.name} has no {variant!r} text tower (it has: {labels})")
        return towers[variant]


def _timm(name, res, norm=IMAGENET, patch=None, text=None, pooling="head", **kw):
    arch, tag = name.split(".", 1)
    return ModelSpec(name, "timm", arch, tag, res, pooling, patch, norm[0], norm[1], text, **kw)


def _custom(name, res, repo, patch=None, pooling="head", official=None):
    note = f"custom architecture and weights ({repo}); extract with its own code and `ilias import` the features"
    return ModelSpec(name, None, name, None, res, pooling, patch, note=note, official=official)


def _dino_hub(name, arch, res, patch, reg=False, pool=None):
    """A torch.hub DINO-family ViT built from timm's copy of its weights."""
    return ModelSpec(name, "timm", arch.split(".")[0], arch.split(".")[1], res, patch=patch,
                     pos_embed=None if reg else "hub", global_pool=pool, note=f"= torch.hub {name}")


_FB = "https://dl.fbaipublicfiles.com"

_MODELS = [
    ModelSpec("alexnet.tv_in1k", "torchvision", "alexnet", "IMAGENET1K_V1", 384, "gem", official="alexnet"),
    _timm("vgg16.tv_in1k", 384, pooling="gem"),
    _timm("resnet50.tv_in1k", 384),
    _timm("resnet101.tv_in1k", 384),
    _timm("densenet169.tv_in1k", 384),
    _timm("inception_v4.tf_in1k", 512, HALF),
    _timm("nasnetalarge.tf_in1k", 512, HALF),
    _timm("tf_efficientnet_b4.ns_jft_in1k", 512),
    _timm("vit_base_patch16_224.augreg_in1k", 384, HALF, 16),
    _timm("vit_base_patch16_224.augreg_in21k", 384, HALF, 16),
    _timm("vit_large_patch16_224.augreg_in21k", 384, HALF, 16),
    _timm("vit_large_patch16_224.augreg_in21k_ft_in1k", 384, HALF, 16),
    _timm("vit_large_patch16_384.augreg_in21k_ft_in1k", 512, HALF, 16),
    _timm("deit3_base_patch16_224.fb_in1k", 384, IMAGENET, 16),
    _timm("deit3_large_patch16_224.fb_in1k", 384, IMAGENET, 16),
    ModelSpec("RN50.openai", "open_clip", "RN50", "openai", 384, "head", None, *OPENAI_CLIP, text=("RN50", "openai")),
    _timm("vit_base_patch16_clip_224.openai", 384, OPENAI_CLIP, 16, ("ViT-B-16", "openai")),
    _timm("vit_large_patch14_clip_224.openai", 384, OPENAI_CLIP, 14, ("ViT-L-14", "openai")),
    _timm("vit_large_patch14_clip_336.openai", 512, OPENAI_CLIP, 14, ("ViT-L-14-336", "openai")),
    _timm("vit_large_patch14_clip_224.laion2b", 384, HALF, 14, ("ViT-L-14", "laion2b_s32b_b82k")),
    ModelSpec(
        "swav_resnet50", "url", "resnet50", None, 384,
        url=f"{_FB}/deepcluster/swav_800ep_pretrain.pth.tar", prefix="module.", official="swav",
        note="torchvision ResNet-50, SwAV weights (the torch.hub facebookresearch/swav entry)",
    ),
    ModelSpec(
        "dino_resnet50", "url", "resnet50", None, 384,
        url=f"{_FB}/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
        note="torchvision ResNet-50, DINO weights (the torch.hub facebookresearch/dino entry)",
    ),
    _dino_hub("dino_vitb16", "vit_base_patch16_224.dino", 384, 16),
    ModelSpec(
        "moco_v3_resnet50", "url", "resnet50", None, 384,
        url=f"{_FB}/moco-v3/r-50-1000ep/r-50-1000ep.pth.tar", prefix="module.base_encoder.",
        official="mocov3_resnet50", note="torchvision ResNet-50, MoCo v3 base encoder",
    ),
    ModelSpec(
        "moco_v3_vitb", "url", "timm:vit_base_patch16_224", None, 384, patch=16,
        url=f"{_FB}/moco-v3/vit-b-300ep/vit-b-300ep.pth.tar", prefix="module.base_encoder.",
        official="mocov3_vitb16", note="timm ViT-B/16, MoCo v3 base encoder",
    ),
    _timm("convnext_base.fb_in1k", 384),
    _timm("convnext_base.fb_in22k", 384),
    _timm("convnext_large.fb_in1k", 384),
    _timm("convnext_large.fb_in22k", 384),
    _timm("convnext_base.clip_laion2b_augreg", 384, OPENAI_CLIP, None, ("convnext_base_w", "laion2b_s13b_b82k_augreg")),
    _timm(
        "convnext_large_mlp.clip_laion2b_ft_soup_320", 512, OPENAI_CLIP, None,
        ("convnext_large_d_320", "laion2b_s29b_b131k_ft_soup"),
    ),
    _custom("recall_512-resnet50", 384, "RS@k, github"),
    _custom("recall_512-vit_base_patch16_224_in21k", 384, "RS@k, github", 16),
    _custom("cvnet_resnet50", 724, "CVNet, github"),
    _custom("cvnet_resnet101", 724, "CVNet, github"),
    # the seed table gives 384; the official extraction runs it at 724, as SuperGlobal's own evaluation does
    _custom("superglobal_resnet50", 724, "SuperGlobal, github"),
    _custom("superglobal_resnet101", 724, "SuperGlobal, github"),
    _custom("hier_dino_vits16_sop", 384, "Hier, github", 16, official="dino_vit16_patch16_224_sop"),
    _timm("eva02_base_patch14_224.mim_in22k", 384, OPENAI_CLIP, 14),
    _timm("eva02_large_patch14_224.mim_in22k", 384, OPENAI_CLIP, 14),
    _timm("eva02_large_patch14_224.mim_m38m", 384, OPENAI_CLIP, 14),
    _timm("eva02_base_patch16_clip_224.merged2b", 384, OPENAI_CLIP, 16, ("EVA02-B-16", "merged2b_s8b_b131k")),
    _timm(
        "eva02_large_patch14_clip_336.merged2b", 512, OPENAI_CLIP, 14, ("EVA02-L-14", "merged2b_s4b_b131k"),
        text_variants=(("matching", ("EVA02-L-14-336", "merged2b_s6b_b61k")),),
    ),
    _custom("unicom_vit_base_patch16_224", 384, "UNICOM, github", 16),
    _custom("unicom_vit_large_patch14_224", 384, "UNICOM, github", 14),
    _custom("unicom_vit_large_patch14_336", 512, "UNICOM, github", 14),
    _custom("unicom_vit_base_patch16_gldv2", 724, "UNICOM, github", 16),
    _custom("unicom_vit_base_patch16_sop", 384, "UNICOM, github", 16),
    # the seed table gives 724; the official extraction runs it at 384 on its CLS token
    _custom("uscrr_64-vit_base_patch16_clip_224.openai", 384, "USCRR, github", 16, "cls"),
    _dino_hub("dinov2_vitb14", "vit_base_patch14_dinov2.lvd142m", 724, 14),
    _dino_hub("dinov2_vitl14", "vit_large_patch14_dinov2.lvd142m", 724, 14),
    _timm("vit_base_patch16_siglip_224.webli", 384, HALF, 16, ("ViT-B-16-SigLIP", "webli")),
    _timm("vit_base_patch16_siglip_256.webli", 384, HALF, 16, ("ViT-B-16-SigLIP-256", "webli")),
    _timm("vit_base_patch16_siglip_384.webli", 512, HALF, 16, ("ViT-B-16-SigLIP-384", "webli")),
    _timm("vit_base_patch16_siglip_512.webli", 724, HALF, 16, ("ViT-B-16-SigLIP-512", "webli")),
    _timm("vit_large_patch16_siglip_256.webli", 384, HALF, 16, ("ViT-L-16-SigLIP-256", "webli")),
    _timm("vit_large_patch16_siglip_384.webli", 512, HALF, 16, ("ViT-L-16-SigLIP-384", "webli")),
    _timm("vit_base_patch16_clip_224.metaclip_2pt5b", 384, OPENAI_CLIP, 16, ("ViT-B-16-quickgelu", "metaclip_fullcc")),
    _timm("vit_large_patch14_clip_224.metaclip_2pt5b", 384, OPENAI_CLIP, 14, ("ViT-L-14-quickgelu", "metaclip_fullcc")),
    _dino_hub("dinov2_vitb14_reg", "vit_base_patch14_reg4_dinov2.lvd142m", 724, 14, reg=True),
    _dino_hub("dinov2_vitl14_reg", "vit_large_patch14_reg4_dinov2.lvd142m", 724, 14, reg=True),
    _custom("unic_l", 512, "UNIC, github", 14),
    _custom("udon_64-vitb_in21k_ft_in1k", 384, "UDON, github", 16, "cls",
            official="udon_64-vit_base_patch16_224.augreg_in21k_ft_in1k"),
    _custom("udon_64-vitb_clip_openai", 384, "UDON, github", 16, "cls", official="udon_64-vit_base_patch16_clip_224.openai"),
    # newer than the paper: listed by the official extraction, not in the seed table
    _timm("vit_base_patch16_siglip_384.v2_webli", 512, HALF, 16, ("ViT-B-16-SigLIP2-384", "webli")),
    _timm("vit_base_patch16_siglip_512.v2_webli", 724, HALF, 16, ("ViT-B-16-SigLIP2-512", "webli")),
    _timm("vit_large_patch16_siglip_384.v2_webli", 512, HALF, 16, ("ViT-L-16-SigLIP2-384", "webli")),
    _timm("vit_large_patch16_siglip_512.v2_webli", 724, HALF, 16, ("ViT-L-16-SigLIP2-512", "webli")),
    _timm("vit_pe_core_base_patch16_224.fb", 384, HALF, 16, ("PE-Core-B-16", "meta")),
    _timm("vit_pe_core_large_patch14_336.fb", 512, HALF, 14, ("PE-Core-L-14-336", "meta")),
    _dino_hub("dinov3_vitb16", "vit_base_patch16_dinov3.lvd1689m", 768, 16, reg=True, pool="token"),
    _dino_hub("dinov3_vitl16", "vit_large_patch16_dinov3.lvd1689m", 768, 16, reg=True, pool="token"),
]

REGISTRY: dict[str, ModelSpec] = {m.name: m for m in _MODELS}
# the official scripts' names of the same models
ALIASES: dict[str, str] = {m.official: m.name for m in _MODELS if m.official}


def get_spec(name: str) -> ModelSpec:
    """The entry of `name` (ours or the official scripts'); an unknown name is a ValueError that
    suggests the closest names."""
    spec = REGISTRY.get(ALIASES.get(name, name))
    if spec is not None:
        return spec
    close = difflib.get_close_matches(name, [*REGISTRY, *ALIASES], n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `ilias models` lists them"
    raise ValueError(f"unknown model {name!r}{hint}") from None


def list_models(pattern: str | None = None, buildable_only: bool = False) -> list[ModelSpec]:
    """Entries whose name matches a shell-style pattern (a bare word matches as a substring)."""
    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"

    def matches(m: ModelSpec) -> bool:
        return not pattern or any(fnmatch.fnmatch(n.lower(), pattern.lower()) for n in (m.name, m.official or ""))

    return [m for m in _MODELS if matches(m) and (m.buildable or not buildable_only)]
