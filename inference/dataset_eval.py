"""Per-head loss, perplexity and teacher-forced draft acceptance of a model on a dataset (mtp-eval --data).

The samples are the trainer's: data/loader.py's datasets (the same split of documents, seq_len + n tokens per
sample, packed across documents), read in order from the start of the split; each batch goes through the
model's own loss path (MTPTransformer.forward with labels, as Trainer.evaluate does), which also returns every
head's greedy token for inference/acceptance.py. Head losses are means over every target token, so the result
does not depend on the batch size.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader

from mtplm.data.config import DataConfig
from mtplm.data.loader import BlendedDataset, DistributedBatchSampler, _stack, build_datasets

from .acceptance import AcceptanceCounts, acceptance_counts


def eval_samples(cfg: DataConfig, split: str, n_future_tokens: int, vocab_size: int,
                 tokenizer_sha256: str | None) -> BlendedDataset:
    """One epoch of the split's samples, blended by the config's weights as training blends them."""
    parts, weights = build_datasets(cfg, n_future_tokens, vocab_size, tokenizer_sha256, split)
    return BlendedDataset(parts, weights, length=sum(len(p) for p in parts))


@torch.no_grad()
def dataset_metrics(model, samples, seq_len: int, batch_size: int, limit: int | None = None,
                    progress: bool | None = None) -> dict:
    """Figures over the first `limit` samples (all by default) of `samples`, in batches of batch_size."""
    from tqdm import tqdm

    total = len(samples) if limit is None else min(limit, len(samples))
    if total == 0:
        raise ValueError("the dataset split holds no complete sample of seq_len + n_future_tokens tokens")
    model.eval()
    device = next(model.parameters()).device
    n = model.cfg.n_future_tokens
    loader = DataLoader(samples, batch_sampler=DistributedBatchSampler(batch_size, 0, 1, 0, total // batch_size
                                                                       * batch_size), collate_fn=_stack)
    batches = list(iter(loader))
    if total % batch_size:  # the sampler keeps whole batches only; the rest is one smaller batch
        batches.append(_stack([samples[i] for i in range(total - total % batch_size, total)]))
    head_sum = torch.zeros(n, dtype=torch.float64)
    counts = None
    bar = tqdm(batches, desc="loss", unit="batch", disable=None if progress is None else not progress)
    done = 0
    for batch in bar:
        batch = batch.to(device)
        out = model(batch[:, :seq_len], batch[:, 1:], head_argmax=n > 1)
        # Every sample has a target for every head at every position: a batch mean times its rows is a sum.
        head_sum += out.head_losses.double().cpu() * len(batch)
        done += len(batch)
        if n > 1:
            c = acceptance_counts(out.head_argmax)
            counts = c if counts is None else counts + c
        bar.set_postfix(loss_head1=f"{head_sum[0] / done:.4f}")
    head_losses = (head_sum / total).tolist()
    weights = list(model.cfg.loss_weights)
    result = {
        "samples": total, "tokens_per_head": total * seq_len,
        "loss": float(sum(w * h for w, h in zip(weights, head_losses))),
        "head_losses": head_losses,
        "head_perplexities": [math.exp(h) if h < 700 else float("inf") for h in head_losses],
    }
    if counts is not None:
        result.update(counts.metrics())
    else:
        result.update(AcceptanceCounts(*(torch.zeros(0),) * 4).metrics())
    return result
