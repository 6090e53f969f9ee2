"""PyTorch front end: ``scaled_dot_product_attention`` with torch's semantics.

``fastattn.torch.scaled_dot_product_attention`` takes and returns CPU
tensors without copying them (tensors and numpy arrays share memory both
ways) and follows ``torch.nn.functional.scaled_dot_product_attention``:
top-left causal alignment, bool masks (True = takes part) and float masks
(added), ``scale`` defaulting to ``1/sqrt(E)``, grouped heads only with
``enable_gqa=True``.  It supports autograd: it is the custom operator
``torch.ops.fastattn.attention`` (with a fake implementation, so
``torch.compile(..., fullgraph=True)`` traces it) whose gradient is the
custom operator ``torch.ops.fastattn.attention_backward``, fastattn's
FlashAttention-2 backward; float masks (a learned bias) and attention
sinks get their gradients, bool masks none.
``dropout_p > 0`` drops weights inside the kernels, forward and backward,
from a seed drawn from torch's default generator.  What it does not
support raises an error instead of silently differing: CUDA and other
devices.

``fastattn.torch.patch()`` routes a model's attention through fastattn::

    with fastattn.torch.patch():
        y = model(x)          # F.scaled_dot_product_attention now runs on fastattn

Inside the context, calls fastattn supports go to fastattn and all others
to torch's own function; leaving the context restores torch's function.
Training works the same way: gradients flow through fastattn's backward.

Calls through this module run on PyTorch's own OpenMP threads (at most
``torch.get_num_threads()`` of them), not on fastattn's pool: after each of
its parallel operations torch's threads spin for a while, holding the cores
that fastattn's workers would need (see :func:`share_threads`).
"""
import contextlib
import functools
import math
import os
from typing import Optional, Tuple

import numpy as np

import torch
import torch.nn.functional as F

from fastattn import _api, _config, _core, _masks, _problem, _threads, _validate

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_original_sdpa = F.scaled_dot_product_attention


def share_threads(enable=True):
    """Run the calls made through this module on PyTorch's OpenMP threads
    (or on fastattn's own pool).

    Inside a model, torch's OpenMP threads keep spinning for a while after
    each of torch's parallel operations; fastattn's workers, woken for an
    attention call in between, would wait for those cores (on a 16-core
    machine a decoding call between torch's matrix products took 0.69 ms
    on fastattn's pool, 0.25 ms on torch's threads).  Running fastattn's
    work on torch's threads avoids it: they are awake already.
    This is on from import when torch runs its parallel work on OpenMP
    (``torch.__config__.parallel_info()``) and the runtime exports
    ``GOMP_parallel`` (GNU's libgomp, as torch's wheels bundle, LLVM's and
    Intel's do); the environment variable ``FASTATTN_TORCH_THREADS=0``
    turns it off at import.  Results do not depend on it (they are the same
    for any thread count).  Calls through the numpy API stay on fastattn's
    pool.

    Parameters
    ----------
    enable : bool
        True: use torch's OpenMP threads if they can be found.  False:
        fastattn's own pool.

    Returns
    -------
    str or None
        Path of the OpenMP runtime the calls run on, None for the pool.
    """
    if not isinstance(enable, bool):
        raise TypeError(f"enable must be a bool, got {type(enable).__name__}")
    found = None
    if enable and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        found = _threads._openmp_runtime(prefer=os.path.dirname(torch.__file__))
    _core.set_host_openmp(*(found[1:] if found else (0, 0)))
    _threads._host_openmp = found[0] if found else None
    return _threads._host_openmp


def _on_torch_threads(fn):
    """fn, with the kernels it calls running on torch's OpenMP threads when
    share_threads has found them."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if _threads._host_openmp is None:
            return fn(*args, **kwargs)
        was = _core.host_calls(torch.get_num_threads())
        try:
            return fn(*args, **kwargs)
        finally:
            _core.host_calls(was)
    return run


def _unsupported(query, key, value, attn_mask, dropout_p):
    """Why fastattn cannot run this call, or None."""
    tensors = [("query", query), ("key", key), ("value", value)]
    if attn_mask is not None and not isinstance(attn_mask, _masks.BlockMask):
        tensors.append(("attn_mask", attn_mask))
    for name, t in tensors:
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"
        if not t.is_cpu:
            return ValueError, f"{name} is on {t.device}; fastattn runs on CPU tensors only"
        if t.layout is not torch.strided or t.is_quantized or t.is_nested:
            return TypeError, f"{name} must be a dense tensor"
    for name, t in tensors[:3]:
        if t.dtype not in _DTYPES:
            return TypeError, f"{name} must be float32, float64, float16 or bfloat16, got {t.dtype}"
    if len(tensors) == 4 and attn_mask.dtype not in (torch.bool,) + _DTYPES:
        return TypeError, f"attn_mask must be bool, float32, float64, float16 or bfloat16, got {attn_mask.dtype}"
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        return TypeError, f"dropout_p must be a float, got {type(dropout_p).__name__}"
    if not 0.0 <= dropout_p < 1.0:
        return ValueError, f"dropout_p must be in [0, 1), got {dropout_p}"
    return None


def _as_numpy(t):
    """A numpy view of a CPU tensor's memory (no copy); None and a BlockMask stay."""
    if t is None or isinstance(t, _masks.BlockMask):
        return t
    if t.requires_grad:
        t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy's bfloat16 is ml_dtypes': the same bits
        return t.view(torch.int16).numpy().view(_api.BFLOAT16)
    return t.numpy()


def _as_tensor(a):
    """A tensor sharing the memory of the numpy array a."""
    if a.dtype == _api.BFLOAT16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _lead(query, key, value, attn_mask):
    """The broadcast leading dimensions of the result (k/v head axes count as
    query's where they group query heads)."""
    q = tuple(query.shape[:-2])
    kv = [tuple(t.shape[:-2]) for t in (key, value)]
    if q:
        kv = [s[:-1] + (q[-1],) if s and s[-1] not in (1, q[-1]) else s for s in kv]
    mask = tuple(attn_mask.shape[:-2]) if attn_mask is not None else ()
    return tuple(torch.broadcast_shapes(q, *kv, mask))


def _window(window_left, window_right):
    """An operator's window bounds (-1 = unbounded) as fastattn's window."""
    return None if window_left < 0 and window_right < 0 else (window_left, window_right)


def _options(is_causal, scale, window_left, window_right, softcap, bottom_right, dropout_p=0.0, dropout_seed=None,
             sinks=None):
    """The op's scalar arguments (dropout's seed and the sinks too) as
    fastattn.attention's keywords."""
    return dict(scale=scale, causal=is_causal, window=_window(window_left, window_right),
                softcap=softcap if softcap > 0 else None, align="bottom-right" if bottom_right else "top-left",
                sinks=_as_numpy(sinks), **_dropout(dropout_p, dropout_seed))


def _dropout(dropout_p, dropout_seed):
    """An operator's dropout (its seed a 0-d int64 tensor) as the numpy
    API's keywords (which refuse dropout without a seed)."""
    return dict(dropout_p=dropout_p, dropout_seed=None if dropout_seed is None else int(dropout_seed))


def _dropout_seed(dropout_p):
    """A seed for a call's dropout, drawn from torch's default generator (so
    torch.manual_seed repeats it), as a 0-d tensor an operator takes (and
    torch.compile traces); None without dropout."""
    return torch.randint(0, 2**62, (), dtype=torch.int64) if dropout_p else None


# Problems of direct calls by their tensors' layouts and options, for calls
# with no mask or sinks on q, k and v of one dtype: a model calls attention
# with the same layouts every layer and every decoding step, and reaching
# the kernels through numpy views and the numpy API's checks costs more than
# a small call.  The first call of a key runs through the numpy API (which
# validates it); later ones rerun its problem on their own tensors.
_DIRECT_MAX = 256
_direct = {}


def _direct_key(query, key, value, options, return_lse, heads_last):
    """The _direct key of a call, or None if the call cannot take that way."""
    for t in (query, key, value):
        if not t.is_cpu or t.layout is not torch.strided or t.is_nested:
            return None
    if not query.dtype is key.dtype is value.dtype:
        return None
    return (query.dtype, query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), options,
            return_lse, heads_last, _config.path_index())


def _direct_run(hit, query, key, value, return_lse):
    """(out, lse) of a call of a layout in _direct: its problem rerun on these tensors."""
    template, out_shape, lse_shape, lse_dtype = hit
    out = torch.empty(*out_shape, dtype=query.dtype)  # (a shape as one argument takes longer)
    lse = torch.empty(*lse_shape, dtype=lse_dtype) if return_lse else None
    _problem.rerun(template, _config.resolve_threads(None), query, key, value, out, lse)
    return out, lse


_direct_run_on_torch_threads = _on_torch_threads(_direct_run)


@_on_torch_threads
def _attention_impl(query, key, value, attn_mask, is_causal, scale, window_left, window_right, softcap,
                    bottom_right, dropout_p=0.0, dropout_seed=None, sinks=None, return_lse=True, heads_last=False):
    """(out, lse) of fastattn.attention on tensors (lse None unless
    return_lse); with heads_last, out is (..., Lq, H, Dv), the head axis
    after the queries' (written so by the kernel, not transposed after)."""
    heads_last = heads_last and query.dim() >= 3
    dkey = None
    if attn_mask is None and sinks is None and not dropout_p:
        dkey = _direct_key(query, key, value, (is_causal, scale, window_left, window_right, softcap, bottom_right),
                           return_lse, heads_last)
        hit = _direct.get(dkey) if dkey is not None else None
        if hit is not None:
            return _direct_run(hit, query, key, value, return_lse)
    out = None
    if heads_last and query.dtype is key.dtype is value.dtype:
        lead = _lead(query, key, value, attn_mask)
        out = torch.empty(lead[:-1] + (query.shape[-2], lead[-1], value.shape[-1]), dtype=query.dtype)
    res, template = _api.attention_planned(
        *(_as_numpy(t) for t in (query, key, value)), mask=_as_numpy(attn_mask), weights="softmax",
        alibi_slopes=None, return_lse=return_lse, out=None if out is None else _as_numpy(out.transpose(-2, -3)),
        num_threads=None, **_options(is_causal, scale, window_left, window_right, softcap, bottom_right, dropout_p,
                                     dropout_seed, sinks))
    res, lse = (res if return_lse else (res, None))
    if out is None:
        out = _as_tensor(res)
        if heads_last:
            out = out.transpose(-2, -3).contiguous()
    lse = None if lse is None else _as_tensor(lse)
    if template is not None and dkey is not None:
        _api._keep_plan(_direct, dkey, (template, tuple(out.shape), None if lse is None else tuple(lse.shape),
                                        None if lse is None else lse.dtype), _DIRECT_MAX)
    return out, lse


@torch.library.custom_op("fastattn::attention", mutates_args=(), device_types="cpu")
def _attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
                  is_causal: bool, scale: float, window_left: int = -1, window_right: int = -1,
                  softcap: float = 0.0, bottom_right: bool = False, dropout_p: float = 0.0,
                  dropout_seed: Optional[torch.Tensor] = None,
                  sinks: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """fastattn.attention on tensors: (out, lse).  Causal, window and the
    mask align top-left (torch's convention) unless bottom_right; dropout's
    seed is a 0-d int64 tensor (_dropout_seed); sinks, one per query head,
    get their gradient, and so does a float mask that requires one."""
    return _attention_impl(query, key, value, attn_mask, is_causal, scale, window_left, window_right, softcap,
                           bottom_right, dropout_p, dropout_seed, sinks)


@_attention_op.register_fake
def _attention_fake(query, key, value, attn_mask, is_causal, scale, window_left=-1, window_right=-1, softcap=0.0,
                    bottom_right=False, dropout_p=0.0, dropout_seed=None, sinks=None):
    lead = _lead(query, key, value, attn_mask)
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query.new_empty(lead + (query.shape[-2], value.shape[-1])),
            query.new_empty(lead + (query.shape[-2],), dtype=lse_dtype))


@torch.library.custom_op("fastattn::attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, attn_mask: Optional[torch.Tensor], is_causal: bool,
                           scale: float, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                           bottom_right: bool = False, dropout_p: float = 0.0,
                           dropout_seed: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                           mask_grad: bool = False
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastattn.attention_backward on tensors: (dq, dk, dv, dsinks, dmask),
    dsinks empty without sinks, dmask (the float mask's gradient) empty
    unless mask_grad."""
    return _attention_backward_impl(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, window_left,
                                    window_right, softcap, bottom_right, dropout_p, dropout_seed, sinks, mask_grad)


@_on_torch_threads
def _attention_backward_impl(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, window_left,
                             window_right, softcap, bottom_right, dropout_p, dropout_seed, sinks, mask_grad):
    grads = _api.attention_backward(*(_as_numpy(t) for t in (grad_out, query, key, value, out, lse)),
                                    mask=_as_numpy(attn_mask), return_dsinks=sinks is not None,
                                    return_dmask=mask_grad,
                                    **_options(is_causal, scale, window_left, window_right, softcap, bottom_right,
                                               dropout_p, dropout_seed, sinks))
    dmask = _as_tensor(grads[-1]) if mask_grad else query.new_empty(0)
    return _gradient_tensors(grads[:-1] if mask_grad else grads, query, sinks) + (dmask,)


def _gradient_tensors(grads, query, sinks):
    """(dq, dk, dv, dsinks) as tensors from the numpy API's gradients:
    dsinks in the sinks' dtype, empty without sinks."""
    dsinks = torch.from_numpy(np.asarray(grads[3])).to(sinks.dtype) if sinks is not None else query.new_empty(0)
    return tuple(_as_tensor(g) for g in grads[:3]) + (dsinks,)


def _gradient_fakes(query, key, value, sinks):
    return (torch.empty_like(query), torch.empty_like(key), torch.empty_like(value),
            torch.empty_like(sinks) if sinks is not None else query.new_empty(0))


@_attention_backward_op.register_fake
def _attention_backward_fake(grad_out, query, key, value, out, lse, attn_mask, is_causal, scale, window_left=-1,
                             window_right=-1, softcap=0.0, bottom_right=False, dropout_p=0.0, dropout_seed=None,
                             sinks=None, mask_grad=False):
    return _gradient_fakes(query, key, value, sinks) + (
        torch.empty_like(attn_mask) if mask_grad else query.new_empty(0),)


def attention(query, key, value, attn_mask, is_causal, scale, window_left=-1, window_right=-1, softcap=0.0,
              bottom_right=False, sinks=None, *, dropout_p=0.0, need_lse=True, heads_last=False):
    """``torch.ops.fastattn.attention`` (out, lse), called directly where no
    operator is needed: when torch.compile traces, or when a gradient may be
    needed, the call goes through the operator (its fake implementation and
    its autograd formula); otherwise straight to fastattn, which saves the
    dispatcher's ~0.1 ms per call (decoding calls attention once per layer
    and token).  With need_lse=False a direct call does not compute the
    log-sum-exp and returns (out, None).  With heads_last, out is
    (..., Lq, H, Dv) (the layout transformers' attention functions return),
    written so by the kernel on a direct call.  With dropout_p > 0, the
    seed is drawn from torch's default generator (_dropout_seed)."""
    seed = _dropout_seed(dropout_p)
    if _through_operator(query, key, value, sinks, attn_mask if isinstance(attn_mask, torch.Tensor) else None):
        if isinstance(attn_mask, _masks.BlockMask):  # the operator takes tensors: the mask, classified per call
            attn_mask = torch.from_numpy(attn_mask.mask)
        out, lse = torch.ops.fastattn.attention(query, key, value, attn_mask, is_causal, scale, window_left,
                                                window_right, softcap, bottom_right, dropout_p, seed, sinks)
        if heads_last and out.dim() >= 3:
            out = out.transpose(-2, -3).contiguous()
        return out, lse
    return _attention_impl(query, key, value, attn_mask, is_causal, scale, window_left, window_right, softcap,
                           bottom_right, dropout_p, seed, sinks, need_lse, heads_last)


def _through_operator(*tensors):
    """Must a call on these tensors (None allowed) go through its operator:
    while torch.compile traces, or where a gradient may be needed?"""
    return torch.compiler.is_compiling() or (
        torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask = inputs[:4]
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, attn_mask)
    ctx.options = inputs[4:]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse, attn_mask = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    mask_grad = ctx.needs_input_grad[3]  # a float mask that requires grad (a learned bias)
    dq, dk, dv, dsinks, dmask = torch.ops.fastattn.attention_backward(grad_out, query, key, value, out, lse,
                                                                      attn_mask, *ctx.options, mask_grad)
    # no gradient for the scalar options; the mask where it needs one, the sinks (the last input) theirs
    return (dq, dk, dv, dmask if mask_grad else None) + (None,) * (len(ctx.options) - 1) + \
        (_sinks_gradient(ctx, dsinks),)


def _sinks_gradient(ctx, dsinks):
    """The sinks' gradient where the sinks (an operator's last input) need one."""
    return dsinks if ctx.needs_input_grad[-1] else None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` on fastattn's kernels.

    Parameters
    ----------
    query : Tensor, shape (N, ..., L, E)
    key : Tensor, shape (N, ..., S, E)
    value : Tensor, shape (N, ..., S, Ev)
        CPU tensors, float32, float64, float16 or bfloat16 (16-bit inputs
        are computed in float32 and give 16-bit outputs and gradients).
    attn_mask : Tensor or fastattn.BlockMask, optional
        Broadcastable to (N, ..., L, S); bool (True = takes part in
        attention) or float (added to the scores; any of the four float
        dtypes, a 16-bit model's own included, read in place; one that
        requires grad, a learned bias, gets its gradient in its dtype); or a
        :func:`fastattn.block_mask` (its table is used where no gradient is
        needed; with autograd or torch.compile, its mask).
    dropout_p : float
        Dropout on the attention weights (training), in [0, 1): each call
        draws its seed from torch's default generator, so
        ``torch.manual_seed`` repeats it, and the backward drops the same
        weights.  Which weights are dropped is fastattn's own hash of the
        seed and the weight's place (:func:`fastattn.reference.dropout_keep`),
        not torch's generator's stream.
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
    out = _sdpa_direct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if out is not None:
        return out
    return _sdpa_checked(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _sdpa_checked(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """scaled_dot_product_attention through every check of its arguments."""
    problem = _unsupported(query, key, value, attn_mask, dropout_p)
    if problem is not None:
        exc, msg = problem
        raise exc(msg)
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
    heads = _ungrouped_heads(query, key, enable_gqa)
    if heads:
        raise ValueError(f"query has {heads[0]} heads and key {heads[1]}: pass enable_gqa=True for grouped-query "
                         "attention (as in torch)")
    # the grouped-query rule itself (H a multiple of G) is fastattn's own, checked by attention()
    return attention(query, key, value, attn_mask, bool(is_causal), float(_default_scale(query, scale)),
                     dropout_p=float(dropout_p), need_lse=False)[0]


def _ungrouped_heads(query, key, enable_gqa):
    """(query heads, key heads) where they differ without enable_gqa and key's
    are not broadcast (torch's rule), else None."""
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hk = key.shape[-3] if key.dim() >= 3 else 1
    return (hq, hk) if hq != hk and not enable_gqa and hk != 1 else None


def _default_scale(query, scale=None):
    """scale, or by default 1/sqrt(E) of query (..., L, E) (1 for E = 0)."""
    if scale is not None:
        return scale
    return 1.0 / math.sqrt(query.shape[-1]) if query.shape[-1] else 1.0


def _sdpa_direct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The output of a scaled_dot_product_attention call without a mask or a
    gradient whose layout and options a call before ran through every check
    (_direct), or None: such a call skips the checks (a fifth of a small
    call's time), all of which the layout and options decide but the
    grouped-heads rule, checked here."""
    if attn_mask is not None or type(dropout_p) not in (float, int) or dropout_p != 0 or \
            not type(query) is type(key) is type(value) is torch.Tensor or _through_operator(query, key, value) or \
            _ungrouped_heads(query, key, enable_gqa):
        return None
    options = (bool(is_causal), float(_default_scale(query, scale)), -1, -1, 0.0, False)
    dkey = _direct_key(query, key, value, options, False, False)
    hit = _direct.get(dkey) if dkey is not None else None
    return None if hit is None else _direct_run_on_torch_threads(hit, query, key, value, False)[0]


def _routed_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
    out = _sdpa_direct(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if out is not None:
        return out
    if _unsupported(query, key, value, attn_mask, dropout_p) is None and not (is_causal and attn_mask is not None):
        return _sdpa_checked(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return _original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


@contextlib.contextmanager
def patch():
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through fastattn.

    Calls fastattn supports run on fastattn (with autograd and dropout);
    the rest (CUDA tensors, other dtypes) run on torch's own function.  On
    exit torch's function is restored, also when the body raises.
    """
    saved = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _routed_sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = saved


# ---- packed variable-length sequences -------------------------------------------------

def _packed_outputs(query, dv):
    """Empty (out, lse) of a call on packed rows: query (total_q, H, D), out
    (total_q, H, dv), lse (H, total_q)."""
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    return (query.new_empty(tuple(query.shape[:-1]) + (dv,)),
            query.new_empty((query.shape[1], query.shape[0]), dtype=lse_dtype))


def _packed_offsets(position_ids, total):
    """The offsets (int64, (n + 1,)) of the sequences packed in the rows of
    position_ids (a numpy array (rows, L), rows * L == total): a sequence
    begins at each row's start and wherever a position is not the one
    before it plus one (the rule of transformers' packed-sequence masks)."""
    if position_ids.ndim != 2 or position_ids.dtype.kind not in "iu" or position_ids.size != total:
        raise ValueError(f"position_ids must be an integer tensor (rows, L) with rows * L = {total} (the "
                         f"packed query rows), got {position_ids.dtype} of shape {position_ids.shape}")
    pos = position_ids.astype(np.int64)
    starts = np.ones(pos.shape, dtype=bool)
    starts[:, 1:] = pos[:, 1:] - pos[:, :-1] != 1
    return np.append(np.flatnonzero(starts), total)


def _varlen_arguments(query, key, value, cu_seqlens_q, cu_seqlens_k, position_ids, scale, causal, window_left,
                      window_right, softcap, bottom_right, alibi_slopes, dropout_p, dropout_seed, sinks):
    """fastattn.attention_varlen's arguments as numpy arrays, keywords
    included; the offsets come from position_ids where given."""
    a = _numpy_args(q=query, k=key, v=value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    alibi_slopes=alibi_slopes, sinks=sinks)
    if position_ids is not None:
        a["cu_seqlens_q"] = a["cu_seqlens_k"] = _packed_offsets(_as_numpy(position_ids), query.shape[0])
    a.update(scale=scale, causal=causal, window=_window(window_left, window_right), softcap=softcap,
             align="bottom-right" if bottom_right else "top-left", **_dropout(dropout_p, dropout_seed))
    return a


@_on_torch_threads
def _attention_varlen_impl(query, key, value, cu_seqlens_q, cu_seqlens_k, position_ids, scale, causal, window_left,
                           window_right, softcap, bottom_right, alibi_slopes, dropout_p, dropout_seed, sinks,
                           return_lse=True):
    res = _api.attention_varlen(**_varlen_arguments(
        query, key, value, cu_seqlens_q, cu_seqlens_k, position_ids, scale, causal, window_left, window_right,
        softcap, bottom_right, alibi_slopes, dropout_p, dropout_seed, sinks), return_lse=return_lse)
    out, lse = res if return_lse else (res, None)
    return _as_tensor(out), None if lse is None else _as_tensor(lse)


@torch.library.custom_op("fastattn::attention_varlen", mutates_args=(), device_types="cpu")
def _attention_varlen_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                         position_ids: Optional[torch.Tensor], scale: Optional[float], causal: bool,
                         window_left: int, window_right: int, softcap: Optional[float], bottom_right: bool,
                         alibi_slopes: Optional[torch.Tensor], dropout_p: float, dropout_seed: Optional[torch.Tensor],
                         sinks: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """fastattn.attention_varlen on tensors: (out, lse).  The sequences are
    given by their offsets or, where position_ids is given, by the
    positions of the packed rows (_packed_offsets)."""
    return _attention_varlen_impl(query, key, value, cu_seqlens_q, cu_seqlens_k, position_ids, scale, causal,
                                  window_left, window_right, softcap, bottom_right, alibi_slopes, dropout_p,
                                  dropout_seed, sinks)


@_attention_varlen_op.register_fake
def _attention_varlen_fake(query, key, value, cu_seqlens_q, cu_seqlens_k, position_ids, scale, causal, window_left,
                           window_right, softcap, bottom_right, alibi_slopes, dropout_p, dropout_seed, sinks):
    return _packed_outputs(query, value.shape[-1])


@torch.library.custom_op("fastattn::attention_varlen_backward", mutates_args=(), device_types="cpu")
def _attention_varlen_backward_op(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                                  value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                  cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                                  position_ids: Optional[torch.Tensor], scale: Optional[float], causal: bool,
                                  window_left: int, window_right: int, softcap: Optional[float],
                                  bottom_right: bool, alibi_slopes: Optional[torch.Tensor], dropout_p: float,
                                  dropout_seed: Optional[torch.Tensor], sinks: Optional[torch.Tensor]
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """fastattn.attention_varlen_backward on tensors: (dq, dk, dv, dsinks),
    dsinks empty without sinks."""
    return _attention_varlen_backward_impl(grad_out, query, key, value, out, lse, cu_seqlens_q, cu_seqlens_k,
                                           position_ids, scale, causal, window_left, window_right, softcap,
                                           bottom_right, alibi_slopes, dropout_p, dropout_seed, sinks)


@_on_torch_threads
def _attention_varlen_backward_impl(grad_out, query, key, value, out, lse, *options):
    a = _varlen_arguments(query, key, value, *options)
    sinks = options[-1]
    grads = _api.attention_varlen_backward(_as_numpy(grad_out), a.pop("q"), a.pop("k"), a.pop("v"), _as_numpy(out),
                                           _as_numpy(lse), a.pop("cu_seqlens_q"), a.pop("cu_seqlens_k"),
                                           return_dsinks=sinks is not None, **a)
    return _gradient_tensors(grads, query, sinks)


@_attention_varlen_backward_op.register_fake
def _attention_varlen_backward_fake(grad_out, query, key, value, out, lse, *options):
    return _gradient_fakes(query, key, value, options[-1])


def _varlen_setup_context(ctx, inputs, output):
    query, key, value = inputs[:3]
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.options = inputs[3:]
    ctx.mark_non_differentiable(lse)


def _varlen_backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dsinks = torch.ops.fastattn.attention_varlen_backward(grad_out, query, key, value, out, lse,
                                                                      *ctx.options)
    # no gradient for the offsets, the slopes, the seed and the scalar options; the sinks (the last input) get theirs
    return (dq, dk, dv) + (None,) * (len(ctx.options) - 1) + (_sinks_gradient(ctx, dsinks),)


_attention_varlen_op.register_autograd(_varlen_backward, setup_context=_varlen_setup_context)


def _varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, position_ids, scale, causal, window_left, window_right,
            softcap, bottom_right, alibi_slopes, sinks, return_lse, dropout_p=0.0):
    """(out, lse) of the packed sequences (lse None unless return_lse):
    through the operator when torch.compile traces or a gradient may be
    needed (as in attention()), straight to fastattn otherwise; dropout's
    seed drawn as attention() draws it."""
    args = (query, key, value, cu_seqlens_q, cu_seqlens_k, position_ids, scale, causal, window_left, window_right,
            softcap, bottom_right, alibi_slopes, dropout_p, _dropout_seed(dropout_p), sinks)
    if _through_operator(query, key, value, sinks):
        return torch.ops.fastattn.attention_varlen(*args)
    return _attention_varlen_impl(*args, return_lse=return_lse)


def attention_varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, *, scale=None, causal=False, window=None,
                     softcap=None, alibi_slopes=None, sinks=None, align="bottom-right", dropout_p=0.0,
                     return_lse=False):
    """:func:`fastattn.attention_varlen` on CPU tensors, with autograd.

    Packed sequences without padding, as FlashAttention's
    ``flash_attn_varlen_func`` takes them: query ``(total_q, H, D)``, key
    and value ``(total_k, G, D|Dv)``, the sequences' int32 or int64 offsets
    ``cu_seqlens_q`` and ``cu_seqlens_k`` ``(batch + 1,)``; causal, window
    and ALiBi aligned per sequence, ``align`` "bottom-right" (the default)
    or "top-left".  The tensors are read in place.  It is the custom
    operator ``torch.ops.fastattn.attention_varlen``, whose gradient is
    fastattn's varlen backward (``torch.ops.fastattn.attention_varlen_backward``),
    so ``torch.compile(..., fullgraph=True)`` traces it and training on
    packed batches works; sinks get their gradient, offsets and slopes
    none.  Calls needing no gradient go to fastattn directly.  dropout_p
    as in :func:`scaled_dot_product_attention` (its seed from torch's
    default generator).

    Returns
    -------
    Tensor, shape (total_q, H, Dv)
        With return_lse, ``(out, lse)``, lse of shape (H, total_q).
    """
    _tensor_args(query=query, key=key, value=value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                 alibi_slopes=alibi_slopes, sinks=sinks)
    for name, t in (("query", query), ("key", key), ("value", value), ("cu_seqlens_q", cu_seqlens_q),
                    ("cu_seqlens_k", cu_seqlens_k)):
        if t is None:
            raise TypeError(f"{name} must be a torch.Tensor, got None")
    if align not in ("bottom-right", "top-left"):
        raise ValueError(f"align must be 'bottom-right' or 'top-left', got {align!r}")
    left, right = _validate.window(window)
    dropout_p, _ = _validate.dropout(dropout_p, 0)
    out, lse = _varlen(query, key, value, cu_seqlens_q, cu_seqlens_k, None, scale, causal, left, right, softcap,
                       align == "bottom-right", alibi_slopes, sinks, return_lse, dropout_p)
    return (out, lse) if return_lse else out


# ---- paged KV caches (serving) -------------------------------------------------------

# torch's float8 dtypes (those this torch has) and ml_dtypes' names for them
_FLOAT8 = {getattr(torch, n): n for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)}


def _on_cpu(name, t):
    if not t.is_cpu:  # (t.device makes a device object: slower)
        raise ValueError(f"{name} is on {t.device}; fastattn runs on CPU tensors only")


def _numpy_args(**tensors):
    """Numpy views of the tensor arguments of the paged and packed
    functions, by name (float8 as ml_dtypes' types); None and anything not
    a tensor are left to the numpy API to check."""
    views = {}
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            _on_cpu(name, t)
            if t.dtype in _FLOAT8:
                import ml_dtypes

                t = t.detach().view(torch.uint8).numpy().view(getattr(ml_dtypes, _FLOAT8[t.dtype]))
            else:
                t = _as_numpy(t)
        views[name] = t
    return views


@_on_torch_threads
def _attention_paged_impl(query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, causal, window_left,
                          window_right, softcap, alibi_slopes, sinks, k_scale, v_scale):
    a = _numpy_args(query=query, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                    cu_seqlens_q=cu_seqlens_q, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale,
                    v_scale=v_scale)
    out, lse = _api.attention_paged(a.pop("query"), **a, scale=scale, causal=causal,
                                    window=_window(window_left, window_right), softcap=softcap, return_lse=True)
    return _as_tensor(out), _as_tensor(lse)


@torch.library.custom_op("fastattn::attention_paged", mutates_args=(), device_types="cpu")
def _attention_paged_op(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], scale: Optional[float],
                        causal: bool, window_left: int, window_right: int, softcap: Optional[float],
                        alibi_slopes: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
                        k_scale: Optional[torch.Tensor],
                        v_scale: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """fastattn.attention_paged on tensors: (out, lse)."""
    return _attention_paged_impl(query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, causal,
                                 window_left, window_right, softcap, alibi_slopes, sinks, k_scale, v_scale)


@_attention_paged_op.register_fake
def _attention_paged_fake(query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, causal, window_left,
                          window_right, softcap, alibi_slopes, sinks, k_scale, v_scale):
    return _packed_outputs(query, v_cache.shape[-1])


def _cache_write_impl(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    a = _numpy_args(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                    k_scale=k_scale, v_scale=v_scale)
    _api.cache_write(a.pop("key"), a.pop("value"), **a)


@torch.library.custom_op("fastattn::cache_write", mutates_args=("k_cache", "v_cache", "k_scale", "v_scale"),
                         device_types="cpu")
def _cache_write_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, k_scale: Optional[torch.Tensor],
                    v_scale: Optional[torch.Tensor]) -> None:
    """fastattn.cache_write on tensors, in place (int8 caches: their scales too)."""
    _cache_write_impl(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


@_cache_write_op.register_fake
def _cache_write_fake(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale):
    return None


def _scale_tensor(s):
    """A float scale (a float8 cache's, per tensor) as a one-element tensor."""
    return torch.tensor([s], dtype=torch.float32) if isinstance(s, (int, float)) and not isinstance(s, bool) else s


def _tensor_args(**tensors):
    """Each argument None or a CPU tensor (checked before the operator: a
    tensor on another device would reach its fake implementation)."""
    for name, t in tensors.items():
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t is not None:
            _on_cpu(name, t)


def attention_paged(query, k_cache, v_cache, block_table, seq_lens, *, cu_seqlens_q=None, scale=None, causal=True,
                    window=None, softcap=None, alibi_slopes=None, sinks=None, k_scale=None, v_scale=None,
                    return_lse=False):
    """:func:`fastattn.attention_paged` on CPU tensors (the caches are read in place).

    The arguments are those of :func:`fastattn.attention_paged`, as tensors
    (float8 caches as ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``;
    their per-tensor scales as floats or one-element tensors).  It is the
    custom operator ``torch.ops.fastattn.attention_paged``, so
    ``torch.compile(..., fullgraph=True)`` traces it; eager calls go to
    fastattn directly.  No gradients (inference).

    Returns
    -------
    Tensor, shape (total_q, H, Dv)
        With return_lse, ``(out, lse)``, lse of shape (H, total_q).
    """
    k_scale, v_scale = _scale_tensor(k_scale), _scale_tensor(v_scale)
    _tensor_args(query=query, k_cache=k_cache, v_cache=v_cache, block_table=block_table, seq_lens=seq_lens,
                 cu_seqlens_q=cu_seqlens_q, alibi_slopes=alibi_slopes, sinks=sinks, k_scale=k_scale,
                 v_scale=v_scale)
    left, right = _validate.window(window)
    args = (query, k_cache, v_cache, block_table, seq_lens, cu_seqlens_q, scale, causal, left, right, softcap,
            alibi_slopes, sinks, k_scale, v_scale)
    if torch.compiler.is_compiling():
        out, lse = torch.ops.fastattn.attention_paged(*args)
    else:
        out, lse = _attention_paged_impl(*args)
    return (out, lse) if return_lse else out


def cache_write(key, value, k_cache, v_cache, slot_mapping, *, k_scale=None, v_scale=None):
    """:func:`fastattn.cache_write` on CPU tensors: writes into the tensors' memory.

    The custom operator ``torch.ops.fastattn.cache_write`` (it mutates the
    caches and, for int8 caches, their scales), so ``torch.compile`` traces
    it; eager calls go to fastattn directly.
    """
    k_scale, v_scale = _scale_tensor(k_scale), _scale_tensor(v_scale)
    _tensor_args(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                 k_scale=k_scale, v_scale=v_scale)
    if torch.compiler.is_compiling():
        torch.ops.fastattn.cache_write(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)
    else:
        _cache_write_impl(key, value, k_cache, v_cache, slot_mapping, k_scale, v_scale)


if os.environ.get("FASTATTN_TORCH_THREADS", "1").strip().lower() not in ("0", "false", "no", "off"):
    share_threads(True)
