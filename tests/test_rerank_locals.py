"""The local-descriptor store (rerank/locals_store.py), its AMES HDF5 interchange and bit packing."""

import json

import numpy as np
import pytest
from ilias import StoreFormatError
from ilias.rerank.binary import load_projection, pack_signs, unpack_signs
from ilias.rerank.locals_store import LocalsMismatchError, LocalsStore, LocalsWriter

h5py = pytest.importorskip("h5py")
from ilias.rerank.locals_hdf5 import export_ames_hdf5, import_ames_hdf5  # noqa: E402

N, D, BITS = 7, 24, 16


def _images(rng, n, tokens=N, dim=D):
    """AMES-like rows: a random number of real tokens per image, the rest padding (mask 1)."""
    meta = rng.random((n, tokens, 5)).astype(np.float32)
    real = rng.integers(1, tokens + 1, n)
    meta[..., 3] = np.arange(tokens)[None] >= real[:, None]
    # values float16 holds exactly, so that HDF5 -> store -> HDF5 is bit-exact
    desc = rng.standard_normal((n, tokens, dim)).astype(np.float16).astype(np.float32)
    return meta, desc, [f"tar-{i // 10}/img{i:04d}" for i in range(n)]


def _write_h5(path, meta, desc, ids=None):
    with h5py.File(path, "w") as h:
        h.create_dataset("features", data=np.concatenate([meta, desc], axis=-1).astype(np.float32))
        if ids is not None:
            h.create_dataset("ids", data=ids, dtype=h5py.string_dtype("utf-8"))


def test_write_read_round_trip(tmp_path, rng):
    meta, desc, ids = _images(rng, 23)
    with LocalsWriter(tmp_path / "s", "m", N, D, shard_images=5) as w:
        w.append(meta[:11], desc[:11], ids[:11])
        w.append(meta[11:], desc[11:], ids[11:])
    s = LocalsStore.open(tmp_path / "s", model="m", tokens=N, dim=D, variant="float16")
    assert s.count == 23 and s.num_shards == 5 and s.all_ids() == ids
    rows = s.rows_of([ids[17], ids[2], ids[17]])
    got_meta, got_desc = s.read(rows)
    np.testing.assert_array_equal(got_meta, meta[[17, 2, 17]])
    assert got_desc.dtype == np.float16
    np.testing.assert_array_equal(got_desc.astype(np.float32), desc[[17, 2, 17]])
    values, mask = s.model_inputs(rows)
    np.testing.assert_array_equal(mask, meta[[17, 2, 17], :, 3] == 1)
    few, few_mask = s.model_inputs(rows, tokens=3)
    np.testing.assert_array_equal(few, desc[[17, 2, 17], :3])
    np.testing.assert_array_equal(few_mask, meta[[17, 2, 17], :3, 3] == 1)
    with pytest.raises(ValueError, match="tokens: must be 1 to 7"):
        s.model_inputs(rows, tokens=8)
    s.verify()
    with pytest.raises(KeyError, match="1 of 2 ids are not in this store .*'nope'"):
        s.rows_of([ids[0], "nope"])


def test_hdf5_store_hdf5_is_bit_exact(tmp_path, rng):
    meta, desc, ids = _images(rng, 13)
    _write_h5(tmp_path / "in.h5", meta, desc, ids)
    s = import_ames_hdf5(tmp_path / "in.h5", tmp_path / "s", model="dinov2", chunk=4, shard_images=6)
    assert s.all_ids() == ids and s.tokens == N and s.dim == D
    export_ames_hdf5(s, tmp_path / "out.h5", chunk=5)
    with h5py.File(tmp_path / "in.h5") as a, h5py.File(tmp_path / "out.h5") as b:
        assert b["features"].dtype == np.float32 and b["features"].shape == (13, N, 5 + D)
        assert a["features"][:].tobytes() == b["features"][:].tobytes()
        assert [i.decode() for i in b["ids"][:]] == ids
    # an AMES file without ids: rows are named by number, or by the ids given
    _write_h5(tmp_path / "bare.h5", meta, desc)
    assert import_ames_hdf5(tmp_path / "bare.h5", tmp_path / "b1", "dinov2").all_ids() == [str(i) for i in range(13)]
    assert import_ames_hdf5(tmp_path / "bare.h5", tmp_path / "b2", "dinov2", ids=ids).all_ids() == ids


def test_packing_matches_numpy_signs(rng):
    x = rng.standard_normal((3, 5, D)).astype(np.float32)
    proj = rng.standard_normal((D, BITS)).astype(np.float32)
    bits = pack_signs(x, proj)
    assert bits.dtype == np.uint8 and bits.shape == (3, 5, BITS // 8)
    signs = unpack_signs(bits)
    want = np.where(x @ proj >= 0, 1.0, -1.0)
    np.testing.assert_array_equal(signs, want)
    # by hand for one token: component 0 is the top bit of byte 0
    s = want[0, 0]
    byte0 = sum(int(s[j] > 0) << (7 - j) for j in range(8))
    assert bits[0, 0, 0] == byte0
    # the length of the descriptor does not matter
    np.testing.assert_array_equal(pack_signs(3.5 * x, proj), bits)


def test_binary_store_from_floats_or_bits(tmp_path, rng):
    meta, desc, ids = _images(rng, 9)
    proj = rng.standard_normal((D, BITS)).astype(np.float32)
    np.savez(tmp_path / "itq.npz", proj=proj)
    proj = load_projection(tmp_path / "itq.npz")
    with LocalsWriter(tmp_path / "b", "m", N, BITS, variant="binary", projection=proj, shard_images=4) as w:
        w.append(meta[:5], desc[:5], ids[:5])
        w.append(meta[5:], pack_signs(desc[5:], proj), ids[5:])  # already packed
    s = LocalsStore.open(tmp_path / "b", variant="binary", dim=BITS)
    values, mask = s.model_inputs(np.arange(9))
    np.testing.assert_array_equal(values, np.where(desc @ proj >= 0, 1.0, -1.0))
    assert s.descriptors(0).dtype == np.uint8 and s.descriptors(0).shape == (4, N, BITS // 8)
    # the HDF5 of a binary store holds its signs
    export_ames_hdf5(s, tmp_path / "b.h5")
    with h5py.File(tmp_path / "b.h5") as h:
        np.testing.assert_array_equal(h["features"][..., 5:], values)
        np.testing.assert_array_equal(h["features"][..., :5], meta)
    # binary import from the float HDF5 gives the same store content
    _write_h5(tmp_path / "f.h5", meta, desc, ids)
    t = import_ames_hdf5(tmp_path / "f.h5", tmp_path / "b2", "m", variant="binary", projection=proj)
    np.testing.assert_array_equal(t.read(np.arange(9))[1], s.read(np.arange(9))[1])


def test_interrupted_write_resumes_to_the_same_store(tmp_path, rng):
    meta, desc, ids = _images(rng, 30)

    def write(path, stop_after=None):
        w = LocalsWriter(path, "m", N, D, shard_images=4, expected=30, source={"from": "test"})
        try:
            for lo in range(w.committed, 30, 3):
                if stop_after is not None and lo >= stop_after:
                    raise KeyboardInterrupt
                w.append(meta[lo:lo + 3], desc[lo:lo + 3], ids[lo:lo + 3])
        except KeyboardInterrupt:
            w.abort()
            return None
        return w.close()

    ref = write(tmp_path / "ref")
    assert write(tmp_path / "run", stop_after=17) is None
    half = LocalsStore.open(tmp_path / "run")
    assert half.count == 16 and not half.manifest.complete  # complete shards only, marked partial
    assert not list((tmp_path / "run" / "shards").glob(".*tmp"))
    done = write(tmp_path / "run")
    assert done.manifest.complete and done.all_ids() == ref.all_ids()
    for i in range(ref.num_shards):
        for kind in ("meta", "desc", "ids"):
            assert done.file(i, kind).read_bytes() == ref.file(i, kind).read_bytes()
    assert [vars(s) for s in done.manifest.shards] == [vars(s) for s in ref.manifest.shards]
    # a third run of another input is refused
    with pytest.raises(ValueError, match="another source"):
        LocalsWriter(tmp_path / "run", "m", N, D, shard_images=4, expected=30, source={"from": "other"})


def test_interrupted_hdf5_import_resumes(tmp_path, rng, monkeypatch):
    meta, desc, ids = _images(rng, 20)
    _write_h5(tmp_path / "in.h5", meta, desc, ids)
    calls = {"n": 0}
    real = LocalsWriter.append

    def dying(self, *a):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        real(self, *a)

    monkeypatch.setattr(LocalsWriter, "append", dying)
    with pytest.raises(KeyboardInterrupt):
        import_ames_hdf5(tmp_path / "in.h5", tmp_path / "s", "m", chunk=3, shard_images=4)
    monkeypatch.setattr(LocalsWriter, "append", real)
    assert LocalsStore.open(tmp_path / "s").count == 8
    s = import_ames_hdf5(tmp_path / "in.h5", tmp_path / "s", "m", chunk=3, shard_images=4)
    ref = import_ames_hdf5(tmp_path / "in.h5", tmp_path / "ref", "m", chunk=3, shard_images=4)
    assert s.manifest.complete and s.all_ids() == ids
    np.testing.assert_array_equal(s.read(np.arange(20))[1], ref.read(np.arange(20))[1])


def test_other_model_n_or_d_is_an_error_naming_the_file(tmp_path, rng):
    meta, desc, ids = _images(rng, 3)
    with LocalsWriter(tmp_path / "s", "dinov2", N, D) as w:
        w.append(meta, desc, ids)
    man = str(tmp_path / "s" / "manifest.json")
    for kwargs, what in (({"model": "siglip"}, "model 'dinov2', expected 'siglip'"), ({"tokens": 700}, "tokens per image 7"),
                         ({"dim": 768}, "descriptor dimension 24"), ({"variant": "binary"}, "variant 'float16'")):
        with pytest.raises(LocalsMismatchError, match=f"^{man}: holds {what}"):
            LocalsStore.open(tmp_path / "s", **kwargs)
    # resuming with other parameters
    for args in (("siglip", N, D), ("dinov2", 9, D), ("dinov2", N, 32)):
        with pytest.raises(LocalsMismatchError, match=f"^{man}"):
            LocalsWriter(tmp_path / "s", *args)
    # an HDF5 of another N into the store
    m2, d2, _ = _images(rng, 3, tokens=9)
    _write_h5(tmp_path / "n9.h5", m2, d2)
    with pytest.raises(LocalsMismatchError, match="tokens per image 7, expected 9"):
        import_ames_hdf5(tmp_path / "n9.h5", tmp_path / "s", "dinov2")
    assert LocalsStore.open(tmp_path / "s").count == 3


def test_bad_files_and_arrays(tmp_path, rng):
    meta, desc, ids = _images(rng, 4)
    with LocalsWriter(tmp_path / "s", "m", N, D) as w:
        with pytest.raises(ValueError, match=r"meta: expected shape \(n, 7, 5\)"):
            w.append(meta[..., :4], desc, ids)
        bad = meta.copy()
        bad[0, 0, 3] = 0.5
        with pytest.raises(ValueError, match="mask column"):
            w.append(bad, desc, ids)
        with pytest.raises(ValueError, match=r"descriptors: expected float shape \(n, 7, 24\)"):
            w.append(meta, desc[..., :8], ids)
        nan = desc.copy()
        nan[2, 1, 1] = np.nan
        with pytest.raises(ValueError, match="image 2 holds NaN"):
            w.append(meta, nan, ids)
        w.append(meta, desc, ids)
    assert LocalsStore.open(tmp_path / "s").count == 4
    # a damaged shard file
    f = tmp_path / "s" / "shards" / "00000.desc.npy"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(StoreFormatError, match="00000.desc.npy"):
        LocalsStore.open(tmp_path / "s")
    # a vector store's manifest is not a locals store
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "manifest.json").write_text(json.dumps({"format": "ilias-store", "version": 1}))
    with pytest.raises(StoreFormatError, match="format is 'ilias-store', expected 'ilias-locals'"):
        LocalsStore.open(tmp_path / "v")
    # HDF5 files of another layout
    with h5py.File(tmp_path / "x.h5", "w") as h:
        h.create_dataset("features", data=np.zeros((3, 10), np.float32))
    with pytest.raises(StoreFormatError, match=r"x.h5: features is float32 \(3, 10\), expected"):
        import_ames_hdf5(tmp_path / "x.h5", tmp_path / "t", "m")
    (tmp_path / "p.npz").write_bytes(b"nope")
    with pytest.raises(ValueError, match="p.npz: not a readable"):
        load_projection(tmp_path / "p.npz")
    np.savez(tmp_path / "q.npz", W=np.zeros((4, 8)))
    with pytest.raises(ValueError, match="q.npz: no 'proj' array"):
        load_projection(tmp_path / "q.npz")
