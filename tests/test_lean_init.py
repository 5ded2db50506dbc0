"""The lean build (pretrain/parallel/lean_init.py): under ZeRO-0/1/2 a rank materialises only its pipeline stage and its
tensor shards, one full tensor at a time, with exactly the values of the whole single-process build from the same
seed (or of init_from loaded into it). The training comparisons of test_tensor_parallel.py and
test_pipeline_parallel.py hold end to end; here each rank's tensors are compared directly, and what it
allocated while building is measured (tests/workers/lean_build.py)."""

import json

import pytest
import torch
from torch import nn

from conftest import tiny_model_config
from dist_launch import run_ranks
from dist_training import TINY, ds_json, tiny_with
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model
from mtplm.pretrain.parallel.lean_init import build_lean
from mtplm.pretrain.parallel.layout import ParallelLayout
from mtplm.pretrain.parallel.tensor_parallel import TensorParallel

SINGLE = ParallelLayout(TensorParallel(None, 0, 1), 0, 1, None, None, None)


def lean_ranks(tmp_path, world, *args, config=TINY):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config))
    out = tmp_path / "out"
    out.mkdir()
    run_ranks(world, ["tests/workers/lean_build.py", str(out), "--config", str(cfg),
                      "--deepspeed_config", str(ds_json(tmp_path, "zero1.json")), *args], timeout=300)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def assert_lean(ranks, drawn=True):
    for r, got in enumerate(ranks):
        assert got["n_local"] > 0 and got["mismatched"] == [], f"rank {r}: not the whole build's slices"
        assert got["meta_kept"] == [] and got["kept_but_dropped"] == [], f"rank {r}: not what the layout keeps"
        if drawn:  # the same random numbers were drawn, in the same order
            assert got["same_rng"], f"rank {r}"
        # Alive at once while building (init_from: safetensors' views of the file included): what the rank keeps
        # and one full tensor, never the whole model.
        assert got["peak"] <= got["kept"] + got["largest"], f"rank {r}: {got}"
        assert got["peak"] < got["whole"], f"rank {r}: {got}"


@pytest.mark.distributed
@pytest.mark.parametrize("world, layout, tied", [
    (2, ["--parallel.tensor", "2"], False),
    (2, ["--parallel.pipeline", "2"], True),  # the tied embedding on the first and the last stage
    (4, ["--parallel.pipeline", "2", "--parallel.tensor", "2"], False),
], ids=["tp2", "pp2-tied", "pp2-tp2"])
def test_lean_build_keeps_the_slices_of_the_whole_build(tmp_path, world, layout, tied):
    ranks = lean_ranks(tmp_path, world, *layout, "--model.tie_embeddings", str(tied).lower())
    assert_lean(ranks)
    if "--parallel.pipeline" in layout:  # each stage holds part of its shard, not all of it
        assert all(r["kept"] < 0.8 * r["whole"] / (world // 2) for r in ranks)


@pytest.mark.distributed
@pytest.mark.parametrize("world, layout", [(2, ["--parallel.tensor", "2"]),
                                           (4, ["--parallel.pipeline", "2", "--parallel.tensor", "2"])],
                         ids=["tp2", "pp2-tp2"])
def test_lean_build_peak_is_within_the_model_parallel_share_plus_the_largest_tensor(tmp_path, world, layout):
    """Issue #19's target: alive at once while building, at most 1/(tensor x pipeline) of the model plus its
    largest tensor. The unembedding is the largest tensor here, as in real vocabularies, and the heads stage holds
    more than 1/(tensor x pipeline): building in construction order, the last stage would hold its whole share
    when the unembedding is drawn; the lean build draws the rank's largest tensors first."""
    ranks = lean_ranks(tmp_path, world, *layout, config=tiny_with(vocab_size=1024, n_layers=12, n_future_tokens=2,
                                                                  head_loss_weights=[1.0, 0.5]))
    assert_lean(ranks)
    assert max(r["kept"] for r in ranks) > ranks[0]["whole"] / world  # a share above 1/(tensor x pipeline)
    for r, got in enumerate(ranks):
        assert got["peak"] <= got["whole"] / got["model_parallel"] + got["largest"], f"rank {r}: {got}"


@pytest.mark.distributed
def test_lean_init_from_reads_the_local_slices_of_todays_result(tmp_path):
    """A saved n=4 model continued as n=2 (the trunk kept): each rank's slices are load_initial_weights' whole
    result, cut."""
    torch.manual_seed(7)
    save_model(MTPTransformer(tiny_model_config(n_layers=6, n_future_tokens=4)), tmp_path / "src")
    ranks = lean_ranks(tmp_path, 4, "--parallel.pipeline", "2", "--parallel.tensor", "2",
                       "--train.init_from", str(tmp_path / "src"),
                       config=tiny_with(n_layers=4, n_future_tokens=2, head_loss_weights=[1.0, 0.5]))
    assert_lean(ranks, drawn=False)
    assert all(r["notes"] == r["whole_notes"] == ["dropped saved heads 3..4"] for r in ranks)


@pytest.mark.parametrize("tied", [False, True])
def test_lean_build_of_one_rank_is_the_whole_build(tied):
    cfg = tiny_model_config(tie_embeddings=tied)
    torch.manual_seed(3)
    model, _ = build_lean(lambda: MTPTransformer(cfg), SINGLE, "blocks")
    rng = torch.get_rng_state()
    torch.manual_seed(3)
    whole = MTPTransformer(cfg)
    assert torch.equal(rng, torch.get_rng_state())
    got, ref = model.state_dict(), whole.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k
    assert (model.output.weight is model.tok_embeddings.weight) == tied


def test_lean_build_refuses_a_module_it_cannot_initialise():
    class NoReset(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))

    with pytest.raises(TypeError, match=r"NoReset \(the model\) owns parameters but has no reset_parameters"):
        build_lean(NoReset, SINGLE, "blocks")
