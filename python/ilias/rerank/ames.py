"""AMES (Suma et al., ECCV 2024) in torch: a small transformer that scores a pair of images from
their local descriptors, loading the published checkpoints.

The architecture, as the published model defines it:

- each descriptor is L2-normalised and mapped to width 128: full precision by Linear(768 -> 128)
  and LayerNorm; binary by a fixed ITQ projection 768 -> 128, the sign, Linear(128 -> 128) and
  LayerNorm;
- the sequence is [matching token, query tokens, database tokens]; 5 post-norm layers of width
  128 (2 heads, feed-forward 1024, relu), each a self-attention in which a token sees only the
  tokens of its own image, then a cross-attention in which it sees only the other image's; the
  matching token sees, and is seen by, everything in both; padded tokens are never seen;
- the score is Linear(128 -> 1) of the matching token's output: a logit, which `fuse.py` turns
  into `sigmoid(gamma * logit)`.

There are no positional encodings: the score does not depend on the order of an image's tokens
(tested), only x, y and scale are carried in the stores for other verifiers.

Parameter names and shapes follow the published state dicts exactly (`mtc_token`,
`remap_local.*`, `decoder.layers.<i>.{self_attn,cross_attn,linear1,linear2,norm1..3}`,
`classifier`), so that a checkpoint (a torch file with its weights under `state`) loads with
strict=True. The binary model's projection is a parameter of the checkpoint
(`remap_local.0.W`, (768, 128)); a binary locals store must be packed with that matrix.

Inference follows the published evaluation in one more detail: the full-precision model rounds
the database side's remapped tokens to float16 (`db_half`), as its database descriptors were.

Cost: the remap is done once per image (each query once, each database image once, however many
pairs share them); the transformer runs on pairs, `batch_size` at a time, in float16 autocast on
CUDA, and its attentions compute only the blocks the masks leave open (`_image_attention`: with
600 + 50 tokens, about half the products of the masked squares; 3x the pairs/s on a CPU). The binary projection and sign run in float32 even then: a sign must not flip by rounding.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from .._extras import require

torch = require("torch", "AMES re-ranking", "rerank")
nn = torch.nn
F = torch.nn.functional

VARIANTS = ("full", "binary")
# the published configuration
LOCAL_DIM, WIDTH, HEADS, LAYERS, FEEDFORWARD, BITS = 768, 128, 2, 5, 1024, 128


class _SignProjection(nn.Module):
    """The binary input: signs of `x @ W` as +-1 (a component >= 0 gives +1, as binary.py packs it)."""

    def __init__(self, in_dim: int, bits: int):
        super().__init__()
        self.W = nn.Parameter(torch.zeros(in_dim, bits), requires_grad=False)

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            y = x.float() @ self.W.float()
        return torch.where(y >= 0, 1.0, -1.0).to(y.dtype)


class _Layer(nn.Module):
    """One post-norm layer: attention within each image, attention across the two, feed-forward."""

    def __init__(self, width: int, heads: int, feedforward: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.linear1 = nn.Linear(width, feedforward)
        self.linear2 = nn.Linear(feedforward, width)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)

    def forward(self, x, nq: int, keep_q, keep_d):
        x = self.norm1(x + _image_attention(self.self_attn, x, nq, keep_q, keep_d, within=True))
        x = self.norm2(x + _image_attention(self.cross_attn, x, nq, keep_q, keep_d, within=False))
        return self.norm3(x + self.linear2(F.relu(self.linear1(x))))


def _image_attention(attn, x, nq: int, keep_q, keep_d, within: bool):
    """The attention of `attn` over [matching token, query tokens, database tokens], computed only
    where a token may look: `within`, at the token and its own image; otherwise at the token and
    the other image; the matching token everywhere; padded tokens (keep False) nowhere.

    Equal to the module's own forward with the published masks, but the masked blocks are never
    computed: with 600 query and 50 database tokens the cross-attention is 7x smaller than the
    full square, and the self-attention skips the 2 x 600 x 50 pairs across images."""
    b, n, w = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).view(b, n, 3, h, w // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, n, head width)
    token = keep_q.new_ones(b, 1)
    with_query = slice(0, 1 + nq)  # the token and the query's tokens lie side by side

    def look(rows, keys, values, keep):
        return F.scaled_dot_product_attention(rows, keys, values, attn_mask=keep[:, None, None, :])

    def with_db(t):  # the token and the database's tokens
        return torch.cat([t[:, :, :1], t[:, :, 1 + nq:]], 2)

    keep_tq, keep_td = torch.cat([token, keep_q], 1), torch.cat([token, keep_d], 1)
    q_rows, d_rows = q[:, :, 1:1 + nq], q[:, :, 1 + nq:]
    if within:
        out_q = look(q_rows, k[:, :, with_query], v[:, :, with_query], keep_tq)
        out_d = look(d_rows, with_db(k), with_db(v), keep_td)
    else:
        out_q = look(q_rows, with_db(k), with_db(v), keep_td)
        out_d = look(d_rows, k[:, :, with_query], v[:, :, with_query], keep_tq)
    out_t = look(q[:, :, :1], k, v, torch.cat([token, keep_q, keep_d], 1))
    out = torch.cat([out_t, out_q, out_d], 2).transpose(1, 2).reshape(b, n, w)
    return F.linear(out, attn.out_proj.weight, attn.out_proj.bias)


class _Decoder(nn.Module):
    # a module of its own only for the parameter names: decoder.layers.<i>.*
    def __init__(self, layers: int, width: int, heads: int, feedforward: int):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(width, heads, feedforward) for _ in range(layers))


class AMES(nn.Module):
    """The AMES matcher. `variant`: "full" (float descriptors) or "binary" (ITQ signs).

    >>> model = load_ames("dinov2_ames.pt")                                       # doctest: +SKIP
    >>> logits = model.score(q_desc, q_mask, db_desc, db_mask, pairs=pairs)       # (P,)
    """

    def __init__(self, variant: str = "binary", local_dim: int = LOCAL_DIM, width: int = WIDTH, heads: int = HEADS,
                 layers: int = LAYERS, feedforward: int = FEEDFORWARD, bits: int = BITS):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant: {variant!r} is not one of {', '.join(VARIANTS)}")
        self.variant = variant
        self.local_dim = local_dim
        self.bits = bits if variant == "binary" else None
        self.mtc_token = nn.Parameter(torch.zeros(width))
        if variant == "binary":
            self.remap_local = nn.Sequential(_SignProjection(local_dim, bits), nn.Linear(bits, width), nn.LayerNorm(width))
        else:
            self.remap_local = nn.Sequential(nn.Linear(local_dim, width), nn.LayerNorm(width))
        self.decoder = _Decoder(layers, width, heads, feedforward)
        self.classifier = nn.Linear(width, 1)
        self.db_half = variant == "full"
        self.eval()

    @property
    def projection(self) -> np.ndarray | None:
        """The binary model's ITQ projection (local_dim, bits): what a binary store must be packed with."""
        return None if self.variant == "full" else self.remap_local[0].W.detach().cpu().numpy()

    # ---- the two halves of the work
    def remap(self, locals_, mask, side: str = "query", binary_input: bool | None = None):
        """Descriptors (B, N, D) and their padding mask (B, N) -> tokens of width 128 (B, N, 128).

        Binary model: `binary_input` says the descriptors are already +-1 signs (D = bits, as a
        binary store gives them); by default it is inferred from D. Padded tokens are zeroed
        first (they are never attended to, and NaN there must not reach the rest)."""
        x = torch.where(mask[..., None], 0.0, locals_.float())
        if binary_input is None:
            binary_input = self.variant == "binary" and x.shape[-1] == self.bits and self.bits != self.local_dim
        if binary_input:
            if self.variant != "binary" or x.shape[-1] != self.bits:
                raise ValueError(f"{side} descriptors: +-1 input needs the binary model and dimension {self.bits}, got {x.shape[-1]}")
            out = self.remap_local[2](self.remap_local[1](x))
        else:
            if x.shape[-1] != self.local_dim:
                raise ValueError(f"{side} descriptors: dimension {x.shape[-1]}, the {self.variant} model reads {self.local_dim}"
                                 + (f" (or {self.bits}-bit signs)" if self.bits else ""))
            out = self.remap_local(F.normalize(x, p=2, dim=-1))
        if side == "db" and self.db_half:
            out = out.half().float()
        return out

    def match(self, q_tokens, q_mask, d_tokens, d_mask):
        """Logits (B,) of B pairs of remapped tokens: (B, Nq, W), (B, Nq) and (B, Nd, W), (B, Nd)."""
        b = q_tokens.shape[0]
        x = torch.cat([self.mtc_token.expand(b, 1, -1).to(q_tokens.dtype), q_tokens, d_tokens.to(q_tokens.dtype)], 1)
        for layer in self.decoder.layers:
            x = layer(x, q_tokens.shape[1], ~q_mask, ~d_mask)
        return self.classifier(x[:, 0]).squeeze(-1)

    @torch.no_grad()
    def score(self, query_locals, query_mask, db_locals, db_mask, pairs=None, batch_size: int = 128,
              binary_input: bool | None = None) -> np.ndarray:
        """Raw AMES logits of (query, database image) pairs, float32.

        query_locals (Q, Nq, D) with query_mask (Q, Nq) (True: padding), db_locals (R, Nd, D)
        with db_mask (R, Nd); numpy arrays or tensors. `pairs` (P, 2): (query row, database
        row) per pair -> (P,); without it, every query with every database image -> (Q, R).
        Each image is remapped once; pairs run `batch_size` at a time."""
        device = self.mtc_token.device
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda")
        qx, qm = _tensor(query_locals, "query_locals", 3, device), _tensor(query_mask, "query_mask", 2, device).bool()
        dx, dm = _tensor(db_locals, "db_locals", 3, device), _tensor(db_mask, "db_mask", 2, device).bool()
        for what, x, m in (("query", qx, qm), ("db", dx, dm)):
            if m.shape != x.shape[:2]:
                raise ValueError(f"{what}_mask: shape {tuple(m.shape)} does not match {what}_locals {tuple(x.shape)}")
        if pairs is None:
            grid = np.stack(np.meshgrid(np.arange(len(qx)), np.arange(len(dx)), indexing="ij"), -1).reshape(-1, 2)
        else:
            grid = np.asarray(pairs, dtype=np.int64)
            if grid.ndim != 2 or grid.shape[1] != 2:
                raise ValueError(f"pairs: expected shape (P, 2) of (query row, database row), got {grid.shape}")
            if grid.size and (grid.min() < 0 or grid[:, 0].max() >= len(qx) or grid[:, 1].max() >= len(dx)):
                raise ValueError(f"pairs: rows out of range ({len(qx)} queries, {len(dx)} database images)")
        if batch_size < 1:
            raise ValueError(f"batch_size: must be at least 1, got {batch_size}")
        with autocast:
            q = self.remap(qx, qm, "query", binary_input)
            d = self.remap(dx, dm, "db", binary_input)
            out = torch.empty(len(grid), dtype=torch.float32)
            index = torch.from_numpy(grid).to(device)
            for lo in range(0, len(grid), batch_size):
                qi, di = index[lo:lo + batch_size, 0], index[lo:lo + batch_size, 1]
                out[lo:lo + len(qi)] = self.match(q[qi], qm[qi], d[di], dm[di]).float().cpu()
        logits = out.numpy()
        return logits if pairs is not None else logits.reshape(len(qx), len(dx))


def _tensor(x, what: str, ndim: int, device):
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim != ndim:
        raise ValueError(f"{what}: expected {ndim} dimensions, got shape {tuple(t.shape)}")
    return t.to(device)


def published_keys(variant: str, layers: int = LAYERS) -> list[str]:
    """The parameter names of a published checkpoint of `variant` (what strict loading expects)."""
    return list(AMES(variant, layers=layers).state_dict().keys())


def load_ames(path: str | os.PathLike, variant: str | None = None, device: str = "cpu", heads: int = HEADS,
              trust: bool = False) -> AMES:
    """A published AMES checkpoint (weights under `state`), loaded strictly.

    The variant and the sizes come from the weights; `variant` ("full" or "binary"), when
    given, must be the checkpoint's (an error names the file and the keys that differ). The
    number of heads is not in the weights: the published models have 2. The file is read with
    torch's tensors-only unpickler; `trust=True` lifts that for a checkpoint that also pickles
    other objects (a training config, say), which runs whatever code the file names."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such AMES checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=not trust)
    except Exception as e:  # torch raises several kinds for a file that is not a checkpoint
        first = (str(e).splitlines() or [""])[0]
        hint = "" if trust or "weights_only" not in str(e) else "; if you trust the file, load it with trust=True"
        raise ValueError(f"{path}: not a loadable torch checkpoint ({type(e).__name__}: {first}){hint}") from None
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a dict with the model's weights under 'state' (the published AMES layout)")
    found = "binary" if "remap_local.0.W" in state else "full"
    layer_ids = {int(m.group(1)) for k in state if (m := re.match(r"decoder\.layers\.(\d+)\.", k))}
    layers = max(layer_ids) + 1 if layer_ids else LAYERS
    if variant is not None and variant != found:
        want = set(published_keys(variant, layers))
        missing, unexpected = sorted(want - state.keys()), sorted(state.keys() - want)
        raise ValueError(f"{path}: a {found} AMES checkpoint, not {variant} (missing keys: {', '.join(missing) or 'none'}; "
                         f"unexpected keys: {', '.join(unexpected) or 'none'})")
    try:
        width = state["mtc_token"].shape[0]
        feedforward = state["decoder.layers.0.linear1.weight"].shape[0]
        if found == "binary":
            local_dim, bits = state["remap_local.0.W"].shape
        else:
            local_dim, bits = state["remap_local.0.weight"].shape[1], BITS
    except KeyError as e:
        raise ValueError(f"{path}: not an AMES checkpoint (no {e.args[0]!r} in its state)") from None
    model = AMES(found, local_dim=local_dim, width=width, heads=heads, layers=layers, feedforward=feedforward, bits=bits)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:])
        raise ValueError(f"{path}: does not fit the {found} AMES model: {detail}") from None
    return model.to(device).eval()
