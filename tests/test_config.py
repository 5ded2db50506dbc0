"""The config system: files, overrides, and errors that name the key."""

import json

import pytest

from mtplm.pretrain.config import ConfigError, TrainConfig, load_config, parse_overrides
from mtplm.pretrain.ds_config import build_ds_config


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
])
def test_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_config(TrainConfig, None, overrides)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(TrainConfig, bad)


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
    assert built["scheduler"]["params"]["warmup_type"] == "linear"


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
