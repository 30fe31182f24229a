"""Random access into webdataset tars (extract/tar_index.py) against tarfile's sequential read."""

import io
import os
import tarfile

import numpy as np
import pytest

pytest.importorskip("torch")  # the extract package needs the models extra
from ilias.extract.datasets import webdataset_key  # noqa: E402
from ilias.extract.tar_index import TarIndex, cache_path_for  # noqa: E402


def _write_tar(path, members, fmt=tarfile.GNU_FORMAT):
    with tarfile.open(path, "w", format=fmt) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("a_folder")
        d.type = tarfile.DIRTYPE
        t.addfile(d)


def _members(rng, n):
    out = []
    for i in range(n):
        # long folder names (over 100 bytes) need GNU long-name or pax headers; non-ASCII needs pax
        folder = "sub/" + "d" * (120 if i % 7 == 0 else 3) + ("é" if i % 11 == 0 else "")
        key = f"{folder}/{i:06d}"
        size = int(rng.integers(0, 3000))
        out.append((f"{key}.jpg", rng.integers(0, 256, size, dtype=np.uint8).tobytes()))
        out.append((f"{key}.cls", str(i).encode()))
    return out


def _sequential(path):
    with tarfile.open(path, "r:") as t:
        return {webdataset_key(m.name): t.extractfile(m).read() for m in t if m.isfile()}


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_random_access_equals_sequential_read(tmp_path, rng, fmt):
    tar = tmp_path / "00000.tar"
    _write_tar(tar, _members(rng, 300), fmt)
    want = _sequential(tar)
    idx = TarIndex.open(tar)
    assert len(idx) == len(want) == 600
    order = rng.permutation(len(want))
    items = list(want.items())
    with idx:
        for j in order:
            (key, ext), data = items[j]
            assert idx.read(key, ext) == data
    assert idx.keys("jpg") == [k for (k, e) in want if e == "jpg"]
    # the cache answers the same
    again = TarIndex.open(tar)
    assert again.cache_path == idx.cache_path and again.cache_path.is_file()
    assert all(again.read(k, e) == d for (k, e), d in items[::17])


def test_stale_cache_is_rebuilt(tmp_path, rng):
    tar = tmp_path / "x.tar"
    _write_tar(tar, [("a.jpg", b"first"), ("b.jpg", b"second")])
    assert TarIndex.open(tar).read("b") == b"second"
    # the same names, other contents and offsets; the size changes
    _write_tar(tar, [("z.jpg", b"0" * 700), ("a.jpg", b"new a"), ("b.jpg", b"new b!")])
    idx = TarIndex.open(tar)
    assert idx.read("a") == b"new a" and idx.read("b") == b"new b!"
    # same size, only the modification time differs: still rebuilt
    st = tar.stat()
    _write_tar(tar, [("z.jpg", b"1" * 700), ("a.jpg", b"NEW A"), ("b.jpg", b"NEW B!")])
    assert tar.stat().st_size == st.st_size
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert TarIndex.open(tar).read("a") == b"NEW A"


def test_damaged_cache_is_rebuilt(tmp_path):
    tar = tmp_path / "x.tar"
    _write_tar(tar, [("a.jpg", b"first")])
    path = TarIndex.open(tar).cache_path
    path.write_bytes(b"not an npz")
    assert TarIndex.open(tar).read("a") == b"first"


def test_missing_key_names_the_tar(tmp_path):
    tar = tmp_path / "shard-7.tar"
    _write_tar(tar, [("a.jpg", b"x")])
    idx = TarIndex.open(tar)
    with pytest.raises(KeyError, match="shard-7.tar.*nope.jpg"):
        idx.read("nope")
    with pytest.raises(KeyError, match="a.png"):
        idx.read("a", "png")
    assert "a" in idx and ("a", "png") not in idx


def test_read_only_folder_caches_elsewhere(tmp_path):
    tar = tmp_path / "x.tar"
    _write_tar(tar, [("a.jpg", b"x")])
    cache = tmp_path / "cache"
    idx = TarIndex.open(tar, cache_dir=cache)
    assert idx.cache_path.parent == cache and idx.cache_path == cache_path_for(tar, cache)
    assert TarIndex.open(tar, cache_dir=cache).read("a") == b"x"


def test_bad_tar_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"\x01" * 1000)
    with pytest.raises(ValueError, match="bad.tar: not a readable"):
        TarIndex.open(bad)
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        TarIndex.open(tmp_path / "missing.tar")
    assert not list(tmp_path.glob(".bad.tar.index*"))
