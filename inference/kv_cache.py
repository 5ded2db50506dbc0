"""Key/value caches for ragged batches: every sequence keeps its own length, so sequences advance by
different amounts per step and a rejected draft is rolled back by lowering that length.

Keys are stored at their absolute position (slot p holds position p), and a query at position q may attend
to slots <= q. Slots beyond a sequence's length hold stale or padding entries, but a query never sits
past its sequence's length + new tokens, and any stale slot it can see is overwritten in the same forward.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.write_positions: torch.Tensor | None = None  # (B, T), set before each forward
        self.used = 0  # slots any sequence may read in this forward

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: (B, kv_heads, T, D) for the positions in write_positions; returns the readable slots."""
        B, H, T, D = k.shape
        pos = self.write_positions
        b = torch.arange(B, device=k.device).view(B, 1).expand(B, T)
        self.k[b, :, pos] = k.transpose(1, 2)
        self.v[b, :, pos] = v.transpose(1, 2)
        return self.k[:, :, : self.used], self.v[:, :, : self.used]


class ModelKVCache:
    """One LayerKVCache per trunk block and per head (head 1's block is the main stack's last)."""

    def __init__(self, model, batch: int, max_len: int, dtype=None, device=None):
        cfg = model.cfg
        p = next(model.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        n_blocks = cfg.n_trunk_layers + cfg.n_future_tokens
        self.layers = [LayerKVCache(batch, cfg.kv_heads, max_len, cfg.head_dim, dtype, device) for _ in range(n_blocks)]
        self.n_trunk = cfg.n_trunk_layers
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # cached positions per sequence

    def trunk(self) -> list[LayerKVCache]:
        return self.layers[: self.n_trunk]

    def head(self, k: int) -> LayerKVCache:
        return self.layers[self.n_trunk + k]

    def prepare(self, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions (B, T) of the next n_new tokens of every sequence and the attention mask
        (B, 1, T, S), True where a query may attend to a slot."""
        positions = self.lengths.unsqueeze(1) + torch.arange(n_new, device=self.lengths.device)
        used = int(positions.max()) + 1
        if used > self.max_len:
            raise ValueError(f"KV cache full: {used} positions needed, {self.max_len} allocated")
        for layer in self.layers:
            layer.write_positions, layer.used = positions, used
        slots = torch.arange(used, device=positions.device)
        mask = slots.view(1, 1, 1, used) <= positions.view(positions.shape[0], 1, n_new, 1)
        return positions, mask
