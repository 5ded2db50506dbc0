"""The MTP heads run side by side, as one batched transformer block, for decoding.

Every head is one block reading the same trunk output, so at inference they are independent: their weights
are stacked along a leading head axis and each matrix product of the block becomes one batched product
(`torch.bmm`) for all heads, with q/k/v and the two SwiGLU input projections fused as well. The heads of a
speculative step then take the operations (kernel launches, dispatcher overhead) of one block instead of
k + 1, which is what a decoding step of a small model, or any model at batch 1 on a GPU, is made of. The
weights of all k + 1 heads are still read, so where decoding is bound by weight reads the step costs the
trunk plus k + 1 blocks (bench/bench_speculative.py prints that bound). The arithmetic is the model's own
(`rms_normalize`, `apply_rotary`, `attend` from model/transformer.py); only the products are batched.

The stacks are copies of the head weights made once, when built (n blocks' worth of memory): build a new
one after changing the model's weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtplm.model.transformer import apply_rotary, attend, rms_normalize


class StackedHeads:
    def __init__(self, model):
        cfg = model.cfg
        self.eps, self.head_dim = cfg.norm_eps, cfg.head_dim
        self.split = [cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
        blocks = [model.head_block(j) for j in range(cfg.n_future_tokens)]

        def stack(*weights_of) -> torch.Tensor:
            """(n, in, out): each head's listed nn.Linear weights (out, in), concatenated along out."""
            w = [torch.cat([get(b) for get in weights_of]) for b in blocks]
            return torch.stack(w).transpose(1, 2).contiguous().detach()

        self.attention_norm = torch.stack([b.attention_norm.weight for b in blocks]).unsqueeze(1).detach()
        self.ffn_norm = torch.stack([b.ffn_norm.weight for b in blocks]).unsqueeze(1).detach()
        self.wqkv = stack(lambda b: b.attention.wq.weight, lambda b: b.attention.wk.weight,
                          lambda b: b.attention.wv.weight)
        self.wo = stack(lambda b: b.attention.wo.weight)
        self.w13 = stack(lambda b: b.feed_forward.w1.weight, lambda b: b.feed_forward.w3.weight)
        self.w2 = stack(lambda b: b.feed_forward.w2.weight)

    @torch.no_grad()
    def __call__(self, h: torch.Tensor, rope, cache, attn_mask, n: int) -> torch.Tensor:
        """Heads 1..n on the trunk output h (B, T, d); returns their block outputs (n, B, T, d), before the
        shared norm. cache holds the heads' keys and values stacked head-major (head j in rows j*B..j*B+B-1)."""
        B, T, d = h.shape
        x = h.reshape(1, B * T, d)
        qkv = torch.bmm(rms_normalize(x, self.eps) * self.attention_norm[:n], self.wqkv[:n])
        q, k, v = (t.reshape(n, B, T, -1, self.head_dim) for t in qkv.split(self.split, dim=-1))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)  # rope (B, T, D/2) broadcasts over heads
        q, k, v = (t.flatten(0, 1).transpose(1, 2) for t in (q, k, v))  # (n * B, heads, T, D)
        out = attend(q, k, v, cache, attn_mask.repeat(n, 1, 1, 1))
        x = x + torch.bmm(out.transpose(1, 2).reshape(n, B * T, -1), self.wo[:n])
        gate, up = torch.bmm(rms_normalize(x, self.eps) * self.ffn_norm[:n], self.w13[:n]).chunk(2, dim=-1)
        x = x + torch.bmm(F.silu(gate) * up, self.w2[:n])
        return x.view(n, B, T, d)
