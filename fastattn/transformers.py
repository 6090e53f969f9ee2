"""fastattn as an attention implementation of Hugging Face transformers.

::

    import fastattn.transformers
    fastattn.transformers.register()                       # once: the name "fastattn"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="fastattn")
    # or, on a model already loaded: model.set_attn_implementation("fastattn")

``register(name)`` adds fastattn's attention function to
``transformers.AttentionInterface`` and, under the same name, the mask
function of transformers' FlashAttention contract to
``transformers.masking_utils.AttentionMaskInterface``: a layer receives no
dense ``(B, 1, Lq, Lk)`` mask, only ``None`` (no padding) or the 2-D key
padding mask ``(B, Lk)`` of the batch, and the causal flag, the sliding
window and the soft-cap arrive as the layer's arguments.  fastattn then runs
the whole batch in one call: causal and window bottom-right aligned (the
queries are the last ``Lq`` of the keys, as with transformers' caches), the
padding mask read in place as a ``(B, 1, 1, Lk)`` view, grouped key/value
heads and the ``(B, H, L, D)`` layout read through their strides, no copies.

Mapped: ``attention_mask`` (2-D padding, bool), ``is_causal`` (else the
module's), ``scaling``, ``sliding_window`` (key ``j`` visible from query
position ``i`` iff ``i - sliding_window < j <= i``), ``softcap``, grouped
key/value heads, attention sinks (``s_aux``, one logit per head, as in
gpt-oss, trained with their gradient), float32, float64, float16 and
bfloat16, and ``dropout`` (models pass it while training, 0 in eval mode:
dropped inside the kernels, the seed drawn from torch's default
generator).  Several sequences packed into one batch row (padding-free
training) attend each within itself, as with transformers' FlashAttention:
their offsets are taken from ``cu_seq_lens_q``/``cu_seq_lens_k`` where the
collator passes them, otherwise from ``position_ids`` that restart within a
row (a new sequence wherever a position is not the one before it plus one,
as transformers' packed-sequence masks have it), and the batch runs as one
call of fastattn's varlen kernels (the rows read in place where their layout
allows; a single row always).  The call goes through the custom operator
``torch.ops.fastattn.attention`` (packed rows:
``torch.ops.fastattn.attention_varlen``), with a fake implementation and
fastattn's backward as its gradient, so
``torch.compile(model, fullgraph=True)`` traces it and training works.
"""
import torch

import fastattn.torch


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None,
                      softcap=None, is_causal=None, s_aux=None, **kwargs):
    """transformers' attention function signature: query (B, H, Lq, D), key
    and value (B, G, Lk, D|Dv); returns (output (B, Lq, H, Dv), None)."""
    if kwargs.get("output_attentions", False):
        raise ValueError("fastattn never forms the attention weights: output_attentions needs 'eager'")
    is_causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    packing = _packing(query, key, kwargs) if attention_mask is None else None
    mask = None
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"fastattn takes the 2-D padding mask (batch, keys) its mask function makes, got "
                             f"shape {tuple(attention_mask.shape)}")
        n = attention_mask.shape[1]
        if n < key.shape[2]:  # a static cache: keys past the mask are not filled yet
            key, value = key[:, :, :n], value[:, :, :n]
        mask = attention_mask[:, None, None, :].to(torch.bool)
    scaling = fastattn.torch._default_scale(query, scaling)
    # FlashAttention's window: (W - 1) keys back and, without causality, ahead
    left = int(sliding_window) - 1 if sliding_window else -1
    right = -1 if left < 0 else (0 if is_causal else left)
    if packing is not None:  # the rows' sequences as packed sequences, (B, H, L, D) as (B * L, H, D)
        b, h, lq = query.shape[:3]
        q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
        out, _ = fastattn.torch._varlen(q, k, v, *packing, float(scaling), is_causal, left, right,
                                        float(softcap) if softcap else None, True, None, s_aux, False, dropout)
        return out.view(b, lq, h, out.shape[-1]), None
    out, _ = fastattn.torch.attention(query, key, value, mask, is_causal, float(scaling), left, right,
                                      float(softcap or 0.0), True, s_aux, dropout_p=float(dropout or 0.0),
                                      need_lse=False, heads_last=True)
    return out, None


def _packing(query, key, kwargs):
    """The sequences packed in the rows of a call without a padding mask, as
    (cu_seqlens_q, cu_seqlens_k, position_ids) for fastattn.torch's varlen
    operator: the offsets transformers' padding-free collators pass
    (``cu_seq_lens_q`` and ``cu_seq_lens_k``), or position ids that restart
    within a row of as many queries as keys; None for one sequence per
    row.  While torch.compile traces, position ids always take the packed
    way (its operator finds the sequences), which gives the plain way's
    result where they do not restart."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        return cu_q, cu_k, None
    pos = kwargs.get("position_ids")
    b, _, lq = query.shape[:3]
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[0] not in (1, b) or pos.shape[1] != lq or \
            key.shape[2] != lq or lq < 2:
        return None
    pos = pos.expand(b, lq)
    if not torch.compiler.is_compiling() and not bool((pos[:, 1:] - pos[:, :-1] != 1).any()):
        return None
    return None, None, pos


def register(name="fastattn"):
    """Register fastattn with transformers under `name` (for
    ``attn_implementation=name``); returns the name."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("fastattn.transformers needs transformers: pip install 'fastattn[transformers]'") from exc
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
