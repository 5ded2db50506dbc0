"""Assemble the DeepSpeed config: ZeRO, precision and communication come from the JSON in ds_configs/;
batch sizes, optimizer and clipping come from the training config (the LR schedule too, as a scheduler the
trainer hands to deepspeed.initialize: lr_schedule.py), so each value has one source. Values the JSON repeats must agree, or start-up stops with both values named."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from .config import ConfigError, TrainConfig

# Written by the trainer from the training config; a JSON that sets them differently is refused.
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def read_ds_json(path: str | Path | None) -> dict:
    if path is None:
        return {"zero_optimization": {"stage": 0}}
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"train.deepspeed_config: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at the top level")
    validate_ds_json(data, str(path))
    return data


# Sizes in zero_optimization with DeepSpeed 0.19.8's bounds (True: must be > 0, False: >= 0).
_ZERO_SIZES = {"reduce_bucket_size": True, "allgather_bucket_size": False, "sub_group_size": False,
               "stage3_prefetch_bucket_size": False, "stage3_param_persistence_threshold": False,
               "stage3_max_live_parameters": False, "stage3_max_reuse_distance": False}
_ZERO_FLAGS = ("contiguous_gradients", "reduce_scatter", "allgather_partitions", "overlap_comm",
               "round_robin_gradients", "stage3_gather_16bit_weights_on_model_save")


def validate_ds_json(ds: dict, src: str) -> None:
    """The fields the trainer and DeepSpeed's engine rely on, checked before any process starts, so a mistake
    gets one line naming the file and key instead of DeepSpeed's validation text after start-up."""
    def fail(key: str, expected: str, value) -> None:
        raise ConfigError(f"{src}: {key}: expected {expected}, got {json.dumps(value)}")

    def section(key: str) -> dict:
        value = ds.get(key, {})
        if not isinstance(value, dict):
            fail(key, "an object", value)
        return value

    def is_num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def is_int(v) -> bool:  # DeepSpeed also takes integral floats such as 5e8
        return is_num(v) and float(v).is_integer()

    if "bfloat16" in ds:
        raise ConfigError(f"{src}: bfloat16: DeepSpeed's old spelling; write it as \"bf16\"")
    for key in ("bf16", "fp16"):
        if "enabled" in section(key) and not isinstance(ds[key]["enabled"], bool):
            fail(f"{key}.enabled", "true or false", ds[key]["enabled"])
    if ds.get("bf16", {}).get("enabled") and ds.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{src}: bf16.enabled and fp16.enabled are both true; enable one of them")
    fp16 = ds.get("fp16", {})
    for key, ok, expected in (("loss_scale", lambda v: is_num(v) and v >= 0, "a number >= 0 (0: dynamic)"),
                              ("initial_scale_power", lambda v: is_int(v) and v >= 0, "an integer >= 0"),
                              ("loss_scale_window", lambda v: is_int(v) and v > 0, "an integer > 0"),
                              ("hysteresis", lambda v: is_int(v) and v > 0, "an integer > 0"),
                              ("min_loss_scale", lambda v: is_num(v) and v > 0, "a number > 0")):
        if key in fp16 and not ok(fp16[key]):
            fail(f"fp16.{key}", expected, fp16[key])

    zero = section("zero_optimization")
    stage = zero.get("stage", 0)
    if not is_int(stage) or not 0 <= stage <= 3:
        fail("zero_optimization.stage", "0, 1, 2 or 3", stage)
    for key, positive in _ZERO_SIZES.items():
        v = zero.get(key, 1)
        if not is_int(v) or v < (1 if positive else 0):
            fail(f"zero_optimization.{key}", f"an integer {'> 0' if positive else '>= 0'}", v)
    for key in _ZERO_FLAGS:
        if key in zero and not isinstance(zero[key], bool):
            fail(f"zero_optimization.{key}", "true or false", zero[key])
    for key, min_stage in (("offload_optimizer", 1), ("offload_param", 3)):
        if key not in zero or zero[key] is None:
            continue
        off = zero[key]
        if not isinstance(off, dict):
            fail(f"zero_optimization.{key}", "an object", off)
        device = off.get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            fail(f"zero_optimization.{key}.device", '"none", "cpu" or "nvme"', device)
        if device == "nvme" and not isinstance(off.get("nvme_path"), str):
            fail(f"zero_optimization.{key}.nvme_path", 'a folder (device is "nvme")', off.get("nvme_path"))
        if "pin_memory" in off and not isinstance(off["pin_memory"], bool):
            fail(f"zero_optimization.{key}.pin_memory", "true or false", off["pin_memory"])
        if device != "none" and stage < min_stage:
            raise ConfigError(f"{src}: zero_optimization.{key}: offloading needs ZeRO stage >= {min_stage}, "
                              f"zero_optimization.stage is {stage}")
    if "gradient_clipping" in ds and not (is_num(ds["gradient_clipping"]) and ds["gradient_clipping"] >= 0):
        fail("gradient_clipping", "a number >= 0", ds["gradient_clipping"])


def zero_stage(ds: dict) -> int:
    return int(ds.get("zero_optimization", {}).get("stage", 0))


def precision(ds: dict) -> str:
    if ds.get("bf16", {}).get("enabled", False):
        return "bf16"
    if ds.get("fp16", {}).get("enabled", False):
        return "fp16"
    return "fp32"


def check_arch_list_for_deepspeed(arch_list: str) -> None:
    """DeepSpeed 0.19.8 JIT-builds its fused Adam on the first step and parses every TORCH_CUDA_ARCH_LIST entry
    as numbers: an architecture-specific one that PyTorch accepts ("9.0a", as some CUDA images set for Hopper)
    makes it fail deep inside the op builder (int('0a'); DeepSpeed PR #8619). Say so before any work is done."""
    bad = [a for a in re.split(r"[;\s]+", arch_list.strip()) if a and not re.fullmatch(r"\d+\.\d+(\+PTX)?", a)]
    if bad:
        plain = ";".join(dict.fromkeys(re.sub(r"[a-z]+(?=$|\+)", "", a) for a in re.split(r"[;\s]+", arch_list.strip())
                                       if a))
        raise ConfigError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: DeepSpeed cannot build its fused Adam for "
                          f"{', '.join(bad)} (it accepts entries like 9.0 or 9.0+PTX only); set "
                          f"TORCH_CUDA_ARCH_LIST={plain!r} (the fused Adam needs no architecture-specific "
                          f"instructions)")


def build_ds_config(cfg: TrainConfig, ds_path: str | Path | None, dp_world_size: int, on_cpu: bool) -> dict:
    ds = read_ds_json(ds_path)
    src = str(ds_path) if ds_path else "the default DeepSpeed config"
    t, o = cfg.train, cfg.optim

    expected = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": t.micro_batch_size * t.grad_accum_steps * dp_world_size,
    }
    for key in _BATCH_KEYS:
        if key in ds and ds[key] != expected[key]:
            where = {"train_micro_batch_size_per_gpu": "train.micro_batch_size",
                     "gradient_accumulation_steps": "train.grad_accum_steps",
                     "train_batch_size": f"train.micro_batch_size x train.grad_accum_steps x data-parallel size "
                                         f"({t.micro_batch_size} x {t.grad_accum_steps} x {dp_world_size})"}[key]
            raise ConfigError(f"{src}: {key} is {ds[key]} but {where} gives {expected[key]}; remove it from the "
                              f"JSON (the trainer fills it in) or make them agree")
    if "gradient_clipping" in ds and float(ds["gradient_clipping"]) != o.grad_clip:
        raise ConfigError(f"{src}: gradient_clipping is {ds['gradient_clipping']} but optim.grad_clip is "
                          f"{o.grad_clip}; they must agree")
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{src}: has an '{key}' section; set optim.* in the training config instead "
                              f"(the trainer builds the optimizer and LR schedule from it, so there is one source "
                              f"of truth)")
    if cfg.parallel.pipeline > 1 and zero_stage(ds) >= 2:
        raise ConfigError(f"{src}: ZeRO-{zero_stage(ds)} cannot run with parallel.pipeline "
                          f"{cfg.parallel.pipeline}: DeepSpeed's pipeline engine supports ZeRO-0 and ZeRO-1 only. "
                          f"Use a zero1 config for the pipeline layout, or ZeRO-3 without pipeline stages")
    if precision(ds) == "fp16" and on_cpu:
        raise ConfigError(f"{src}: fp16 is not supported by DeepSpeed's CPU accelerator; use bf16 or fp32 on CPU")

    ds.update(expected)
    ds["gradient_clipping"] = o.grad_clip
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") not in (None, "none")
    adam_params = {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay}
    if on_cpu and not offload:
        # torch's AdamW: DeepSpeed's fused Adam is a GPU kernel; on CPU it would JIT-build for nothing.
        adam_params["torch_adam"] = True
    elif not on_cpu:
        check_arch_list_for_deepspeed(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    ds["optimizer"] = {"type": "AdamW", "params": adam_params}
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; DeepSpeed's own step prints are noise
    ds.setdefault("wall_clock_breakdown", False)
    return ds
