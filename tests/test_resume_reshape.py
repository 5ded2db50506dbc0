"""Resume on another layout: 3 steps at layout A, checkpoint, then 3 more at layout B, against one uninterrupted
single-process run over the same global batches (micro-batch 2 x 4). The optimizer state (fp32 masters, Adam
moments, step), the LR schedule and the data position must carry over, or the losses of steps 4-6 and the final
weights would differ."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from dist_launch import run_ranks
from dist_training import TINY, ds_json
from mtplm.conversion.consolidate import consolidated_state_dict
from mtplm.pretrain.checkpointing.checkpoint import COMPLETE, checkpoint_dir, save_checkpoint, tag_for
from mtplm.pretrain.config import TrainConfig
from mtplm.pretrain.checkpointing.reshard import UNIVERSAL, plan_batch, universal_state

WORKER = "tests/workers/train_synthetic.py"
# Global batch 8 in every layout: micro-batch 2 x accumulation x data-parallel size.
CONFIG = {**TINY, "train": {**TINY["train"], "steps": 6, "save_interval": 3, "eval_interval": 0}}


def write_config(tmp: Path) -> str:
    path = tmp / "tiny6.json"
    path.write_text(json.dumps(CONFIG))
    return str(path)


def metrics(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    out = tmp / "ref"
    run_ranks(1, [WORKER, "--config", write_config(tmp), "--train.out_dir", str(out), "--train.save_interval", "0",
                  "--train.grad_accum_steps", "4"], timeout=900)
    return metrics(out), load_file(str(out / "final" / "model.safetensors"))


def layout(tmp: Path, world: int, stage: int, *args: str) -> tuple[int, list[str]]:
    cfg = ["--config", write_config(tmp)]
    if stage:
        cfg += ["--deepspeed_config", str(ds_json(tmp, f"zero{stage}.json"))]
    return world, [*cfg, *args]


def resume_elsewhere(tmp: Path, a: tuple[int, list[str]], b: tuple[int, list[str]]) -> tuple[dict, dict, str]:
    """Train at layout a until the step-3 checkpoint (then killed), resume at layout b; (records of steps 1-6,
    final weights, rank 0's output of the resumed run)."""
    first, second = tmp / "a", tmp / "b"
    second.mkdir()
    with pytest.raises(RuntimeError, match="exit -9"):
        run_ranks(a[0], [WORKER, *a[1], "--train.out_dir", str(first), "--kill_after_step", "3"], timeout=900)
    run_ranks(b[0], [WORKER, *b[1], "--train.out_dir", str(second), "--train.resume", str(first / "checkpoints")],
              timeout=900, log_dir=second)
    records = {**metrics(first), **metrics(second)}
    return records, load_file(str(second / "final" / "model.safetensors")), (second / "stdout_rank0.txt").read_text()


def assert_same_run(reference, records, weights, tol=1e-5):
    ref_records, ref_weights = reference
    assert sorted(records) == list(range(1, 7))
    for step in range(1, 7):
        a, b = ref_records[step], records[step]
        assert b["loss"] == pytest.approx(a["loss"], rel=tol, abs=tol), f"step {step}"
        assert b["head_losses"] == pytest.approx(a["head_losses"], rel=tol, abs=tol), f"step {step}"
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-12), f"step {step}"
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), f"step {step}"
    assert weights.keys() == ref_weights.keys()
    for k, ref in ref_weights.items():
        diff = (weights[k] - ref).abs().max().item()
        assert diff <= tol * max(1.0, ref.abs().max().item()), f"{k}: differs by {diff:.2e}"


@pytest.mark.distributed
@pytest.mark.parametrize("a, b, says", [
    ((2, 1, ()), (1, 1, ()), ["data-parallel size 2 -> 1", "train.grad_accum_steps 2 -> 4"]),
    ((2, 3, ()), (1, 3, ()), ["data-parallel size 2 -> 1"]),
    ((1, 0, ("--train.grad_accum_steps", "4")), (2, 1, ()),
     ["data-parallel size 1 -> 2", "ZeRO stage 0 -> 1", "train.grad_accum_steps 4 -> 2"]),
    ((2, 1, ("--parallel.tensor", "2", "--train.grad_accum_steps", "4")), (1, 0, ()),
     ["parallel.tensor 2 -> 1", "ZeRO stage 1 -> 0"]),
    ((2, 1, ("--parallel.pipeline", "2", "--train.grad_accum_steps", "4")), (1, 1, ()), ["parallel.pipeline 2 -> 1"]),
    ((2, 1, ()), (2, 1, ("--parallel.pipeline", "2")), ["parallel.pipeline 1 -> 2", "train.grad_accum_steps 2 -> 4"]),
    ((2, 1, ()), (2, 3, ()), ["ZeRO stage 1 -> 3"]),
], ids=["dp2-1-zero1", "dp2-1-zero3", "dp1-2-zero0-1", "tp2-1-zero1-0", "pp2-1", "pp1-2", "zero1-3"])
def test_resume_on_another_layout_continues_the_same_run(tmp_path, reference, a, b, says):
    records, weights, log = resume_elsewhere(tmp_path, layout(tmp_path, a[0], a[1], *a[2]),
                                             layout(tmp_path, b[0], b[1], *b[2]))
    for change in says:
        assert f"resumed with {change}" in log
    assert "carried over through" in log
    assert_same_run(reference, records, weights)


PP2 = ("--parallel.pipeline", "2", "--train.grad_accum_steps", "4")


@pytest.mark.distributed
@pytest.mark.parametrize("a, b, says", [
    (("zero0_bf16.json", *PP2), ("zero0_bf16.json",), "parallel.pipeline 2 -> 1"),
    (("zero1_bf16.json", *PP2), ("zero1_bf16.json",), "parallel.pipeline 2 -> 1"),
    (("zero0_bf16.json",), ("zero1_bf16.json", *PP2), "ZeRO stage 0 -> 1"),
], ids=["pp2-1-zero0", "pp2-1-zero1", "pp1-2-zero0-1"])
def test_a_bf16_checkpoint_carries_its_optimizer_state_exactly(tmp_path, a, b, says):
    """bf16 keeps fp32 masters and Adam moments in one of DeepSpeed's mixed-precision optimizers: the bf16 one
    (pipeline, and ZeRO-1), whose partition files are named bf16_zero_pp_rank_* and under ZeRO-0 come without
    parameter shapes, or, under ZeRO-0 without stages, the unfused wrapper with a master per parameter. Resumed
    on another layout (2 ranks each) and saved again at once, the new checkpoint holds bit for bit the masters,
    moments and step of the old one, and consolidation (mtp-export-hf) reads what final/ holds. (bf16 steps
    would not match a single-process fp32 reference, so the state itself is compared.)"""
    first, second = tmp_path / "a", tmp_path / "b"

    def run(out, ds, *args, resume=()):
        run_ranks(2, [WORKER, "--config", write_config(tmp_path), "--train.steps", "3", "--train.out_dir", str(out),
                      "--deepspeed_config", str(ds_json(tmp_path, ds)), *args, *resume], timeout=900, log_dir=out)

    first.mkdir()
    second.mkdir()
    run(first, *a)
    run(second, *b, resume=("--train.resume", str(first / "checkpoints")))
    assert f"resumed with {says}" in (second / "stdout_rank0.txt").read_text()
    (sa, step_a), (sb, step_b) = (universal_state(checkpoint_dir(str(out)) / tag_for(3)) for out in (first, second))
    # 3 steps; the unfused wrapper's Adam counts one more (DeepSpeed steps it once with zero gradients to create
    # its state), and the count carries over as it is, so that Adam's bias correction goes on as before.
    assert step_a == step_b == (4 if a == ("zero0_bf16.json",) else 3)
    trained = [v for k, v in sa["fp32"].items() if v.dim() == 2]  # the masters, not their bf16 working copy
    assert all(not torch.equal(v, v.bfloat16().float()) for v in trained)
    for key in sa:
        assert sa[key].keys() == sb[key].keys(), key
        for name in sa[key]:
            assert torch.equal(sa[key][name], sb[key][name]), f"{key} {name}"
    consolidated, _, _ = consolidated_state_dict(first / "checkpoints")
    final = load_file(str(first / "final" / "model.safetensors"))
    assert consolidated.keys() == final.keys()
    for name, weight in final.items():
        assert torch.equal(consolidated[name], weight.float()), name


def test_resume_refuses_a_different_global_batch(tmp_path):
    out = tmp_path / "run"
    run_ranks(1, [WORKER, "--config", write_config(tmp_path), "--train.out_dir", str(out), "--train.steps", "3",
                  "--train.grad_accum_steps", "4"], timeout=900)
    with pytest.raises(RuntimeError) as e:
        run_ranks(1, [WORKER, "--config", write_config(tmp_path), "--train.out_dir", str(out), "--train.resume",
                      "auto", "--train.grad_accum_steps", "2"], timeout=900)
    assert "the checkpoint's global batch is 8 samples" in str(e.value)
    with pytest.raises(RuntimeError) as e:
        run_ranks(1, [WORKER, "--config", write_config(tmp_path), "--train.out_dir", str(out), "--train.resume",
                      "auto", "--train.micro_batch_size", "3"], timeout=900)
    assert "no whole number of accumulation steps" not in str(e.value)  # same data-parallel size: nothing adjusts
    assert "this run's micro-batch 3 x accumulation 2 x data-parallel 1 = 6" in str(e.value)


@pytest.mark.distributed
def test_resume_refuses_a_layout_change_it_cannot_carry(tmp_path):
    """A pipeline run under ZeRO-0 keeps its Adam moments by position in each stage's optimizer, not by
    parameter: it resumes on its own layout only, and any other is refused with one message on every rank."""
    out = tmp_path / "pp"
    run_ranks(2, [WORKER, "--config", write_config(tmp_path), "--train.out_dir", str(out), "--train.steps", "1",
                  "--parallel.pipeline", "2", "--train.grad_accum_steps", "4"], timeout=900)
    with pytest.raises(RuntimeError) as e:
        run_ranks(1, [WORKER, "--config", write_config(tmp_path), "--train.out_dir", str(out), "--train.resume",
                      "auto"], timeout=900)
    assert "cannot carry" in str(e.value) and "no optimizer state by parameter" in str(e.value)


def test_the_global_batch_is_kept_by_the_accumulation_steps():
    saved = {"micro_batch_size": 2, "grad_accum_steps": 2, "data_parallel": 4, "tensor": 1, "pipeline": 1}
    assert plan_batch(saved, 2, 2, 4, 1, 1) == (2, None)  # the same layout
    assert plan_batch(saved, 2, 2, 2, 1, 1) == (4, None)  # half the nodes: twice the accumulation
    assert plan_batch(saved, 2, 2, 8, 1, 1) == (1, None)
    assert plan_batch(saved, 4, 2, 2, 1, 1) == (2, None)  # micro-batch 4 on two replicas: 16 already
    assert plan_batch(saved, 2, 1, 4, 2, 1) == (2, None)  # tensor parallel added, as many replicas
    gas, why = plan_batch(saved, 2, 2, 3, 1, 1)  # 16 samples do not split over 3 replicas of 2
    assert gas is None and "no whole number of accumulation steps gives 16" in why
    gas, why = plan_batch(saved, 2, 4, 4, 1, 1)  # the same layout with a larger batch: refused, not adjusted
    assert gas is None and "this run's micro-batch 2 x accumulation 4 x data-parallel 4 = 32" in why
    assert "\n" not in why


class OneFileEngine:
    checkpoint_engine = None

    def save_checkpoint(self, root, tag, client_state, save_latest):
        (Path(root) / tag / "mp_rank_00_model_states.pt").write_bytes(b"new")


def test_a_save_over_a_step_folder_leaves_nothing_of_the_old_layout(tmp_path):
    """A resumed run on fewer ranks that saves the same step again: the old run's partitions and the layout-free
    form of the old files would otherwise be read as part of the new checkpoint."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cfg = TrainConfig()
        cfg.train.out_dir = str(tmp_path / "run")
        folder = checkpoint_dir(cfg.train.out_dir) / tag_for(3)
        (folder / UNIVERSAL).mkdir(parents=True)
        (folder / UNIVERSAL / "fp32.safetensors").write_bytes(b"old")
        for name in ("zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng_rank1.pt", COMPLETE):
            (folder / name).write_bytes(b"old")
        save_checkpoint(OneFileEngine(), cfg, 3, {})
    finally:
        dist.destroy_process_group()
    assert sorted(p.name for p in folder.iterdir()) == [COMPLETE, "mp_rank_00_model_states.pt", "mtp_config.json",
                                                        "rng_rank0.pt"]
