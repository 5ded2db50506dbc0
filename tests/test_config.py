"""The config system: files, overrides, and errors that name the key."""

import json
import os
import re
import subprocess
import sys

import pytest

from dist_launch import REPO
from mtplm.pretrain.config import ConfigError, TrainConfig, load_config, parse_overrides
from mtplm.pretrain.ds_config import build_ds_config, read_ds_json


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {dim: 64, n_heads: 4, n_layers: 4, n_future_tokens: 2}\noptim: {lr: 3e-4}\n")
    cfg = load_config(TrainConfig, path, ["--model.n_future_tokens", "4", "--optim.betas", "[0.9, 0.99]",
                                          "--train.activation_checkpointing", "--train.steps=7"])
    assert cfg.model.n_future_tokens == 4 and cfg.model.dim == 64
    assert cfg.optim.lr == pytest.approx(3e-4) and cfg.optim.betas == [0.9, 0.99]
    assert cfg.train.activation_checkpointing is True and cfg.train.steps == 7


def test_json_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"model": {"dim": 128, "n_heads": 8}}))
    assert load_config(TrainConfig, path).model.n_heads == 8


@pytest.mark.parametrize("overrides, message", [
    (["--model.n_future_tokens", "0"], "model.n_future_tokens: must be >= 1"),
    (["--model.n_heads", "32", "--model.n_kv_heads", "5"], "model.n_kv_heads"),
    (["--model.dim", "100", "--model.n_heads", "3"], "model.n_heads: dim (100) must be divisible"),
    (["--model.n_layers", "2", "--model.n_future_tokens", "4"], "model.n_layers"),
    (["--model.n_future_tokens", "2", "--model.head_loss_weights", "[1.0]"], "model.head_loss_weights"),
    (["--model.bogus", "1"], "unknown key model.bogus"),
    (["--trian.steps", "1"], "unknown key trian"),
    (["--train.steps", "ten"], "train.steps: expected an integer, got 'ten'"),
    (["--train.loss_impl", "fast"], "train.loss_impl"),
    (["--data.seq_len", "4096"], "data.seq_len: 4096 exceeds model.max_seq_len"),
    (["--optim.betas", "[0.9]"], "optim.betas"),
    (["--data.weights", "[0.5]"], "data.weights"),
    (["--optim.grad_clip", "-1"], "optim.grad_clip: must be >= 0, got -1"),
    (["--optim.warmup_steps", "-2"], "optim.warmup_steps: must be >= 0, got -2"),
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(TrainConfig, None, overrides)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:2:1: not valid YAML: expected ',' or ']'") as e:
        load_config(TrainConfig, bad)
    assert "\n" not in str(e.value)  # YAML's own text spans lines with a source excerpt


def test_out_dir_under_a_file_is_refused_at_load(tmp_path):
    from mtplm.pretrain.preflight import check_input_files

    (tmp_path / "f").write_text("")
    for out_dir in (tmp_path / "f", tmp_path / "f" / "run"):
        cfg = load_config(TrainConfig, None, ["--train.out_dir", str(out_dir)])
        with pytest.raises(ConfigError, match=f"train.out_dir: {out_dir}: {tmp_path}/f is a file, not a folder"):
            check_input_files(cfg, datasets=False)


def test_override_parsing():
    assert parse_overrides(["--a.b", "1", "--a.c=x", "--flag"]) == {"a": {"b": 1, "c": "x"}, "flag": True}
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["positional"])


def test_deepspeed_json_must_agree_with_the_training_config(tmp_path):
    cfg = load_config(TrainConfig, None, ["--train.micro_batch_size", "4", "--train.grad_accum_steps", "2"])
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu is 8 but train.micro_batch_size gives 4"):
        build_ds_config(cfg, ds, dp_world_size=2, on_cpu=True)
    ds.write_text(json.dumps({"train_batch_size": 8}))
    with pytest.raises(ConfigError, match="train_batch_size is 8"):
        build_ds_config(cfg, ds, dp_world_size=2, on_cpu=True)
    ds.write_text(json.dumps({"gradient_clipping": 0.5}))
    with pytest.raises(ConfigError, match="gradient_clipping is 0.5 but optim.grad_clip is 1.0"):
        build_ds_config(cfg, ds, dp_world_size=2, on_cpu=True)
    ds.write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="has an 'optimizer' section"):
        build_ds_config(cfg, ds, dp_world_size=2, on_cpu=True)
    ds.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json: not valid JSON"):
        build_ds_config(cfg, ds, dp_world_size=2, on_cpu=True)
    ds.write_text(json.dumps({"gradient_clipping": 1.0, "train_micro_batch_size_per_gpu": 4, "bf16": {"enabled": True}}))
    built = build_ds_config(cfg, ds, dp_world_size=2, on_cpu=True)
    assert built["train_batch_size"] == 16 and built["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert "scheduler" not in built  # the trainer hands deepspeed.initialize its own (pretrain/lr_schedule.py)


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for path in sorted((root / "configs").glob("*.yaml")):
        load_config(TrainConfig, path)
    for path in sorted((root / "ds_configs").glob("*.json")):
        data = json.loads(path.read_text())
        assert data["gradient_clipping"] == 1.0, f"{path.name}: gradient_clipping must be explicit"


@pytest.mark.parametrize("arch_list", ["9.0a", "8.0;9.0a+PTX", "8.6 10.0f"])
def test_cuda_arch_list_deepspeed_cannot_parse_is_refused_with_the_fix(monkeypatch, arch_list):
    # The reference is DeepSpeed's own parser (the one its fused Adam's JIT build runs on a GPU's first step):
    # the value is refused exactly when that parser fails, and the suggested value is one it accepts.
    from deepspeed.ops.op_builder.fused_adam import FusedAdamBuilder

    def deepspeed_parses(value: str) -> bool:
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        builder = FusedAdamBuilder()
        builder.jit_mode = True
        try:
            builder.compute_capability_args()
            return True
        except ValueError:
            return False

    cfg = load_config(TrainConfig, None, [])
    assert not deepspeed_parses(arch_list)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    with pytest.raises(ConfigError, match="TORCH_CUDA_ARCH_LIST=.*set TORCH_CUDA_ARCH_LIST='([^']+)'") as err:
        build_ds_config(cfg, None, dp_world_size=1, on_cpu=False)
    suggested = err.value.args[0].split("set TORCH_CUDA_ARCH_LIST='")[1].split("'")[0]
    assert deepspeed_parses(suggested)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", suggested)
    assert "torch_adam" not in build_ds_config(cfg, None, dp_world_size=1, on_cpu=False)["optimizer"]["params"]


@pytest.mark.parametrize("ds, key", [
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage: expected 0, 1, 2 or 3, got 7"),
    ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage"),
    ({"zero_optimization": [3]}, "zero_optimization: expected an object"),
    ({"bf16": {"enabled": "yes"}}, "bf16.enabled: expected true or false"),
    ({"bf16": {"enabled": True}, "fp16": {"enabled": True}}, "bf16.enabled and fp16.enabled are both true"),
    ({"bfloat16": {"enabled": True}}, "bfloat16: DeepSpeed's old spelling"),
    ({"fp16": {"enabled": True, "loss_scale_window": 0}}, "fp16.loss_scale_window: expected an integer > 0"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}}, "zero_optimization.reduce_bucket_size"),
    ({"zero_optimization": {"stage": 2, "allgather_bucket_size": -1}}, "zero_optimization.allgather_bucket_size"),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "5e7"}},
     "zero_optimization.stage3_prefetch_bucket_size"),
    ({"zero_optimization": {"stage": 2, "overlap_comm": 1}}, "zero_optimization.overlap_comm: expected true or false"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}},
     "zero_optimization.offload_param.device: expected \"none\", \"cpu\" or \"nvme\""),
    ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}},
     "zero_optimization.offload_param: offloading needs ZeRO stage >= 3"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
     "zero_optimization.offload_optimizer.nvme_path"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping: expected a number >= 0"),
])
def test_deepspeed_json_fields_are_checked_with_file_and_key(tmp_path, ds, key):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    with pytest.raises(ConfigError, match="^" + re.escape(f"{path}: {key}")):
        read_ds_json(path)


def test_deepspeed_json_accepts_what_deepspeed_accepts(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 5e8, "sub_group_size": 0,
                                                      "offload_optimizer": {"device": "nvme", "nvme_path": "/nvme"}},
                                "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}}))
    read_ds_json(path)


def _refusal(tmp_path, *args):
    """mtp-train's whole output for a run that must be refused: (exit code, non-empty lines)."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"dim": 64, "n_layers": 5, "n_heads": 4, "vocab_size": 200,
                                         "n_future_tokens": 4, "max_seq_len": 64}, "data": {"seq_len": 16}}))
    proc = subprocess.run([sys.executable, "pretrain/train.py", "--config", str(cfg),
                           "--train.out_dir", str(tmp_path / "run"), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    return proc.returncode, [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


@pytest.mark.parametrize("args, message", [
    (["--deepspeed_config", "{tmp}/ds.json"], "{tmp}/ds.json: zero_optimization.stage: expected 0, 1, 2 or 3, got 7"),
    (["--data.datasets", "[]"], "data.datasets: empty"),
    (["--data.datasets", "[{tmp}/data, {tmp}/nope]"], "data.datasets[1]: dataset {tmp}/nope: neither a folder"),
    (["--data.datasets", "[{tmp}/folder]"], "data.datasets[0]: {tmp}/folder: a dataset folder needs dataset.json"),
    (["--data.datasets", "[{tmp}/half]"], "data.datasets[0]: {tmp}/half: shard {tmp}/half.bin is missing"),
    (["--data.tokenizer", "{tmp}/tok.model"], "data.tokenizer: {tmp}/tok.model is not a file"),
    (["--train.init_from", "{tmp}/model"], "train.init_from: {tmp}/model is not a consolidated model folder"),
    (["--train.resume", "{tmp}/ckpt"], "train.resume: {tmp}/ckpt is not a complete checkpoint"),
    # from the manifests, not at engine start-up
    (["--data.datasets", "[{tmp}/small]", "--data.split", "[0.9, 0.1, 0]"],
     "data.datasets[0]: dataset {tmp}/small: its valid split is empty"),
    (["--data.datasets", "[{tmp}/wide]"],
     "data.datasets[0]: {tmp}/wide/dataset.json: tokenized with vocab_size 300, but model.vocab_size is 200"),
    (["--data.datasets", "[{tmp}/high]"],
     "data.datasets[0]: {tmp}/high/dataset.json: holds token id 250, but model.vocab_size is 200"),
    (["--data.tokenizer", "bytes"], "data.datasets[0]: {tmp}/data/dataset.json: tokenized with tokenizer sha256 abab"),
    (["--data.tokenizer", "{tmp}/text.model"], "data.tokenizer: {tmp}/text.model: not a SentencePiece model"),
], ids=["zero7", "no-datasets", "missing-dataset", "folder-without-manifest", "missing-shard", "missing-tokenizer",
        "missing-init-from", "missing-resume", "empty-split", "manifest-vocab", "manifest-max-id", "tokenizer-sha256",
        "tokenizer-not-sentencepiece"])
def test_refusals_come_before_deepspeed_starts_as_one_line(tmp_path, args, message):
    from mtplm.data.synthetic import write_token_dataset

    docs = [[1, 2, 3, 4, 5, 6, 7, 8]] * 60  # the default data.split leaves the valid split one document
    write_token_dataset(tmp_path / "data", docs, vocab_size=200, tokenizer_sha256="ab" * 32)
    write_token_dataset(tmp_path / "small", docs[:3], vocab_size=200)
    write_token_dataset(tmp_path / "wide", docs, vocab_size=300)
    high = write_token_dataset(tmp_path / "high", docs + [[1, 250]], vocab_size=300)
    for f in high.glob("*.json"):  # a manifest that records no vocabulary, only the ids it holds
        f.write_text(json.dumps({**json.loads(f.read_text()), "vocab_size": None}))
    (tmp_path / "half.idx").write_bytes(b"")  # 'half' lacks its .bin
    (tmp_path / "text.model").write_text("not a tokenizer\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 7}}))
    code, lines = _refusal(tmp_path, "--data.datasets", f"[{tmp_path}/data]", *(a.format(tmp=tmp_path) for a in args))
    assert code == 2, lines
    # one line, the last thing printed: nothing from DeepSpeed before or after it
    assert len(lines) == 1 and lines[0].startswith(f"mtp-train: configuration error: {message.format(tmp=tmp_path)}"), \
        lines


def test_a_rerun_into_a_run_with_checkpoints_is_refused(tmp_path):
    """Without --train.resume, a second mtp-train into the same out_dir would train over the first run's
    checkpoints from step 0; it is refused instead, before DeepSpeed starts, saying how to continue."""
    from mtplm.data.synthetic import write_token_dataset

    write_token_dataset(tmp_path / "data", [[1, 2, 3, 4, 5, 6, 7, 8]] * 60, vocab_size=200)
    done = tmp_path / "run" / "checkpoints" / "step_00000004"
    done.mkdir(parents=True)
    (done / "COMPLETE").write_text("")
    code, lines = _refusal(tmp_path, "--data.datasets", f"[{tmp_path}/data]")
    assert code == 2, lines
    assert len(lines) == 1 and "already holds" in lines[0] and "step_00000004" in lines[0] \
        and "--train.resume auto" in lines[0], lines
