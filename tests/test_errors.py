"""Bad input gets a clear TypeError or ValueError that names the argument."""
import ml_dtypes
import numpy as np
import pytest

import fastattn

f32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
Q = np.zeros((2, 5, 8), f32)
K = np.zeros((2, 6, 8), f32)
V = np.zeros((2, 6, 4), f32)


def attn(**kw):
    args = dict(q=Q, k=K, v=V)
    args.update(kw)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return fastattn.attention(q, k, v, **args)


def overlapping_out():
    buf = np.zeros((2, 6, 5), f32)
    return attn(v=buf[..., :4], out=buf[:, :5, 1:])


BAD = [
    # (call, exception, message fragment)
    (lambda: attn(q=Q.astype(np.int32)), TypeError, "q must have dtype"),
    (lambda: attn(k=K.astype(np.complex64)), TypeError, "k must have dtype"),
    (lambda: attn(v=V.astype(object)), TypeError, "v must have dtype"),
    (lambda: attn(q=np.zeros((5, 8), dtype=[("a", f32)])), TypeError, "q must have dtype"),
    (lambda: attn(q=Q.astype(np.float16), k=K.astype(BF16), v=V.astype(BF16)), TypeError,
     "no common dtype"),
    (lambda: attn(q="abc"), TypeError, "q must have dtype"),
    (lambda: attn(q=np.zeros(8, f32)), ValueError, "q must have at least 2 dimensions"),
    (lambda: attn(k=np.zeros((2, 6, 7), f32)), ValueError, "same head dim"),
    (lambda: attn(v=np.zeros((2, 7, 4), f32)), ValueError, "same length Lk"),
    (lambda: attn(q=np.zeros((3, 5, 8), f32)), ValueError, "head counts"),
    (lambda: attn(q=np.zeros((3, 1, 5, 8), f32), k=np.zeros((2, 2, 6, 8), f32),
                  v=np.zeros((2, 2, 6, 4), f32)), ValueError, "do not broadcast"),
    (lambda: attn(q=np.zeros((1, 6, 5, 8), f32), k=np.zeros((1, 4, 6, 8), f32),
                  v=np.zeros((1, 4, 6, 4), f32)), ValueError, "head counts"),
    (lambda: attn(q=np.zeros((1, 0, 5, 8), f32), k=np.zeros((1, 2, 6, 8), f32),
                  v=np.zeros((1, 2, 6, 4), f32)), ValueError, "do not broadcast"),
    (lambda: attn(mask=np.ones((5, 7), bool)), ValueError, "mask of shape"),
    (lambda: attn(mask=np.ones((3, 5, 6), bool)), ValueError, "do not broadcast"),
    (lambda: attn(mask=np.ones((5, 6), np.int8)), TypeError, "mask must have dtype"),
    (lambda: attn(weights="relu"), ValueError, "weights"),
    (lambda: attn(scale="1"), TypeError, "scale"),
    (lambda: attn(scale=True), TypeError, "scale"),
    (lambda: attn(causal=1), TypeError, "causal"),
    (lambda: attn(window=3), TypeError, "window"),
    (lambda: attn(window=(-2, 0)), ValueError, "window left"),
    (lambda: attn(window=(0, 1.5)), TypeError, "window right"),
    (lambda: attn(softcap=-1.0), ValueError, "softcap"),
    (lambda: attn(softcap=float("inf")), ValueError, "softcap"),
    (lambda: attn(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes"),
    (lambda: attn(return_lse=True, weights="dot"), ValueError, "return_lse"),
    (lambda: attn(num_threads=0), ValueError, "num_threads"),
    (lambda: attn(num_threads=-3), ValueError, "num_threads"),
    (lambda: attn(num_threads=2.0), TypeError, "num_threads"),
    (lambda: attn(out=[0.0]), TypeError, "out must be a numpy.ndarray"),
    (lambda: attn(out=np.zeros((2, 5, 4), np.float64)), TypeError, "out must have dtype"),
    (lambda: attn(out=np.zeros((2, 5, 5), f32)), ValueError, "out must have shape"),
    (lambda: attn(out=np.broadcast_to(np.zeros(4, f32), (2, 5, 4))), ValueError, "out is read-only"),
    (lambda: overlapping_out(), ValueError, "overlaps the input v"),
    (lambda: fastattn.scores(Q, np.zeros((2, 6, 9), f32)), ValueError, "same head dim"),
    (lambda: fastattn.weighted_sum(np.zeros((5, 7), f32), V[0]), ValueError, "w's last dim"),
    (lambda: fastattn.weighted_sum(np.zeros((5, 6), np.int64), V[0]), TypeError, "w must have dtype"),
    (lambda: fastattn.set_num_threads(0), ValueError, "n must be >= 1"),
    (lambda: fastattn.set_isa(3), TypeError, "isa must be a str"),
]


@pytest.mark.parametrize("call, exc, fragment", BAD, ids=[b[2] for b in BAD])
def test_bad_input_raises(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


def test_out_with_overlapping_elements_is_rejected():
    out = np.lib.stride_tricks.as_strided(np.zeros(100, f32), (2, 5, 4), (0, 16, 4))
    with pytest.raises(ValueError, match="out has overlapping elements"):
        attn(out=out)
