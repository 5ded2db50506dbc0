"""Sizes and budgets of the recipes' presets.

tiny: the CI miniature (seconds per model). cpu: every model of a recipe (all sizes x n x 3 seeds) on a 2-core
CPU with --jobs 2, meant to let the next-token (n = 1) baseline learn the task; every choice was made on n = 1
alone and is applied unchanged to n > 1 (docs/recipes/cpu_search.md says what was tried and what it gave; the
polynomial one does not learn yet). paper: the paper's settings (Gloeckle et al. 2024, Tables S13/S14, App. J
and K), for GPUs.

Every model of a size has the same number of transformer blocks (n_layers counts heads too), so an n-head model
has n-1 fewer trunk blocks: parameter-matched, as in the paper.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    # name -> {"dim", "n_layers", "n_heads"}, optionally "seq_len" and "batch_size" where a size has its own
    sizes: dict
    seq_len: int
    micro_batch_size: int  # sequences per process and forward
    steps: int
    lr: float
    warmup_steps: int
    train_docs: int  # generated training documents (problems or stories); reread in epochs if steps need more
    test_docs: int  # test problems per m (polynomial) or test stories (induction)
    # sequences per optimizer step over all data-parallel ranks (train.global_batch_size; accumulation is
    # derived for the number of GPUs); 0: micro_batch_size, one process
    batch_size: int = 0
    eval_points: int = 1  # checkpoints evaluated, evenly spaced (induction: accuracy against training tokens)
    valid_samples: int = 64  # validation samples mtp-eval reads for the per-head loss
    eval_batch_size: int = 32
    min_lr_ratio: float = 0.1  # the cosine schedule ends at lr x this
    story: str = "paper"  # induction's story style (recipes/induction.py: STYLES)
    ring_terms: int = 5  # polynomial: coefficients kept, F7[X]/(X^ring_terms); the paper's ring has 5
    train_max_m: int = 5  # polynomial: training problems have 1..train_max_m operations (the paper's 5)
    decode_compiled: bool = True  # bytes: time compiled decoding beside eager (one compilation per k)

    def shape(self, size: str) -> dict:
        """dim, n_layers, n_heads, seq_len and batch_size (sequences per optimizer step) of one size."""
        return {"seq_len": self.seq_len, "batch_size": self.batch_size or self.micro_batch_size,
                **self.sizes[size]}


def with_changes(preset: Preset, changes: list[str]) -> Preset:
    """The preset with KEY=VALUE changes of its scalar fields (mtp-recipe --set), each parsed as the field's type."""
    fields = {f.name: f for f in dataclasses.fields(Preset) if f.name != "sizes"}
    values = {}
    for change in changes:
        key, sep, text = change.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{change!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = type(getattr(preset, key))
        own = [name for name, s in preset.sizes.items() if key in s]
        if own:
            raise ValueError(f"{change!r}: the sizes {', '.join(own)} set their own {key}")
        try:
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                values[key] = text.lower() == "true"
            else:
                values[key] = kind(float(text)) if kind is int and text.replace("e", "").isdigit() else kind(text)
        except ValueError:
            raise ValueError(f"{change!r}: {key} takes a {kind.__name__}, got {text!r}") from None
    return dataclasses.replace(preset, **values)


# The paper's small-scale training (Table S13): 100k steps of 0.25 x 2^20 tokens (128 sequences of 2048, 26.2B
# tokens), peak LR 1e-4 after 2000 warmup steps, cosine decay to 0.03 x peak, Adam (0.9, 0.95), weight decay
# 0.1, clipping 1.0 (the trainer's defaults). Generated data is reread in epochs: generating 26.2B tokens of
# stories or problems in Python would take longer than training the small models on it.
PAPER_SCHEDULE = dict(steps=100_000, lr=1e-4, warmup_steps=2000, min_lr_ratio=0.03, valid_samples=512,
                      eval_batch_size=128)

POLYNOMIAL = {
    "tiny": Preset({"tiny": dict(dim=32, n_layers=4, n_heads=2)}, seq_len=64, micro_batch_size=4, steps=4,
                   lr=3e-3, warmup_steps=1, train_docs=300, test_docs=2, valid_samples=4, eval_batch_size=20),
    # Chosen on n = 1 alone (docs/recipes/cpu_search.md), and not yet enough: the paper's ring and m = 1..5 give
    # constant answers at this size; F7[X]/(X^3) with m = 1..3 (a named CPU analogue), 16 x 128 bytes per step
    # and 8000 steps give an n = 1 model that negates (1.00) but barely adds (0.04): exact match 0.23 at m = 1,
    # 0.10 at m = 2, 0.00 at m = 3. About 47 minutes per model (two side by side): over the 2-hour budget.
    "cpu": Preset({"128": dict(dim=128, n_layers=4, n_heads=4)},
                  seq_len=128, micro_batch_size=16, steps=8000, lr=3e-3, warmup_steps=100, train_docs=400_000,
                  test_docs=200, ring_terms=3, train_max_m=3),
    # Fig. 8 (App. K): the 100M model (768/14/12) at context 2048, and the 30M model (512/10/8) of Fig. S16 at
    # context 1024 with the same 2^18 tokens per step; 2000 test problems per m; trained on m = 1..5.
    "paper": Preset({"30M": dict(dim=512, n_layers=10, n_heads=8, seq_len=1024, batch_size=256),
                     "100M": dict(dim=768, n_layers=14, n_heads=12)},
                    seq_len=2048, micro_batch_size=16, batch_size=128, train_docs=10_000_000, test_docs=2000,
                    **PAPER_SCHEDULE),
}

INDUCTION = {
    "tiny": Preset({"tiny": dict(dim=32, n_layers=4, n_heads=2)}, seq_len=64, micro_batch_size=4, steps=4,
                   lr=3e-3, warmup_steps=1, train_docs=200, test_docs=8, eval_points=2, valid_samples=4),
    # Chosen on n = 1 alone (docs/recipes/cpu_search.md): dense stories (a name is 1 byte in 5, not 1 in 10)
    # in 128-byte contexts, so the copy pattern recurs ~10 times per sample; at lr 3e-3 every n = 1 model
    # learns to copy an earlier name within 1000-2000 steps and ends at 0.26-0.30, the level of copying one at
    # random (0.29): copying, not yet induction, which a 24.6M-token run at 64/4/4 did not reach either.
    "cpu": Preset({"32": dict(dim=32, n_layers=3, n_heads=2), "48": dict(dim=48, n_layers=4, n_heads=4),
                   "64": dict(dim=64, n_layers=4, n_heads=4)},
                  seq_len=128, micro_batch_size=32, steps=3000, lr=3e-3, warmup_steps=100, train_docs=100_000,
                  test_docs=200, eval_points=6, story="dense"),
    # Fig. 7 (App. J): sizes by non-embedding parameters (dim/layers/heads); 100 held-out test stories.
    "paper": Preset({"1M": dict(dim=128, n_layers=5, n_heads=4), "3M": dict(dim=256, n_layers=4, n_heads=8),
                     "10M": dict(dim=384, n_layers=6, n_heads=8), "30M": dict(dim=512, n_layers=10, n_heads=8),
                     "100M": dict(dim=768, n_layers=14, n_heads=12), "300M": dict(dim=1024, n_layers=25, n_heads=16),
                     "1B": dict(dim=1536, n_layers=36, n_heads=24)},
                    seq_len=2048, micro_batch_size=16, batch_size=128, train_docs=4_000_000, test_docs=100,
                    eval_points=8, **PAPER_SCHEDULE),
}

BYTES = {
    "tiny": Preset({"tiny": dict(dim=32, n_layers=9, n_heads=2)}, seq_len=64, micro_batch_size=4, steps=4,
                   lr=3e-3, warmup_steps=1, train_docs=40, test_docs=2, valid_samples=4, decode_compiled=False),
    # n = 8 as the paper's byte-level model, with 4 trunk blocks left (n = 1: 11 + 1); 6.1M bytes of training,
    # about half the library's code once; LR and warmup are induction's, chosen on n = 1 there (no search here).
    "cpu": Preset({"64": dict(dim=64, n_layers=12, n_heads=4)}, seq_len=256, micro_batch_size=16, steps=1500,
                  lr=3e-3, warmup_steps=100, train_docs=0, test_docs=24),
}

# The paper's byte-level model (Table S3) is a 7B model trained on 314B bytes, far past a recipe: bytes has no
# paper preset.
PRESETS = {"polynomial": POLYNOMIAL, "induction": INDUCTION, "bytes": BYTES}
