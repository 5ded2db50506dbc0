"""The training configuration: typed dataclasses, loaded like every tool's options (mtplm.config).

    cfg = load_config(TrainConfig, "configs/tiny.yaml", ["--model.n_future_tokens", "4"])

Unknown keys, wrong types and impossible combinations fail at load time with a ConfigError naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mtplm.config import ConfigError, config_error_exit, from_dict, load_config, parse_overrides, to_dict
from mtplm.data.config import DataConfig
from mtplm.model.config import ModelConfig

# The loading functions are re-exported: training code and its tests take them from here with TrainConfig.
__all__ = ["ConfigError", "ModelConfig", "DataConfig", "OptimConfig", "TrainLoopConfig", "ParallelConfig", "TrainConfig",
           "load_config", "from_dict", "to_dict", "parse_overrides", "config_error_exit"]


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # 0 disables; written into the DeepSpeed config as gradient_clipping

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"optim.betas: expected two values in [0, 1), got {self.betas}")
        for key in ("warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                raise ConfigError(f"optim.{key}: must be >= 0, got {getattr(self, key)}")

    __post_init__ = validate


@dataclass
class TrainLoopConfig:
    steps: int = 1000  # optimizer steps
    micro_batch_size: int = 8  # per data-parallel rank
    grad_accum_steps: int = 1
    # Sequences per optimizer step over all data-parallel ranks (Megatron's --global-batch-size): when set,
    # grad_accum_steps is derived from it at start-up, so one config keeps its batch on any number of GPUs.
    global_batch_size: int = 0
    loss_impl: str = "sequential"  # "sequential" (memory-flat in n) or "naive" (reference)
    ce_chunk_tokens: int = 0  # tokens per cross-entropy chunk; 0 picks chunk logits ~ hidden-state size
    activation_checkpointing: bool = False  # recompute trunk blocks in backward
    activation_checkpoint_interval: int = 1  # consecutive trunk blocks per recomputed unit ("full" policy)
    # "full": whole trunk blocks (in units of activation_checkpoint_interval) keep only their input; "selective":
    # every trunk block keeps its matmul and attention outputs and recomputes the rest (norms, rotary, SwiGLU
    # gating, residual adds), as torchtitan's op-level mode (parallel/recompute.py).
    activation_checkpoint_policy: str = "full"
    compile: bool = False  # torch.compile each transformer block and the cross-entropy's chunk (parallel/compile.py)
    compile_backend: str = "inductor"  # torch.compile's backend: "aot_eager" traces the same graphs, no codegen
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 200  # 0 disables validation
    eval_iters: int = 10
    out_dir: str = "runs/default"
    save_interval: int = 0  # 0: save only at the end
    keep_last: int = 3
    resume: str = "none"  # "none", "auto" (newest complete checkpoint in out_dir), or a checkpoint path
    # Start from a consolidated model's weights (not its optimizer); n_future_tokens may differ
    # (see checkpointing/init_from.py).
    init_from: str | None = None
    save_final: bool = True
    deepspeed_config: str | None = None  # JSON; also accepted as --deepspeed_config (the launcher's spelling)
    metrics_file: str = "metrics.jsonl"  # in out_dir, rank 0 only
    # Task accuracy during training (mtp-eval --tasks' JSONL files), greedy, on rank 0, every eval_tasks_interval
    # steps (0: at every validation) and at the last step; needs data.tokenizer.
    eval_tasks: list[str] = field(default_factory=list)
    eval_tasks_interval: int = 0
    eval_tasks_max_new_tokens: int = 64
    peak_tflops: float = 0.0  # accelerator peak for MFU; 0 looks the GPU up in a table

    def validate(self) -> None:
        if self.global_batch_size < 0:
            raise ConfigError(f"train.global_batch_size: must be >= 0 (0: micro_batch_size x grad_accum_steps x "
                              f"data-parallel size), got {self.global_batch_size}")
        for key in ("steps", "micro_batch_size", "grad_accum_steps", "log_interval", "activation_checkpoint_interval"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("ce_chunk_tokens", "eval_interval", "eval_iters", "save_interval", "keep_last",
                    "eval_tasks_interval", "eval_tasks_max_new_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if self.loss_impl not in ("sequential", "naive"):
            raise ConfigError(f"train.loss_impl: expected 'sequential' or 'naive', got {self.loss_impl!r}")
        if self.compile and self.compile_backend != "inductor":
            import torch._dynamo

            if self.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
                raise ConfigError(f"train.compile_backend: {self.compile_backend!r} is not a torch.compile backend "
                                  f"(e.g. 'inductor', 'aot_eager')")
        if self.activation_checkpoint_policy not in ("full", "selective"):
            raise ConfigError(f"train.activation_checkpoint_policy: expected 'full' or 'selective', "
                              f"got {self.activation_checkpoint_policy!r}")

    __post_init__ = validate


@dataclass
class ParallelConfig:
    """Model parallelism; data parallelism takes the remaining ranks (world / (tensor x pipeline))."""

    tensor: int = 1  # Megatron-style tensor parallelism of every block, the embedding and the unembedding
    pipeline: int = 1  # pipeline stages: embedding and trunk blocks spread over them, the heads on the last
    # How stages are balanced: "blocks" (compute: the heads layer counts as n blocks plus the unembedding),
    # "parameters" (memory) or "uniform" (layer count).
    pipeline_partition: str = "blocks"

    def validate(self) -> None:
        for key in ("tensor", "pipeline"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}: must be >= 1, got {getattr(self, key)}")
        if self.pipeline_partition not in ("blocks", "parameters", "uniform"):
            raise ConfigError(f"parallel.pipeline_partition: expected 'blocks', 'parameters' or 'uniform', "
                              f"got {self.pipeline_partition!r}")

    __post_init__ = validate


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len ({self.model.max_seq_len})"
            )
        self._validate_tensor_parallel()
        self._validate_pipeline()

    def _validate_pipeline(self) -> None:
        m, pp = self.model, self.parallel.pipeline
        if pp == 1:
            return
        layers = m.n_trunk_layers + 2  # embedding, trunk blocks, heads
        if pp > layers:
            raise ConfigError(f"parallel.pipeline: {pp} stages but the model has only {layers} pipeline layers "
                              f"(embedding, {m.n_trunk_layers} trunk blocks, heads)")

    def _validate_tensor_parallel(self) -> None:
        m, tp = self.model, self.parallel.tensor
        if tp == 1:
            return
        for what, key, value in (("attention heads", "model.n_heads", m.n_heads),
                                 ("key/value heads", "model.n_kv_heads", m.kv_heads),
                                 ("feed-forward width", "model.multiple_of / ffn_dim_multiplier", m.ffn_hidden_dim)):
            if value % tp:
                raise ConfigError(f"parallel.tensor: {tp} ranks cannot split {value} {what} ({key}); "
                                  f"it must divide them")
        if m.padded_vocab_size % tp:
            multiple = math.lcm(m.vocab_pad_multiple, tp)
            raise ConfigError(f"parallel.tensor: the padded vocabulary ({m.padded_vocab_size}) is not divisible by "
                              f"{tp}; set model.vocab_pad_multiple to {multiple} (a multiple of {tp} and of "
                              f"{m.vocab_pad_multiple})")
