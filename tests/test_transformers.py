"""fastattn as a transformers attention implementation: tiny Llama-,
Mistral- (sliding window), Qwen2-, Gemma2- (soft-cap) and gpt-oss-style
(attention sinks) models with random weights, left-padded batches, against
transformers' own attention."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (pip install 'fastattn[torch]')")
transformers = pytest.importorskip("transformers", reason="needs transformers (pip install 'fastattn[transformers]')")

from fastattn import _config  # noqa: E402
import fastattn.transformers as fat  # noqa: E402

NAME = fat.register()

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
MODELS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=6)),  # shorter than the sequences
    "qwen2": ("Qwen2Config", {}),
    "gemma2": ("Gemma2Config", dict(sliding_window=6, attn_logit_softcapping=5.0, head_dim=16,
                                    query_pre_attn_scalar=16)),
    # attention sinks (s_aux), sliding and full layers; every token to both experts, so that rounding (bfloat16)
    # cannot flip a discrete routing choice
    "gpt_oss": ("GptOssConfig", dict(sliding_window=6, head_dim=16, num_local_experts=2, num_experts_per_tok=2,
                                     layer_types=["sliding_attention", "full_attention"],
                                     rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
}
# transformers' SDPA path refuses a soft-cap and sinks: Gemma2 and gpt-oss are checked against eager
REFERENCE = {"gemma2": "eager", "gpt_oss": "eager"}
DTYPES = {"float32": (torch.float32, 1e-5), "bfloat16": (torch.bfloat16, 2e-2)}


def batch():
    """Three sequences of 16, 11 and 5 tokens, left-padded to 16."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, BASE["vocab_size"], (3, 16), generator=g)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    ids[mask == 0] = 0
    return ids, mask


def model(name, dtype):
    cls, extra = MODELS[name]
    config = getattr(transformers, cls)(**BASE, **extra)
    torch.manual_seed(1)
    m = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=REFERENCE.get(name, "sdpa"),
                                                      dtype=dtype)
    with torch.no_grad():
        for module in m.modules():  # sinks of either sign, some above the scores
            if isinstance(getattr(module, "sinks", None), torch.nn.Parameter):
                module.sinks.normal_(0.0, 2.0)
    return m.eval()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(MODELS))
def test_logits_and_generation_match(name, dtype):
    if name == "gpt_oss" and dtype == "bfloat16":
        pytest.skip("gpt-oss in bfloat16: its eager reference differs from the float32 model by about 4% of the "
                    "logits here, beyond this test's tolerance (sinks in bfloat16 are checked against the float64 "
                    "reference in test_serving)")
    dt, tol = DTYPES[dtype]
    m = model(name, dt)
    ids, mask = batch()
    with torch.no_grad():
        want = m(input_ids=ids, attention_mask=mask).logits.float()
        want_tokens = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 pad_token_id=0)
        m.set_attn_implementation(NAME)
        runs = sum(_config.path_runs().values())
        got = m(input_ids=ids, attention_mask=mask).logits.float()
        assert sum(_config.path_runs().values()) - runs == BASE["num_hidden_layers"]  # one call per layer
        got_tokens = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                pad_token_id=0)
        # the reference's logits along its own generated tokens (teacher forcing)
        m.set_attn_implementation(REFERENCE.get(name, "sdpa"))
        full_mask = torch.cat([mask, torch.ones(3, 12, dtype=mask.dtype)], dim=1)
        ref_logits = m(input_ids=want_tokens, attention_mask=full_mask).logits.float()
    keep = mask.bool()  # padding positions' outputs are not defined alike
    mag = want[keep].abs().max().item()
    assert (got - want)[keep].abs().max().item() <= tol * max(mag, 1.0)
    # greedy tokens: equal, up to the first step where the reference's best two
    # logits are closer than the tolerance (a tie that rounding may break either way)
    steps = ref_logits[:, 15:-1]
    top2 = steps.topk(2, dim=-1).values
    close = (top2[..., 0] - top2[..., 1]) <= 2 * tol * max(mag, 1.0)
    for row in range(3):
        differ = (got_tokens[row, 16:] != want_tokens[row, 16:]).nonzero()
        if len(differ):
            first = differ[0].item()
            assert close[row, first], f"row {row}: token {first} differs without a near tie"
    if dtype == "float32":
        assert torch.equal(got_tokens, want_tokens)


def test_the_padding_mask_is_not_expanded(monkeypatch):
    """Layers get the 2-D padding mask (or None), never a dense (B, 1, Lq, Lk) one."""
    seen = []
    original = fat.attention_forward

    def spy(module, query, key, value, attention_mask, **kw):
        seen.append(None if attention_mask is None else tuple(attention_mask.shape))
        return original(module, query, key, value, attention_mask, **kw)

    transformers.AttentionInterface.register(NAME, spy)
    try:
        m = model("mistral", torch.float32)
        m.set_attn_implementation(NAME)
        ids, mask = batch()
        with torch.no_grad():
            m(input_ids=ids, attention_mask=mask)
            m(input_ids=ids[:1], attention_mask=mask[:1])  # no padding: no mask at all
    finally:
        transformers.AttentionInterface.register(NAME, fat.attention_forward)
    assert seen[:2] == [(3, 16), (3, 16)] and seen[2:] == [None, None]


def test_training_step_gradients_match():
    """A backward pass through the model: fastattn's gradients equal SDPA's."""
    grads = {}
    ids, mask = batch()
    for impl in ("sdpa", NAME):
        m = model("llama", torch.float32).train()
        m.set_attn_implementation(impl)
        loss = m(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        loss.backward()
        grads[impl] = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
    assert torch.allclose(grads[NAME], grads["sdpa"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiles_without_graph_breaks():
    """torch.compile(model, fullgraph=True): a graph break would raise (~25 s of compiling)."""
    m = model("mistral", torch.float32)
    m.set_attn_implementation(NAME)
    ids, _ = batch()
    with torch.no_grad():
        want = m(input_ids=ids, use_cache=False).logits
        compiled = torch.compile(m, fullgraph=True, dynamic=False)
        got = compiled(input_ids=ids, use_cache=False).logits
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hf_generate_example():
    import os
    import subprocess
    import sys

    path = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "hf_generate.py")
    res = subprocess.run([sys.executable, path, "--prompt-tokens", "64", "--new-tokens", "4"], capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fastattn:" in res.stdout and "sdpa:" in res.stdout
