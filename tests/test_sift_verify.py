"""The weight-free SIFT re-ranker (rerank/sift.py): description, verification, and the store round trip."""

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
from ilias.rerank import sift  # noqa: E402
from ilias.rerank.locals_store import LocalsStore, LocalsWriter  # noqa: E402

TOKENS = 300


def _scene(seed, w=120, h=96):
    """A synthetic textured RGB image: coloured rectangles and discs on a noisy background."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, 3).astype(np.uint8)[None, None] * np.ones((h, w, 1), np.uint8)
    for _ in range(40):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        if rng.random() < 0.5:
            cv2.rectangle(img, (x, y), (x + int(rng.integers(3, 20)), y + int(rng.integers(3, 20))), colour, -1)
        else:
            cv2.circle(img, (x, y), int(rng.integers(2, 10)), colour, -1)
    return np.clip(img.astype(np.int16) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)


def _warped(img, angle=25.0, scale=0.8, shift=(6.0, -4.0)):
    h, w = img.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
    m[:, 2] += shift
    return cv2.warpAffine(img, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


@pytest.fixture(scope="module")
def described():
    """(meta, desc) of an image, a rotated, scaled and shifted copy, and two unrelated images."""
    a = _scene(1)
    return [sift.describe(im, TOKENS) for im in (a, _warped(a), _scene(2), _scene(3))]


def test_copy_scores_high_unrelated_low(described):
    a, copy, other, third = described
    same = sift.verify(*a, *copy)
    unrelated = [sift.verify(*a, *other), sift.verify(*a, *third), sift.verify(*copy, *other)]
    assert same >= 30, same
    assert max(unrelated) <= 5 and same > 5 * max(unrelated, default=0), (same, unrelated)
    assert sift.verify(*a, *a) >= same  # itself: every mutual match is an inlier


def test_describe_layout(described):
    img = _scene(4, w=150, h=90)
    meta, desc = sift.describe(img, TOKENS)
    assert meta.shape == (TOKENS, 5) and meta.dtype == np.float32
    assert desc.shape == (TOKENS, sift.dim()) and desc.dtype == np.float32 and sift.dim() == 384
    real = meta[:, 3] == 0
    n = int(real.sum())
    assert 20 <= n <= TOKENS
    # real tokens first, strongest first; padding rows exactly zero bar the mask
    assert np.isin(meta[:, 3], (0, 1)).all() and real[:n].all() and not real[n:].any()
    assert (np.diff(meta[:n, 4]) <= 0).all() and (meta[:n, 4] > 0).all()
    assert not meta[n:, [0, 1, 2, 4]].any() and not desc[n:].any()
    # x, y in units of the larger side: within [0, W/L] x [0, H/L]
    assert (meta[:n, 0] >= 0).all() and (meta[:n, 0] <= 1).all()
    assert (meta[:n, 1] >= 0).all() and (meta[:n, 1] <= 90 / 150).all()
    assert (meta[:n, 2] > 0).all()
    np.testing.assert_allclose(np.linalg.norm(desc[:n], axis=1), 1, atol=2e-3)
    np.testing.assert_array_equal(desc, desc.astype(np.float16).astype(np.float32))
    few_meta, few_desc = sift.describe(img, 5)
    assert (few_meta[:, 3] == 0).all() and (few_meta[:, 4] >= meta[5, 4]).all()


def test_blank_image_is_all_padding():
    meta, desc = sift.describe(np.full((64, 80, 3), 117, np.uint8), 50)
    assert meta.shape == (50, 5) and (meta[:, 3] == 1).all() and not meta[:, [0, 1, 2, 4]].any() and not desc.any()
    real_meta, real_desc = sift.describe(_scene(5), 50)
    assert sift.verify(meta, desc, real_meta, real_desc) == 0 and sift.verify(real_meta, real_desc, meta, desc) == 0


def test_keypoints_follow_the_image_not_the_upscale():
    # the same scene at twice the size: x, y (units of the larger side) of the strongest keypoints agree
    img = _scene(6)
    big = cv2.resize(img, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)
    m1, _ = sift.describe(img, 40, upscale=4)
    m2, _ = sift.describe(big, 40, upscale=2)
    d = np.linalg.norm(m1[:, None, :2] - m2[None, :, :2], axis=-1).min(axis=1)
    assert np.median(d[m1[:, 3] == 0]) < 0.01


def test_verify_pairs_equals_verify(described):
    metas = np.stack([m for m, _ in described])
    descs = np.stack([d for _, d in described])
    pairs = np.array([(0, 1), (1, 0), (0, 2), (2, 3), (3, 3), (0, 1)])
    got = sift.verify_pairs(metas, descs, metas, descs, pairs)
    assert got.dtype == np.float64 and got.shape == (6,)
    want = [sift.verify(metas[q], descs[q], metas[d], descs[d]) for q, d in pairs]
    np.testing.assert_array_equal(got, want)
    assert sift.verify_pairs(metas, descs, metas, descs, np.zeros((0, 2), int)).shape == (0,)
    with pytest.raises(IndexError):
        sift.verify_pairs(metas[:1], descs[:1], metas, descs, np.array([(1, 0)]))


def test_score_ignores_token_order_and_padding(described, rng):
    (qm, qd), (dm, dd) = described[0], described[1]
    want = sift.verify(qm, qd, dm, dd)
    n = int((dm[:, 3] == 0).sum())
    assert n < TOKENS  # the test needs padding rows
    for _ in range(3):
        perm = np.concatenate([rng.permutation(n), np.arange(n, TOKENS)])
        assert sift.verify(qm, qd, dm[perm], dd[perm]) == want
        # the padding moved among the real rows, garbage in its descriptors and places
        mixed = rng.permutation(TOKENS)
        gm, gd = dm[mixed].copy(), dd[mixed].copy()
        pad = gm[:, 3] == 1
        gd[pad] = rng.standard_normal((int(pad.sum()), sift.dim()))
        gm[pad, :3] = rng.random((int(pad.sum()), 3))
        assert sift.verify(qm, qd, gm, gd) == want
        qperm = rng.permutation(TOKENS)
        assert sift.verify(qm[qperm], qd[qperm], dm, dd) == want


def test_store_round_trip_gives_the_same_scores(described, tmp_path):
    # describe() returns float16-exact descriptors and the store keeps meta in float32, so the
    # scores from the store are exactly those from memory (no tolerance needed)
    metas = np.stack([m for m, _ in described])
    descs = np.stack([d for _, d in described])
    with LocalsWriter(tmp_path / "s", model=sift.NAME, tokens=TOKENS, dim=sift.dim(), variant="float16") as w:
        w.append(metas, descs, [f"img{i}" for i in range(len(metas))])
    store = LocalsStore.open(tmp_path / "s", model=sift.NAME, dim=sift.dim())
    m16, d16 = store.read(np.arange(len(metas)))
    assert d16.dtype == np.float16
    pairs = np.array([(q, d) for q in range(len(metas)) for d in range(len(metas))])
    np.testing.assert_array_equal(sift.verify_pairs(m16, d16, m16, d16, pairs),
                                  sift.verify_pairs(metas, descs, metas, descs, pairs))


def test_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        sift.describe(np.zeros((10, 10), np.uint8), 5)
    with pytest.raises(ValueError, match="tokens"):
        sift.describe(np.zeros((10, 10, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="pairs"):
        m, d = np.zeros((1, 4, 5), np.float32), np.zeros((1, 4, sift.dim()), np.float32)
        sift.verify_pairs(m, d, m, d, np.zeros((3,), int))
