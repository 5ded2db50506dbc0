"""What the trainer reports about a run: the start-up description, each step's throughput, and the accelerator's
peak for MFU."""

from __future__ import annotations

import time

import torch

from mtplm.data.fingerprint import describe, digest
from mtplm.model.flops import count_params, flops_per_token

from .config import TrainConfig
from .parallel.compile import describe as describe_compile

# Dense bf16 peak of common accelerators, for MFU; override with train.peak_tflops.
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def peak_flops(cfg: TrainConfig) -> float | None:
    if cfg.train.peak_tflops > 0:
        return cfg.train.peak_tflops * 1e12
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in _PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def startup_lines(cfg: TrainConfig, dist, layout, dp_world: int, fingerprint, zero_stage: int, precision: str,
                  local_params: int, total_params: int) -> list[str]:
    """The lines the trainer logs once it is built (dist: DistInfo, layout: ParallelLayout)."""
    lines = []
    if fingerprint is not None:
        lines.append(f"data fingerprint {digest(fingerprint)}, the same on all {dist.world_size} ranks: "
                     + "; ".join(f"{d['path']} ({describe(d)})" for d in fingerprint["datasets"]))
    c = count_params(cfg.model)
    f = flops_per_token(cfg.model, cfg.data.seq_len)
    lines.append(
        f"model: {c.total / 1e6:.2f}M parameters (embedding {c.embedding / 1e6:.2f}M, trunk blocks "
        f"{c.trunk_blocks / 1e6:.2f}M, {cfg.model.n_future_tokens} heads {c.heads / 1e6:.2f}M, norm+unembedding "
        f"{c.shared_head / 1e6:.2f}M); {f.training / 1e6:.1f} MFLOP/token per training step "
        f"(trunk fwd {f.trunk_forward / 1e6:.1f}, heads fwd {f.heads_forward / 1e6:.1f})")
    lines.append(
        f"world {dist.world_size} on {'CPU' if dist.on_cpu else 'GPU'}, ZeRO-{zero_stage}, "
        f"{precision}, micro-batch {cfg.train.micro_batch_size} x accumulation "
        f"{cfg.train.grad_accum_steps} x data-parallel {dp_world}, tensor-parallel "
        f"{layout.tensor.world}, pipeline {cfg.parallel.pipeline}, loss path {cfg.train.loss_impl}")
    t = cfg.train
    if t.activation_checkpointing:
        lines.append("activation checkpointing: " + (
            f"whole trunk blocks, {t.activation_checkpoint_interval} per recomputed unit"
            if t.activation_checkpoint_policy == "full" else
            "selective (trunk blocks keep matmul and attention outputs, recompute the elementwise ops)"))
    if t.compile:
        lines.append(describe_compile(zero_stage))
    if zero_stage == 3:
        tp = layout.tensor.world
        shard = "the model" if tp == 1 else f"its 1/{tp} tensor-parallel shard of the model"
        lines.append(f"built under zero.Init: this rank keeps {local_params / 1e6:.2f}M of the "
                     f"{total_params / 1e6:.2f}M parameters of {shard}")
    return lines


class Throughput:
    """The figures each step's record carries beside its losses and data consumed: tokens/s since the last
    measured step, and on a GPU MFU and peak memory. Time spent evaluating or saving is left out (restart())."""

    def __init__(self, cfg: TrainConfig, world_size: int, on_cpu: bool, step: int):
        self.world_size, self.on_cpu = world_size, on_cpu
        self.flops_token = flops_per_token(cfg.model, cfg.data.seq_len).training
        self.peak = None if on_cpu else peak_flops(cfg)
        if not on_cpu:
            torch.cuda.reset_peak_memory_stats()
        self.last_step = step
        self.restart()

    def restart(self) -> None:
        self.last_time = time.perf_counter()

    def measure(self, step: int, tokens_per_step: int) -> dict:
        now = time.perf_counter()
        m = {"tokens_per_s": tokens_per_step * (step - self.last_step) / max(now - self.last_time, 1e-9)}
        m["tokens_per_s_per_rank"] = m["tokens_per_s"] / self.world_size
        if self.peak:
            m["mfu"] = m["tokens_per_s_per_rank"] * self.flops_token / self.peak
        if not self.on_cpu:
            m["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        self.last_time, self.last_step = now, step
        return m
