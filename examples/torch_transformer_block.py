"""Run a small transformer block with its attention routed through fastattn,
and check the output against PyTorch's own attention.

    python examples/torch_transformer_block.py
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastattn.torch


class Block(nn.Module):
    """Pre-norm transformer block: causal grouped-query self-attention and an MLP."""

    def __init__(self, dim=256, heads=8, kv_heads=2, attention=None):
        super().__init__()
        # None: torch's function, looked up at each call (so fastattn.torch.patch() reaches it)
        self.attention = attention
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.proj = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        b, t, _ = x.shape
        h = self.norm1(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(h).view(b, t, 2, self.kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        a = (self.attention or F.scaled_dot_product_attention)(q, k, v, is_causal=True, enable_gqa=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        return x + self.mlp(self.norm2(x))


def main():
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(2, 100, 256)
    with torch.inference_mode():
        expected = block(x)
        with fastattn.torch.patch():
            got = block(x)
    err = (got - expected).abs().max().item()
    print(f"transformer block through fastattn: max |difference| from torch = {err:.2e}")
    assert err < 1e-4, err
    return err


if __name__ == "__main__":
    main()
