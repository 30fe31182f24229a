"""Our features against the official models' forward, written out here from their definitions.

Each family is checked on images of several aspect ratios, a 1000x120 panorama among them, with
random weights (the same tensors on both sides), in float32:
- DINO and DINOv2 (torch.hub code): learned positional embeddings resized bicubically without
  antialiasing by the scale factors (n + 0.1) / M; the interpolation is written here as the cubic
  convolution it is (Keys' kernel, a = -0.75, borders clamped), in float64.
- DINOv2 with registers, and timm ViTs: resized to the grid with the antialiased bicubic filter
  (a = -0.5, widened when shrinking, weights normalised), also written out here.
- DINOv3 (torch.hub code): rotary position embeddings for the grid, from the definition (periods
  100^(2i/(D/2)), coordinates at patch centres normalised per axis to [-1, 1], rotate-half), with
  the attention computed here.
- PE core and SigLIP2: the official extraction builds them with timm itself; the reference is that
  recipe (default head, dynamic size) with our weights.
The tolerance is 1e-6 on L2-normalised features; the resize rules differ by orders of magnitude more.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")

from ilias.extract import ResizeLarge  # noqa: E402
from ilias.models import build_image_encoder, get_spec  # noqa: E402
from ilias.models.pos_embed import hub_resize  # noqa: E402
from PIL import Image  # noqa: E402

F = torch.nn.functional
SIZES = [(640, 480), (1000, 120), (120, 1000), (300, 300)]  # (width, height)
RESOLUTION = 224  # small enough for CPU tests; the rules do not depend on it
TOL = 1e-6


def inputs(encoder):
    rng = np.random.default_rng(7)
    tf = ResizeLarge(RESOLUTION, encoder.mean, encoder.std, encoder.patch)
    for w, h in SIZES:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        yield (w, h), tf(img)[None]


def unit(x):
    return F.normalize(x.double(), dim=-1)


def cubic(d, a):
    """Keys' cubic convolution kernel."""
    d = np.abs(d)
    return np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                    np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))


def bicubic_by_scale(n_in, n_out, scale):
    """Rows of weights: output i samples input (i + 0.5) / scale - 0.5, four taps, borders clamped.
    The sample positions are computed in float32 from the float32 step 1 / scale, as float32
    interpolation does: past the 7th digit, they are part of the rule's result."""
    w = np.zeros((n_out, n_in))
    step = np.float32(1.0 / scale)
    for i in range(n_out):
        src = float(step * np.float32(i + 0.5) - np.float32(0.5))
        x0 = math.floor(src)
        for k in range(-1, 3):
            w[i, min(max(x0 + k, 0), n_in - 1)] += cubic(src - (x0 + k), -0.75)
    return w


def bicubic_antialiased(n_in, n_out):
    """Rows of weights of the antialiased filter: a = -0.5, stretched by in/out when shrinking."""
    ratio = n_in / n_out
    stretch = max(ratio, 1.0)
    w = np.zeros((n_out, n_in))
    for i in range(n_out):
        centre = (i + 0.5) * ratio
        lo, hi = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), n_in)
        taps = cubic((np.arange(lo, hi) - centre + 0.5) / stretch, -0.5)
        w[i, lo:hi] = taps / taps.sum()
    return w


def resize_grid(pos, gh, gw, rows_h, rows_w):
    """(M*M, C) embeddings of a square grid -> (gh*gw, C) through separable weight matrices."""
    m = round(pos.shape[0] ** 0.5)
    grid = pos.double().numpy().reshape(m, m, -1)
    out = np.einsum("hi,ijc,wj->hwc", rows_h, grid, rows_w)
    return torch.from_numpy(out.reshape(gh * gw, -1)).float()


def hub_rule(pos, gh, gw, offset=0.1):
    m = round(pos.shape[0] ** 0.5)
    if (gh, gw) == (m, m):
        return pos
    return resize_grid(pos, gh, gw, bicubic_by_scale(m, gh, (gh + offset) / m), bicubic_by_scale(m, gw, (gw + offset) / m))


def antialiased_rule(pos, gh, gw):
    m = round(pos.shape[0] ** 0.5)
    if (gh, gw) == (m, m):
        return pos
    return resize_grid(pos, gh, gw, bicubic_antialiased(m, gh), bicubic_antialiased(m, gw))


def learned_pos_vit(model, x, resize):
    """A ViT with learned positions: patches and [CLS] plus their positions, registers, blocks, norm, CLS."""
    p = model.patch_embed.patch_size[0]
    gh, gw = x.shape[2] // p, x.shape[3] // p
    patches = model.patch_embed.norm(model.patch_embed.proj(x).flatten(2).transpose(1, 2))
    pos = model.pos_embed[0]
    if model.no_embed_class:  # positions for the patches only (the class token's is folded into it)
        patches, cls = patches + resize(pos, gh, gw), model.cls_token
    else:
        patches, cls = patches + resize(pos[1:], gh, gw), model.cls_token + pos[:1]
    prefix = [cls] + ([model.reg_token] if model.reg_token is not None else [])
    t = torch.cat([q.expand(len(x), -1, -1) for q in prefix] + [patches], 1)
    for blk in model.blocks:
        t = blk(t)
    return model.norm(t)[:, 0]


def dinov3_rope(gh, gw, head_dim, base=100.0):
    periods = base ** (2 * np.arange(head_dim // 4) / (head_dim // 2))
    ch, cw = (np.arange(gh) + 0.5) / gh * 2 - 1, (np.arange(gw) + 0.5) / gw * 2 - 1
    coords = np.stack(np.meshgrid(ch, cw, indexing="ij"), -1).reshape(-1, 2)  # (HW, 2) as (y, x)
    angles = (2 * np.pi * coords[:, :, None] / periods[None, None, :]).reshape(len(coords), -1)
    angles = np.tile(angles, 2)
    return torch.from_numpy(np.sin(angles)).float(), torch.from_numpy(np.cos(angles)).float()


def rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def dinov3_forward(model, x):
    """The DINOv3 hub ViT: [CLS], 4 storage tokens, patches; rotary q/k on patches; CLS after the norm."""
    p = model.patch_embed.patch_size[0]
    gh, gw = x.shape[2] // p, x.shape[3] // p
    t = model.patch_embed.proj(x).flatten(2).transpose(1, 2)
    t = torch.cat([model.cls_token.expand(len(t), -1, -1), model.reg_token.expand(len(t), -1, -1), t], 1)
    prefix = t.shape[1] - gh * gw
    heads = model.blocks[0].attn.num_heads
    sin, cos = dinov3_rope(gh, gw, t.shape[-1] // heads)
    for blk in model.blocks:
        h = blk.norm1(t)
        a = blk.attn
        bias = a.qkv.bias if a.q_bias is None else torch.cat([a.q_bias, a.k_bias, a.v_bias])
        q, k, v = F.linear(h, a.qkv.weight, bias).reshape(len(t), -1, 3, heads, t.shape[-1] // heads).permute(2, 0, 3, 1, 4)
        q = torch.cat([q[:, :, :prefix], q[:, :, prefix:] * cos + rotate_half(q[:, :, prefix:]) * sin], 2)
        k = torch.cat([k[:, :, :prefix], k[:, :, prefix:] * cos + rotate_half(k[:, :, prefix:]) * sin], 2)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        t = t + blk.gamma_1 * a.proj((w @ v).transpose(1, 2).reshape(t.shape))
        t = t + blk.gamma_2 * blk.mlp(blk.norm2(t))
    return model.norm(t)[:, 0]


def smooth_positions(model):
    """Learned positions as real checkpoints have them: smooth over the grid and not small against the
    patch embeddings (random-init ones are tiny noise, under which every resize rule looks alike)."""
    if getattr(model, "pos_embed", None) is None:
        return
    n, c = model.pos_embed.shape[1:]
    prefix = n - round((n - (0 if model.no_embed_class else 1)) ** 0.5) ** 2
    m = round((n - prefix) ** 0.5)
    g = torch.Generator().manual_seed(3)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, m), torch.linspace(0, 1, m), indexing="ij")
    fy, fx, phase = torch.rand(3, c, generator=g) * torch.tensor([[4.0], [4.0], [6.28]])
    field = torch.sin(fy * yy[..., None] * 6.28 + fx * xx[..., None] * 6.28 + phase).reshape(m * m, c)
    model.pos_embed.data[0, prefix:] = field


def compare(name, reference, depth=2):
    """Ours against `reference(backbone, x)` on every test image; the first `depth` blocks suffice (the
    blocks are the same modules on both sides, the position handling before them is what differs)."""
    torch.manual_seed(0)
    enc = build_image_encoder(name, pretrained=False)
    enc.backbone.blocks = enc.backbone.blocks[:depth]
    smooth_positions(enc.backbone)
    with torch.inference_mode():
        for size, x in inputs(enc):
            diff = (unit(enc(x)) - unit(reference(enc.backbone, x))).abs().max().item()
            assert diff <= TOL, f"{name} at {size}: max abs difference {diff:.2e}"
    return enc


@pytest.mark.parametrize("name", ["dino_vitb16", "dinov2_vitb14"])
def test_dino_and_dinov2_resize_positions_by_the_hub_rule(name):
    compare(name, lambda m, x: learned_pos_vit(m, x, hub_rule))


@pytest.mark.parametrize("name", ["dinov2_vitb14_reg", "vit_base_patch16_224.augreg_in1k"])
def test_registers_and_timm_vits_resize_positions_with_antialiasing(name):
    compare(name, lambda m, x: learned_pos_vit(m, x, antialiased_rule))


def test_the_two_rules_differ_far_beyond_the_tolerance():
    # what the comparisons above would see if a model used the other rule
    with pytest.raises(AssertionError, match="max abs difference"):
        compare("dinov2_vitb14", lambda m, x: learned_pos_vit(m, x, antialiased_rule))
    with pytest.raises(AssertionError, match="max abs difference"):
        compare("dinov2_vitb14_reg", lambda m, x: learned_pos_vit(m, x, hub_rule))


def test_hub_resize_equals_the_cubic_convolution_definition():
    torch.manual_seed(1)
    pos = torch.randn(1, 1 + 37 * 37, 16)
    for gh, gw in [(16, 2), (51, 38), (37, 37), (37, 52), (1, 60)]:
        ours = hub_resize(pos, (gh, gw))[0]
        ref = torch.cat([pos[0, :1], hub_rule(pos[0, 1:], gh, gw)])
        assert ours.shape == (1 + gh * gw, 16)
        # float32 interpolation of rough data (unit normal, no smoothness) carries ~1e-6 relative error
        assert torch.allclose(ours, ref, atol=5e-6 * pos.abs().max().item(), rtol=0), (gh, gw)


def test_dinov3_rotary_positions_and_cls_pooling():
    enc = compare("dinov3_vitb16", dinov3_forward)
    assert enc.backbone.global_pool == "token" and isinstance(enc.backbone.norm_pre, torch.nn.Identity)


@pytest.mark.parametrize("name", ["vit_pe_core_base_patch16_224.fb", "vit_base_patch16_siglip_384.v2_webli"])
def test_pe_core_and_siglip2_are_the_official_timm_recipe(name):
    spec = get_spec(name)

    def official(model, x):
        ref = timm.create_model(spec.hub_name, pretrained=False, dynamic_img_size=True)
        ref.blocks = ref.blocks[: len(model.blocks)]
        ref.load_state_dict(model.state_dict())
        return ref.eval()(x)

    compare(name, official)
