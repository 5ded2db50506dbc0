"""Real 2-process DeepSpeed runs (CPU, gloo) of the trainer against a single-process reference.

The sequential heads compute gradients inside the forward, so a passing single-process test proves nothing
about ZeRO: these runs compare the losses and the parameters after several optimizer steps (n=4 heads with
unequal weights, masked positions, gradient accumulation, clipping on) with a naive single-process run of the
same global batch. The same comparison runs for n=1 and n=2 heads, against references of their own, and in bf16
under ZeRO-0 to 3 against a bf16 naive run of the same layout.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from dist_training import assert_matches, ds_json, params_held, train
from mtplm.conversion.consolidate import consolidated_state_dict
from mtplm.pretrain.engine import fp32_master

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_data_parallel_sequential_matches_single_process(tmp_path, reference, stage):
    got = train(tmp_path, f"z{stage}", 2, "--deepspeed_config", str(ds_json(tmp_path, f"zero{stage}.json")))
    assert_matches(reference, got)
    held, total = params_held(tmp_path, f"z{stage}")
    # ZeRO-3 builds the model under zero.Init: each rank keeps its half from the start, not the whole model.
    assert held == (total // 2 if stage == 3 else total)


def fewer_heads(n: int) -> list[str]:
    """TINY's two trunk blocks with n heads; head 2 (n=2) has no target at the last position."""
    return ["--model.n_future_tokens", str(n), "--model.n_layers", str(2 + n),
            "--model.head_loss_weights", json.dumps([1.0, 0.4][:n])]


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"n{n}")
def fewer_heads_reference(request, tmp_path_factory):
    n = request.param
    ref = train(tmp_path_factory.mktemp(f"ref_n{n}"), "ref", 1, "--train.loss_impl", "naive",
                "--train.grad_accum_steps", "4", *fewer_heads(n), sample_extra=1)
    return n, ref


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fewer_heads_sequential_matches_single_process(tmp_path, fewer_heads_reference, stage):
    n, reference = fewer_heads_reference
    got = train(tmp_path, f"n{n}z{stage}", 2, "--deepspeed_config", str(ds_json(tmp_path, f"zero{stage}.json")),
                *fewer_heads(n), sample_extra=1)
    assert len(got[0][0]["head_losses"]) == n
    assert_matches(reference, got)


def test_zero3_with_activation_checkpointing(tmp_path, reference):
    got = train(tmp_path, "z3ac", 2, "--deepspeed_config", str(ds_json(tmp_path, "zero3.json")),
                "--train.activation_checkpointing", "true")
    assert_matches(reference, got)


def test_zero3_init_from_into_partitions_matches_single_process(tmp_path):
    """train.init_from loads a saved model (here n=4, continued as n=2) into the partitions that zero.Init
    built, one parameter at a time: the run matches a single-process run that starts from the same file."""
    train(tmp_path, "src", 1, "--train.steps", "2")
    start = ["--train.init_from", str(tmp_path / "src" / "final"), *fewer_heads(2)]
    ref = train(tmp_path, "ref", 1, "--train.loss_impl", "naive", "--train.grad_accum_steps", "4", *start,
                sample_extra=1)
    got = train(tmp_path, "z3", 2, "--deepspeed_config", str(ds_json(tmp_path, "zero3.json")), *start,
                sample_extra=1)
    assert_matches(ref, got)
    held, total = params_held(tmp_path, "z3")
    assert held == total // 2


def test_zero3_tied_embeddings_matches_single_process(tmp_path):
    tied = ["--model.tie_embeddings", "true"]
    ref = train(tmp_path, "ref_tied", 1, "--train.loss_impl", "naive", "--train.grad_accum_steps", "4", *tied)
    got = train(tmp_path, "z3_tied", 2, "--deepspeed_config", str(ds_json(tmp_path, "zero3.json")), *tied)
    assert_matches(ref, got)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_sequential_matches_bf16_naive(tmp_path, stage):
    ds = str(ds_json(tmp_path, f"zero{stage}_bf16.json"))
    naive = train(tmp_path, "bf16_naive", 2, "--deepspeed_config", ds, "--train.loss_impl", "naive")
    seq = train(tmp_path, "bf16_seq", 2, "--deepspeed_config", ds)
    # bf16 rounds each head's contribution separately; Adam's first steps amplify that to about lr/10, and
    # gradient norms differ by up to 1.7e-4 (relative) under ZeRO-0 to 3; assert_matches allows tol / 3 = 1e-3.
    assert_matches(naive, seq, tol=3e-3, compare_weights=False)
    # Weights: every optimizer step runs at a real rate (warmup peaks at step 1), and Adam moves a weight by
    # about lr per step whatever its gradient's size, so the few entries whose tiny bf16 gradient changes sign
    # between the two paths differ by up to a few lr, and bf16 norm weights by one unit (2**-7 at 1.0). A
    # dropped or mis-scaled gradient moves a whole tensor differently: so bound how MANY entries differ.
    (_, w_naive), (_, w_seq) = naive, seq
    for k in w_naive:
        off = (w_seq[k] - w_naive[k]).abs() > 1e-3 * w_naive[k].abs().max().clamp(min=1.0)
        assert off.sum().item() <= max(2, 0.01 * off.numel()), f"{k}: {off.sum().item()} of {off.numel()} entries differ"
    # final/ holds the optimizer's fp32 masters, not their bf16 rounding (the working copy), like the checkpoint's
    # consolidation (what mtp-export-hf reads); under ZeRO-0 they are the unfused bf16 wrapper's, by parameter.
    state, _, _ = consolidated_state_dict(tmp_path / "bf16_seq" / "checkpoints")
    for k, v in w_seq.items():
        assert v.dtype == torch.float32 and torch.equal(v, state[k].float()), k
    assert any(not torch.equal(v, v.bfloat16().float()) for v in w_seq.values() if v.dim() == 2)


def test_fp32_master_finds_each_parameters_master_in_deepspeeds_zero0_wrappers():
    """Under ZeRO-0 in bf16/fp16, DeepSpeed's unfused wrapper keeps an fp32 master per parameter (tested end to end
    above); its fused one (FP16_Optimizer, which needs a GPU's fused Adam) one flat master per parameter group,
    in the order of the group's parameters."""
    from torch._utils import _flatten_dense_tensors

    params = [[torch.randn(3, 2).bfloat16(), torch.randn(4).bfloat16()], [torch.randn(5).bfloat16()]]
    masters = [[p.float() + 1 for p in group] for group in params]
    fused = SimpleNamespace(fp16_groups=params, fp32_groups_flat=[_flatten_dense_tensors(g) for g in masters])
    unfused = SimpleNamespace(fp16_groups=params, fp32_groups=masters)
    for optimizer in (fused, unfused):
        master = fp32_master(optimizer)
        for group, group_masters in zip(params, masters):
            for p, m in zip(group, group_masters):
                assert torch.equal(master(p), m)
        assert master(torch.zeros(1)) is None
