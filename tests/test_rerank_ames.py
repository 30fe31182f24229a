"""The AMES model (rerank/ames.py): published checkpoint layout, a numpy reference of the forward
pass, and the properties the architecture guarantees."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from ilias.rerank.ames import AMES, load_ames, published_keys  # noqa: E402
from ilias.rerank.binary import pack_signs, unpack_signs  # noqa: E402

# small sizes for the property tests; the checkpoint tests use the published ones
SMALL = dict(local_dim=24, width=16, heads=2, layers=2, feedforward=32, bits=16)


def _published_state(variant, rng):
    """A state dict named and shaped as the published checkpoints are (DINOv2 AMES: local
    descriptors 768, width 128, 5 layers, feed-forward 1024, 128 ITQ bits), written out here
    from the published model definition rather than taken from our module."""
    def t(*shape):
        return torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.05)

    sd = {"mtc_token": t(128)}
    if variant == "binary":
        sd.update({"remap_local.0.W": t(768, 128), "remap_local.1.weight": t(128, 128), "remap_local.1.bias": t(128),
                   "remap_local.2.weight": t(128) + 1, "remap_local.2.bias": t(128)})
    else:
        sd.update({"remap_local.0.weight": t(128, 768), "remap_local.0.bias": t(128),
                   "remap_local.1.weight": t(128) + 1, "remap_local.1.bias": t(128)})
    for i in range(5):
        p = f"decoder.layers.{i}."
        for attn in ("self_attn", "cross_attn"):
            sd.update({f"{p}{attn}.in_proj_weight": t(384, 128), f"{p}{attn}.in_proj_bias": t(384),
                       f"{p}{attn}.out_proj.weight": t(128, 128), f"{p}{attn}.out_proj.bias": t(128)})
        sd.update({f"{p}linear1.weight": t(1024, 128), f"{p}linear1.bias": t(1024),
                   f"{p}linear2.weight": t(128, 1024), f"{p}linear2.bias": t(128)})
        for n in (1, 2, 3):
            sd.update({f"{p}norm{n}.weight": t(128) + 1, f"{p}norm{n}.bias": t(128)})
    sd.update({"classifier.weight": t(1, 128), "classifier.bias": t(1)})
    return sd


# ---- a plain numpy forward pass of one pair, from the published definition


def _ln(x, w, b, eps=1e-5):
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + eps) * w + b


def _attention(x, p, allowed, heads):
    n, w = x.shape
    qkv = x @ p["in_proj_weight"].T + p["in_proj_bias"]
    q, k, v = qkv[:, :w], qkv[:, w:2 * w], qkv[:, 2 * w:]
    hd = w // heads
    out = []
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        s = q[:, sl] @ k[:, sl].T / np.sqrt(hd)
        s = np.where(allowed, s, -np.inf)
        a = np.exp(s - s.max(1, keepdims=True))
        out.append((a / a.sum(1, keepdims=True)) @ v[:, sl])
    return np.concatenate(out, 1) @ p["out_proj.weight"].T + p["out_proj.bias"]


def _sub(params, prefix):
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _reference(sd, variant, heads, qx, qpad, dx, dpad):
    p = {k: v.double().numpy() for k, v in sd.items()}

    def remap(x, db):
        x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        if variant == "binary":
            x = np.where(x @ p["remap_local.0.W"] >= 0, 1.0, -1.0)
            y = _ln(x @ p["remap_local.1.weight"].T + p["remap_local.1.bias"], p["remap_local.2.weight"], p["remap_local.2.bias"])
        else:
            y = _ln(x @ p["remap_local.0.weight"].T + p["remap_local.0.bias"], p["remap_local.1.weight"], p["remap_local.1.bias"])
            if db:  # the published evaluation keeps database tokens in float16
                y = y.astype(np.float16).astype(np.float64)
        return y

    x = np.concatenate([p["mtc_token"][None], remap(qx, False), remap(dx, True)])
    image = np.array([-1] + [0] * len(qx) + [1] * len(dx))
    token = (image[:, None] < 0) | (image[None, :] < 0)
    same = image[:, None] == image[None, :]
    seen = ~np.concatenate([[False], qpad, dpad])[None, :]
    layers = sorted({int(k.split(".")[2]) for k in p if k.startswith("decoder.layers.")})
    for i in layers:
        lp = {k[len(f"decoder.layers.{i}."):]: v for k, v in p.items() if k.startswith(f"decoder.layers.{i}.")}
        x = _ln(x + _attention(x, _sub(lp, "self_attn."), (same | token) & seen, heads), lp["norm1.weight"], lp["norm1.bias"])
        x = _ln(x + _attention(x, _sub(lp, "cross_attn."), (~same | token) & seen, heads), lp["norm2.weight"], lp["norm2.bias"])
        ff = np.maximum(x @ lp["linear1.weight"].T + lp["linear1.bias"], 0) @ lp["linear2.weight"].T + lp["linear2.bias"]
        x = _ln(x + ff, lp["norm3.weight"], lp["norm3.bias"])
    return float(x[0] @ p["classifier.weight"][0] + p["classifier.bias"][0])


def _inputs(rng, n, tokens, dim, pad_from=None):
    x = rng.standard_normal((n, tokens, dim)).astype(np.float32)
    mask = np.zeros((n, tokens), bool)
    for i in range(n):
        mask[i, rng.integers(1, tokens + 1) if pad_from is None else pad_from:] = True
    return x, mask


def _model(variant, seed=0):
    """A small model with weights large enough that every part of the input matters."""
    torch.manual_seed(seed)
    m = AMES(variant, **SMALL)
    with torch.no_grad():
        for name, prm in m.named_parameters():
            if "norm" in name or name.startswith("remap_local.2") or (variant == "full" and name.startswith("remap_local.1")):
                prm.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(prm))
            elif prm.ndim == 2:
                prm.copy_(torch.randn_like(prm) * 1.5 / prm.shape[-1] ** 0.5)
            else:
                prm.copy_(torch.randn_like(prm) * 0.5)
    return m


# ---- the published layout


@pytest.mark.parametrize("variant", ["full", "binary"])
def test_published_checkpoint_loads_strictly_and_matches_the_reference(tmp_path, rng, variant):
    sd = _published_state(variant, rng)
    assert sorted(published_keys(variant)) == sorted(sd)
    path = tmp_path / f"dinov2_{variant}.pt"
    torch.save({"state": sd, "epoch": 7}, path)
    model = load_ames(path)
    assert model.variant == variant
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    qx, qm = _inputs(rng, 2, 12, 768)
    dx, dm = _inputs(rng, 3, 6, 768)
    got = model.score(qx, qm, dx, dm)
    assert got.shape == (2, 3) and got.dtype == np.float32
    want = [[_reference(sd, variant, 2, qx[i], qm[i], dx[j], dm[j]) for j in range(3)] for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    if variant == "binary":
        np.testing.assert_array_equal(model.projection, sd["remap_local.0.W"].numpy())


def test_wrong_variant_names_the_file_and_keys(tmp_path, rng):
    path = tmp_path / "dinov2_ames.pt"
    torch.save({"state": _published_state("full", rng)}, path)
    with pytest.raises(ValueError, match=r"dinov2_ames.pt: a full AMES checkpoint, not binary \(missing keys: "
                                         r"remap_local.0.W, remap_local.2.bias, remap_local.2.weight; unexpected keys: "
                                         r"remap_local.0.bias, remap_local.0.weight\)"):
        load_ames(path, variant="binary")
    assert load_ames(path, variant="full").variant == "full"


def test_bad_checkpoints_are_clear_errors(tmp_path, rng):
    sd = _published_state("binary", rng)
    torch.save({"model": sd}, tmp_path / "a.pt")
    with pytest.raises(ValueError, match="a.pt: expected a dict with the model's weights under 'state'"):
        load_ames(tmp_path / "a.pt")
    bad = dict(sd)
    bad["decoder.layers.0.norm1.weight"] = torch.zeros(64)
    torch.save({"state": bad}, tmp_path / "b.pt")
    with pytest.raises(ValueError, match="b.pt: does not fit the binary AMES model: .*decoder.layers.0.norm1.weight"):
        load_ames(tmp_path / "b.pt")
    extra = dict(sd, stray=torch.zeros(1))
    torch.save({"state": extra}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="c.pt: does not fit .*stray"):
        load_ames(tmp_path / "c.pt")
    (tmp_path / "d.pt").write_bytes(b"not torch")
    with pytest.raises(ValueError, match="d.pt: not a loadable torch checkpoint"):
        load_ames(tmp_path / "d.pt")
    with pytest.raises(FileNotFoundError, match="e.pt"):
        load_ames(tmp_path / "e.pt")
    # a checkpoint that pickles more than tensors needs the caller's trust
    torch.save({"state": sd, "cfg": _Config()}, tmp_path / "f.pt")
    with pytest.raises(ValueError, match="f.pt: not a loadable torch checkpoint .*trust=True"):
        load_ames(tmp_path / "f.pt")
    assert load_ames(tmp_path / "f.pt", trust=True).variant == "binary"


class _Config:
    """Stands for a training configuration pickled beside the weights."""


# ---- properties of the architecture


@pytest.mark.parametrize("variant", ["full", "binary"])
def test_small_model_matches_the_reference(rng, variant):
    m = _model(variant)
    qx, qm = _inputs(rng, 2, 9, 24)
    dx, dm = _inputs(rng, 2, 5, 24)
    got = m.score(qx, qm, dx, dm, pairs=[[0, 1], [1, 0], [1, 1]])
    want = [_reference(m.state_dict(), variant, 2, qx[i], qm[i], dx[j], dm[j]) for i, j in ((0, 1), (1, 0), (1, 1))]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["full", "binary"])
def test_permuting_database_tokens_leaves_the_score(rng, variant):
    m = _model(variant)
    qx, qm = _inputs(rng, 3, 10, 24)
    dx, dm = _inputs(rng, 4, 8, 24)
    base = m.score(qx, qm, dx, dm)
    for _ in range(3):
        perm = rng.permutation(8)
        np.testing.assert_allclose(m.score(qx, qm, dx[:, perm], dm[:, perm]), base, rtol=1e-5, atol=1e-5)
    # and the query's tokens too
    perm = rng.permutation(10)
    np.testing.assert_allclose(m.score(qx[:, perm], qm[:, perm], dx, dm), base, rtol=1e-5, atol=1e-5)
    # while the scores do depend on the content (the test above can fail)
    assert np.ptp(base) > 1e-3


@pytest.mark.parametrize("variant", ["full", "binary"])
def test_masked_tokens_do_not_count(rng, variant):
    m = _model(variant)
    qx, qm = _inputs(rng, 2, 10, 24)
    dx, dm = _inputs(rng, 3, 8, 24)
    base = m.score(qx, qm, dx, dm)
    dx2, qx2 = dx.copy(), qx.copy()
    dx2[dm] = rng.standard_normal((int(dm.sum()), 24)) * 100
    qx2[qm] = np.nan  # even NaN in padding is never seen
    np.testing.assert_allclose(m.score(qx2, qm, dx2, dm), base, rtol=1e-6, atol=1e-6)
    # cutting the padding off gives the same score too
    one = m.score(qx[:1, :int((~qm[0]).sum())], qm[:1, :int((~qm[0]).sum())], dx[:1, :int((~dm[0]).sum())],
                  dm[:1, :int((~dm[0]).sum())])
    np.testing.assert_allclose(one[0, 0], base[0, 0], rtol=1e-5, atol=1e-5)
    # while an unmasked token does change it
    dx3 = dx.copy()
    dx3[0, 0] = -dx3[0, 0]
    assert abs(m.score(qx, qm, dx3, dm)[0, 0] - base[0, 0]) > 1e-3


def test_batched_equals_one_pair_at_a_time(rng):
    m = _model("full")
    qx, qm = _inputs(rng, 4, 9, 24)
    dx, dm = _inputs(rng, 6, 5, 24)
    pairs = np.stack([rng.integers(0, 4, 30), rng.integers(0, 6, 30)], 1)
    batched = m.score(qx, qm, dx, dm, pairs=pairs, batch_size=7)
    single = [m.score(qx[i:i + 1], qm[i:i + 1], dx[j:j + 1], dm[j:j + 1])[0, 0] for i, j in pairs]
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m.score(qx, qm, dx, dm, batch_size=1)[pairs[:, 0], pairs[:, 1]], batched, rtol=1e-5, atol=1e-5)


def test_each_image_is_remapped_once(rng):
    m = _model("binary")
    qx, qm = _inputs(rng, 3, 9, 24)
    dx, dm = _inputs(rng, 5, 5, 24)
    seen = []
    m.remap_local[1].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    m.score(qx, qm, dx, dm, batch_size=4)  # 15 pairs in 4 batches
    assert seen == [3, 5]


# ---- binary: the float path and the +-1 path


def test_binary_model_reads_packed_store_bits_like_floats(rng):
    """The binary model given float descriptors (it projects and signs them) scores exactly as
    given the +-1 signs a binary locals store holds of the same descriptors."""
    m = _model("binary")
    proj = m.projection
    qx, qm = _inputs(rng, 3, 9, 24)
    dx, dm = _inputs(rng, 4, 6, 24)
    floats = m.score(qx, qm, dx, dm)
    q_bits, d_bits = unpack_signs(pack_signs(qx, proj)), unpack_signs(pack_signs(dx, proj))
    assert q_bits.shape == (3, 9, 16) and set(np.unique(q_bits)) == {-1.0, 1.0}
    np.testing.assert_array_equal(m.score(q_bits, qm, d_bits, dm), floats)


def test_binary_store_feeds_the_binary_model(tmp_path, rng):
    """Store and model together: descriptors packed into a binary locals store with the model's
    projection, read back as the model reads them, score as the float descriptors do; a store
    packed with another projection is refused."""
    from ilias.rerank.locals_store import LocalsMismatchError, LocalsStore, LocalsWriter

    m = _model("binary")
    qx, qm = _inputs(rng, 2, 9, 24, pad_from=6)
    dx, dm = _inputs(rng, 5, 9, 24)
    meta = np.zeros((7, 9, 5), np.float32)
    meta[..., 3] = np.concatenate([qm, dm])
    with LocalsWriter(tmp_path / "s", "m", 9, 16, variant="binary", projection=m.projection, shard_images=3) as w:
        w.append(meta, np.concatenate([qx, dx]), [f"i{k}" for k in range(7)])
    s = LocalsStore.open(tmp_path / "s", variant="binary", projection=m.projection)
    q_in, q_mask = s.model_inputs(s.rows_of(["i0", "i1"]))
    d_in, d_mask = s.model_inputs(np.arange(2, 7))
    np.testing.assert_array_equal(q_mask, qm)
    np.testing.assert_array_equal(m.score(q_in, q_mask, d_in, d_mask), m.score(qx, qm, dx, dm))
    with pytest.raises(LocalsMismatchError, match="manifest.json: holds bits of projection .*, expected projection"):
        LocalsStore.open(tmp_path / "s", projection=m.projection + 1)


def test_binary_path_equals_float_path_on_pm1_inputs(rng):
    """What "the binary path equals the float path on inputs that are already +-1" means here.

    The binary model is the full-precision one with a sign in front: on descriptors that are
    already +-1 (and with no projection to change them, proj = identity, D = bits) the sign is
    the identity, so the binary model must give what a full-precision model with the same
    weights gives. The one difference the published model has is normalisation: the full path
    L2-normalises its input (a +-1 vector of D dims has length sqrt(D)) before Linear, while the
    sign output enters Linear as +-1; so the full model's input weight is the binary one times
    sqrt(D). The published float16 rounding of database tokens (db_half) is switched off for the
    comparison: it is an inference detail of the full model, not part of the map."""
    small = dict(SMALL, local_dim=16)
    binary = AMES("binary", **small)
    full = AMES("full", **small)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, prm in binary.named_parameters():
            prm.copy_(torch.randn_like(prm) * 0.3 + (1.0 if name.endswith("norm1.weight") else 0))
        binary.remap_local[0].W.copy_(torch.eye(16))
        sd = {k: v for k, v in binary.state_dict().items() if not k.startswith("remap_local.")}
        sd["remap_local.0.weight"] = binary.remap_local[1].weight * 4.0  # sqrt(16)
        sd["remap_local.0.bias"] = binary.remap_local[1].bias
        sd["remap_local.1.weight"] = binary.remap_local[2].weight
        sd["remap_local.1.bias"] = binary.remap_local[2].bias
        full.load_state_dict(sd, strict=True)
    full.db_half = False
    qx, qm = _inputs(rng, 3, 9, 16)
    dx, dm = _inputs(rng, 4, 6, 16)
    qs, ds = np.where(qx >= 0, 1.0, -1.0).astype(np.float32), np.where(dx >= 0, 1.0, -1.0).astype(np.float32)
    b_float = binary.score(qs, qm, ds, dm, binary_input=False)  # normalise, project (identity), sign
    b_bits = binary.score(qs, qm, ds, dm, binary_input=True)  # the signs straight in
    f = full.score(qs, qm, ds, dm)
    np.testing.assert_array_equal(b_float, b_bits)
    np.testing.assert_allclose(b_bits, f, rtol=1e-5, atol=1e-5)
    # on inputs that are not +-1 the two differ: the sign is doing work
    assert np.abs(binary.score(qx, qm, dx, dm, binary_input=False) - full.score(qx, qm, dx, dm)).max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_autocast_is_close_to_cpu(tmp_path, rng):
    model = AMES("full")
    with torch.no_grad():
        for prm in model.parameters():
            prm.normal_(0, 0.05)
    qx, qm = _inputs(rng, 3, 60, 768)
    dx, dm = _inputs(rng, 20, 50, 768)
    cpu = model.score(qx, qm, dx, dm)
    gpu = model.to("cuda").score(qx, qm, dx, dm)
    np.testing.assert_allclose(gpu, cpu, rtol=2e-2, atol=2e-2)


def test_bad_inputs(rng):
    m = _model("binary")
    qx, qm = _inputs(rng, 2, 9, 24)
    dx, dm = _inputs(rng, 2, 5, 24)
    with pytest.raises(ValueError, match="db descriptors: dimension 20, the binary model reads 24 \\(or 16-bit signs\\)"):
        m.score(qx, qm, dx[..., :20], dm)
    with pytest.raises(ValueError, match="query_mask: shape"):
        m.score(qx, qm[:, :4], dx, dm)
    with pytest.raises(ValueError, match="pairs: rows out of range"):
        m.score(qx, qm, dx, dm, pairs=[[0, 2]])
    with pytest.raises(ValueError, match="variant"):
        AMES("half")
