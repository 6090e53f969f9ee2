"""Bad input gets a clear TypeError or ValueError that names the argument.

One table for every public entry point: (call, exception, message fragment).
"""
import os
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

import fastattn
from fastattn import _config

f32 = np.float32
BF16 = np.dtype(ml_dtypes.bfloat16)
F8 = np.dtype(ml_dtypes.float8_e4m3fn)
Q = np.zeros((2, 5, 8), f32)
K = np.zeros((2, 6, 8), f32)
V = np.zeros((2, 6, 4), f32)


def attn(**kw):
    args = dict(q=Q, k=K, v=V)
    args.update(kw)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return fastattn.attention(q, k, v, **args)


def varlen(q=None, k=None, v=None, cu_q=(0, 5, 10), cu_k=(0, 4, 10), **kw):
    x = np.zeros((10, 2, 4), f32)
    return fastattn.attention_varlen(x if q is None else q, x if k is None else k, x if v is None else v,
                                     cu_q, cu_k, **kw)


def paged(**kw):
    """attention_paged on 2 sequences (one decoding, one a 3-query chunk)
    over 4 blocks of 4 rows, arguments replaced by kw."""
    c = np.zeros((4, 4, 2, 8), f32)
    args = dict(q=np.zeros((4, 4, 8), f32), k_cache=c, v_cache=c, block_table=np.array([[0, 1], [2, 3]], np.int32),
                seq_lens=[5, 8], cu_seqlens_q=[0, 1, 4])
    args.update(kw)
    positional = [args.pop(n) for n in ("q", "k_cache", "v_cache", "block_table", "seq_lens")]
    return fastattn.attention_paged(*positional, **args)


def write(**kw):
    """cache_write of 3 tokens into 4 blocks of 4 rows, arguments replaced by kw."""
    c = np.zeros((4, 4, 2, 8), f32)
    args = dict(k=np.zeros((3, 2, 8), f32), v=np.zeros((3, 2, 8), f32), k_cache=c, v_cache=c.copy(),
                slot_mapping=[0, 1, -1])
    args.update(kw)
    return fastattn.cache_write(**args)


def linear(**kw):
    x = np.zeros((4, 3), f32)
    return fastattn.linear_attention(x, x, x, **kw)


def sdpa(make):
    """fastattn.torch.scaled_dot_product_attention with q = k = v of (1, 4, 5, 8)
    and the arguments make(q) returns (skipped without torch)."""
    torch = pytest.importorskip("torch")
    import fastattn.torch as ft

    q = torch.randn(1, 4, 5, 8)
    args = dict(query=q, key=q, value=q)
    args.update(make(torch, q))
    return ft.scaled_dot_product_attention(**args)


def torch_varlen(make=None, **kw):
    """fastattn.torch.attention_varlen on q = k = v of (6, 2, 8) in two
    sequences, with the arguments make(torch, q) returns and kw (skipped
    without torch)."""
    torch = pytest.importorskip("torch")
    import fastattn.torch as ft

    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    args = dict(query=q, key=q, value=q, cu_seqlens_q=cu, cu_seqlens_k=cu)
    args.update(make(torch, q) if make else {}, **kw)
    return ft.attention_varlen(**args)


def dask_attention(make, **kw):
    """fastattn.dask.attention on the dask arrays make(da, Q, V) returns, with
    Q of (2, 5, 8) in two chunks and V of (2, 6, 4) (skipped without dask)."""
    da = pytest.importorskip("dask.array", reason="needs dask (pip install 'fastattn[dask]')")
    import fastattn.dask

    q = da.zeros((2, 5, 8), chunks=(1, 5, 8), dtype=f32)
    return fastattn.dask.attention(*make(da, q, da.zeros((2, 6, 4), dtype=f32)), **kw)


def hf_attention(make=None, **kw):
    """fastattn.transformers.attention_forward on q of (1, 4, 3, 16) over two
    key/value heads, with the arguments make(torch) returns and kw
    (skipped without transformers)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers", reason="needs transformers (pip install 'fastattn[transformers]')")
    import fastattn.transformers

    q = torch.zeros(1, 4, 3, 16)
    args = dict(attention_mask=None)
    args.update(make(torch) if make else {}, **kw)
    return fastattn.transformers.attention_forward(None, q, q[:, :2], q[:, :2], **args)


def torch_share_threads(enable):
    pytest.importorskip("torch", reason="needs torch (pip install 'fastattn[torch]')")
    import fastattn.torch

    return fastattn.torch.share_threads(enable)


def hf_register(name):
    pytest.importorskip("torch")
    pytest.importorskip("transformers", reason="needs transformers (pip install 'fastattn[transformers]')")
    import fastattn.transformers

    return fastattn.transformers.register(name)


def backward(**kw):
    """attention_backward on the forward of (Q, K, V), with arguments replaced by kw."""
    out, lse = fastattn.attention(Q, K, V, return_lse=True)
    args = dict(dout=np.ones_like(out), q=Q, k=K, v=V, out=out, lse=lse)
    args.update(kw)
    pos = [args.pop(n) for n in ("dout", "q", "k", "v", "out", "lse")]
    return fastattn.attention_backward(*pos, **args)


def varlen_backward(cu_q=(0, 5, 10), **kw):
    """attention_varlen_backward on a 2-sequence forward, arguments replaced by kw."""
    x = np.ones((10, 2, 4), f32)
    out, lse = fastattn.attention_varlen(x, x, x, [0, 5, 10], [0, 4, 10], return_lse=True)
    args = dict(dout=np.ones_like(out), out=out, lse=lse)
    args.update(kw)
    return fastattn.attention_varlen_backward(args.pop("dout"), x, x, x, args.pop("out"), args.pop("lse"), cu_q,
                                              [0, 4, 10], **args)


def same_grad_buffer():
    buf = np.zeros((2, 6, 8), f32)
    return backward(dq=buf[:, :5], dk=buf)


def unsupported_path():
    """A kernel path of this build this CPU cannot run (skipped if it runs them all)."""
    missing = [name for name, _, _, ok in _config.PATHS if not ok]
    if not missing:
        pytest.skip("this CPU runs every kernel path of the build")
    fastattn.set_isa(missing[0])


def huge_broadcast():
    one = np.zeros(1, f32)
    a = np.lib.stride_tricks.as_strided(one, (2**32, 1, 1, 1), (0, 0, 0, 0))
    b = np.lib.stride_tricks.as_strided(one, (1, 2**32, 1, 1), (0, 0, 0, 0))
    return fastattn.attention(a, b, b)


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
    (lambda: attn(align="left"), ValueError, "align"),
    (lambda: attn(align=1.5), TypeError, "align"),
    (lambda: attn(align=True), TypeError, "align"),
    (lambda: attn(align=2**61), ValueError, "align"),
    (lambda: varlen(align=None), TypeError, "align"),
    (lambda: backward(align=-2**62), ValueError, "align"),
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
    (lambda: attn(out=np.zeros((2, 5, 4), BF16)), TypeError, "out must have dtype"),
    (lambda: huge_broadcast(), ValueError, "too big"),
    # attention_varlen
    (lambda: varlen(cu_q=[0, 5, 9]), ValueError, "cu_seqlens_q must start at 0"),
    (lambda: varlen(cu_q=[0, 5, 10], cu_k=[0, 10]), ValueError, "same length"),
    (lambda: varlen(cu_q=[1, 5, 10]), ValueError, "cu_seqlens_q must start at 0"),
    (lambda: varlen(cu_q=[0, 6, 10], cu_k=[0, 11, 10]), ValueError, "cu_seqlens_k"),
    (lambda: varlen(cu_q=[0.0, 5.0, 10.0]), TypeError, "integer"),
    # offsets whose differences wrap around to non-negative lengths
    (lambda: varlen(cu_q=np.array([0, 9 * 10**18, -9 * 10**18, 10]), cu_k=[0, 4, 6, 10]), ValueError,
     "cu_seqlens_q must start at 0"),
    (lambda: varlen(q=np.zeros((10, 3, 4), f32)), ValueError, "head counts do not match"),
    (lambda: varlen(q=np.zeros((10, 2), f32)), ValueError, "q must have shape"),
    (lambda: varlen(v=np.zeros((9, 2, 4), f32)), ValueError, "same length and heads"),
    (lambda: varlen(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes"),
    (lambda: varlen(window=(1,)), TypeError, "window"),
    # attention_backward
    (lambda: backward(dout=np.ones((2, 5, 3), f32)), ValueError, "dout must have the attention output's shape"),
    (lambda: backward(out=np.ones((2, 4, 4), f32)), ValueError, "out must have the attention output's shape"),
    (lambda: backward(lse=None), ValueError, "lse is required"),
    (lambda: backward(lse=np.zeros((2, 6), f32)), ValueError, "lse must have shape"),
    (lambda: backward(weights="dot"), ValueError, "lse must be None with weights='dot'"),
    (lambda: backward(dout=np.ones((2, 5, 4), np.int32)), TypeError, "dout must have dtype"),
    (lambda: backward(lse="x"), TypeError, "lse must have dtype"),
    (lambda: backward(dq=np.zeros((2, 5, 8), np.float64)), TypeError, "dq must have dtype"),
    (lambda: backward(dk=np.zeros((2, 5, 8), f32)), ValueError, "dk must have shape"),
    (lambda: same_grad_buffer(), ValueError, "dk overlaps the input dq"),
    (lambda: backward(k=np.zeros((2, 6, 7), f32)), ValueError, "same head dim"),
    (lambda: backward(causal=1), TypeError, "causal"),
    (lambda: backward(num_threads=0), ValueError, "num_threads"),
    (lambda: varlen_backward(lse=np.zeros((10, 2), f32)), ValueError, "lse must have shape"),
    (lambda: varlen_backward(dout=np.zeros((10, 2, 3), f32)), ValueError, "dout must have the attention output's"),
    (lambda: varlen_backward(cu_q=[0, 5, 9]), ValueError, "cu_seqlens_q"),
    (lambda: backward(return_dsinks=True), ValueError, "return_dsinks=True needs sinks"),
    (lambda: backward(return_dsinks=1, sinks=0.5), TypeError, "return_dsinks must be a bool"),
    (lambda: varlen_backward(return_dsinks=True), ValueError, "return_dsinks=True needs sinks"),
    (lambda: varlen_backward(return_dsinks=True, sinks=[1.0, 2.0, 3.0]), ValueError, "sinks of shape"),
    # block masks
    (lambda: fastattn.block_mask(np.ones((4, 4), bool), block=128), ValueError, "block must be 64"),
    (lambda: fastattn.block_mask(np.ones((4, 4), np.int8)), TypeError, "mask must have dtype"),
    (lambda: fastattn.block_mask(np.ones((4, 4), bool), block="64"), TypeError, "block"),
    (lambda: attn(mask=fastattn.block_mask(np.ones((5, 7), bool))), ValueError, "mask of shape"),
    (lambda: fastattn.block_mask_from_function(3, 4, 4), TypeError, "fn must be callable"),
    (lambda: fastattn.block_mask_from_function(lambda i, j: i + j, 4, 4), TypeError, "bool array"),
    (lambda: fastattn.block_mask_from_function(lambda i, j: (i < j)[:2], 4, 4), ValueError, "does not broadcast"),
    (lambda: fastattn.block_mask_from_function(lambda i, j: i < j, -1, 4), ValueError, "lq"),
    (lambda: fastattn.block_mask_from_function(lambda i, j: i < j, 4, 4, lead=3), TypeError, "lead"),
    (lambda: fastattn.block_mask_from_function(lambda h, i, j: i < j, 4, 4, lead=(0,)), ValueError, "lead"),
    # sinks
    (lambda: attn(sinks=np.ones(3)), ValueError, "sinks of shape"),
    (lambda: attn(sinks=np.ones(2), weights="dot"), ValueError, "sinks need weights='softmax'"),
    (lambda: attn(sinks=np.array([np.nan, 0.0])), ValueError, "sinks must be finite"),
    (lambda: attn(sinks=np.array([np.inf, 0.0])), ValueError, "sinks must be finite"),
    (lambda: attn(sinks=["a", "b"]), TypeError, "sinks must have dtype"),
    # dropout
    (lambda: attn(dropout_p=1.0, dropout_seed=1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda: attn(dropout_p=-0.1, dropout_seed=1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda: attn(dropout_p=float("nan"), dropout_seed=1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (lambda: attn(dropout_p="0.1", dropout_seed=1), TypeError, "dropout_p must be a real number"),
    (lambda: attn(dropout_p=0.1), ValueError, "dropout_seed is required"),
    (lambda: attn(dropout_p=0.1, dropout_seed=-1), ValueError, r"dropout_seed must be in \[0, 2\*\*64\)"),
    (lambda: attn(dropout_p=0.1, dropout_seed=2**64), ValueError, r"dropout_seed must be in \[0, 2\*\*64\)"),
    (lambda: attn(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed must be an int"),
    (lambda: attn(dropout_p=0.0, dropout_seed="a"), TypeError, "dropout_seed must be an int"),
    (lambda: backward(dropout_p=0.1), ValueError, "dropout_seed is required"),
    (lambda: backward(return_dmask=True), ValueError, "return_dmask=True needs a float mask"),
    (lambda: backward(return_dmask=True, mask=np.ones((5, 6), bool)), ValueError, "a bool mask has no gradient"),
    (lambda: backward(return_dmask=1, mask=np.zeros((5, 6))), TypeError, "return_dmask must be a bool"),
    (lambda: backward(dropout_p=1.5, dropout_seed=3), ValueError, "dropout_p must be in"),
    (lambda: varlen(dropout_p=0.1, dropout_seed=True), TypeError, "dropout_seed must be an int"),
    (lambda: varlen(dropout_p=0.1), ValueError, "dropout_seed is required"),
    (lambda: varlen_backward(dropout_p=2, dropout_seed=0), ValueError, "dropout_p must be in"),
    (lambda: varlen(sinks=np.ones(3)), ValueError, "sinks"),
    # attention_paged
    (lambda: paged(q=np.zeros((4, 8), f32)), ValueError, "q must have shape"),
    (lambda: paged(q=np.zeros((4, 3, 8), f32)), ValueError, "head counts do not match"),
    (lambda: paged(q=np.zeros((4, 4, 7), f32)), ValueError, "same head dim"),
    (lambda: paged(q=np.zeros((4, 4, 8), np.float64)), TypeError, "q and the caches must have one dtype"),
    (lambda: paged(q=np.zeros((4, 4, 8), np.float16), k_cache=np.zeros((4, 4, 2, 8), BF16),
                   v_cache=np.zeros((4, 4, 2, 8), BF16)), TypeError, "q and the caches must have one dtype"),
    (lambda: paged(k_cache=np.zeros((4, 4, 8), f32)), ValueError, "k_cache must have shape"),
    (lambda: paged(v_cache=np.zeros((4, 4, 1, 8), f32)), ValueError, "same blocks, block size and heads"),
    (lambda: paged(v_cache=np.zeros((4, 4, 2, 8), np.float64)), TypeError, "one dtype"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 8), np.int8)), TypeError, "k_cache and v_cache must have one dtype"),
    (lambda: paged(k_cache=np.zeros((0, 4, 2, 8), f32), v_cache=np.zeros((0, 4, 2, 8), f32)), ValueError,
     "at least one block"),
    (lambda: paged(k_cache=np.lib.stride_tricks.as_strided(np.zeros(400, f32), (4, 4, 2, 8), (40, 64, 32, 4))),
     ValueError, "block stride"),
    (lambda: paged(block_table=np.array([[0, 1], [2, 4]], np.int32)), ValueError, "block ids outside"),
    (lambda: paged(block_table=np.array([[0, -1], [2, 3]], np.int32)), ValueError, "row 0 uses block ids"),
    (lambda: paged(block_table=np.array([[0.0, 1.0], [2.0, 3.0]])), TypeError, "block_table must be an integer"),
    (lambda: paged(block_table=np.array([0, 1, 2, 3], np.int32)), ValueError, "block_table must have shape"),
    (lambda: paged(block_table=np.array([[0, 1]], np.int32)), ValueError, "block_table has 1 rows"),
    (lambda: paged(seq_lens=[5, 9]), ValueError, "seq_lens must be in"),
    (lambda: paged(seq_lens=[-1, 8]), ValueError, "seq_lens must be in"),
    (lambda: paged(seq_lens=[5.0, 8.0]), TypeError, "seq_lens must be an integer"),
    (lambda: paged(seq_lens=[5, 2]), ValueError, "sequence 1 has 3 queries"),
    (lambda: paged(cu_seqlens_q=[0, 1, 3]), ValueError, "cu_seqlens_q must start at 0"),
    (lambda: paged(cu_seqlens_q=[0, 4]), ValueError, "cu_seqlens_q has 2 entries"),
    (lambda: paged(cu_seqlens_q=None), ValueError, "pass cu_seqlens_q"),
    (lambda: paged(sinks=np.ones(3)), ValueError, "sinks"),
    (lambda: paged(alibi_slopes=np.ones(3)), ValueError, "alibi_slopes"),
    (lambda: paged(window=(-3, 0)), ValueError, "window left"),
    (lambda: paged(causal="yes"), TypeError, "causal"),
    (lambda: paged(return_lse=1), TypeError, "return_lse"),
    (lambda: paged(out=np.zeros((4, 4, 7), f32)), ValueError, "out must have shape"),
    (lambda: paged(num_threads=0), ValueError, "num_threads"),
    (lambda: paged(k_scale=np.ones((4, 4, 2), f32)), ValueError, "k_scale is only for 8-bit caches"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 8), np.int8), v_cache=np.zeros((4, 4, 2, 8), np.int8)), ValueError,
     "needs k_scale"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 8), np.int8), v_cache=np.zeros((4, 4, 2, 8), np.int8),
                   k_scale=np.ones((4, 4, 2)), v_scale=np.ones((4, 4, 2), f32)), TypeError, "k_scale of an int8"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 8), np.int8), v_cache=np.zeros((4, 4, 2, 8), np.int8),
                   k_scale=np.ones((4, 4, 2), f32), v_scale=np.ones((4, 4), f32)), ValueError, "v_scale must have shape"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 8), F8), v_cache=np.zeros((4, 4, 2, 8), F8), k_scale=0.0,
                   v_scale=1.0), ValueError, "k_scale must be a finite number > 0"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 8), F8), v_cache=np.zeros((4, 4, 2, 8), F8), k_scale=np.ones(2),
                   v_scale=1.0), ValueError, "one float"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 16), np.int8)[..., ::2], v_cache=np.zeros((4, 4, 2, 8), np.int8),
                   k_scale=np.ones((4, 4, 2), f32), v_scale=np.ones((4, 4, 2), f32)), ValueError, "contiguous rows"),
    (lambda: paged(k_cache=np.zeros((4, 4, 2, 8), np.int16)), TypeError, "k_cache must have dtype"),
    # cache_write
    (lambda: write(k=np.zeros((3, 2, 7), f32)), ValueError, "k must have shape"),
    (lambda: write(v=np.zeros((2, 2, 8), f32)), ValueError, "v must have shape"),
    (lambda: write(k=np.zeros((3, 2, 8), np.int32)), TypeError, "k must have dtype"),
    (lambda: write(slot_mapping=[0, 1]), ValueError, "2 slots for 3 tokens"),
    (lambda: write(slot_mapping=[0, 16, -1]), ValueError, "slot_mapping must hold -1"),
    (lambda: write(slot_mapping=[0, -2, 1]), ValueError, "slot_mapping must hold -1"),
    (lambda: write(slot_mapping=[3, 3, -1]), ValueError, "one slot twice"),
    (lambda: write(slot_mapping=[0.0, 1.0, 2.0]), TypeError, "slot_mapping must be an integer"),
    (lambda: write(k_cache=np.broadcast_to(np.zeros((1, 1, 1, 8), f32), (4, 4, 2, 8))), ValueError,
     "k_cache is read-only"),
    (lambda: write(k_cache=np.zeros((4, 4, 2, 8), np.int8), v_cache=np.zeros((4, 4, 2, 8), np.int8)), ValueError,
     "needs k_scale"),
    (lambda: write(k_scale=np.ones((4, 4, 2), f32)), ValueError, "only for 8-bit caches"),
    # scores, weighted_sum, merge, linear_attention
    (lambda: fastattn.scores(Q, np.zeros((2, 6, 9), f32)), ValueError, "same head dim"),
    (lambda: fastattn.weighted_sum(np.zeros((5, 7), f32), V[0]), ValueError, "w's last dim"),
    (lambda: fastattn.weighted_sum(np.zeros((5, 6), np.int64), V[0]), TypeError, "w must have dtype"),
    (lambda: fastattn.merge([np.zeros((2, 3))], []), ValueError, "as many outputs"),
    (lambda: fastattn.merge([np.zeros((2, 3))], [np.zeros(3)]), ValueError, "does not match"),
    (lambda: linear(feature_map="relu"), ValueError, "feature_map"),
    (lambda: linear(feature_map=3), TypeError, "feature_map"),
    (lambda: linear(feature_map=lambda x: x[..., :1, :]), ValueError, "every dimension"),
    (lambda: linear(causal="yes"), TypeError, "causal"),
    (lambda: linear(eps="1"), TypeError, "eps"),
    # fastattn.torch
    (lambda: sdpa(lambda t, q: dict(query=q.to("meta"))), ValueError, "CPU tensors only"),
    (lambda: sdpa(lambda t, q: dict(dropout_p=1.0)), ValueError, "dropout_p must be in"),
    (lambda: sdpa(lambda t, q: dict(dropout_p=-0.5)), ValueError, "dropout_p must be in"),
    (lambda: sdpa(lambda t, q: dict(dropout_p="0.1")), TypeError, "dropout_p must be a float"),
    (lambda: sdpa(lambda t, q: dict(dropout_p=True)), TypeError, "dropout_p must be a float"),
    (lambda: sdpa(lambda t, q: dict(dropout_p=0.1, query=q.clone().requires_grad_(), key=q[:, :3])), ValueError,
     "enable_gqa"),  # dropout through the operator keeps the checks
    (lambda: sdpa(lambda t, q: dict(query=q.int(), key=q.int(), value=q.int())), TypeError,
     "float32, float64, float16 or bfloat16"),
    (lambda: sdpa(lambda t, q: dict(attn_mask=t.ones(5, 5, dtype=t.uint8))), TypeError, "attn_mask"),
    (lambda: sdpa(lambda t, q: dict(attn_mask=t.ones(5, 5, dtype=t.int32))), TypeError, "attn_mask"),
    (lambda: sdpa(lambda t, q: dict(attn_mask=t.ones(5, 5, dtype=t.bool), is_causal=True)), ValueError, "both"),
    (lambda: sdpa(lambda t, q: dict(key=q[:, :2], value=q[:, :2])), ValueError, "enable_gqa"),
    (lambda: sdpa(lambda t, q: dict(key=q[:, :3], value=q[:, :3], enable_gqa=True)), ValueError,
     "head counts do not match"),
    (lambda: sdpa(lambda t, q: dict(query=q.numpy())), TypeError, "torch.Tensor"),
    (lambda: torch_varlen(lambda t, q: dict(cu_seqlens_q=[0, 2, 6])), TypeError, "cu_seqlens_q must be a torch"),
    (lambda: torch_varlen(lambda t, q: dict(key=None)), TypeError, "key must be a torch.Tensor, got None"),
    (lambda: torch_varlen(lambda t, q: dict(value=q.to("meta"))), ValueError, "value is on meta"),
    (lambda: torch_varlen(lambda t, q: dict(cu_seqlens_k=t.tensor([0, 4, 2]))), ValueError, "cu_seqlens_k"),
    (lambda: torch_varlen(lambda t, q: dict(query=q.clone().requires_grad_(), cu_seqlens_q=t.tensor([0, 7, 6]))),
     ValueError, "cu_seqlens_q"),  # through the operator (a gradient needed)
    (lambda: torch_varlen(align="middle"), ValueError, "align must be"),
    (lambda: torch_varlen(window=2), TypeError, "window must be"),
    (lambda: torch_varlen(lambda t, q: dict(sinks=t.zeros(3))), ValueError, "sinks"),
    (lambda: torch_varlen(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (lambda: torch_varlen(dropout_p=None), TypeError, "dropout_p must be a real"),
    # fastattn.dask: every rule raises when the graph is built
    (lambda: dask_attention(lambda da, q, v: (q, q[:, :, :4], v)), ValueError, "head dim"),
    (lambda: dask_attention(lambda da, q, v: (q, q, v)), ValueError, "same length Lk"),
    (lambda: dask_attention(lambda da, q, v: (q.astype(np.int32), q, q)), TypeError, "q must have dtype"),
    (lambda: dask_attention(lambda da, q, v: (q, q, q), window=(-2, 0)), ValueError, "window left"),
    (lambda: dask_attention(lambda da, q, v: (q, q, q), mask=np.zeros((3, 5), dtype=bool)), ValueError, "mask"),
    (lambda: dask_attention(lambda da, q, v: (q, q, q), align=1.5), TypeError, "align"),
    (lambda: dask_attention(lambda da, q, v: (q, q, q), weights="dot", return_lse=True), ValueError, "return_lse"),
    (lambda: dask_attention(lambda da, q, v: (q, q, q), split_every=1), ValueError, "split_every"),
    (lambda: dask_attention(lambda da, q, v: (q, q, q), split_every=2.0), TypeError, "split_every"),
    (lambda: dask_attention(lambda da, q, v: (q, q, q), num_threads=0), ValueError, "num_threads"),
    (lambda: dask_attention(lambda da, q, v: (q[q[:, 0, 0] >= 0], q, q)), ValueError, "unknown chunk sizes"),
    (lambda: dask_attention(lambda da, q, v: (object(), q, q)), TypeError, "q must"),
    # fastattn.transformers
    (lambda: hf_attention(dropout=1.0), ValueError, "dropout_p must be in"),
    (lambda: hf_attention(lambda t: dict(attention_mask=t.ones(1, 1, 3, 3, dtype=t.bool))), ValueError,
     "2-D padding mask"),
    (lambda: hf_register(""), TypeError, "name"),
    # settings
    (lambda: fastattn.set_num_threads(0), ValueError, "n must be >= 1"),
    (lambda: fastattn.set_num_threads(True), TypeError, "n must be an int"),
    (lambda: fastattn.set_isa(3), TypeError, "isa must be a str"),
    (lambda: fastattn.set_spin_time("1e-4"), TypeError, "seconds must be a real number"),
    (lambda: fastattn.set_spin_time(True), TypeError, "seconds must be a real number"),
    (lambda: fastattn.set_spin_time(-1e-6), ValueError, r"seconds must be in \[0, 10\]"),
    (lambda: fastattn.set_spin_time(float("nan")), ValueError, r"seconds must be in \[0, 10\]"),
    (lambda: fastattn.set_spin_time(11), ValueError, r"seconds must be in \[0, 10\]"),
    (lambda: fastattn.share_blas_threads(1), TypeError, "enable must be a bool"),
    (lambda: torch_share_threads(1), TypeError, "enable must be a bool"),
    (lambda: fastattn.set_isa("sse9"), ValueError, "isa must name a kernel path"),
    (lambda: unsupported_path(), ValueError, "needs CPU features this CPU lacks"),
]


@pytest.mark.parametrize("call, exc, fragment", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_input_raises(call, exc, fragment):
    try:
        with pytest.raises(exc, match=fragment):
            call()
    finally:
        fastattn.set_isa(None)


@pytest.mark.parametrize("value, fragment", [
    ("sse9", "FASTATTN_ISA must name a kernel path"),
    ("neon" if sys.platform != "linux" or os.uname().machine != "aarch64" else "avx2", "FASTATTN_ISA"),
])
def test_unknown_fastattn_isa_fails_the_import(value, fragment):
    env = dict(os.environ, FASTATTN_ISA=value)
    res = subprocess.run([sys.executable, "-c", "import fastattn"], capture_output=True, text=True, env=env)
    assert res.returncode != 0
    assert fragment in res.stderr and "ValueError" in res.stderr


def test_out_with_overlapping_elements_is_rejected():
    out = np.lib.stride_tricks.as_strided(np.zeros(100, f32), (2, 5, 4), (0, 16, 4))
    with pytest.raises(ValueError, match="out has overlapping elements"):
        attn(out=out)
