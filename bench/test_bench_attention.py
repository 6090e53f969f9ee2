"""pytest-benchmark suite: one group per (shape, dtype, causal), with fastattn,
the plain numpy float32 implementation and PyTorch's scaled_dot_product_attention
side by side (PyTorch's cases are skipped when it is not installed).

    python -m pytest bench                       # all groups
    python -m pytest bench -k "1024"             # a subset
"""
import numpy as np
import pytest

import fastattn
from fastattn import _bench

CASES = [(shape, causal) for shape in _bench.PREFILL_SHAPES for causal in (False, True)]
IDS = [f"{'x'.join(map(str, s))}-{'causal' if c else 'full'}" for s, c in CASES]

_inputs = {}


def inputs(shape):
    """Fixed-seed inputs, made once per shape."""
    if shape not in _inputs:
        _inputs.clear()
        _inputs[shape] = _bench.make_inputs(*shape)
    return _inputs[shape]


def group(benchmark, shape, causal):
    benchmark.group = f"{'x'.join(map(str, shape))} float32 {'causal' if causal else 'full'}"
    benchmark.extra_info["gflop"] = _bench.attention_flops(*shape[:3], shape[2], shape[3], causal) / 1e9


@pytest.mark.parametrize("shape, causal", CASES, ids=IDS)
def test_fastattn(benchmark, shape, causal):
    q, k, v = inputs(shape)
    out = np.empty_like(q)
    group(benchmark, shape, causal)
    benchmark(fastattn.attention, q, k, v, causal=causal, out=out)


@pytest.mark.parametrize("shape, causal", CASES, ids=IDS)
def test_numpy(benchmark, shape, causal):
    q, k, v = inputs(shape)
    group(benchmark, shape, causal)
    benchmark(_bench.numpy_attention, q, k, v, causal)


@pytest.mark.parametrize("shape, causal", CASES, ids=IDS)
def test_torch(benchmark, shape, causal):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    q, k, v = (torch.from_numpy(x) for x in inputs(shape))
    group(benchmark, shape, causal)
    with torch.inference_mode():
        benchmark(F.scaled_dot_product_attention, q, k, v, is_causal=causal)


LINEAR_CASES = [(l, d) for d in _bench.LINEAR_DIMS for l in _bench.LINEAR_LENGTHS]


@pytest.mark.parametrize("l, d", LINEAR_CASES, ids=[f"L{l}-D{d}" for l, d in LINEAR_CASES])
@pytest.mark.parametrize("kind", ["linear", "quadratic"])
def test_linear_vs_quadratic(benchmark, l, d, kind):
    q, k, v = inputs((1, 1, l, d))
    benchmark.group = f"dot weights 1x1x{l}x{d} float32"
    if kind == "linear":
        benchmark(fastattn.linear_attention, q, k, v)
    else:
        benchmark(fastattn.attention, q, k, v, weights="dot")
