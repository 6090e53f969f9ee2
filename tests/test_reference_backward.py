"""The float64 reference backward (fastattn.reference.attention_backward)
against central finite differences of the reference forward, option by option."""
import numpy as np
import pytest

import fastattn.reference as ref
from util import stable_seed

# (q shape, k shape, v shape): odd sizes, Lq != Lk, broadcast leading dims, grouped heads
SHAPES = [
    ((5, 3), (7, 3), (7, 2)),
    ((2, 4, 6, 5), (2, 2, 9, 5), (2, 2, 9, 3)),  # grouped heads, 4 over 2
    ((1, 3, 4, 4), (2, 3, 5, 4), (1, 1, 5, 2)),  # q and v broadcast over k's batch and heads
]
OPTIONS = {
    "plain": {},
    "causal": dict(causal=True),
    "causal top-left": dict(causal=True, align="top-left"),
    "window": dict(window=(2, 1)),
    "softcap": dict(softcap=1.5, scale=0.9),
    "alibi": dict(alibi_slopes=0.3),
    "bool mask": dict(mask="bool"),
    "float mask": dict(mask="float"),
    "dot": dict(weights="dot"),
    "dot causal softcap": dict(weights="dot", causal=True, softcap=2.0),
}


def finite_difference(f, x, eps=1e-6):
    g = np.zeros_like(x)
    it = np.nditer(x, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        old = x[i]
        x[i] = old + eps
        plus = f()
        x[i] = old - eps
        minus = f()
        x[i] = old
        g[i] = (plus - minus) / (2 * eps)
    return g


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("name", list(OPTIONS))
def test_reference_backward_matches_finite_differences(shapes, name):
    rng = np.random.default_rng(stable_seed(shapes, name))
    q, k, v = (rng.standard_normal(s) for s in shapes)
    options = dict(OPTIONS[name])
    lq, lk = shapes[0][-2], shapes[1][-2]
    if options.get("mask") == "bool":
        m = rng.random((lq, lk)) < 0.7
        m[0] = False  # a row that sees nothing: zero gradients
        options["mask"] = m
    elif options.get("mask") == "float":
        options["mask"] = np.where(rng.random((lq, lk)) < 0.2, -np.inf, rng.standard_normal((lq, lk)))
    out = ref.attention(q, k, v, **options)
    dout = rng.standard_normal(out.shape)
    dq, dk, dv = ref.attention_backward(dout, q, k, v, **options)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape

    def loss():
        return float(np.sum(dout * ref.attention(q, k, v, **options)))

    for got, x in ((dq, q), (dk, k), (dv, v)):
        want = finite_difference(loss, x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_fully_masked_rows_get_zero_gradients():
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((4, 3)) for _ in range(3))
    mask = np.ones((4, 4), bool)
    mask[1] = False
    dq, dk, dv = ref.attention_backward(np.ones((4, 3)), q, k, v, mask=mask)
    assert np.all(dq[1] == 0)
    dq2, dk2, dv2 = ref.attention_backward(np.ones((4, 3)) * (np.arange(4) != 1)[:, None], q, k, v, mask=mask)
    np.testing.assert_array_equal(dk, dk2)
    np.testing.assert_array_equal(dv, dv2)


@pytest.mark.parametrize("sinks_shape", [(), (3,), (2, 3)], ids=["scalar", "per head", "per batch and head"])
def test_reference_sink_gradient_matches_finite_differences(sinks_shape):
    """The sinks' gradient (return_dsinks), in the sinks' own shape, with a
    fully masked row (there the sink takes the whole weight) and a head
    without a sink (-inf: no gradient)."""
    rng = np.random.default_rng(stable_seed(sinks_shape))
    q, k, v = rng.standard_normal((2, 3, 5, 4)), rng.standard_normal((2, 3, 6, 4)), rng.standard_normal((2, 3, 6, 3))
    sinks = rng.standard_normal(sinks_shape)
    mask = rng.random((5, 6)) < 0.7
    mask[2] = False
    options = dict(mask=mask, causal=True, softcap=3.0)
    dout = rng.standard_normal((2, 3, 5, 3))
    *grads, dsinks = ref.attention_backward(dout, q, k, v, sinks=sinks, return_dsinks=True, **options)
    assert dsinks.shape == sinks_shape

    def loss():
        return float(np.sum(dout * ref.attention(q, k, v, sinks=sinks, **options)))

    np.testing.assert_allclose(dsinks, finite_difference(loss, sinks), rtol=1e-6, atol=1e-7)
    for got, want in zip(grads, ref.attention_backward(dout, q, k, v, sinks=sinks, **options)):
        np.testing.assert_array_equal(got, want)
    if sinks_shape == (3,):
        sinks[1] = -np.inf
        dsinks = ref.attention_backward(dout, q, k, v, sinks=sinks, return_dsinks=True, **options)[3]
        assert dsinks[1] == 0 and np.all(np.isfinite(dsinks))
