"""A save over a complete checkpoint of the same step (a resumed run that ends where it started, a new run in
the same out_dir) unmarks it first: a crash while its files are rewritten must not leave a folder that
`--train.resume auto` takes as complete."""

from pathlib import Path

import pytest
import torch.distributed as dist

from mtplm.pretrain.checkpointing.checkpoint import (COMPLETE, LATEST, checkpoint_dir, resolve_resume, save_checkpoint,
                                                  tag_for)
from mtplm.pretrain.config import TrainConfig


class CrashingEngine:
    """Rewrites part of the step folder, then dies as a SIGKILL'd or crashed save would."""

    checkpoint_engine = None

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"half of a new save")
        raise SystemExit("killed mid-save")


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_a_crash_while_overwriting_a_complete_checkpoint_leaves_it_unmarked(tmp_path, one_rank):
    cfg = TrainConfig()
    cfg.train.out_dir = str(tmp_path / "run")
    root = checkpoint_dir(cfg.train.out_dir)
    for step in (2, 4):  # two complete checkpoints, `latest` on step 4
        (root / tag_for(step)).mkdir(parents=True)
        (root / tag_for(step) / "mp_rank_00_model_states.pt").write_bytes(b"complete")
        (root / tag_for(step) / COMPLETE).write_text(f"{step}\n")
    (root / LATEST).write_text(tag_for(4) + "\n")

    with pytest.raises(SystemExit):
        save_checkpoint(CrashingEngine(), cfg, 4, {})
    assert not (root / tag_for(4) / COMPLETE).exists()
    assert resolve_resume("auto", cfg.train.out_dir) == root / tag_for(2)
