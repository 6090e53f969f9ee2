"""Dropout through fastattn.torch and fastattn.transformers: the seed drawn
from torch's default generator, the numpy API's results for that seed,
autograd, gradcheck and torch.compile."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (pip install 'fastattn[torch]')")

import fastattn  # noqa: E402
import fastattn.torch as ft  # noqa: E402


def numpy_of(*tensors):
    return [t.detach().numpy() for t in tensors]


def replayed_seed(torch_seed, p):
    """The seed a call right after torch.manual_seed(torch_seed) draws."""
    torch.manual_seed(torch_seed)
    return int(ft._dropout_seed(p))


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_dropout_is_the_numpy_apis_for_its_seed(causal):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 37, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 45, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 45, 8, generator=g, requires_grad=True)
    torch.manual_seed(7)
    out = ft.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal, enable_gqa=True)
    seed = replayed_seed(7, 0.25)
    options = dict(causal=causal, align="top-left", dropout_p=0.25, dropout_seed=seed)
    want, lse = fastattn.attention(*numpy_of(q, k, v), return_lse=True, **options)
    assert np.array_equal(out.detach().numpy(), want)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    grads = fastattn.attention_backward(dout.numpy(), *numpy_of(q, k, v), want, lse, **options)
    for t, gr in zip((q, k, v), grads):
        assert np.array_equal(t.grad.numpy(), gr)
    # without a gradient, straight to the kernels: the same seed, the same result
    torch.manual_seed(7)
    with torch.no_grad():
        again = ft.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal, enable_gqa=True)
    assert torch.equal(again, out.detach())
    assert not torch.equal(ft.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=causal,
                                                           enable_gqa=True), out)


def test_dropout_gradcheck():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 5, dtype=torch.float64, generator=g, requires_grad=True) for n in (7, 9, 9))
    seed = torch.tensor(1234)

    def f(q, k, v):
        return torch.ops.fastattn.attention(q, k, v, None, True, 0.5, -1, -1, 0.0, False, 0.3, seed, None)[0]

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_compiles_and_repeats_under_manual_seed():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 33, 16, generator=g, requires_grad=True) for _ in range(3))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss(q, k, v):
        return ft.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True).square().sum()

    results = []
    for _ in range(2):
        for t in (q, k, v):
            t.grad = None
        torch.manual_seed(11)
        value = loss(q, k, v)
        value.backward()
        results.append((value.detach(), q.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    torch.manual_seed(11)
    eager = ft.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True).square().sum()
    assert torch.equal(eager.detach(), results[0][0])


def test_patched_sdpa_with_dropout_runs_on_fastattn(monkeypatch):
    calls = []
    real = fastattn._api.attention_planned
    monkeypatch.setattr(fastattn._api, "attention_planned", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    q = torch.randn(1, 2, 6, 8, requires_grad=True)
    with ft.patch():
        torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5).sum().backward()
    assert len(calls) == 1 and q.grad is not None


def test_varlen_dropout_is_the_numpy_apis_for_its_seed():
    g = torch.Generator().manual_seed(4)
    cu = torch.tensor([0, 10, 11, 40])
    q, k, v = (torch.randn(40, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    torch.manual_seed(5)
    out = ft.attention_varlen(q, k, v, cu, cu, causal=True, dropout_p=0.3)
    seed = replayed_seed(5, 0.3)
    options = dict(causal=True, dropout_p=0.3, dropout_seed=seed)
    want, lse = fastattn.attention_varlen(*numpy_of(q, k, v), cu.numpy(), cu.numpy(), return_lse=True, **options)
    assert np.array_equal(out.detach().numpy(), want)
    dout = torch.randn(out.shape, generator=g)
    out.backward(dout)
    grads = fastattn.attention_varlen_backward(dout.numpy(), *numpy_of(q, k, v), want, lse, cu.numpy(), cu.numpy(),
                                               **options)
    for t, gr in zip((q, k, v), grads):
        assert np.array_equal(t.grad.numpy(), gr)


def test_transformers_training_with_attention_dropout():
    """A Llama-style model with attention_dropout trains through fastattn:
    the attention function gets the dropout (in train mode only), a step is
    repeated exactly under torch.manual_seed, and eval mode is unaffected."""
    transformers = pytest.importorskip("transformers", reason="needs transformers (pip install "
                                                              "'fastattn[transformers]')")
    import fastattn.transformers as fat

    name = fat.register()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attention_dropout=0.3)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=name)
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    model.train()
    for _ in range(2):
        model.zero_grad()
        torch.manual_seed(9)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.equal(losses[0], losses[1]) and torch.equal(grads[0], grads[1])
    model.config.attention_dropout = 0.0
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.0
    torch.manual_seed(9)
    assert not torch.equal(model(input_ids=ids, labels=ids).loss.detach(), losses[0])  # the dropout did drop
    model.eval()
    with torch.no_grad():
        evaluated = model(input_ids=ids).logits
        model.set_attn_implementation("sdpa")
        torch.testing.assert_close(evaluated, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
