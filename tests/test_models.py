"""The model registry against the seed table, and the factory with random weights (no downloads)."""

import csv
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("open_clip")

from ilias.cli import main  # noqa: E402
from ilias.models import REGISTRY, ModelSpec, build_image_encoder, build_text_encoder, get_spec, list_models  # noqa: E402
from ilias.models.registry import HALF  # noqa: E402

SEED = Path(__file__).parents[1] / "python/ilias/data/seed_results.tsv"


def seed_rows():
    lines = [line for line in SEED.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


OFFICIAL = Path(__file__).parents[1] / "python/ilias/data/official_models.tsv"
# where the seed table's test resolution is not what the official extraction runs (the official one wins)
SEED_DIFFERS = {"superglobal_resnet50": (384, 724), "uscrr_64-vit_base_patch16_clip_224.openai": (724, 384)}


def official_rows():
    lines = [line for line in OFFICIAL.read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines, delimiter="\t"))


def test_every_seed_checkpoint_is_registered_with_its_test_resolution():
    for row in seed_rows():
        spec = get_spec(row["checkpoint"])
        if row["task"] == "i2i":
            seed, official = SEED_DIFFERS.get(spec.name, (spec.resolution, spec.resolution))
            assert int(row["test_res"]) == seed and spec.resolution == official, row["checkpoint"]
        else:
            assert spec.text is not None, f"{row['checkpoint']}: t2i model without a text tower"


def test_registry_has_the_official_settings():
    rows = official_rows()
    assert len(rows) == len({r["name"] for r in rows}) >= 72
    for row in rows:
        spec = get_spec(row["name"])  # official names resolve, as aliases where ours differ
        assert spec.official in (None, row["name"]) and (spec.official or spec.name) == row["name"]
        assert spec.resolution == int(row["resolution"]), row["name"]
        assert spec.pooling == row["pooling"], row["name"]
        assert (spec.text is not None) == (row["text"] == "true"), row["name"]
        if row["pad"] != "?":
            assert spec.patch == (None if row["pad"] == "-" else int(row["pad"])), row["name"]
        if row["library"] == "timm" and spec.buildable:
            assert spec.framework == "timm" and spec.hub_name == row["name"], row["name"]
    # every buildable entry is one the official extraction lists
    listed = {get_spec(r["name"]).name for r in rows}
    assert {m.name for m in REGISTRY.values() if m.buildable} <= listed


def test_official_names_work_on_the_command_line(capsys):
    assert get_spec("mocov3_vitb16") is get_spec("moco_v3_vitb")
    assert main(["models", "mocov3"]) == 0
    out = capsys.readouterr().out
    assert "moco_v3_vitb" in out and "mocov3_vitb16" in out and "2 models" in out


def test_normalisation_and_patch_agree_with_timm_configs():
    for spec in REGISTRY.values():
        if spec.framework != "timm":
            continue
        cfg = timm.models.get_pretrained_cfg(spec.hub_name)
        assert cfg is not None, spec.name
        assert np.allclose(spec.mean, cfg.mean) and np.allclose(spec.std, cfg.std), spec.name
        is_vit = any(k in spec.arch for k in ("vit", "eva", "deit"))
        assert bool(spec.patch) == is_vit, spec.name
        if spec.patch:
            assert f"patch{spec.patch}" in spec.arch, spec.name


def test_open_clip_text_towers_exist():
    import open_clip

    for spec in REGISTRY.values():
        if spec.text:
            arch, tag = spec.text
            assert arch in open_clip.list_models(), spec.name
            assert tag in open_clip.list_pretrained_tags_by_model(arch), spec.name


def test_unknown_name_suggests_close_names():
    with pytest.raises(ValueError, match="did you mean vit_base_patch16_siglip_224.webli"):
        get_spec("vit_base_patch16_siglp_224.webli")


def test_list_models_filters():
    names = [m.name for m in list_models("dinov2")]
    assert names == ["dinov2_vitb14", "dinov2_vitl14", "dinov2_vitb14_reg", "dinov2_vitl14_reg"]
    assert all(m.buildable for m in list_models(buildable_only=True))
    assert any(not m.buildable for m in list_models("unicom"))


def test_dynamic_vit_runs_at_any_padded_size():
    spec = ModelSpec("tiny-vit", "timm", "vit_tiny_patch16_224", None, 64, patch=16, mean=HALF[0], std=HALF[1])
    enc = build_image_encoder(spec, pretrained=False)
    assert enc.dim == 192 and enc.weights == "random-init"
    with torch.inference_mode():
        for h, w in [(64, 48), (48, 64), (16, 112)]:
            assert enc(torch.randn(2, 3, h, w)).shape == (2, 192)


def test_cnn_head_and_gem():
    cnn = build_image_encoder(ModelSpec("r18", "timm", "resnet18", None, 64), pretrained=False)
    assert cnn.dim == 512
    gem = build_image_encoder(ModelSpec("r18-gem", "timm", "resnet18", None, 64, "gem"), pretrained=False)
    x = torch.randn(1, 3, 70, 50)
    with torch.inference_mode():
        fmap = gem.backbone.forward_features(x)
        expected = fmap.clamp(min=1e-6).pow(3).mean((-2, -1)).pow(1 / 3)
        assert torch.allclose(gem(x), expected, rtol=1e-5)


def test_clip_resnet_attention_pool_at_other_sizes():
    enc = build_image_encoder("RN50.openai", pretrained=False)
    assert enc.dim == 1024
    with torch.inference_mode():
        assert enc(torch.randn(1, 3, 96, 160)).shape == (1, 1024)
        # at the training size, the resized embedding is the original one: same as open_clip's own pooling
        x = torch.randn(1, 3, 224, 224)
        pool = enc.backbone.attnpool.pool
        trunk = enc.backbone
        fmap = trunk.layer4(trunk.layer3(trunk.layer2(trunk.layer1(trunk.stem(x)))))
        assert torch.allclose(enc.backbone.attnpool(fmap), pool(fmap), atol=1e-4)


def test_text_encoder_random_init_is_normalised():
    spec = ModelSpec("clip-b32", "open_clip", "ViT-B-32", None, 224, text=("ViT-B-32", None))
    text = build_text_encoder(spec, pretrained=False)
    v = text.encode(["a red mug with a white logo", "a toy robot"])
    assert v.dtype == np.float32 and v.shape == (2, 512)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)


def test_image_only_model_has_no_text_tower():
    with pytest.raises(ValueError, match="not a vision-language model"):
        build_text_encoder("dinov2_vitb14", pretrained=False)


def test_custom_models_and_missing_weight_files_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="custom architecture"):
        build_image_encoder("cvnet_resnet50", pretrained=False)
    with pytest.raises(FileNotFoundError, match="--weights"):
        build_image_encoder("dino_vitb16", weights=tmp_path / "nope.pth")


def test_local_weights_file_is_loaded(tmp_path):
    spec = ModelSpec("moco-like", "url", "resnet18", None, 64, url="unused", prefix="module.base_encoder.")
    ref = build_image_encoder(spec, pretrained=False)
    state = {f"module.base_encoder.{k}": v for k, v in ref.backbone.state_dict().items()}
    torch.save({"state_dict": state}, tmp_path / "w.pth.tar")
    enc = build_image_encoder(spec, weights=tmp_path / "w.pth.tar")
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(enc(x), ref(x))
    assert enc.weights.endswith("w.pth.tar")


def test_cli_models(capsys):
    assert main(["models", "siglip"]) == 0
    out = capsys.readouterr().out
    assert "vit_large_patch16_siglip_384.webli" in out and "10 models" in out
    assert "ViT-L-16-SigLIP2-512" in out  # the text tower
    assert main(["models", "-v", "eva02_large_patch14_clip_336"]) == 0
    out = capsys.readouterr().out
    assert "text tower published: EVA02-L-14/merged2b_s4b_b131k" in out
    assert "text tower matching: EVA02-L-14-336/merged2b_s6b_b61k" in out
    assert main(["models", "cvnet"]) == 0
    assert "not served by a public hub" in capsys.readouterr().out
    assert main(["models", "no-such-model"]) == 1


def test_eva02_text_tower_is_the_published_one_unless_asked(tmp_path):
    spec = get_spec("eva02_large_patch14_clip_336.merged2b")
    assert spec.text_tower() == ("EVA02-L-14", "merged2b_s4b_b131k")
    assert spec.text_tower("matching") == ("EVA02-L-14-336", "merged2b_s6b_b61k")
    with pytest.raises(ValueError, match="--text-tower: .* has no 'other' text tower .*published, matching"):
        spec.text_tower("other")
    with pytest.raises(ValueError, match="not a vision-language model"):
        get_spec("dinov3_vitb16").text_tower()


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    # a timm entry: timm's strict loader, its report condensed to one line
    other = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    torch.save(other.state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"--weights .*small.pth: not a checkpoint of vit_base_patch16_224.dino: "
                                         r".*keys of another shape \(first: "):
        build_image_encoder("dino_vitb16", weights=tmp_path / "small.pth")
    # a torchvision architecture with a state dict URL: missing and unexpected keys counted
    spec = ModelSpec("moco-like", "url", "resnet18", None, 64, url="unused")
    state = build_image_encoder(spec, pretrained=False).backbone.state_dict()
    state.pop("layer4.1.bn2.weight")
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r18.pth")
    with pytest.raises(ValueError, match=r"not of this architecture: 1 missing keys \(first: layer4.1.bn2.weight\), "
                                         r"1 unexpected keys \(first: extra.weight\)"):
        build_image_encoder(spec, weights=tmp_path / "r18.pth")


@pytest.mark.parametrize("name", ["dinov2_vitb14", "dinov2_vitb14_reg"])
def test_a_checkpoint_in_the_hub_layout_loads_from_a_local_file(tmp_path, name):
    # the torch.hub DINOv2 files: a mask token, registers as `register_tokens`, and (with registers)
    # a position for the class token, which timm folds into the token itself
    torch.manual_seed(0)
    ref = build_image_encoder(name, pretrained=False).backbone.state_dict()
    hub = {k: v.clone() for k, v in ref.items()}
    hub["mask_token"] = torch.zeros(1, ref["cls_token"].shape[-1])
    if "reg_token" in hub:
        hub["register_tokens"] = hub.pop("reg_token")
        hub["pos_embed"] = torch.cat([torch.zeros(1, 1, ref["pos_embed"].shape[-1]), ref["pos_embed"]], 1)
    torch.save(hub, tmp_path / "hub.pth")
    got = build_image_encoder(name, weights=tmp_path / "hub.pth").backbone.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_dinov3_checkpoint_in_the_hub_layout_loads_from_a_local_file(tmp_path):
    # the torch.hub DINOv3 files: storage tokens, layer scales as ls1/ls2, rope periods, a mask token,
    # and q/k/v biases (all zero in the published ViT-B/L) with their mask
    torch.manual_seed(0)
    ref = build_image_encoder("dinov3_vitb16", pretrained=False).backbone.state_dict()
    names = (("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma"))
    hub = {}
    for k, v in ref.items():
        for ours, theirs in names:
            k = k.replace(ours, theirs)
        hub[k] = v.clone()
    hub["mask_token"] = torch.zeros(1, 768)
    hub["rope_embed.periods"] = torch.ones(16)
    for i in range(12):
        hub[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * 768)
        hub[f"blocks.{i}.attn.qkv.bias_mask"] = torch.ones(3 * 768)
    torch.save(hub, tmp_path / "dinov3.pth")
    got = build_image_encoder("dinov3_vitb16", weights=tmp_path / "dinov3.pth").backbone.state_dict()
    assert set(got) == set(ref) and all(torch.equal(got[k], ref[k]) for k in ref)


def test_a_swav_checkpoint_with_its_training_heads_loads(tmp_path):
    torch.manual_seed(0)
    ref = build_image_encoder("swav", pretrained=False).backbone.state_dict()
    state = {f"module.{k}": v for k, v in ref.items()}
    state["module.projection_head.0.weight"] = torch.zeros(2048, 2048)
    state["module.prototypes.weight"] = torch.zeros(3000, 128)
    torch.save(state, tmp_path / "swav.pth.tar")
    got = build_image_encoder("swav", weights=tmp_path / "swav.pth.tar").backbone.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in ref)
