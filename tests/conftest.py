import os

import numpy as np
import pytest
from hypothesis import settings

# the same examples on every run, so that a CI run can be reproduced exactly; set
# HYPOTHESIS_PROFILE=explore to draw new ones
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def unit_rows(rng, n, d, dtype=np.float32):
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(dtype)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
