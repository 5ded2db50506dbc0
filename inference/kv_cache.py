"""Key/value caches for ragged batches: every sequence keeps its own length, so sequences advance by
different amounts per step and a rejected draft is rolled back by lowering that length.

Keys are stored at their absolute position (slot p holds position p), and a query at position q may attend
to slots <= q. Slots beyond a sequence's length hold stale or padding entries, but a query never sits
past its sequence's length + new tokens, and any stale slot it can see is overwritten in the same forward.
"""

from __future__ import annotations

import torch


class LayerKVCache:
    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device, stacked: int = 1):
        self.k = torch.zeros(stacked * batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.batch, self.stacked = batch, stacked  # rows: `stacked` heads' batches, head-major
        self.write_positions: torch.Tensor | None = None  # (B, T), set before each forward
        self.used = 0  # slots any sequence may read in this forward

    def update(self, k: torch.Tensor, v: torch.Tensor):
        """k, v: (R, kv_heads, T, D) for the positions in write_positions (B, T); returns the readable slots of
        rows 0..R-1. R may be a multiple of B: several heads' batches stacked head-major share the positions."""
        R, _, T, _ = k.shape
        pos = self.write_positions
        pos = pos.repeat(R // pos.shape[0], 1)
        b = torch.arange(R, device=k.device).view(R, 1).expand(R, T)
        self.k[b, :, pos] = k.transpose(1, 2)
        self.v[b, :, pos] = v.transpose(1, 2)
        return self.k[:R, :, : self.used], self.v[:R, :, : self.used]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (in this order); with several heads stacked head-major, in every head."""
        index = (torch.arange(self.stacked, device=rows.device).view(-1, 1) * self.batch + rows).flatten()
        self.k, self.v = self.k[index], self.v[index]
        self.batch = len(rows)


class ModelKVCache:
    """One LayerKVCache per trunk block, and one for all the heads, stacked head-major (see StackedHeads)."""

    def __init__(self, model, batch: int, max_len: int, dtype=None, device=None):
        cfg = model.cfg
        p = next(model.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        self.trunk = [LayerKVCache(batch, cfg.kv_heads, max_len, cfg.head_dim, dtype, device)
                      for _ in range(cfg.n_trunk_layers)]
        self.heads = LayerKVCache(batch, cfg.kv_heads, max_len, cfg.head_dim, dtype, device, cfg.n_future_tokens)
        self.layers = self.trunk + [self.heads]
        self.max_len = max_len
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)  # cached positions per sequence

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

    def keep(self, rows: torch.Tensor) -> None:
        """Drop the sequences not in rows (B,) from every cache: finished sequences cost nothing from then on."""
        for layer in self.layers:
            layer.keep(rows)
        self.lengths = self.lengths[rows]
