import numpy as np
import pytest


def unit_rows(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
