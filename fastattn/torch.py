"""PyTorch front end: ``scaled_dot_product_attention`` with torch's semantics.

``fastattn.torch.scaled_dot_product_attention`` takes and returns CPU
tensors without copying them (tensors and numpy arrays share memory both
ways) and follows ``torch.nn.functional.scaled_dot_product_attention``:
top-left causal alignment, bool masks (True = takes part) and float masks
(added), ``scale`` defaulting to ``1/sqrt(E)``, grouped heads only with
``enable_gqa=True``.  What it does not support raises an error instead of
silently differing: CUDA and other devices, ``dropout_p > 0``, tensors that
require grad while autograd is on.

``fastattn.torch.patch()`` routes a model's attention through fastattn::

    with fastattn.torch.patch():
        y = model(x)          # F.scaled_dot_product_attention now runs on fastattn

Inside the context, calls fastattn supports go to fastattn and all others
to torch's own function; leaving the context restores torch's function.
"""
import contextlib
import math

import numpy as np

import torch
import torch.nn.functional as F

from fastattn import _api

_DTYPES = (torch.float32, torch.float64)
_original_sdpa = F.scaled_dot_product_attention


def _unsupported(query, key, value, attn_mask, dropout_p):
    """Why fastattn cannot run this call, or None."""
    tensors = [("query", query), ("key", key), ("value", value)]
    if attn_mask is not None:
        tensors.append(("attn_mask", attn_mask))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if t.device.type != "cpu":
            return ValueError, f"{name} is on {t.device}; fastattn runs on CPU tensors only"
        if t.requires_grad and torch.is_grad_enabled():
            return ValueError, (f"{name} requires grad; fastattn has no backward pass "
                                "(use torch.no_grad() or torch.inference_mode())")
        if t.is_sparse or t.is_quantized or t.is_nested:
            return TypeError, f"{name} must be a dense tensor"
    for name, t in tensors[:3]:
        if t.dtype not in _DTYPES:
            return TypeError, f"{name} must be float32 or float64, got {t.dtype}"
    if attn_mask is not None and attn_mask.dtype not in (torch.bool,) + _DTYPES:
        return TypeError, f"attn_mask must be bool, float32 or float64, got {attn_mask.dtype}"
    if dropout_p != 0.0:
        return ValueError, f"dropout_p must be 0 (fastattn has no dropout), got {dropout_p}"
    return None


def _as_numpy(t):
    """A numpy view of a CPU tensor's memory (no copy)."""
    return t.detach().numpy()


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` on fastattn's kernels.

    Parameters
    ----------
    query : Tensor, shape (N, ..., L, E)
    key : Tensor, shape (N, ..., S, E)
    value : Tensor, shape (N, ..., S, Ev)
        CPU tensors, float32 or float64.
    attn_mask : Tensor, optional
        Broadcastable to (N, ..., L, S); bool (True = takes part in
        attention) or float (added to the scores).
    dropout_p : float
        Must be 0.
    is_causal : bool
        Top-left aligned, as torch: query i sees keys j <= i.
    scale : float, optional
        Default ``1/sqrt(E)``.
    enable_gqa : bool
        Allow query heads (dim -3) to be a multiple of key/value heads.

    Returns
    -------
    Tensor, shape (N, ..., L, Ev)
        Shares memory with the numpy array fastattn wrote.  A query row that
        may see no key gives zeros (as torch's CPU kernel does).
    """
    problem = _unsupported(query, key, value, attn_mask, dropout_p)
    if problem is not None:
        exc, msg = problem
        raise exc(msg)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hk = key.shape[-3] if key.dim() >= 3 else 1
    if hq != hk and not enable_gqa and hk != 1:
        raise ValueError(f"query has {hq} heads and key {hk}: pass enable_gqa=True for grouped-query "
                         "attention (as in torch)")
    # the grouped-query rule itself (H a multiple of G) is fastattn's own, checked by attention()
    q, k, v = (_as_numpy(t) for t in (query, key, value))
    mask = _as_numpy(attn_mask) if attn_mask is not None else None
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0
    out = _api.attention(q, k, v, scale=scale, causal=bool(is_causal), mask=mask, align="top-left")
    return torch.from_numpy(out)


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
    if _unsupported(query, key, value, attn_mask, dropout_p) is None and not (is_causal and attn_mask is not None):
        return scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                            is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def patch():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through fastattn.

    Calls fastattn supports run on fastattn; the rest (CUDA tensors,
    dropout, autograd) run on torch's own function.  On exit torch's
    function is restored, also when the body raises.
    """
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _routed_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved
