"""Where training data comes from and how samples are drawn from it (the `data:` section of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from mtplm.config import ConfigError


@dataclass
class DataConfig:
    # Dataset prefixes (path without .idx/.bin) written by mtp-preprocess, blended by `weights`.
    datasets: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)  # empty: proportional to each dataset's tokens
    split: list[float] = field(default_factory=lambda: [0.98, 0.02, 0.0])  # train/valid/test, by documents
    seq_len: int = 2048
    seed: int = 1234
    cache_dir: str | None = None  # sample/shuffle index cache; default: next to the data
    num_workers: int = 2
    # Checked against each dataset's manifest, so a model never trains on ids from another tokenizer.
    tokenizer: str | None = None

    def validate(self) -> None:
        if self.seq_len < 1:
            raise ConfigError(f"data.seq_len: must be >= 1, got {self.seq_len}")
        if self.weights and len(self.weights) != len(self.datasets):
            raise ConfigError(f"data.weights: {len(self.weights)} weights for {len(self.datasets)} datasets")
        if any(w < 0 for w in self.weights) or (self.weights and sum(self.weights) <= 0):
            raise ConfigError(f"data.weights: must be >= 0 with a positive sum, got {self.weights}")
        if len(self.split) != 3 or any(s < 0 for s in self.split) or sum(self.split) <= 0:
            raise ConfigError(f"data.split: expected three non-negative ratios (train, valid, test), got {self.split}")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers: must be >= 0, got {self.num_workers}")

    __post_init__ = validate
