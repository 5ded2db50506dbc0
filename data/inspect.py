"""mtp-data: look inside a dataset, or merge shards into one.

    mtp-data inspect data/code [--decode 3] [--tokenizer tok.model]
    mtp-data merge data/merged data/code data/web/shard_00003 ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from .indexed_dataset import IndexedDataset, bin_path, idx_path, write_index
from .manifest import TOOL_VERSION, resolve_shards, write_json_atomic
from .tokenizer import load_tokenizer


def inspect(spec: str, decode: int, tokenizer: str | None) -> None:
    prefixes, manifest = resolve_shards(spec)
    shards = [IndexedDataset(p) for p in prefixes]
    n_docs = sum(len(s.doc_indices) - 1 for s in shards)
    n_tok = sum(s.n_tokens for s in shards)
    print(f"dataset {spec}: {len(shards)} shard(s), {n_docs} documents, {n_tok} tokens, dtype {shards[0].dtype}")
    if manifest:
        for key in ("tokenizer", "tokenizer_sha256", "vocab_size", "eod_id", "max_token_id", "tool_version"):
            if key in manifest:
                print(f"  {key}: {manifest[key]}")
    lengths = np.concatenate([s.document_lengths() for s in shards]) if shards else np.zeros(0)
    if len(lengths):
        print(f"  document length: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}")
    tok_spec = tokenizer or (manifest or {}).get("tokenizer")
    if decode and tok_spec:
        tok = load_tokenizer(tok_spec)
        shown = 0
        for s in shards:
            for d in range(len(s.doc_indices) - 1):
                if shown >= decode:
                    return
                ids = s.tokens[s.document_offsets()[d]:s.document_offsets()[d] + s.document_lengths()[d]]
                text = tok.decode(ids.tolist())
                print(f"--- document {shown} ({len(ids)} tokens) ---\n{text[:1000]}")
                shown += 1
    elif decode:
        print("  (no tokenizer known: pass --tokenizer to decode documents)")


def merge(out: str, specs: list[str]) -> Path:
    """Concatenate every shard of the given datasets into one .idx/.bin pair (out is a prefix)."""
    prefixes, manifests = [], []
    for spec in specs:
        p, m = resolve_shards(spec)
        prefixes += p
        if m:
            manifests.append(m)
    shards = [IndexedDataset(p) for p in prefixes]
    dtypes = {s.dtype for s in shards}
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge shards of different dtypes: {sorted(map(str, dtypes))}")
    hashes = {m.get("tokenizer_sha256") for m in manifests} - {None}
    if len(hashes) > 1:
        raise ValueError("cannot merge datasets made with different tokenizers (tokenizer_sha256 differs)")
    dtype = dtypes.pop()
    out_prefix = Path(out)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = out_prefix.with_name(out_prefix.name + ".bin.tmp")
    lengths, doc_idx, base = [], [0], 0
    with open(tmp_bin, "wb") as f:
        for s in shards:
            with open(bin_path(s.prefix), "rb") as src:
                shutil.copyfileobj(src, f, 16 << 20)
            lengths.append(np.asarray(s.lengths))
            doc_idx.extend(int(x) + base for x in s.doc_indices[1:])
            base += len(s.lengths)
    tmp_idx = out_prefix.with_name(out_prefix.name + ".idx.tmp")
    write_index(tmp_idx, dtype, np.concatenate(lengths), np.asarray(doc_idx, dtype=np.int64))
    bin_path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp_bin.replace(bin_path(out_prefix))
    tmp_idx.replace(idx_path(out_prefix))
    merged = {k: manifests[0][k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size", "eod_id", "dtype")
              if manifests and k in manifests[0]}
    merged.update(documents=len(doc_idx) - 1, tokens=int(sum(s.n_tokens for s in shards)),
                  max_token_id=max((m.get("max_token_id", -1) for m in manifests), default=None),
                  inputs=[str(p) for p in prefixes], tool_version=TOOL_VERSION)
    write_json_atomic(Path(f"{out_prefix}.json"), merged)
    return out_prefix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtp-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="counts, dtype, vocabulary and a few decoded documents")
    p.add_argument("dataset")
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--tokenizer")
    m = sub.add_parser("merge", help="merge datasets or shards into one .idx/.bin pair")
    m.add_argument("output", help="output prefix (writes OUTPUT.idx, OUTPUT.bin, OUTPUT.json)")
    m.add_argument("datasets", nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "inspect":
            inspect(args.dataset, args.decode, args.tokenizer)
        else:
            print(f"wrote {merge(args.output, args.datasets)}")
    except (FileNotFoundError, ValueError) as e:
        print(f"mtp-data: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
