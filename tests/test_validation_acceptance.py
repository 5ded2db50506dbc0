"""Draft acceptance logged by training's validation against the teacher-forced function on the same batches."""

import importlib.util
import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model_config
from dist_launch import REPO, run_ranks

from mtplm.inference.acceptance import acceptance_counts
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import load_model
from mtplm.pretrain.parallel.pipeline import HeadsStage, PipelineLoss


@pytest.mark.parametrize("loss_impl", ["sequential", "naive"])
def test_loss_paths_return_every_heads_argmax(loss_impl):
    """The greedy tokens the loss path collects (the sequential one chunk by chunk) are the argmax of each
    head's logits, and asking for them changes no loss."""
    model = MTPTransformer(tiny_model_config(vocab_size=50), loss_impl=loss_impl, ce_chunk_tokens=7).eval()
    batch = torch.randint(0, 50, (3, 20), generator=torch.Generator().manual_seed(0))
    tokens, labels = batch[:, :16], batch[:, 1:]
    with torch.no_grad():
        want = model(tokens, all_heads=True).logits.argmax(-1)
        plain = model(tokens, labels)
        out = model(tokens, labels, head_argmax=True)
        naive_with_logits = model(tokens, labels, return_logits=True, head_argmax=True)
    assert torch.equal(out.head_argmax, want) and torch.equal(naive_with_logits.head_argmax, want)
    assert torch.equal(out.head_losses, plain.head_losses) and plain.head_argmax is None
    # The pipeline's last stage, over micro-batches: its counts add up to the function's on all of them.
    loss = PipelineLoss(HeadsStage(model))  # the heads stage shares the model's MTPLoss (loss_impl)
    loss.with_acceptance = True
    rope = model.rope(torch.arange(16).unsqueeze(0))
    with torch.no_grad():
        for rows in (slice(0, 2), slice(2, 3)):
            loss(model.trunk(tokens[rows], rope), labels[rows])
    assert torch.equal(loss.acceptance.as_tensor(), acceptance_counts(want).as_tensor())


@pytest.mark.parametrize("layout", ["single", pytest.param("pipeline", marks=pytest.mark.distributed),
                                    pytest.param("tensor", marks=pytest.mark.distributed),
                                    pytest.param("pipeline-tensor", marks=pytest.mark.distributed)])
def test_validation_logs_teacher_forced_acceptance(tmp_path, layout):
    """A short real run (sequential loss, ZeRO-1; one process, two pipeline stages whose last computes the
    figures, tensor parallelism with vocabulary-sharded logits, or both): the acceptance and tokens per forward its last validation logged equal the teacher-forced
    function's on the final model and the same validation batches, in the returned log, metrics.jsonl, the
    console line and DeepSpeed's monitor (CSV here; TensorBoard alike)."""
    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from train_synthetic import SyntheticLoader

    from mtplm.pretrain.train import parse_args

    out = tmp_path / "run"
    ds = json.loads((REPO / "ds_configs" / "zero1.json").read_text())
    ds["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "acc"}
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    args = ["--config", "configs/tiny.yaml", "--model.vocab_size", "200", "--data.seq_len", "32",
            "--train.steps", "30", "--train.eval_interval", "30", "--train.eval_iters", "2",
            "--train.out_dir", str(out), "--deepspeed_config", str(tmp_path / "ds.json")]
    cfg = parse_args(args)  # before the run: afterwards its checkpoints would make this a refused re-run
    parallel = {"pipeline": ["--parallel.pipeline", "2"], "tensor": ["--parallel.tensor", "2"],
                "pipeline-tensor": ["--parallel.pipeline", "2", "--parallel.tensor", "2"]}
    if layout in parallel:
        world = 4 if layout == "pipeline-tensor" else 2
        run_ranks(world, ["tests/workers/train_synthetic.py", *args, *parallel[layout]], timeout=600)
    else:
        proc = subprocess.run([sys.executable, "tests/workers/train_synthetic.py", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logged = json.loads((out / "train_log.json").read_text())["eval"][-1]

    n, seq_len = cfg.model.n_future_tokens, cfg.data.seq_len
    model = load_model(out / "final").eval()
    valid = iter(SyntheticLoader(cfg, 0, 1, n, 10**6))
    counts = None
    for _ in range(cfg.train.eval_iters):
        with torch.no_grad():
            c = acceptance_counts(model(next(valid)[:, :seq_len], all_heads=True).logits.argmax(-1))
        counts = c if counts is None else counts + c
    assert len(logged["acceptance"]) == n - 1
    assert logged["acceptance"] == pytest.approx(counts.acceptance, rel=1e-6)
    assert logged["tokens_per_forward"] == pytest.approx(counts.tokens_per_forward, rel=1e-6)
    assert 0 < logged["acceptance"][0] < 1 and logged["tokens_per_forward"][-1] > 1  # a figure with content

    record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert record["kind"] == "valid" and record["acceptance"] == logged["acceptance"]
    assert "| acceptance [" in (out / "logs" / "rank0.log").read_text()
    monitor_files = {p.name for p in (tmp_path / "monitor").rglob("*.csv")}
    assert {"valid_acceptance_draft3.csv", "valid_tokens_per_forward_3_drafts.csv"} <= monitor_files, monitor_files
    if layout == "single" and importlib.util.find_spec("matplotlib"):  # mtp-plot reads what the trainer wrote
        from mtplm.pretrain.plot import main as plot_main

        assert plot_main([str(out)]) == 0
        assert {p.name for p in (out / "plots").iterdir()} == {"loss.png", "lr.png", "throughput.png", "acceptance.png"}
