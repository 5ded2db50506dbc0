import os
import sys
from pathlib import Path

import pytest
import torch

# Tests run on the CPU with DeepSpeed's CPU accelerator, whatever the machine has.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mtplm.model.config import ModelConfig  # noqa: E402


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=200, multiple_of=16,
                n_future_tokens=4, max_seq_len=64)
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """The single-process naive run every multi-process training comparison is held against."""
    from dist_training import reference_run

    return reference_run(tmp_path_factory.mktemp("ref"))
