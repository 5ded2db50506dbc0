"""Interoperability with megatron-core's own indexed dataset code (not a re-implementation of it): its reader
reads our shards, we train from what its IndexedDatasetBuilder writes, and `mtp-data merge` writes the bytes its
add_index writes."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

mcore = pytest.importorskip("megatron.core.datasets.indexed_dataset")

from dist_launch import REPO  # noqa: E402

from mtplm.data.config import DataConfig  # noqa: E402
from mtplm.data.indexed_dataset import IndexedDataset  # noqa: E402
from mtplm.data.inspect import main as mtp_data  # noqa: E402
from mtplm.data.loader import build_data_loaders  # noqa: E402
from mtplm.data.manifest import resolve_shards  # noqa: E402
from mtplm.data.synthetic import write_token_dataset  # noqa: E402

VOCAB = 300
SEQ, N_FUTURE = 16, 4


def documents(seed=0, n=40, high=VOCAB):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, rng.integers(1, 60)).tolist() for _ in range(n)]


def megatron_write(prefix, docs, layout, dtype=np.uint16):
    """Megatron's builder, in the layouts its preprocess_data.py produces: one sequence per document, or a
    document split into several sequences (sentences) closed by end_document (or given whole to add_document)."""
    builder = mcore.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    rng = np.random.default_rng(1)
    for d in docs:
        if layout == "one":
            builder.add_item(torch.tensor(d))
            builder.end_document()
            continue
        cuts = np.sort(rng.choice(np.arange(1, len(d)), size=min(3, len(d) - 1), replace=False)) if len(d) > 1 else []
        sentences = np.split(np.asarray(d), cuts)
        if layout == "several":
            for s in sentences:
                builder.add_item(torch.tensor(s))
            builder.end_document()
        else:
            builder.add_document(d, [len(s) for s in sentences])  # as preprocess_data.py calls it
    builder.finalize(f"{prefix}.idx")
    return prefix


def test_megatron_reads_our_shards_with_the_same_ids(tmp_path):
    for vocab, dtype in ((VOCAB, np.uint16), (70_000, np.int32)):
        docs = documents() + [[vocab - 1, 0]]
        folder = write_token_dataset(tmp_path / f"v{vocab}", docs, vocab, docs_per_shard=15)
        prefixes, _ = resolve_shards(folder)
        read = []
        for p in prefixes:
            theirs = mcore.IndexedDataset(str(p))
            assert theirs.index.dtype == dtype
            assert theirs.document_indices.tolist() == list(range(len(theirs) + 1))
            read += [theirs[i].tolist() for i in range(len(theirs))]
        assert read == docs


@pytest.mark.parametrize("layout", ["one", "several", "add_document"])
def test_we_read_and_sample_what_megatrons_builder_writes(tmp_path, layout):
    docs = documents(seed=2)
    prefix = megatron_write(tmp_path / "text_document", docs, layout)
    ours = IndexedDataset(prefix)
    assert ours.document_lengths().tolist() == [len(d) for d in docs]
    assert [ours.tokens[o:o + n].tolist() for o, n in zip(ours.document_offsets(), ours.document_lengths())] == docs
    # the whole training data path: config -> loader -> batches, against the documents laid end to end
    cfg = DataConfig(datasets=[str(prefix)], seq_len=SEQ, split=[1.0, 0.0, 0.0], seed=5, num_workers=0,
                     cache_dir=str(tmp_path / "cache"))
    train, valid = build_data_loaders(cfg, n_future_tokens=N_FUTURE, vocab_size=VOCAB, micro_batch_size=2,
                                      dp_rank=0, dp_world_size=1)
    assert valid is None
    part = train.dataset.datasets[0]
    order, _, shuffle = part.epoch_index(0)
    stream = np.concatenate([docs[d] for d in order])
    batches = torch.cat(list(itertools.islice(iter(train), len(part) // 2)))
    for i, got in enumerate(batches):
        k = int(shuffle[i])
        assert got.tolist() == stream[k * SEQ:k * SEQ + SEQ + N_FUTURE].tolist()


def test_trainer_runs_on_megatron_data(tmp_path):
    prefix = megatron_write(tmp_path / "text_document", documents(seed=3, n=80), "several")

    def train(out, vocab_size):
        return subprocess.run(
            [sys.executable, "-m", "mtplm.pretrain.train", "--config", "configs/tiny.yaml", "--model.vocab_size",
             str(vocab_size), "--model.max_seq_len", "32", "--data.seq_len", str(SEQ), "--data.datasets",
             f"[{prefix}]", "--data.split", "[0.9, 0.1, 0.0]", "--data.num_workers", "0", "--train.steps", "2",
             "--train.micro_batch_size", "2", "--train.eval_interval", "2", "--train.eval_iters", "1",
             "--train.log_interval", "1", "--train.out_dir", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=600)

    proc = train(tmp_path / "run", VOCAB)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    # ids at or beyond the model's vocabulary are refused before any step, naming the file: not an IndexError
    # from inside the embedding
    proc = train(tmp_path / "bad", 200)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "text_document.bin: holds token id 299, but model.vocab_size is 200 (ids must be < vocab_size)")


def test_merge_writes_the_bytes_megatron_add_index_writes(tmp_path):
    ours = write_token_dataset(tmp_path / "ours", documents(seed=4, high=200), VOCAB, docs_per_shard=15)
    theirs = megatron_write(tmp_path / "theirs", documents(seed=5) + [[VOCAB - 1]], "several")
    assert mtp_data(["merge", str(tmp_path / "merged"), str(ours), str(theirs)]) == 0
    prefixes, _ = resolve_shards(ours)
    builder = mcore.IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for p in prefixes + [theirs]:
        builder.add_index(str(p))
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".idx", ".bin"):
        assert (tmp_path / f"merged{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes(), ext
    merged = json.loads((tmp_path / "merged.json").read_text())  # its max id covers the input without a manifest
    assert merged["max_token_id"] == VOCAB - 1
