"""linear_attention against attention(weights="dot") and the reference."""
import numpy as np
import pytest

import fastattn
import fastattn.reference as ref
from util import assert_close, randn, stable_seed

SHAPES = [
    ((), (), 1, 1, 1, 1),
    ((2,), (2,), 300, 300, 17, 9),  # one block plus a tail
    ((1, 3), (1, 3), 513, 513, 64, 33),  # two blocks plus one row
    ((2,), (2,), 100, 777, 8, 8),  # Lk > Lq: a prefix seen by every row
    ((2,), (2,), 260, 90, 12, 5),  # Lq > Lk: the first rows see nothing under causal
    ((3,), (), 256, 256, 16, 16),  # exactly one block, k/v shared
    ((2,), (2,), 5, 0, 4, 3),  # no keys: zeros (causal raised an IndexError)
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("causal", [False, True])
def test_linear_equals_dot_attention(dtype, shape, causal):
    rng = np.random.default_rng(stable_seed((shape, causal)))
    lead_q, lead_k, lq, lk, d, dv = shape
    q, k = randn(rng, lead_q + (lq, d), dtype), randn(rng, lead_k + (lk, d), dtype)
    v = randn(rng, lead_k + (lk, dv), dtype)
    out = fastattn.linear_attention(q, k, v, causal=causal)
    quad = fastattn.attention(q, k, v, weights="dot", causal=causal)
    expected = ref.linear_attention(q, k, v, causal=causal)
    assert out.shape == expected.shape and out.dtype == dtype
    assert_close(out, expected)
    assert_close(quad, expected)


@pytest.mark.parametrize("causal", [False, True])
def test_linear_transformer_feature_map_and_normalize(dtype, causal):
    rng = np.random.default_rng(7)
    q, k, v = (randn(rng, (2, 4, 300, 16), dtype) for _ in range(3))
    out = fastattn.linear_attention(q, k, v, causal=causal, feature_map="elu+1", normalize=True)
    assert_close(out, ref.linear_attention(q, k, v, causal=causal, feature_map="elu+1", normalize=True))


@pytest.mark.parametrize("causal", [False, True])
def test_linear_attention_without_keys_is_zero(causal):
    """No keys: zeros, normalised or not (causal raised an IndexError)."""
    q = np.ones((2, 5, 4))
    k, v = np.ones((2, 0, 4)), np.ones((2, 0, 3))
    for normalize in (False, True):
        out = fastattn.linear_attention(q, k, v, causal=causal, feature_map="elu+1", normalize=normalize)
        assert out.shape == (2, 5, 3) and not np.any(out)
        assert_close(out, ref.linear_attention(q, k, v, causal=causal, feature_map="elu+1", normalize=normalize))


def test_callable_feature_map_may_change_dim():
    rng = np.random.default_rng(8)
    q, k, v = (randn(rng, (3, 270, 8), np.float64) for _ in range(3))

    def phi(x):
        return np.concatenate([np.maximum(x, 0), np.maximum(-x, 0)], axis=-1)

    out = fastattn.linear_attention(q, k, v, causal=True, feature_map=phi, normalize=True)
    assert_close(out, ref.linear_attention(q, k, v, causal=True, feature_map=phi, normalize=True))


def test_linear_grouped_heads(dtype):
    rng = np.random.default_rng(9)
    q = randn(rng, (2, 8, 290, 16), dtype)
    k, v = randn(rng, (2, 2, 290, 16), dtype), randn(rng, (2, 2, 290, 6), dtype)
    for causal in (False, True):
        out = fastattn.linear_attention(q, k, v, causal=causal)
        assert out.shape == (2, 8, 290, 6)
        assert_close(out, ref.linear_attention(q, k, v, causal=causal))
