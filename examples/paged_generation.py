"""Continuous batching over a paged KV cache, as an inference server runs it.

A tiny transformer with random weights (numpy; attention by fastattn) serves
8 requests of different prompt lengths that arrive at different steps.  At
every step, one batch: requests still reading their prompt prefill a chunk
of it, the others decode one token; each layer writes the step's keys and
values into the cache (`fastattn.cache_write`) and runs one
`fastattn.attention_paged` call for the whole batch.  A block allocator
hands out cache blocks as sequences grow and takes them back when a request
finishes.  Prints tokens per second with float32, bfloat16 and int8 caches.

    python examples/paged_generation.py [--steps N] [--threads N]
"""
import argparse
import time

import numpy as np

import fastattn

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 512, 256, 8, 2, 32, 2
BLOCK, NUM_BLOCKS, CHUNK = 16, 40, 32  # 40 blocks: finished requests' blocks are reused
# (arrival step, prompt length, new tokens)
REQUESTS = [(0, 40, 24), (0, 7, 30), (1, 90, 16), (2, 3, 40), (4, 64, 20), (5, 150, 12), (7, 20, 28), (9, 33, 18)]


class TinyModel:
    """Embedding + sinusoidal positions, LAYERS pre-norm blocks (grouped-query
    attention, a GELU MLP), a tied output projection; random weights."""

    def __init__(self, seed=0):
        rng = np.random.default_rng(seed)
        w = lambda *shape: (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)  # noqa: E731
        self.embed = rng.standard_normal((VOCAB, DIM)).astype(np.float32)
        self.layers = [dict(wq=w(DIM, HEADS * HEAD_DIM), wk=w(DIM, KV_HEADS * HEAD_DIM),
                            wv=w(DIM, KV_HEADS * HEAD_DIM), wo=w(HEADS * HEAD_DIM, DIM), w1=w(DIM, 4 * DIM),
                            w2=w(4 * DIM, DIM)) for _ in range(LAYERS)]

    def embed_tokens(self, tokens, positions):
        i = np.arange(DIM // 2)
        angle = positions[:, None] / 10000.0 ** (2 * i / DIM)
        return self.embed[tokens] + np.concatenate([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)

    def forward(self, tokens, positions, attend):
        """Logits of every token; attend(layer, q, k, v) does the attention."""
        x = self.embed_tokens(tokens, positions)
        for n, p in enumerate(self.layers):
            h = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6)
            q = (h @ p["wq"]).reshape(-1, HEADS, HEAD_DIM)
            k = (h @ p["wk"]).reshape(-1, KV_HEADS, HEAD_DIM)
            v = (h @ p["wv"]).reshape(-1, KV_HEADS, HEAD_DIM)
            x = x + attend(n, q, k, v).reshape(-1, HEADS * HEAD_DIM) @ p["wo"]
            h = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + 1e-6)
            a = h @ p["w1"]
            x = x + (0.5 * a * (1 + np.tanh(0.79788456 * (a + 0.044715 * a ** 3)))) @ p["w2"]
        return x @ self.embed.T


class PagedCache:
    """One paged cache per layer, of `dtype` (float32, bfloat16 or int8 with
    per-token scales), and the allocator of its blocks."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        shape = (NUM_BLOCKS, BLOCK, KV_HEADS, HEAD_DIM)
        self.k = [np.zeros(shape, self.dtype) for _ in range(LAYERS)]
        self.v = [np.zeros(shape, self.dtype) for _ in range(LAYERS)]
        int8 = self.dtype == np.int8
        self.k_scale = [np.zeros(shape[:3], np.float32) if int8 else None for _ in range(LAYERS)]
        self.v_scale = [np.zeros(shape[:3], np.float32) if int8 else None for _ in range(LAYERS)]
        self.free = list(range(NUM_BLOCKS))
        self.handed_out = 0  # blocks handed out so far, reuses counted

    def grow(self, blocks, length):
        while len(blocks) * BLOCK < length:
            blocks.append(self.free.pop())
            self.handed_out += 1

    def release(self, blocks):
        self.free.extend(blocks)
        blocks.clear()


def schedule(step, state):
    """The batch of one step: for each active request, the tokens it feeds
    (a prompt chunk or its last generated token)."""
    batch = []
    for r, (arrive, prompt, new) in enumerate(REQUESTS):
        s = state[r]
        if arrive > step or s["done"]:
            continue
        if s["fed"] < len(s["tokens"]):  # still reading the prompt
            batch.append((r, s["tokens"][s["fed"]: s["fed"] + CHUNK]))
        else:
            batch.append((r, s["tokens"][-1:]))
    return batch


def prompts(seed=1):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(0, VOCAB, prompt)) for _, prompt, _ in REQUESTS]


def run(model, steps, attention_for, threads):
    """The serving loop; attention_for(batch info) gives the layer attention.
    Returns every request's generated tokens and the tokens processed."""
    state = [dict(tokens=list(p), fed=0, generated=[], done=False) for p in prompts()]
    processed = 0
    for step in range(steps):
        batch = schedule(step, state)
        if not batch:
            continue
        tokens = np.concatenate([t for _, t in batch]).astype(np.int64)
        positions = np.concatenate([np.arange(state[r]["fed"], state[r]["fed"] + len(t)) for r, t in batch])
        logits = model.forward(tokens, positions, attention_for(batch, state, threads))
        ends = np.cumsum([len(t) for _, t in batch]) - 1
        for (r, t), end in zip(batch, ends):
            s = state[r]
            s["fed"] += len(t)
            if s["fed"] == len(s["tokens"]):  # the prompt is read: this step's last logits give a token
                tok = int(np.argmax(logits[end]))
                s["tokens"].append(tok)
                s["generated"].append(tok)
                if len(s["generated"]) == REQUESTS[r][2]:
                    s["done"] = True
        processed += len(tokens)
    return [s["generated"] for s in state], processed


def paged_attention(cache):
    """Layer attention over the paged cache: write the step's keys and
    values, then one attention_paged call for the whole batch."""
    tables = {}

    def attention_for(batch, state, threads):
        rows = []
        for r, t in batch:
            blocks = tables.setdefault(r, [])
            cache.grow(blocks, state[r]["fed"] + len(t))
            rows.append(blocks)
        seq_lens = np.array([state[r]["fed"] + len(t) for r, t in batch])
        table = np.zeros((len(batch), max(len(b) for b in rows)), dtype=np.int32)
        for i, b in enumerate(rows):
            table[i, : len(b)] = b
        cu = np.concatenate([[0], np.cumsum([len(t) for _, t in batch])])
        pos = np.concatenate([np.arange(state[r]["fed"], state[r]["fed"] + len(t)) for r, t in batch])
        slots = table[np.repeat(np.arange(len(batch)), np.diff(cu)), pos // BLOCK] * BLOCK + pos % BLOCK
        # requests whose last token this step gives: their blocks go back to the pool after it
        finished = [r for r, t in batch if len(state[r]["generated"]) == REQUESTS[r][2] - 1 and
                    state[r]["fed"] + len(t) == len(state[r]["tokens"])]

        def attend(n, q, k, v):
            fastattn.cache_write(k, v, cache.k[n], cache.v[n], slots, k_scale=cache.k_scale[n],
                                 v_scale=cache.v_scale[n])
            qc = q.astype(cache.dtype) if cache.dtype != np.int8 else q
            out = fastattn.attention_paged(qc, cache.k[n], cache.v[n], table, seq_lens, cu_seqlens_q=cu,
                                           k_scale=cache.k_scale[n], v_scale=cache.v_scale[n], num_threads=threads)
            if n == LAYERS - 1:
                for r in finished:
                    cache.release(tables.pop(r))
            return out.astype(np.float32)

        return attend

    return attention_for


def contiguous_attention():
    """The same loop with each sequence's keys and values in growing
    contiguous arrays and one fastattn.attention call per sequence."""
    kv = {}

    def attention_for(batch, state, threads):
        def attend(n, q, k, v):
            out, at = [], 0
            for r, t in batch:
                m = len(t)
                ks, vs = kv.get((r, n), (np.zeros((KV_HEADS, 0, HEAD_DIM), np.float32),) * 2)
                ks = np.concatenate([ks, k[at: at + m].transpose(1, 0, 2)], axis=1)
                vs = np.concatenate([vs, v[at: at + m].transpose(1, 0, 2)], axis=1)
                kv[(r, n)] = ks, vs
                o = fastattn.attention(q[at: at + m].transpose(1, 0, 2), ks, vs, causal=True, num_threads=threads)
                out.append(o.transpose(1, 0, 2))
                at += m
            return np.concatenate(out)

        return attend

    return attention_for


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    threads = args.threads or fastattn.get_num_threads()
    model = TinyModel()
    results = {}
    kinds = ["float32"] + (["bfloat16"] if BF16 is not None else []) + ["int8"]
    for kind in kinds:
        cache = PagedCache(BF16 if kind == "bfloat16" else kind)
        t0 = time.perf_counter()
        generated, processed = run(model, args.steps, paged_attention(cache), threads)
        dt = time.perf_counter() - t0
        results[kind] = generated
        print(f"{kind:>9} paged cache: {processed} tokens in {dt:.2f} s, {processed / dt:,.0f} tokens/s; "
              f"{sum(map(len, generated))} generated")
    same = sum(a == b for a, b in zip(results["float32"], results["int8"]))
    print(f"int8 cache: {same} of {len(REQUESTS)} requests generated the float32 cache's tokens")
    return results


if __name__ == "__main__":
    main()
