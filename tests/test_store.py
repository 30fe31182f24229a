import json
import os

import numpy as np
import pytest
from ilias import Store, StoreFormatError, StoreWriter, export_hdf5, import_hdf5, import_npy, write_store
from ilias.interop import decode_official_id, encode_official_id

from .conftest import unit_rows


def ids_for(n, prefix="img"):
    return [f"{prefix}/{i:06d}" for i in range(n)]


def test_roundtrip_across_shards(tmp_path, rng):
    x = unit_rows(rng, 1050, 24)
    store = write_store(tmp_path / "s", x, ids_for(1050), shard_rows=400)
    assert store.num_shards == 3 and store.count == 1050 and store.dim == 24
    np.testing.assert_array_equal(store.read_all(), x.astype(np.float16))
    assert store.all_ids() == ids_for(1050)
    assert list(store.ids_of([0, 399, 400, 1049])) == [ids_for(1050)[i] for i in (0, 399, 400, 1049)]
    assert store.manifest.normalized is True
    # numpy reads the shards directly, without copying
    v = np.load(store.shard_path(1), mmap_mode="r")
    assert isinstance(v, np.memmap) and v.shape == (400, 24)
    store.verify()


def test_unicode_ids_roundtrip(tmp_path, rng):
    ids = ["café_000/query/Q000_00.jpg", "naïve/pos/P001_02.jpg", "plain"]
    store = write_store(tmp_path / "s", unit_rows(rng, 3, 4), ids)
    assert store.all_ids() == ids


def test_interrupted_writer_resumes_to_the_same_store(tmp_path, rng):
    x = unit_rows(rng, 950, 8)
    ids = ids_for(950)
    full = write_store(tmp_path / "full", x, ids, shard_rows=200)

    with pytest.raises(RuntimeError):
        with StoreWriter(tmp_path / "part", dim=8, shard_rows=200) as w:
            for lo in range(0, 950, 90):
                if lo >= 540:
                    raise RuntimeError("killed")
                w.append(x[lo : lo + 90], ids[lo : lo + 90])
    # only complete shards survive, and no temporary file is left behind
    partial = Store.open(tmp_path / "part")
    assert partial.count == 400
    assert not [p for p in (tmp_path / "part" / "shards").iterdir() if p.name.startswith(".")]

    w = StoreWriter(tmp_path / "part", dim=8, shard_rows=200)
    assert w.count == 400
    with w:
        w.append(x[w.count :], ids[w.count :])
    resumed = Store.open(tmp_path / "part")
    assert json.loads(resumed.manifest.to_json()) == json.loads(full.manifest.to_json())
    np.testing.assert_array_equal(resumed.read_all(), full.read_all())


def test_writer_rejects_bad_rows(tmp_path, rng):
    w = StoreWriter(tmp_path / "s", dim=4)
    with pytest.raises(ValueError, match=r"vectors: expected shape \(n, 4\)"):
        w.append(np.zeros((2, 5)), ["a", "b"])
    with pytest.raises(ValueError, match="ids: 1 ids for 2 vectors"):
        w.append(np.zeros((2, 4)), ["a"])
    bad = np.zeros((3, 4))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="row 1 holds NaN"):
        w.append(bad, ["a", "b", "c"])
    with pytest.raises(ValueError, match="overflow float16"):
        w.append(np.full((1, 4), 1e6), ["a"])
    w.abort()  # one writer at a time: the next ones would find the store locked
    with pytest.raises(ValueError, match="existing store has dim 4"):
        StoreWriter(tmp_path / "s", dim=5)
    with pytest.raises(FileExistsError):
        StoreWriter(tmp_path / "s", dim=4, resume=False)


def _store(tmp_path, rng, n=300):
    return write_store(tmp_path / "s", unit_rows(rng, n, 16), ids_for(n), shard_rows=128)


def test_truncated_shard_is_a_clear_error(tmp_path, rng):
    store = _store(tmp_path, rng)
    path = store.shard_path(1)
    os.truncate(path, path.stat().st_size - 7)
    with pytest.raises(StoreFormatError, match=r"00001\.npy.*truncated or corrupt"):
        Store.open(store.path)


def test_header_disagreeing_with_size(tmp_path, rng):
    store = _store(tmp_path, rng)
    path = store.shard_path(0)
    with open(path, "ab") as f:
        f.write(b"\0" * 32)
    with pytest.raises(StoreFormatError, match=r"00000\.npy: file size"):
        Store.open(store.path)


def test_wrong_dtype_and_dim(tmp_path, rng):
    store = _store(tmp_path, rng)
    np.save(store.shard_path(0), np.zeros((128, 16), np.float64))
    with pytest.raises(StoreFormatError, match=r"00000\.npy: dtype '<f8'"):
        Store.open(store.path)
    np.save(store.shard_path(0), np.zeros((128, 17), np.float16))
    with pytest.raises(StoreFormatError, match=r"00000\.npy: dimension 17 differs"):
        Store.open(store.path)


def test_garbage_and_missing_files(tmp_path, rng):
    store = _store(tmp_path, rng)
    store.shard_path(2).write_bytes(b"not an npy file at all")
    with pytest.raises(StoreFormatError, match=r"00002\.npy: not a \.npy file"):
        Store.open(store.path)
    store.shard_path(2).unlink()
    with pytest.raises(FileNotFoundError, match=r"00002\.npy"):
        Store.open(store.path)
    with pytest.raises(FileNotFoundError, match="no such store"):
        Store.open(tmp_path / "nowhere")
    (tmp_path / "s" / "manifest.json").write_text("{broken")
    with pytest.raises(StoreFormatError, match="manifest.json: unreadable manifest"):
        Store.open(store.path)


def test_checksum_catches_changed_data(tmp_path, rng):
    store = _store(tmp_path, rng)
    v = np.load(store.shard_path(0), mmap_mode="r+")
    v[3, 3] += 1
    v.flush()
    del v
    with pytest.raises(StoreFormatError, match="checksum mismatch"):
        Store.open(store.path).verify()


def test_search_verifies_the_fast_checksum_of_every_shard(tmp_path, rng, capsys):
    from ilias import _core, search
    from ilias.cli import main

    store = _store(tmp_path, rng)
    assert all(len(s.fast_checksum) == 16 for s in store.manifest.shards)
    assert _core.shard_checksum(str(store.shard_path(1))) == store.manifest.shards[1].fast_checksum_int
    q = unit_rows(rng, 3, 16)
    want = search(q, store, k=5, threads=2)
    # one flipped bit in the data section of shard 1 (the last byte of its rows): no results
    path = store.shard_path(1)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    for method in ("exact", "float32"):
        with pytest.raises(StoreFormatError, match=r"00001\.npy: checksum mismatch.*ilias info --verify"):
            search(q, Store.open(store.path), k=5, threads=2, method=method)
    assert main(["info", str(store.path), "--verify"]) == 1
    assert "00001.npy" in capsys.readouterr().err
    # a store written before the fast checksums is searched (and not verified) as before
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    m = json.loads((store.path / "manifest.json").read_text())
    for s in m["shards"]:
        del s["fast_checksum"]
    (store.path / "manifest.json").write_text(json.dumps(m))
    old = Store.open(store.path)
    assert old.manifest.shards[0].fast_checksum is None
    got = search(q, old, k=5, threads=2)
    assert np.array_equal(got.indices, want.indices) and np.array_equal(got.scores, want.scores)
    old.verify()
    # a manifest whose checksum is not 16 hex digits is damaged
    m["shards"][0]["fast_checksum"] = "xyz"
    (store.path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(StoreFormatError, match="fast_checksum"):
        Store.open(store.path)


def test_thread_counts_are_bounded(tmp_path, rng):
    from ilias import search

    store = _store(tmp_path, rng)
    with pytest.raises(ValueError, match="threads: at most 1,024, got 5000"):
        search(unit_rows(rng, 2, 16), store, k=5, threads=5000)


def test_official_id_escapes():
    assert encode_official_id("café/query/Q000_00.jpg") == "caf#U00e9/query/Q000_00.jpg"
    assert decode_official_id(b"caf#U00e9/query/Q000_00.jpg") == "café/query/Q000_00.jpg"
    for s in ["plain/pos/P000_00.jpg", "Zürich ö ß", "emoji 😀 x"]:
        assert decode_official_id(encode_official_id(s)) == s
        assert encode_official_id(s).isascii()


def test_hdf5_import_export_roundtrip(tmp_path, rng):
    h5py = pytest.importorskip("h5py")
    parts = []
    for f in range(2):
        x = unit_rows(rng, 700, 12).astype(np.float16)
        ids = [f"inst_{f}/pos/P{i:03d}_00.jpg" for i in range(700)]
        ids[5] = f"caf#U00e9_{f}/pos/P005_00.jpg"
        with h5py.File(tmp_path / f"features_distractors_{f:05d}.hdf5", "w") as h:
            h["features"] = x
            h["index"] = np.array([i.encode() for i in ids])
        parts.append((x, ids))
    files = [tmp_path / f"features_distractors_{f:05d}.hdf5" for f in range(2)]
    store = import_hdf5(files, tmp_path / "store", chunk_rows=256, shard_rows=500)
    assert store.count == 1400 and store.num_shards == 3
    np.testing.assert_array_equal(store.read_all(), np.concatenate([p[0] for p in parts]))
    assert store.all_ids()[5] == "café_0/pos/P005_00.jpg"
    assert store.all_ids()[706] == "inst_1/pos/P006_00.jpg"
    # importing again resumes: nothing changes
    again = import_hdf5(files, tmp_path / "store", chunk_rows=256, shard_rows=500)
    assert again.manifest.to_json() == store.manifest.to_json()

    out = export_hdf5(store, tmp_path / "exported.hdf5")
    with h5py.File(out, "r") as h:
        assert h["features"].dtype == np.float16
        np.testing.assert_array_equal(h["features"][:], store.read_all())
        index = [i.decode() for i in h["index"][:]]
    assert index[5] == "caf#U00e9_0/pos/P005_00.jpg"
    assert index[:700] == [i for i in parts[0][1]]


def test_float32_text_features_stay_float32_through_import_and_export(tmp_path, rng):
    h5py = pytest.importorskip("h5py")
    x = unit_rows(rng, 50, 12)  # float32, with digits float16 would drop
    ids = [f"inst_{i}/query/T{i:03d}.txt" for i in range(50)]
    with h5py.File(tmp_path / "features_text_queries.hdf5", "w") as h:
        h["features"] = x
        h["index"] = np.array([i.encode() for i in ids])
    store = import_hdf5([tmp_path / "features_text_queries.hdf5"], tmp_path / "texts")
    assert store.manifest.dtype == "float32"
    np.testing.assert_array_equal(store.read_all(), x)
    written = write_store(tmp_path / "extracted", x, ids, dtype="float32")  # as text extraction writes them
    for src in (store, written):
        out = export_hdf5(src, tmp_path / f"{src.path.name}.hdf5")
        with h5py.File(out, "r") as h:
            assert h["features"].dtype == np.float32
            np.testing.assert_array_equal(h["features"][:], x)


def test_hdf5_without_features_dataset(tmp_path):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "x.hdf5", "w") as h:
        h["feats"] = np.zeros((2, 2))
    with pytest.raises(StoreFormatError, match="x.hdf5: no 'features' dataset"):
        import_hdf5([tmp_path / "x.hdf5"], tmp_path / "s")


def test_import_npy(tmp_path, rng):
    x = unit_rows(rng, 300, 8)
    np.save(tmp_path / "x.npy", x)
    store = import_npy(tmp_path / "x.npy", tmp_path / "s", chunk_rows=64, shard_rows=100)
    assert store.all_ids() == [str(i) for i in range(300)]
    np.testing.assert_array_equal(store.read_all(), x.astype(np.float16))
    np.save(tmp_path / "bad.npy", np.zeros(5))
    with pytest.raises(StoreFormatError, match="bad.npy: expected a 2-D float array"):
        import_npy(tmp_path / "bad.npy", tmp_path / "s2")
