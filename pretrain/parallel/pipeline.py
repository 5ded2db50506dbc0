"""The pipeline layout: the same model cut into DeepSpeed PipelineModule layers.

    layer 0          embedding                                  (first stage)
    layers 1 .. L    one trunk block each                       (spread over the stages)
    layer L + 1      the n heads, shared norm and unembedding   (last stage)

The layers hold the modules of an MTPTransformer built (and, with tensor parallelism, split) the usual way, so
there is one model implementation and a pipeline run starts from the same weights as any other. The heads
need the labels, so the last layer passes the trunk output through and the pipeline's loss function runs the
MTP loss (sequential heads by default) on it: the heads' work stays one autograd node on the last stage, and
the gradient of the trunk output flows back through the pipeline like any activation gradient. Imports
DeepSpeed's PipelineModule (the layout is one) and its balanced partitioner.

Tied embeddings: layer 0 and a pass-through layer after the heads are DeepSpeed TiedLayerSpecs of one key, so
the first and the last stage each hold the embedding (on the last it is the heads' unembedding weight, the same
Parameter), DeepSpeed broadcasts it from the first stage at the start and all-reduces its gradient between the
two before every optimizer step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mtplm.inference.acceptance import acceptance_counts
from mtplm.model.transformer import MTPTransformer, rope_for


class EmbeddingStage(nn.Module):
    def __init__(self, model: MTPTransformer):
        super().__init__()
        self.tok_embeddings = model.tok_embeddings

    def forward(self, tokens):
        return self.tok_embeddings(tokens)


class TrunkBlockStage(nn.Module):
    def __init__(self, model: MTPTransformer, index: int):
        super().__init__()
        self.cfg = model.cfg
        self.block = model.layers[index]

    def forward(self, h):
        # Rotary tables are recomputed per block: (T, head_dim/2) numbers, cheaper than sending them along.
        return self.block(h, rope_for(h, self.cfg))


class HeadsStage(nn.Module):
    """The heads, shared norm and unembedding (model.mtp_loss.LossHeads), and the model's own MTPLoss object, so
    whatever configures the model's loss (tensor parallelism's cross-entropy, the engine's hook) holds here too."""

    def __init__(self, model: MTPTransformer):
        super().__init__()
        self.cfg = model.cfg
        self.head_blocks = nn.ModuleList([model.layers[-1], *model.extra_heads])
        self.norm, self.output = model.norm, model.output
        self.loss = model.loss

    def head_forward(self, k, h, rope, cache=None, attn_mask=None):
        return self.head_blocks[k](h, rope, cache, attn_mask)

    def forward(self, h):
        return h  # the heads run in PipelineLoss, which has the labels


class PipelineLoss:
    """The pipeline's loss_fn: the MTP loss of one micro-batch on the last stage. Per-head losses are summed
    over the micro-batches of a train_batch/eval_batch for the trainer to report (see head_losses)."""

    def __init__(self, heads: HeadsStage):
        self.heads = heads
        self.grad_scale = 1.0  # set by pretrain/engine.py before each train_batch (see model.mtp_loss)
        self.with_acceptance = False  # set by pretrain/engine.py around eval_batch: also count draft acceptance
        self.reset()

    def reset(self) -> None:
        self.head_sum, self.count, self.acceptance = None, 0, None

    def __call__(self, h, labels):
        cfg = self.heads.cfg
        argmax = None
        if self.with_acceptance:
            argmax = torch.empty(cfg.n_future_tokens, *h.shape[:2], dtype=torch.long, device=h.device)
        total, head_losses = self.heads.loss(self.heads, h, rope_for(h, cfg), labels,
                                             self.grad_scale if torch.is_grad_enabled() else 1.0, argmax)
        if argmax is not None:
            counts = acceptance_counts(argmax)
            self.acceptance = counts if self.acceptance is None else self.acceptance + counts
        head_losses = head_losses.detach().float()
        self.head_sum = head_losses if self.head_sum is None else self.head_sum + head_losses
        self.count += 1
        return total


TIED_KEY = "embedding"


def _pass_through(embedding: EmbeddingStage, h):
    return h


def pipeline_layers(model: MTPTransformer) -> list[nn.Module]:
    trunk = [TrunkBlockStage(model, i) for i in range(model.cfg.n_trunk_layers)]
    return [EmbeddingStage(model), *trunk, HeadsStage(model)]


def layer_costs(layers: list[nn.Module], method: str) -> list[int]:
    """Relative cost of each layer for balancing the stages. "blocks": compute, in units of one trunk block
    (matmul FLOPs scale with parameters; the embedding is a lookup), so the heads layer weighs n blocks plus
    the unembedding; "parameters": memory."""
    sizes = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    if method == "parameters":
        return sizes
    if method == "uniform":
        return [1] * len(layers)
    block = sizes[1] if len(layers) > 2 else sizes[-1]
    return [0] + [round(1000 * s / block) for s in sizes[1:]]


def stage_bounds(costs: list[int], num_stages: int, tied: bool) -> list[int]:
    """parts[s]:parts[s + 1] are the layers of stage s: balanced on layer_costs (DeepSpeed's "type:" would count
    every layer of a type as one, but the heads layer is n blocks plus the unembedding). Tied: the embedding's
    copy for the unembedding, one layer past the heads, goes with the heads."""
    from deepspeed.runtime import utils as ds_utils

    parts = ds_utils.partition_balanced(weights=costs, num_parts=num_stages)
    if tied:
        parts[-1] += 1
    return parts


def stage_parameters(model: MTPTransformer, num_stages: int, stage: int, partition_method: str) -> list[nn.Parameter]:
    """The parameters of `model` that build_pipeline_module keeps on `stage` (what the lean build materialises)."""
    layers = pipeline_layers(model)
    parts = stage_bounds(layer_costs(layers, partition_method), num_stages, model.cfg.tie_embeddings)
    if model.cfg.tie_embeddings:
        layers.append(layers[0])
    return [p for layer in layers[parts[stage]:parts[stage + 1]] for p in layer.parameters()]


def build_pipeline_module(model: MTPTransformer, topology, partition_method: str, checkpoint_interval: int = 0):
    """Collective: a PipelineModule over `model`'s modules, partitioned on `topology`; non-local layers are
    dropped. checkpoint_interval > 0 recomputes each stage's trunk blocks in units of that many consecutive
    layers (DeepSpeed's interval; a unit that holds the embedding or the heads is not recomputed).
    Returns (module, loss)."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    layers = pipeline_layers(model)
    costs = layer_costs(layers, partition_method)
    heads = layers[-1]
    tied = model.cfg.tie_embeddings
    if tied:
        def embedding(**kw):
            return TiedLayerSpec(TIED_KEY, EmbeddingStage, model, tied_weight_attr="tok_embeddings.weight", **kw)

        layers = [embedding(), *layers[1:], embedding(forward_fn=_pass_through)]

    class MTPPipelineModule(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = stage_bounds(costs, self.num_stages, tied)
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

    loss = PipelineLoss(heads)
    module = MTPPipelineModule(layers=layers, topology=topology, loss_fn=loss, partition_method=partition_method,
                               activation_checkpoint_interval=checkpoint_interval,
                               checkpointable_layers=[TrunkBlockStage.__name__])
    if not module._grid.is_last_stage:
        loss.heads = None  # the heads live on the last stage only; let the other stages free them
    return module, loss


def meta_name(pipeline_name: str, n_trunk: int) -> str:
    """'<layer>.<name inside the layer>' of the pipeline module -> the model's (Meta's) parameter name."""
    if pipeline_name.startswith("tied_modules."):  # tied_modules.<key>.<name inside EmbeddingStage>
        return pipeline_name.split(".", 2)[2]
    index, _, rest = pipeline_name.partition(".")
    index = int(index)
    if index == 0:
        return rest
    if index <= n_trunk:
        return f"layers.{index - 1}.{rest.removeprefix('block.')}"
    if rest.startswith("head_blocks."):
        k, _, inner = rest.removeprefix("head_blocks.").partition(".")
        return f"layers.{n_trunk}.{inner}" if k == "0" else f"extra_heads.{int(k) - 1}.{inner}"
    return rest


def gather_pipeline_state_dict(stage_state: dict[str, torch.Tensor], n_trunk: int, grid, keep: bool):
    """Collective over the pipe group: every stage's (already tensor-gathered) parameters, with Meta's names,
    on the rank with keep=True (which must be a stage-0 rank of this group); {} elsewhere."""
    local = {meta_name(k, n_trunk): v for k, v in stage_state.items()}
    group_ranks = grid.pp_group
    parts = [None] * len(group_ranks) if keep else None
    dist.gather_object(local, parts, dst=group_ranks[0], group=grid.get_pipe_parallel_group())
    if not keep:
        return {}
    merged = {}
    for part in parts:
        merged.update(part)
    return merged
