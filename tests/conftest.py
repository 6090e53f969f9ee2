import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import fastattn  # noqa: E402
from fastattn import _config  # noqa: E402
from util import stable_seed  # noqa: E402

ISAS = fastattn.available_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    """Run the test on each kernel path this CPU supports, and check that the
    kernels really ran on that path (the C side counts calls per path) and
    on no other."""
    before = _config.path_runs()
    with fastattn.use_isa(request.param):
        yield request.param
    after = _config.path_runs()
    ran = {name for name in after if after[name] != before[name]}
    assert ran == {request.param}, f"asked for path {request.param!r}, kernels ran on {sorted(ran)}"


@pytest.fixture(params=[np.float32, np.float64], ids=["f32", "f64"])
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def rng(request):
    return np.random.default_rng(stable_seed(request.node.nodeid))
