import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fastattn  # noqa: E402

ISAS = fastattn.available_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on each kernel path this CPU supports."""
    with fastattn.use_isa(request.param):
        yield request.param


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng(request):
    seed = abs(hash(request.node.nodeid)) % (2**32)
    return np.random.default_rng(seed)
