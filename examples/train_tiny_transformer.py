"""Train a small transformer language model on synthetic data on the CPU,
once with its attention on fastattn and once on torch's own SDPA, from the
same seed; print both loss curves and the time per step.

    python examples/train_tiny_transformer.py [--steps 300] [--length 256]

The data: sequences over a small vocabulary that repeat their first 8
random tokens, each later token replaced by noise 10% of the time, so the
loss can fall from log(vocab) towards the noise floor only by attending 8
positions back.
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn.torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_transformer_block import Block  # noqa: E402  (the same block, attention passed in)


class TinyLM(nn.Module):
    def __init__(self, attention, vocab=64, dim=128, heads=8, kv_heads=2, layers=2, length=256):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(0.02 * torch.randn(length, dim))
        self.blocks = nn.ModuleList(Block(dim, heads, kv_heads, attention) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


PERIOD = 8


def batch(gen, size, length, vocab):
    """Token t = token t - PERIOD (the first PERIOD random), replaced by noise 10% of the time."""
    first = torch.randint(vocab, (size, PERIOD), generator=gen)
    x = first.repeat(1, (length + 1) // PERIOD + 1)[:, : length + 1].clone()
    noise = torch.rand(size, length + 1, generator=gen) < 0.1
    noise[:, :PERIOD] = False
    x[noise] = torch.randint(vocab, (int(noise.sum()),), generator=gen)
    return x[:, :-1], x[:, 1:]


def train(attention, steps, length=256, batch_size=8, vocab=64, seed=0, log=None):
    """Train from `seed`; the losses and the median seconds per step."""
    torch.manual_seed(seed)
    model = TinyLM(attention, vocab=vocab, length=length)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    losses, times = [], []
    for step in range(steps):
        x, y = batch(gen, batch_size, length, vocab)
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).reshape(-1, vocab), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if log:
            log(step, loss.item())
    return losses, sorted(times)[len(times) // 2]


def main(steps=300, length=256, every=25, quiet=False):
    runs = {}
    for name, attention in (("fastattn", fastattn.torch.scaled_dot_product_attention),
                            ("torch sdpa", F.scaled_dot_product_attention)):
        runs[name] = train(attention, steps, length)
    if not quiet:
        p, q = 0.9 + 0.1 / 64, 0.1 / 64  # the best prediction's probabilities under the noise
        floor = -(p * math.log(p) + 63 * q * math.log(q))
        print(f"loss (log(64) = {math.log(64):.3f} at the start; the noise allows no less than {floor:.3f} "
              f"after the first {PERIOD} positions)")
        print(f"{'step':>6} {'fastattn':>10} {'torch sdpa':>10}")
        for step in list(range(0, steps, every)) + [steps - 1]:
            print(f"{step:>6} {runs['fastattn'][0][step]:>10.4f} {runs['torch sdpa'][0][step]:>10.4f}")
        for name, (_, t) in runs.items():
            print(f"{name}: {1e3 * t:.1f} ms per step (median; forward, backward and optimizer)")
    return runs["fastattn"][0], runs["torch sdpa"][0]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    main(args.steps, args.length)
