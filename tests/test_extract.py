"""Extraction end to end on real photographs and generated images, with random-weight models."""

import io
import tarfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("timm")
skdata = pytest.importorskip("skimage.data")
from ilias import Store  # noqa: E402
from ilias.cli import main  # noqa: E402
from ilias.extract import (  # noqa: E402
    Piece,
    ResizeLarge,
    core_sources,
    extract_images,
    extract_texts,
    folder_sources,
    list_items,
    merge_parts,
    open_parts,
    pad_amounts,
    padded_size,
    piece_from_env,
    resize_large_size,
    select,
    tar_sources,
    webdataset_key,
)
from ilias.groundtruth import read_id_list  # noqa: E402
from ilias.models import ModelSpec, build_image_encoder, build_text_encoder  # noqa: E402
from ilias.models.registry import HALF  # noqa: E402
from PIL import Image  # noqa: E402

TINY_VIT = ModelSpec("tiny-vit", "timm", "vit_tiny_patch16_224", None, 64, patch=16, mean=HALF[0], std=HALF[1])


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return build_image_encoder(TINY_VIT, pretrained=False)


def photos():
    """Real photographs shipped with scikit-image, and generated images of awkward shapes."""
    rng = np.random.default_rng(7)
    out = {"astronaut": skdata.astronaut(), "chelsea": skdata.chelsea(), "coffee": skdata.coffee()}
    for i, (h, w) in enumerate([(30, 200), (200, 30), (1, 50), (64, 64), (97, 131)]):
        out[f"gen{i}"] = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    return {k: Image.fromarray(v) for k, v in out.items()}


def jpeg_bytes(img, **kw):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def make_core(root):
    """A small ilias_core/: two instances with image queries, positives and text queries."""
    imgs = list(photos().values())
    for n, inst in enumerate(["bold_bimp_000", "zippy_zootlenibble_999"]):
        (root / inst / "query").mkdir(parents=True)
        (root / inst / "pos").mkdir()
        (root / inst / "query" / f"Q{n:03d}_00.jpg").write_bytes(jpeg_bytes(imgs[n]))
        (root / inst / "query" / f"Q{n:03d}_00_bbox.txt").write_text("1 2 3 4\n")
        (root / inst / "query" / f"T{n:03d}.txt").write_text(f"a photo of object {n}\nwith details\n")
        for j in range(3):
            (root / inst / "pos" / f"P{n:03d}_{j:02d}.jpg").write_bytes(jpeg_bytes(imgs[2 + n * 3 + j]))
    return root


def make_tars(folder, n_tars=2, per_tar=5):
    imgs = list(photos().values())
    folder.mkdir(parents=True, exist_ok=True)
    for t in range(n_tars):
        with tarfile.open(folder / f"{t:05d}.tar", "w") as tar:
            for k in range(per_tar):
                key = f"{t * 1000 + k:09d}"
                for name, data in ((f"{key}.jpg", jpeg_bytes(imgs[(t * per_tar + k) % len(imgs)])),
                                   (f"{key}.json", b"{}")):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return folder


# ---- transform


@pytest.mark.parametrize(
    "size, res, expected",
    [
        ((640, 480), 384, (384, 288)),  # landscape: ar = 0.75
        ((500, 333), 384, (384, 255)),  # int() truncates 255.744
        ((333, 500), 384, (255, 384)),  # portrait: int(384 / 1.5015...) = 255
        ((100, 100), 724, (724, 724)),  # small images are upscaled
        ((1000, 1), 384, (384, 1)),  # sides are at least 1
        ((3, 1000), 512, (1, 512)),
    ],
)
def test_resize_large_sizes(size, res, expected):
    assert resize_large_size(*size, res) == expected


def test_padding_amounts_split_floor_and_rest():
    assert pad_amounts(255, 16) == (0, 1)
    assert pad_amounts(384, 16) == (0, 0)
    assert pad_amounts(288, 14) == (3, 3)
    assert pad_amounts(255, 14) == (5, 6)
    assert padded_size(500, 333, 384, 16) == (384, 256)
    assert padded_size(500, 333, 384, 14) == (392, 266)
    assert padded_size(500, 333, 384, None) == (384, 255)


def test_resize_large_matches_the_torchvision_pipeline_and_pads_with_zeros():
    import torchvision.transforms.functional as TF

    img = photos()["chelsea"]  # 451 x 300
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = ResizeLarge(384, mean, std, multiple=14)(img)
    w, h = resize_large_size(451, 300, 384)  # (384, 255)
    assert (w, h) == (384, 255) and x.shape == (3, 266, 392)
    ref = TF.normalize(TF.to_tensor(img.resize((w, h), Image.Resampling.BICUBIC)), mean, std)
    top, left = pad_amounts(h, 14)[0], pad_amounts(w, 14)[0]
    assert torch.equal(x[:, top : top + h, left : left + w], ref)
    inner = torch.zeros_like(x, dtype=torch.bool)
    inner[:, top : top + h, left : left + w] = True
    assert torch.all(x[~inner] == 0)


# ---- datasets


def test_core_ids_texts_and_exif(tmp_path):
    root = make_core(tmp_path / "ilias_core")
    q = list_items(core_sources(tmp_path, "image_queries"), exif=True)
    assert q.ids == ["bold_bimp_000/query/Q000_00.jpg", "zippy_zootlenibble_999/query/Q001_00.jpg"]
    p = list_items(core_sources(root, "positives"))
    assert p.ids[0] == "bold_bimp_000/pos/P000_00.jpg" and len(p) == 6
    t = list_items(core_sources(root, "text_queries"), text=True)
    assert t.ids == ["bold_bimp_000/query/T000.txt", "zippy_zootlenibble_999/query/T001.txt"]
    assert t.load_text(0) == "a photo of object 0\nwith details"
    # an id list picks and orders the files
    chosen = core_sources(root, "positives", ["zippy_zootlenibble_999/pos/P001_02.jpg", "bold_bimp_000/pos/P000_01.jpg"])
    assert [s.id for s in chosen] == ["zippy_zootlenibble_999/pos/P001_02.jpg", "bold_bimp_000/pos/P000_01.jpg"]
    # EXIF orientation 6 (rotate 90 degrees): applied to core images only
    exif = Image.Exif()
    exif[0x0112] = 6
    (root / "bold_bimp_000" / "query" / "Q000_00.jpg").write_bytes(
        jpeg_bytes(Image.new("RGB", (60, 40), "red"), exif=exif.tobytes()))
    assert q.load_image(0).size == (40, 60)
    raw = list_items(core_sources(root, "image_queries"), exif=False)
    assert raw.load_image(0).size == (60, 40)


def test_tar_ids_and_mini_ilias_selection(tmp_path):
    tars = make_tars(tmp_path / "yfcc")
    items = list_items(tar_sources([tars]))
    assert len(items) == 10 and items.ids[0] == "00000.tar/000000000" and items.ids[5] == "00001.tar/000001000"
    assert items.load_image(6).size == photos()["gen3"].size  # the 7th of the 8 images
    assert webdataset_key("dir/abc.d.jpg") == ("dir/abc", "d.jpg")
    (tmp_path / "mini.txt").write_text("000000001\n000001004\n")
    mini = select(items, read_id_list(tmp_path / "mini.txt"))
    assert mini.ids == ["00000.tar/000000001", "00001.tar/000001004"]


def test_bad_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        folder_sources(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.tar: no such tar file"):
        tar_sources([tmp_path / "missing.tar"])
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="not a readable tar"):
        list_items(tar_sources([tmp_path / "junk.tar"]))
    with pytest.raises(FileNotFoundError, match="ilias_core"):
        core_sources(tmp_path / "nowhere", "positives")


# ---- the loop


def test_images_store_in_item_order_normalised_with_provenance(tmp_path, vit):
    items = list_items(tar_sources([make_tars(tmp_path / "yfcc")]))
    store = extract_images(items, vit, tmp_path / "out", batch_size=3, workers=2, progress=False)
    assert store.all_ids() == items.ids and store.dtype == np.float16
    v = store.read_all().astype(np.float32)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=2e-3)
    prov = store.manifest.provenance
    assert prov["model"] == "tiny-vit" and prov["transform"] == "resize_large" and prov["resolution"] == 64
    assert prov["complete"] and prov["skipped"] == [] and "torch" in prov["versions"]
    # each row is the model applied to that image alone (batching by size changes nothing)
    x = ResizeLarge(64, vit.mean, vit.std, 16)(items.load_image(3))[None]
    with torch.inference_mode():
        one = torch.nn.functional.normalize(vit(x), dim=-1)[0].numpy()
    assert np.allclose(v[3], one, atol=2e-3)


def test_corrupt_and_truncated_jpegs_are_skipped_and_listed(tmp_path, vit):
    folder = tmp_path / "imgs"
    folder.mkdir()
    good = jpeg_bytes(photos()["coffee"])
    (folder / "a.jpg").write_bytes(good)
    (folder / "b_truncated.jpg").write_bytes(good[: len(good) // 2])
    (folder / "c_garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "d.jpg").write_bytes(good)
    items = list_items(folder_sources(folder))
    with pytest.warns(UserWarning, match="skipped b_truncated.jpg"):
        store = extract_images(items, vit, tmp_path / "out", workers=0, progress=False)
    assert store.all_ids() == ["a.jpg", "d.jpg"]
    skipped = store.manifest.provenance["skipped"]
    assert [s["id"] for s in skipped] == ["b_truncated.jpg", "c_garbage.jpg"]
    assert "truncated" in skipped[0]["error"] and "BytesIO" not in skipped[1]["error"]


def _many_images(folder, n=23):
    rng = np.random.default_rng(3)
    folder.mkdir()
    shapes = [(48, 64), (64, 48), (40, 90), (64, 64)]
    for i in range(n):
        h, w = shapes[i % 4] if i % 7 else (int(rng.integers(5, 90)), int(rng.integers(5, 90)))
        (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))))
    (folder / "005.jpg").write_bytes(b"broken")
    return folder


def test_a_run_killed_midway_resumes_to_the_same_store(tmp_path, vit, monkeypatch):
    items = list_items(folder_sources(_many_images(tmp_path / "imgs")))
    kw = dict(batch_size=4, window=8, workers=0, shard_rows=5, progress=False)
    with pytest.warns(UserWarning):
        whole = extract_images(items, vit, tmp_path / "whole", **kw)

    calls = {"n": 0}
    forward = type(vit).forward

    def dying(self, x):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt  # what Ctrl-C or a kill does to the loop
        return forward(self, x)

    monkeypatch.setattr(type(vit), "forward", dying)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        extract_images(items, vit, tmp_path / "resumed", **kw)
    monkeypatch.setattr(type(vit), "forward", forward)
    partial = Store.open(tmp_path / "resumed")
    assert 0 < partial.count < whole.count and not partial.manifest.provenance["complete"]
    resumed = extract_images(items, vit, tmp_path / "resumed", **kw)
    assert resumed.all_ids() == whole.all_ids()
    assert np.array_equal(resumed.read_all(), whole.read_all())
    assert resumed.manifest.provenance["skipped"] == whole.manifest.provenance["skipped"]
    # a finished store is left as it is
    assert extract_images(items, vit, tmp_path / "resumed", **kw).fingerprint == resumed.fingerprint


def test_resuming_with_another_model_is_refused(tmp_path, vit):
    items = list_items(folder_sources(_many_images(tmp_path / "imgs", n=4)))
    with pytest.warns(UserWarning):
        extract_images(items, vit, tmp_path / "out", workers=0, progress=False)
    other = build_image_encoder(ModelSpec("r18", "timm", "resnet18", None, 64), pretrained=False)
    with pytest.raises(ValueError, match="holds features with model='tiny-vit'"):
        extract_images(items, other, tmp_path / "out", workers=0, progress=False)


def test_two_pieces_form_the_same_store_as_one_run(tmp_path, vit):
    sources = tar_sources([make_tars(tmp_path / "yfcc", n_tars=3, per_tar=4)])
    kw = dict(batch_size=4, workers=1, shard_rows=3, progress=False)
    one = extract_images(list_items(sources), vit, tmp_path / "one", **kw)
    for k in range(2):
        piece = Piece(k, 2)
        extract_images(list_items(piece.slice(sources)), vit, piece.out_dir(tmp_path / "split"), **kw)
    parts = open_parts(tmp_path / "split")
    assert [p.path.name for p in parts] == ["part-00000-of-00002", "part-00001-of-00002"]
    assert sum((p.all_ids() for p in parts), []) == one.all_ids()
    merged = merge_parts(tmp_path / "split")
    assert merged.all_ids() == one.all_ids()
    # windows never span two tars: the pieces form the whole run's batches, so the rows are its bits
    assert np.array_equal(merged.read_all(), one.read_all())
    assert not (tmp_path / "split" / "part-00000-of-00002").exists()


def test_pieces_from_launcher_variables():
    assert piece_from_env(env={}) == Piece(0, 1)
    assert piece_from_env(1, 4, env={"RANK": "3", "WORLD_SIZE": "8"}) == Piece(1, 4)
    assert piece_from_env(env={"RANK": "3", "WORLD_SIZE": "8"}) == Piece(3, 8)
    slurm = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "5", "SLURM_ARRAY_TASK_MIN": "1"}
    assert piece_from_env(env=slurm) == Piece(4, 5)
    with pytest.raises(ValueError):
        piece_from_env(4, 4, env={})
    assert [list(Piece(k, 3).slice(list(range(7)))) for k in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]


def test_unfinished_parts_are_not_merged(tmp_path, vit):
    sources = folder_sources(_many_images(tmp_path / "imgs", n=4))
    extract_images(list_items(Piece(0, 2).slice(sources)), vit, Piece(0, 2).out_dir(tmp_path / "s"),
                   workers=0, progress=False)
    with pytest.raises(ValueError, match="1 of 2 parts are missing"):
        merge_parts(tmp_path / "s")


def test_text_queries_with_an_open_clip_tower(tmp_path):
    pytest.importorskip("open_clip")
    root = make_core(tmp_path / "ilias_core")
    spec = ModelSpec("clip-b32", "open_clip", "ViT-B-32", None, 224, text=("ViT-B-32", None))
    text = build_text_encoder(spec, pretrained=False)
    items = list_items(core_sources(root, "text_queries"), text=True)
    store = extract_texts(items, text, tmp_path / "text", progress=False)
    assert store.dtype == np.float32 and store.all_ids() == items.ids
    expected = text.encode([items.load_text(0), items.load_text(1)])
    assert np.allclose(store.read_all(), expected, atol=1e-6)


def test_cli_extract_folder_split_and_merge(tmp_path, capsys):
    folder = _many_images(tmp_path / "imgs", n=6)
    base = ["extract", "alexnet.tv_in1k", "--random-init", "--folder", str(folder), "--resolution", "128",
            "--workers", "0", "--quiet", "-o", str(tmp_path / "out")]
    for k in range(2):
        assert main(base + ["--shard-id", str(k), "--num-shards", "2"]) == 0
    assert "skipped (listed in the manifest)" in capsys.readouterr().out
    assert main(["extract", "--merge", str(tmp_path / "out")]) == 0
    store = Store.open(tmp_path / "out")
    skipped = store.manifest.provenance["skipped"]
    assert store.dim == 256 and store.count + len(skipped) == 6 and store.count >= 3
    assert "005.jpg" in [s["id"] for s in skipped]
    assert main(["extract", "alexnet.tv_in1k", "--folder", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_cli_extract_core(tmp_path, capsys):
    make_core(tmp_path / "ilias_core")
    args = ["extract", "alexnet.tv_in1k", "--random-init", "--core", str(tmp_path), "--resolution", "256",
            "--workers", "0", "--quiet", "-o", str(tmp_path / "feats")]
    assert main(args) == 0
    # AlexNet cannot pool a 256 x 38 image (the 200 x 30 one): skipped with the reason, not a crash
    positives = Store.open(tmp_path / "feats" / "positives")
    skipped = positives.manifest.provenance["skipped"]
    assert positives.count == 3 and len(skipped) == 3 and "the model fails on" in skipped[0]["error"]
    assert Store.open(tmp_path / "feats" / "image_queries").all_ids()[1] == "zippy_zootlenibble_999/query/Q001_00.jpg"
    assert not (tmp_path / "feats" / "text_queries").exists()  # AlexNet has no text tower
