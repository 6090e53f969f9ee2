"""fastattn.torch against torch.nn.functional.scaled_dot_product_attention."""
import itertools
import os
import runpy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import fastattn  # noqa: E402
import fastattn.torch as ft  # noqa: E402

# (query shape, key shape, value shape): L != S, broadcast leading dims, grouped heads
SHAPES = [
    ((2, 4, 7, 16), (2, 4, 9, 16), (2, 4, 9, 8)),
    ((1, 3, 33, 40), (1, 3, 33, 40), (1, 3, 33, 40)),
    ((2, 8, 5, 24), (2, 2, 70, 24), (2, 2, 70, 12)),  # needs enable_gqa
    ((130, 17), (100, 17), (100, 5)),
]


def masks(lq, lk, dtype):
    g = torch.Generator().manual_seed(lq * 1000 + lk)
    yield None
    yield torch.rand(lq, lk, generator=g) < 0.7
    yield torch.rand(1, lk, generator=g) < 0.7
    m = torch.randn(lq, lk, generator=g, dtype=dtype)
    m[torch.rand(lq, lk, generator=g) < 0.2] = float("-inf")
    yield m


@pytest.mark.parametrize("shapes", SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("is_causal, scale", list(itertools.product([False, True], [None, 0.3])))
def test_matches_torch(shapes, dtype, is_causal, scale):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(s, generator=g, dtype=dtype) for s in shapes)
    gqa = q.dim() >= 3 and q.shape[-3] != k.shape[-3]
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-12, rtol=1e-10)
    for mask in masks(q.shape[-2], k.shape[-2], dtype):
        if is_causal and mask is not None:
            continue
        kw = dict(attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        with torch.inference_mode():
            expected = F.scaled_dot_product_attention(q, k, v, **kw)
            got = ft.scaled_dot_product_attention(q, k, v, **kw)
        assert got.dtype == dtype and got.shape == expected.shape
        torch.testing.assert_close(got, expected, **tol)


def test_non_contiguous_tensors_are_used_in_place():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 50, 4, 3 * 16, generator=g)  # (B, L, H, 3E), as a fused projection
    q, k, v = (x[..., i * 16:(i + 1) * 16].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    got = ft.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert np.shares_memory(q.numpy(), x.numpy())  # the view fastattn reads is x itself


def test_output_shares_memory_with_numpy():
    q = torch.randn(3, 5, 8)
    out = ft.scaled_dot_product_attention(q, q, q)
    arr = out.numpy()  # a view, not a copy
    arr[0, 0, 0] = 123.0
    assert out[0, 0, 0].item() == 123.0


def test_fully_masked_rows_match_torch():
    q = torch.randn(1, 2, 4, 8)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[1] = False
    expected = F.scaled_dot_product_attention(q, q.repeat(1, 1, 2, 1)[:, :, :6], q.repeat(1, 1, 2, 1)[:, :, :6],
                                              attn_mask=mask)
    got = ft.scaled_dot_product_attention(q, q.repeat(1, 1, 2, 1)[:, :, :6], q.repeat(1, 1, 2, 1)[:, :, :6],
                                          attn_mask=mask)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def record_align(monkeypatch, name):
    """The align= of every call of fastattn._api.<name> from now on (a list).
    fastattn.torch's forward calls reach the numpy API through
    attention_planned, once per layout (later calls of a layout rerun its
    problem): its table of layouts starts empty."""
    calls = []
    if name == "attention":
        name = "attention_planned"
        monkeypatch.setattr(ft, "_direct", {})
    real = getattr(fastattn._api, name)

    def spy(*a, **kw):
        calls.append(kw.get("align"))
        return real(*a, **kw)

    monkeypatch.setattr(fastattn._api, name, spy)
    return calls


def test_patch_routes_and_restores(monkeypatch):
    calls = record_align(monkeypatch, "attention")
    original = F.scaled_dot_product_attention
    q = torch.randn(1, 2, 6, 8)
    with ft.patch():
        assert F.scaled_dot_product_attention is not original
        with torch.inference_mode():
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)  # dropout runs on fastattn too
        # unsupported here (a meta tensor): torch's own function runs
        m = q.to("meta")
        assert F.scaled_dot_product_attention(m, m, m).is_meta
    assert F.scaled_dot_product_attention is original
    assert calls == ["top-left", "top-left"]
    with pytest.raises(RuntimeError):
        with ft.patch():
            raise RuntimeError("body fails")
    assert F.scaled_dot_product_attention is original


@pytest.mark.parametrize("bias_shape", [(1, 4, 9, 11), (9, 11), (2, 1, 1, 11)], ids=str)
def test_a_learned_bias_gets_its_gradient(monkeypatch, bias_shape):
    """A float mask that requires grad (T5's relative position bias, per
    head; a plain (L, S) one; a padding-style one per batch) gets torch's
    gradient from fastattn's backward, also when it alone needs one, and
    through patch()."""
    g = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 9, 8, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 11, 8, generator=g, requires_grad=True)
    bias = torch.randn(bias_shape, generator=g, requires_grad=True)
    grads = []
    for fn in (ft.scaled_dot_product_attention, F.scaled_dot_product_attention):
        for t in (q, k, bias):
            t.grad = None
        fn(q, k, k, attn_mask=bias, enable_gqa=True).square().sum().backward()
        grads.append([t.grad for t in (q, k, bias)])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    bias.grad = None
    calls = record_align(monkeypatch, "attention_backward")
    with ft.patch():
        F.scaled_dot_product_attention(q.detach(), k.detach(), k.detach(), attn_mask=bias,
                                       enable_gqa=True).square().sum().backward()
    assert len(calls) == 1 and bias.grad.shape == bias.shape
    torch.testing.assert_close(bias.grad, grads[1][2], rtol=1e-4, atol=1e-5)


def test_a_learned_bias_gradcheck_and_compile():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(1, 2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(2, 5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: ft.scaled_dot_product_attention(x, x, x, attn_mask=b), (x, bias))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(x, b):
        return ft.scaled_dot_product_attention(x, x, x, attn_mask=b).square().sum()

    loss(x, bias).backward()
    got = bias.grad.clone()
    bias.grad = None
    F.scaled_dot_product_attention(x, x, x, attn_mask=bias).square().sum().backward()
    torch.testing.assert_close(got, bias.grad)


def test_transformer_block_example():
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "torch_transformer_block.py")
    err = runpy.run_path(path)["main"]()
    assert err < 1e-4


# ---- autograd -------------------------------------------------------------------

GRAD_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool mask": dict(attn_mask="bool"),
    "float mask": dict(attn_mask="float"),
    "scale": dict(scale=0.3),
    "gqa causal": dict(is_causal=True, enable_gqa=True),
}


def grad_inputs(name, dtype, l=7, s=9):
    gen = torch.Generator().manual_seed(len(name))
    kv_heads = 1 if "gqa" in name else 2
    q = torch.randn(2, 2, l, 5, dtype=dtype, generator=gen, requires_grad=True)
    k = torch.randn(2, kv_heads, s if "causal" not in name else l, 5, dtype=dtype, generator=gen, requires_grad=True)
    v = torch.randn(2, kv_heads, k.shape[-2], 3, dtype=dtype, generator=gen, requires_grad=True)
    kw = dict(GRAD_CASES[name])
    if kw.get("attn_mask") == "bool":
        m = torch.rand(l, k.shape[-2], generator=gen) < 0.7
        m[:, 0] = True
        kw["attn_mask"] = m
    elif kw.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(l, k.shape[-2], dtype=dtype, generator=gen)
    return q, k, v, kw


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradcheck_float64(name):
    q, k, v, kw = grad_inputs(name, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: ft.scaled_dot_product_attention(a, b, c, **kw), (q, k, v))


@pytest.mark.parametrize("name", list(GRAD_CASES))
def test_gradients_match_torch(name):
    q, k, v, kw = grad_inputs(name, torch.float32, l=40, s=70)
    grads = []
    for f in (ft.scaled_dot_product_attention, F.scaled_dot_product_attention):
        for t in (q, k, v):
            t.grad = None
        out = f(q, k, v, **kw)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        grads.append([t.grad.clone() for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_torch_compile_fullgraph_forward_and_backward():
    q, k, v, kw = grad_inputs("gqa causal", torch.float32)

    def loss(a, b, c):
        return (ft.scaled_dot_product_attention(a, b, c, **kw) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_patch_trains(monkeypatch):
    """Inside patch(), a training step's forward and backward run on fastattn."""
    calls = record_align(monkeypatch, "attention_backward")
    torch.manual_seed(0)
    q = torch.randn(1, 2, 6, 8, requires_grad=True)
    with ft.patch():
        F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    assert calls == ["top-left"]
    got = q.grad.clone()
    q.grad = None
    F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    torch.testing.assert_close(got, q.grad, atol=1e-5, rtol=1e-4)


def test_training_example_losses_agree():
    """A few steps of examples/train_tiny_transformer.py: fastattn's losses equal torch's."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "train_tiny_transformer.py")
    ours, theirs = runpy.run_path(path)["main"](steps=4, length=64, quiet=True)
    assert len(ours) == 4
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_tensors_forward_and_backward(dtype):
    """16-bit tensors (bfloat16 viewed through ml_dtypes, no copy): the output
    and gradients are 16-bit, within one 16-bit rounding of float32 math on
    the same 16-bit inputs."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 33, 16, generator=g).to(dtype).requires_grad_() for _ in range(3))
    dout = torch.randn(2, 4, 33, 16, generator=g).to(dtype)
    out = ft.scaled_dot_product_attention(q, k, v, is_causal=True)
    out.backward(dout)
    assert out.dtype == dtype and q.grad.dtype == dtype
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = F.scaled_dot_product_attention(q32, k32, v32, is_causal=True)
    ref.backward(dout.float())
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for got, want in ((out, ref), (q.grad, q32.grad), (k.grad, k32.grad), (v.grad, v32.grad)):
        torch.testing.assert_close(got.float(), want, atol=1e-4 + eps * want.abs().max().item(), rtol=eps)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_masks_in_the_models_dtype(monkeypatch, dtype):
    """A 16-bit model's additive mask in its own dtype (what torch's SDPA
    takes beside such inputs), read in place: the output and the gradients,
    a learned bias's included (in its dtype), within one 16-bit rounding of
    float32 math on the same 16-bit values; patch() runs it on fastattn, and
    torch.compile(fullgraph=True) gives the same gradients, bit for bit."""
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 40, 16, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 70, 16, generator=g).to(dtype).requires_grad_() for _ in range(2))
    bias = torch.randn(4, 40, 70, generator=g)
    bias[torch.rand(4, 40, 70, generator=g) < 0.2] = float("-inf")
    bias = bias.to(dtype).requires_grad_()
    dout = torch.randn(2, 4, 40, 16, generator=g).to(dtype)
    out = ft.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    out.backward(dout)
    assert out.dtype == dtype and bias.grad.dtype == dtype
    wide = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
    ref = F.scaled_dot_product_attention(*wide[:3], attn_mask=wide[3], enable_gqa=True)
    ref.backward(dout.float())
    eps = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    for got, want in zip((out, q.grad, k.grad, v.grad, bias.grad), (ref,) + tuple(t.grad for t in wide)):
        torch.testing.assert_close(got.float(), want, atol=1e-4 + eps * want.abs().max().item(), rtol=eps)
    calls = record_align(monkeypatch, "attention")
    with ft.patch(), torch.no_grad():
        patched = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True)
    assert len(calls) == 1 and torch.equal(patched, out.detach())
    if dtype == torch.bfloat16:  # compiled without graph breaks: the same gradients, the bias's in its dtype
        eager = [t.grad.clone() for t in (q, k, v, bias)]
        for t in (q, k, v, bias):
            t.grad = None

        @torch.compile(fullgraph=True, backend="aot_eager")
        def loss(q, k, v, bias):  # its gradient with respect to the output: dout, exactly
            return (ft.scaled_dot_product_attention(q, k, v, attn_mask=bias, enable_gqa=True).float()
                    * dout.float()).sum()

        loss(q, k, v, bias).backward()
        for t, want in zip((q, k, v, bias), eager):
            assert t.grad.dtype == dtype and torch.equal(t.grad, want)


def test_sinks_through_the_operator_forward_and_gradcheck():
    """fastattn.torch.attention with sinks: the forward against the
    reference, and (through the operator, since inputs need gradients)
    gradcheck in float64, the sinks' gradient included (and alone)."""
    import fastattn.reference as ref

    q, k, v, _ = grad_inputs("causal", torch.float64)
    sinks = torch.tensor([0.5, -1.5], dtype=torch.float64)
    with torch.no_grad():
        out, lse = ft.attention(q, k, v, None, True, 0.4, sinks=sinks)
    want, want_lse = ref.attention(q.detach().numpy(), k.detach().numpy(), v.detach().numpy(), causal=True,
                                   scale=0.4, sinks=sinks.numpy(), align="top-left", return_lse=True)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-12)
    np.testing.assert_allclose(lse.numpy(), want_lse, atol=1e-12)
    sinks.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, s: ft.attention(a, b, c, None, True, 0.4, sinks=s)[0],
                                    (q, k, v, sinks))
    frozen = [t.detach() for t in (q, k, v)]
    assert torch.autograd.gradcheck(lambda s: ft.attention(*frozen, None, True, 0.4, sinks=s)[0], (sinks,))


def test_direct_call_without_lse():
    """need_lse=False (what the transformers front end asks for): the same
    output, no log-sum-exp on the direct path; the operator path (a
    gradient needed) still gives it."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 4, 37, 16, generator=g) for _ in range(3))
    out, lse = ft.attention(q, k, v, None, True, 0.25)
    out2, none = ft.attention(q, k, v, None, True, 0.25, need_lse=False)
    assert none is None and lse.shape == (1, 4, 37)
    assert torch.equal(out, out2)
    qg = q.clone().requires_grad_()
    out3, lse3 = ft.attention(qg, k, v, None, True, 0.25, need_lse=False)
    assert torch.equal(out3.detach(), out) and torch.equal(lse3, lse)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_direct_calls_rerun_their_layouts_problem(monkeypatch, dtype):
    """Direct calls of a layout already seen skip the numpy API and rerun
    its problem on their own tensors: the same result as the API's (bitwise)
    for new data, per layout and options (grouped heads, a strided key,
    causal or not, with or without lse), and with heads_last the output
    written as (B, Lq, H, Dv)."""
    planned = record_align(monkeypatch, "attention")
    g = torch.Generator().manual_seed(21)

    def inputs():
        q = torch.randn(2, 8, 5, 24, generator=g).to(dtype)
        k = torch.randn(2, 9, 2, 24, generator=g).to(dtype).transpose(1, 2)  # (2, 2, 9, 24), strided
        v = torch.randn(2, 2, 9, 12, generator=g).to(dtype)
        return q, k, v

    def reference(q, k, v, causal, heads_last):
        res = fastattn.attention(*(ft._as_numpy(t) for t in (q, k, v)), scale=0.3, causal=causal,
                                 align=0, return_lse=True)  # top-left; not counted below
        out, lse = (ft._as_tensor(a) for a in res)
        return (out.transpose(1, 2) if heads_last else out), lse

    for causal, need_lse, heads_last in itertools.product([False, True], [False, True], [False, True]):
        before = planned.count("top-left")
        for i in range(3):
            q, k, v = inputs()
            out, lse = ft.attention(q, k, v, None, causal, 0.3, need_lse=need_lse, heads_last=heads_last)
            assert planned.count("top-left") == before + 1  # the API on the first call of this layout only
            want, want_lse = reference(q, k, v, causal, heads_last)
            assert torch.equal(out, want) and out.is_contiguous()
            assert lse is None if not need_lse else torch.equal(lse, want_lse)
    # another dtype, a mask or a new shape: through the API again
    q, k, v = inputs()
    ft.attention(q.double(), k.double(), v, None, False, 0.3)
    ft.attention(q, k, v, torch.ones(5, 9, dtype=torch.bool), False, 0.3)
    ft.attention(q[:, :, :4], k, v, None, False, 0.3)
    assert planned.count("top-left") == 8 + 3


def test_sdpa_direct_calls_skip_the_checks_but_not_the_grouped_heads_rule(monkeypatch):
    """A scaled_dot_product_attention call of a layout and options checked
    before skips the per-tensor checks; the grouped-heads rule (which the
    layout does not decide) and a bad dropout_p still raise."""
    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(1, 4, 3, 16, generator=g), torch.randn(1, 2, 5, 16, generator=g)
    calls = []
    checks = ft._unsupported
    with torch.no_grad():
        want = ft.scaled_dot_product_attention(q, k, k, enable_gqa=True, scale=0.3)
        monkeypatch.setattr(ft, "_unsupported", lambda *a: calls.append(a) or checks(*a))
        got = ft.scaled_dot_product_attention(q, k, k, enable_gqa=True, scale=0.3)
        assert calls == [] and torch.equal(got, want)
        with pytest.raises(ValueError, match="enable_gqa"):
            ft.scaled_dot_product_attention(q, k, k, scale=0.3)
        with pytest.raises(ValueError, match="dropout_p"):
            ft.scaled_dot_product_attention(q, k, k, dropout_p=1.5, enable_gqa=True, scale=0.3)
        with pytest.raises(ValueError, match="CPU tensors only"):
            ft.scaled_dot_product_attention(q.to("meta"), k, k, enable_gqa=True, scale=0.3)
    assert len(calls) == 3


def test_direct_call_layouts_keep_their_checks():
    """A tensor the kernels cannot read is refused on every call, also after
    a call of the same shape, strides and dtype took the direct way."""
    q = torch.randn(1, 2, 3, 8)
    ft.attention(q, q, q, None, False, 0.3)
    ft.attention(q, q, q, None, False, 0.3)
    with pytest.raises(TypeError, match="meta"):
        ft.attention(q.to("meta"), q, q, None, False, 0.3)
    sparse = torch.zeros(1, 2, 3, 8).to_sparse()
    with pytest.raises((TypeError, RuntimeError)):
        ft.attention(q, sparse, q, None, False, 0.3)


def test_block_mask_as_attn_mask():
    """A fastattn.BlockMask as attn_mask: its table without gradients, its
    mask through the operator with them; both as torch with the bool mask."""
    q, k, v, _ = grad_inputs("plain", torch.float32, l=70, s=150)
    doc = (np.arange(70)[:, None] + 80) // 50 == np.arange(150)[None, :] // 50
    bm = fastattn.block_mask(doc)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(doc))
    with torch.no_grad():
        torch.testing.assert_close(ft.scaled_dot_product_attention(q, k, v, attn_mask=bm), want)
        # the table decides the tiles: an all-visible mask under a table of
        # 64-token documents (no mixed blocks) gives the documents' result
        docs64 = np.arange(70)[:, None] // 64 == np.arange(150)[None, :] // 64
        fooled = fastattn.BlockMask(np.ones((70, 150), bool), fastattn.block_mask(docs64).kinds)
        torch.testing.assert_close(ft.scaled_dot_product_attention(q, k, v, attn_mask=fooled),
                                   F.scaled_dot_product_attention(q, k, v, attn_mask=torch.from_numpy(docs64)))
    got = ft.scaled_dot_product_attention(q, k, v, attn_mask=bm)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ---- paged KV caches ----------------------------------------------------------------


def _paged_batch(rng, kv_dtype, bs=16, g=2, h=4, d=32, dv=24):
    """A float32 paged cache written through fastattn.torch.cache_write into
    a cache of kv_dtype, with a mixed batch (two decodes and a chunk)."""
    lens, chunk = [37, 70, 50], [1, 1, 9]
    n_blocks = sum(-(-n // bs) for n in lens) + 2
    kf = torch.from_numpy(rng.standard_normal((n_blocks * bs, g, d), dtype=np.float32))
    vf = torch.from_numpy(rng.standard_normal((n_blocks * bs, g, dv), dtype=np.float32))
    kc = torch.zeros((n_blocks, bs, g, d), dtype=kv_dtype)
    vc = torch.zeros((n_blocks, bs, g, dv), dtype=kv_dtype)
    scales = {}
    if kv_dtype == torch.int8:
        scales = dict(k_scale=torch.zeros((n_blocks, bs, g)), v_scale=torch.zeros((n_blocks, bs, g)))
    elif kv_dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scales = dict(k_scale=0.05, v_scale=0.05)
    ft.cache_write(kf, vf, kc, vc, torch.arange(n_blocks * bs), **scales)
    table = torch.from_numpy(rng.permutation(n_blocks)[: sum(-(-n // bs) for n in lens)].astype(np.int32))
    table = torch.nn.utils.rnn.pad_sequence(list(torch.split(table, [-(-n // bs) for n in lens])), batch_first=True)
    q = torch.from_numpy(rng.standard_normal((sum(chunk), h, d), dtype=np.float32))
    cu = torch.tensor(np.concatenate([[0], np.cumsum(chunk)]), dtype=torch.int32)
    return q, kc, vc, table.to(torch.int32), torch.tensor(lens, dtype=torch.int32), cu, scales


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float8_e4m3fn],
                         ids=str)
def test_paged_attention_and_cache_write_on_tensors(kv_dtype):
    """fastattn.torch.cache_write writes into the tensors' memory (int8: the
    scales too) and attention_paged on tensors gives what the numpy API
    gives on the same memory, eagerly and through the operator."""
    rng = np.random.default_rng(11)
    q, kc, vc, table, lens, cu, scales = _paged_batch(rng, kv_dtype)
    assert kc.view(torch.uint8).any() and vc.view(torch.uint8).any()  # written in place
    if kv_dtype == torch.int8:
        assert (scales["k_scale"] > 0).all()
    sinks = np.linspace(-1, 1, 4, dtype=np.float32)
    kw = dict(cu_seqlens_q=cu, window=(40, 0), softcap=5.0, sinks=torch.from_numpy(sinks))
    out, lse = ft.attention_paged(q, kc, vc, table, lens, return_lse=True, **kw, **scales)
    np_scales = ft._numpy_args(**scales)
    caches = ft._numpy_args(k_cache=kc, v_cache=vc)
    want, want_lse = fastattn.attention_paged(
        q.numpy(), caches["k_cache"], caches["v_cache"], table.numpy(), lens.numpy(),
        cu_seqlens_q=cu.numpy(), window=(40, 0), softcap=5.0, sinks=sinks,
        return_lse=True, **np_scales)
    assert np.array_equal(out.numpy(), want) and np.array_equal(lse.numpy(), want_lse)
    op_scales = [ft._scale_tensor(scales.get(k)) for k in ("k_scale", "v_scale")]
    op_out, op_lse = torch.ops.fastattn.attention_paged(q, kc, vc, table, lens, cu, None, True, 40, 0, 5.0, None,
                                                       torch.from_numpy(sinks), *op_scales)
    assert torch.equal(op_out, out) and torch.equal(op_lse, lse)


def test_paged_decode_step_compiles_without_graph_breaks():
    """A decode step that writes the new token and attends, under
    torch.compile(fullgraph=True): the same cache and output as eagerly."""
    rng = np.random.default_rng(12)
    q, kc, vc, table, lens, _, _ = _paged_batch(rng, torch.float32)
    q = q[:3]
    k_new = torch.from_numpy(rng.standard_normal((3, 2, 32), dtype=np.float32))
    v_new = torch.from_numpy(rng.standard_normal((3, 2, 24), dtype=np.float32))
    slots = (table[torch.arange(3), (lens - 1) // 16].to(torch.int64) * 16 + (lens - 1) % 16)

    def step(q, k_new, v_new, kc, vc):
        ft.cache_write(k_new, v_new, kc, vc, slots)
        return ft.attention_paged(q, kc, vc, table, lens) * 2

    kc2, vc2 = kc.clone(), vc.clone()
    want = step(q, k_new, v_new, kc, vc)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_new, v_new, kc2, vc2)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)
    torch.testing.assert_close(got, want)


def test_paged_bad_inputs_name_the_argument():
    rng = np.random.default_rng(13)
    q, kc, vc, table, lens, cu, _ = _paged_batch(rng, torch.float32)
    with pytest.raises(TypeError, match="block_table must be a torch.Tensor"):
        ft.attention_paged(q, kc, vc, table.numpy(), lens, cu_seqlens_q=cu)
    with pytest.raises(ValueError, match="k_cache is on meta"):
        ft.attention_paged(q, kc.to("meta"), vc, table, lens, cu_seqlens_q=cu)
    with pytest.raises(TypeError, match="window must be a"):
        ft.attention_paged(q, kc, vc, table, lens, cu_seqlens_q=cu, window=3)
    with pytest.raises(ValueError, match="seq_lens"):
        ft.attention_paged(q, kc, vc, table, lens + 1000, cu_seqlens_q=cu)
    with pytest.raises(TypeError, match="slot_mapping must be a torch.Tensor"):
        ft.cache_write(q[:1, :2], q[:1, :2, :24], kc, vc, [0])


# ---- packed variable-length sequences ----------------------------------------------

VARLEN_CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal top-left window softcap": dict(causal=True, align="top-left", window=(3, 1), softcap=2.0),
    "alibi sinks": dict(alibi_slopes=[0.5, 0.25, 0.125, 0.0625], sinks=[0.3, -1.0, 2.0, 0.0]),
    "scale": dict(scale=0.4),
}


def varlen_inputs(name, dtype):
    """Four sequences (one without queries, one without keys) of q (20, 4, 8)
    over k (30, 2, 8) and v (30, 2, 6); the case's keywords as tensors."""
    g = torch.Generator().manual_seed(len(name))
    cu_q = torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 7, 9, 9, 30], dtype=torch.int64)
    q = torch.randn(20, 4, 8, dtype=dtype, generator=g, requires_grad=True)
    k = torch.randn(30, 2, 8, dtype=dtype, generator=g, requires_grad=True)
    v = torch.randn(30, 2, 6, dtype=dtype, generator=g, requires_grad=True)
    kw = {n: torch.tensor(x, dtype=dtype) if isinstance(x, list) else x for n, x in VARLEN_CASES[name].items()}
    return q, k, v, cu_q, cu_k, kw


def _numpy_kw(kw):
    return {n: x.numpy() if isinstance(x, torch.Tensor) else x for n, x in kw.items()}


@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_forward_and_gradients_are_the_numpy_apis(name):
    """fastattn.torch.attention_varlen gives what fastattn.attention_varlen
    and attention_varlen_backward give on the same memory, bit for bit,
    without a gradient (direct) and through the operator (with one)."""
    q, k, v, cu_q, cu_k, kw = varlen_inputs(name, torch.float32)
    arrays = [t.detach().numpy() for t in (q, k, v)] + [cu_q.numpy(), cu_k.numpy()]
    want, lse = fastattn.attention_varlen(*arrays, return_lse=True, **_numpy_kw(kw))
    with torch.no_grad():
        direct = ft.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    out, op_lse = ft.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    assert out.requires_grad and np.array_equal(direct.numpy(), want)
    assert np.array_equal(out.detach().numpy(), want) and np.array_equal(op_lse.numpy(), lse)
    dout = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    out.backward(dout)
    grads = fastattn.attention_varlen_backward(dout.numpy(), *arrays[:3], want, lse, *arrays[3:],
                                               **_numpy_kw(kw))
    for t, g in zip((q, k, v), grads):
        assert np.array_equal(t.grad.numpy(), g)


@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen_gradcheck_float64(name):
    q, k, v, cu_q, cu_k, kw = varlen_inputs(name, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b, c: ft.attention_varlen(a, b, c, cu_q, cu_k, **kw), (q, k, v))


def test_varlen_sinks_gradcheck_float64():
    """The sinks' gradient through the varlen operator (a head without a
    sink: -inf, whose gradient is 0)."""
    q, k, v, cu_q, cu_k, kw = varlen_inputs("alibi sinks", torch.float64)
    sinks = torch.tensor([0.3, -1.0, 2.0, float("-inf")], dtype=torch.float64, requires_grad=True)
    kw.pop("sinks")
    assert torch.autograd.gradcheck(lambda a, b, c, s: ft.attention_varlen(a, b, c, cu_q, cu_k, sinks=s, **kw),
                                    (q, k, v, sinks))
    out = ft.attention_varlen(q.detach(), k.detach(), v.detach(), cu_q, cu_k, sinks=sinks, causal=True)
    assert out.requires_grad  # the sinks alone need a gradient: the operator's way
    out.sum().backward()
    assert sinks.grad[3] == 0 and torch.all(sinks.grad[:3] != 0)


def test_varlen_compiles_forward_and_backward():
    q, k, v, cu_q, cu_k, kw = varlen_inputs("causal top-left window softcap", torch.float32)

    def loss(a, b, c):
        return (ft.attention_varlen(a, b, c, cu_q, cu_k, **kw) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_varlen_half_tensors(dtype):
    """16-bit packed sequences: 16-bit output and gradients, those of the
    numpy API on the same memory."""
    q, k, v, cu_q, cu_k, kw = varlen_inputs("causal", torch.float32)
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out = ft.attention_varlen(q, k, v, cu_q, cu_k, **kw)
    out.backward(torch.ones_like(out))
    assert out.dtype == q.grad.dtype == k.grad.dtype == dtype
    views = ft._numpy_args(q=q, k=k, v=v, dout=torch.ones_like(out), out=out)
    want, lse = fastattn.attention_varlen(views["q"], views["k"], views["v"], cu_q.numpy(), cu_k.numpy(),
                                          return_lse=True, **kw)
    assert np.array_equal(views["out"], want)
    grads = fastattn.attention_varlen_backward(views["dout"], views["q"], views["k"], views["v"], want, lse,
                                               cu_q.numpy(), cu_k.numpy(), **kw)
    for t, g in zip((q, k, v), grads):
        assert np.array_equal(ft._numpy_args(g=t.grad)["g"], g)


def test_varlen_offsets_from_position_ids():
    """The operator's position_ids: a sequence begins at each row and
    wherever a position is not the one before it plus one."""
    pos = np.array([[0, 1, 2, 0, 1, 5, 6, 6], [3, 4, 5, 6, 0, 1, 2, 3]])
    assert ft._packed_offsets(pos, 16).tolist() == [0, 3, 5, 7, 8, 12, 16]
    assert ft._packed_offsets(pos[:1, :3], 3).tolist() == [0, 3]
    for bad in (pos.ravel(), pos.astype(np.float32), pos[:, :7]):
        with pytest.raises(ValueError, match="position_ids must be an integer tensor"):
            ft._packed_offsets(bad, 16)


def test_varlen_bad_inputs_name_the_argument():
    q, k, v, cu_q, cu_k, _ = varlen_inputs("plain", torch.float32)
    with pytest.raises(TypeError, match="cu_seqlens_q must be a torch.Tensor"):
        ft.attention_varlen(q, k, v, cu_q.numpy(), cu_k)
    with pytest.raises(TypeError, match="cu_seqlens_k must be a torch.Tensor, got None"):
        ft.attention_varlen(q, k, v, cu_q, None)
    with pytest.raises(ValueError, match="align must be"):
        ft.attention_varlen(q, k, v, cu_q, cu_k, align=3)
    with pytest.raises(TypeError, match="window must be a"):
        ft.attention_varlen(q, k, v, cu_q, cu_k, window=3)
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ft.attention_varlen(q, k, v, cu_q.flip(0), cu_k)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ft.attention_varlen(q, k, v, cu_q, cu_k + 1)  # the same rule with a gradient (the operator's way)
    with pytest.raises(ValueError, match="is on meta"):
        ft.attention_varlen(q, k.to("meta"), v, cu_q, cu_k)
