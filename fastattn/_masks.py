"""Block masks: a mask classified once per 64 x 64 block, reused by every call.

The kernels visit keys in tiles of 64 (rows and keys).  Given a plain mask,
each call classifies the tiles it visits by reading the mask: a tile the mask
hides entirely is skipped, a tile it leaves alone runs unmasked, and only the
others read the mask as they go.  A BlockMask does the classification once
(`block_mask`) and carries its table of block kinds with the mask, so calls
(every head, layer and step that share the mask) read the table instead.
"""
import mmap

import numpy as np

from fastattn import _core
from fastattn import _validate as _v

BLOCK = _core.TILE_BLOCK


class BlockMask:
    """A mask and its table of block kinds (see :func:`fastattn.block_mask`).

    Attributes
    ----------
    mask : ndarray
        The mask (bool or float), read in place by the kernels
        where a block is mixed.  It must not change while the BlockMask is
        in use: the table describes it as it was.
    kinds : ndarray of uint8, shape mask.shape[:-2] + (row blocks, key blocks)
        ``BlockMask.HIDDEN`` (every key hidden), ``VISIBLE`` (none hidden and
        nothing added) or ``MIXED``; one row (key) block where the mask
        broadcasts along its rows (keys).
    """

    MIXED, HIDDEN, VISIBLE = _core.BLOCK_MIXED, _core.BLOCK_HIDDEN, _core.BLOCK_VISIBLE

    def __init__(self, mask, kinds):
        self.mask = mask
        self.kinds = kinds

    @property
    def shape(self):
        return self.mask.shape

    def density(self):
        """The fraction of blocks that are not hidden (the work left)."""
        return float(np.mean(self.kinds != self.HIDDEN)) if self.kinds.size else 0.0

    def __repr__(self):
        counts = {name: int(np.sum(self.kinds == k)) for name, k in
                  (("hidden", self.HIDDEN), ("visible", self.VISIBLE), ("mixed", self.MIXED))}
        return f"BlockMask(shape={self.shape}, dtype={self.mask.dtype}, blocks {counts})"


def _block_kinds(hidden, visible, n_blocks):
    """The kinds of one row block's key blocks, from which of its elements
    (rows on axis -2, keys on axis -1) are hidden and which visible."""
    def every(x):  # x holds for every element of each key block of BLOCK
        x = np.all(x, axis=-2)
        return np.logical_and.reduceat(x, np.arange(n_blocks) * BLOCK, axis=-1) if x.shape[-1] > 1 else x

    return np.where(every(hidden), BlockMask.HIDDEN, np.where(every(visible), BlockMask.VISIBLE, BlockMask.MIXED))


def _check_block(block):
    if block is not None and _v.integer(block, "block") != BLOCK:
        raise ValueError(f"block must be {BLOCK}, the kernels' tile (or None), got {block}")


def block_mask(mask, *, block=None):
    """Classify a mask once per 64 x 64 block, for reuse by every call.

    Pass the result as ``mask=`` to :func:`fastattn.attention` (also
    ``attention_backward`` and ``scores``, which read the plain mask): blocks
    the mask hides entirely are skipped without reading it, blocks it leaves
    alone (bool True, float +-0) run as if unmasked, and only mixed blocks
    read the mask.  Build it once for a mask shared by many heads, layers or
    steps (a document mask, a prefix-LM mask): the classification reads the
    whole mask, which otherwise each call would do again.

    Parameters
    ----------
    mask : array_like
        As :func:`fastattn.attention` takes it: bool (True = may attend) or
        float, 16 to 64 bits (added; -inf hides), broadcastable to
        ``(..., Lq, Lk)``.  Kept by reference: it must not change afterwards.
    block : int, optional
        The block size, 64 (the kernels' tile; the default).

    Returns
    -------
    BlockMask
    """
    _check_block(block)
    if isinstance(mask, BlockMask):
        return mask
    m = _v.as_array(mask, "mask", _v.MASK_NAMES, _v.MASK_KINDS)
    if m.ndim < 2:
        m = m.reshape((1,) * (2 - m.ndim) + m.shape)
    rows, keys = m.shape[-2:]
    nq, nk = -(-rows // BLOCK), -(-keys // BLOCK)
    kinds = np.empty(m.shape[:-2] + (nq, nk), dtype=np.uint8)
    for rb in range(nq):  # one row block at a time: temporaries of BLOCK rows
        sub = m[..., rb * BLOCK: (rb + 1) * BLOCK, :]
        if m.dtype == np.bool_:
            kinds[..., rb, :] = _block_kinds(~sub, sub, nk)
        else:
            kinds[..., rb, :] = _block_kinds(sub == -np.inf, sub == 0, nk)
    kinds.flags.writeable = False
    return BlockMask(m, kinds)


def _zeroed(shape):
    """A zeroed bool array whose pages the operating system provides on
    first write (an anonymous mapping: numpy's own large allocations may be
    backed by 2 MiB huge pages, which one write commits whole)."""
    n = int(np.prod(shape))
    if n == 0:
        return np.zeros(shape, dtype=bool)
    return np.frombuffer(mmap.mmap(-1, n), dtype=bool).reshape(shape)


def block_mask_from_function(fn, lq, lk, *, lead=(), block=None):
    """A BlockMask from a vectorised index predicate, like FlexAttention's ``mask_mod``.

    ``fn(*lead_idx, i, j)`` says whether query ``i`` may attend key ``j``
    (True) for the leading indices ``lead_idx`` (one per entry of ``lead``,
    e.g. batch and head): it is called with integer index arrays that
    broadcast against each other, one block of 64 query rows at a time
    (``i`` of shape ``(rows, 1)``, ``j`` of shape ``(1, lk)``, each lead
    index shaped to its own axis), and returns a bool array broadcastable to
    ``lead + (rows, lk)``.  Document masks, prefix-LM masks, dilated or
    strided patterns and their combinations are one line each.

    The predicate is evaluated everywhere (once), but only the blocks it
    does not hide entirely are written: the mask array is an anonymous
    zeroed mapping whose pages the operating system provides on first write,
    so the memory of hidden blocks (a 4 KiB page holds 4096 / lk rows' worth
    of one block row) is never touched, and the kernels never read it.

    Parameters
    ----------
    fn : callable
    lq, lk : int
        Query rows and keys.
    lead : tuple of int
        Leading dimensions of the mask (default none: one mask for every
        batch and head).
    block : int, optional
        64, the kernels' tile (the default).

    Returns
    -------
    BlockMask
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    _check_block(block)
    lq, lk = _v.count(lq, "lq", 0), _v.count(lk, "lk", 0)
    if not isinstance(lead, (tuple, list)):
        raise TypeError(f"lead must be a tuple of ints, got {lead!r}")
    lead = tuple(_v.count(n, "lead") for n in lead)
    nd = len(lead)
    nq, nk = -(-lq // BLOCK), -(-lk // BLOCK)
    mask = _zeroed(lead + (lq, lk))
    kinds = np.empty(lead + (nq, nk), dtype=np.uint8)
    lead_idx = [np.arange(n).reshape((1,) * a + (n,) + (1,) * (nd - a - 1 + 2)) for a, n in enumerate(lead)]
    j = np.arange(lk)[None, :]
    for rb in range(nq):
        r0, r1 = rb * BLOCK, min(lq, (rb + 1) * BLOCK)
        sub = np.asarray(fn(*lead_idx, np.arange(r0, r1)[:, None], j))
        if sub.dtype != np.bool_:
            raise TypeError(f"fn must return a bool array, got dtype {sub.dtype}")
        try:
            sub = np.broadcast_to(sub, lead + (r1 - r0, lk))
        except ValueError:
            raise ValueError(f"fn returned shape {sub.shape}, which does not broadcast to "
                             f"{lead + (r1 - r0, lk)} (lead + (rows, lk))") from None
        kinds[..., rb, :] = _block_kinds(~sub, sub, nk)
        seen = np.any(kinds[..., rb, :] != BlockMask.HIDDEN, axis=tuple(range(nd)))
        for kb in np.nonzero(seen)[0]:  # blocks some lead entry sees
            cols = slice(kb * BLOCK, min(lk, (kb + 1) * BLOCK))
            mask[..., r0:r1, cols] = sub[..., cols]
    kinds.flags.writeable = False
    return BlockMask(mask, kinds)
