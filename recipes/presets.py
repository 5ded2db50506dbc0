"""Sizes and budgets of the recipes' presets.

tiny: the CI miniature (seconds per model). quick: a 2-core CPU, every model of one recipe (n = 1, 2, 4 x two
seeds) in at most ~45 minutes together, sized from the step rate measured in README.md ("Recipes"). paper: the
paper's model sizes for induction (its smallest two, 1M and 3M non-embedding parameters); for polynomials the
paper gives no size here, so the paper preset is our choice. Every model of a size has the same number of
transformer blocks (n_layers counts heads too), so an n-head model has n-1 fewer trunk blocks: parameter-matched.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Preset:
    sizes: dict  # name -> {"dim", "n_layers", "n_heads"}
    seq_len: int
    micro_batch_size: int
    steps: int
    lr: float
    warmup_steps: int
    train_docs: int  # generated training documents (problems or stories); reread in epochs if steps need more
    test_docs: int  # test problems per m (polynomial) or test stories (induction)
    eval_points: int = 1  # checkpoints evaluated, evenly spaced (induction: accuracy against training tokens)
    valid_samples: int = 64  # validation samples mtp-eval reads for the per-head loss
    eval_batch_size: int = 32
    extra: dict = field(default_factory=dict)


POLYNOMIAL = {
    "tiny": Preset({"tiny": dict(dim=32, n_layers=4, n_heads=2)}, seq_len=64, micro_batch_size=4, steps=4,
                   lr=3e-3, warmup_steps=1, train_docs=300, test_docs=2, valid_samples=4, eval_batch_size=20),
    # 5 blocks, so that n = 4 keeps one trunk block; 100k problems (~3.1M tokens) so that no problem is seen twice
    "quick": Preset({"small": dict(dim=128, n_layers=5, n_heads=4)}, seq_len=128, micro_batch_size=16,
                    steps=1200, lr=2e-3, warmup_steps=50, train_docs=100_000, test_docs=50),
    "paper": Preset({"medium": dict(dim=512, n_layers=8, n_heads=8)}, seq_len=256, micro_batch_size=64,
                    steps=20_000, lr=1e-3, warmup_steps=500, train_docs=2_000_000, test_docs=1000,
                    valid_samples=512, eval_batch_size=128),
}

INDUCTION = {
    "tiny": Preset({"tiny": dict(dim=32, n_layers=4, n_heads=2)}, seq_len=64, micro_batch_size=4, steps=4,
                   lr=3e-3, warmup_steps=1, train_docs=200, test_docs=8, eval_points=2, valid_samples=4),
    "quick": Preset({"1M": dict(dim=128, n_layers=5, n_heads=4)}, seq_len=256, micro_batch_size=8, steps=1200,
                    lr=2e-3, warmup_steps=50, train_docs=10_000, test_docs=200, eval_points=4),
    "paper": Preset({"1M": dict(dim=128, n_layers=5, n_heads=4), "3M": dict(dim=256, n_layers=4, n_heads=8)},
                    seq_len=512, micro_batch_size=64, steps=20_000, lr=1e-3, warmup_steps=500,
                    train_docs=1_000_000, test_docs=2000, eval_points=8, valid_samples=512, eval_batch_size=128),
}

PRESETS = {"polynomial": POLYNOMIAL, "induction": INDUCTION}
