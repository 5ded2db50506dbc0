"""mtp-data: look inside a dataset, or merge shards into one.

    mtp-data inspect data/code [--decode 3] [--tokenizer tok.model]
    mtp-data merge data/merged data/code data/web/shard_00003 ...
    mtp-data finalize data/web       # dataset.json of a multi-node mtp-preprocess run
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from .console import quiet_on_closed_stdout
from .indexed_dataset import bin_path, copy_tokens, idx_path, read_counts, write_concatenated_index
from .manifest import TOOL_VERSION, write_json_atomic
from .preprocess_finalize import finalize
from .preprocess_job import PreprocessError
from .tokenizer import load_tokenizer
from .verify import open_dataset, shard_id_bounds


def inspect(spec: str, decode: int, tokenizer: str | None, vocab_size: int | None = None) -> None:
    ds = open_dataset(spec)
    shards, manifest = ds.shards, ds.manifest
    print(f"dataset {spec}: {len(shards)} shard(s), {ds.n_documents} documents, {ds.n_tokens} tokens, "
          f"dtype {shards[0].dtype}")
    if manifest:
        for key in ("tokenizer", "tokenizer_sha256", "vocab_size", "eod_id", "max_token_id", "tool_version"):
            if key in manifest:
                print(f"  {key}: {manifest[key]}")
    lengths = np.concatenate([s.document_lengths() for s in shards])
    print(f"  document length: mean {lengths.mean():.0f}, median {np.median(lengths):.0f}, max {lengths.max()}")
    if all(s.dtype.kind != "f" for s in shards):
        bounds = shard_id_bounds(ds)
        where, _, hi = max(bounds, key=lambda b: b[2])
        print(f"  largest token id: {hi} ({'scanned' if where.suffix == '.bin' else 'recorded in'} {where.name})")
        vocab, source = (vocab_size, "--vocab-size") if vocab_size else ((manifest or {}).get("vocab_size"),
                                                                          ds.manifest_file)
        if vocab is not None and hi >= vocab:
            raise ValueError(f"{where}: holds token id {hi}, but the vocab_size is {vocab} ({source}); "
                             f"a model of that size cannot embed it")
        if min(b[1] for b in bounds) < 0:
            raise ValueError(f"{min(bounds, key=lambda b: b[1])[0]}: holds negative token ids")
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
    """Concatenate every shard of the given datasets into one .idx/.bin pair (out is a prefix): the bytes
    megatron-core's IndexedDatasetBuilder.add_index writes, streamed one CHUNK at a time so that memory stays
    bounded whatever the inputs' size; the written counts are checked against the inputs' before the pair is
    renamed into place."""
    opened = [open_dataset(spec) for spec in specs]
    prefixes = [p for d in opened for p in d.prefixes]
    manifests = [d.manifest for d in opened if d.manifest]
    shards = [s for d in opened for s in d.shards]
    dtypes = {s.dtype for s in shards}
    if len(dtypes) != 1:
        raise ValueError(f"cannot merge shards of different dtypes: {sorted(map(str, dtypes))}")
    hashes = {spec: d.manifest["tokenizer_sha256"] for spec, d in zip(specs, opened)
              if d.manifest and d.manifest.get("tokenizer_sha256")}
    if len(set(hashes.values())) > 1:
        raise ValueError("cannot merge datasets made with different tokenizers: "
                         + ", ".join(f"{spec} has tokenizer_sha256 {h[:16]}" for spec, h in hashes.items()))
    dtype = dtypes.pop()
    max_token_id = max(hi for d in opened for _, _, hi in shard_id_bounds(d))
    expected = (sum(len(s.lengths) for s in shards), sum(d.n_documents for d in opened),
                sum(d.n_tokens for d in opened))
    out_prefix = Path(out)
    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp_bin = out_prefix.with_name(out_prefix.name + ".bin.tmp")
    tmp_idx = out_prefix.with_name(out_prefix.name + ".idx.tmp")
    try:
        with open(tmp_bin, "wb") as f:
            copy_tokens(shards, f)
        indexed = write_concatenated_index(tmp_idx, shards)
        for what, counts in (("index describes", indexed), ("files hold", read_counts(tmp_idx, tmp_bin, dtype))):
            if counts != expected:
                raise ValueError(f"merge into {out_prefix}: the merged {what} {counts[0]} sequences, {counts[1]} "
                                 f"documents, {counts[2]} tokens, but the inputs hold {expected[0]}, "
                                 f"{expected[1]}, {expected[2]}; nothing was written")
        tmp_bin.replace(bin_path(out_prefix))
        tmp_idx.replace(idx_path(out_prefix))
    finally:  # after a failure or Ctrl-C: no partial pair left behind, under any name
        tmp_bin.unlink(missing_ok=True)
        tmp_idx.unlink(missing_ok=True)
    merged = {k: manifests[0][k] for k in ("tokenizer", "tokenizer_sha256", "vocab_size", "eod_id", "dtype")
              if manifests and k in manifests[0]}
    merged.update(documents=expected[1], tokens=expected[2], max_token_id=max_token_id,
                  inputs=[str(p) for p in prefixes], tool_version=TOOL_VERSION)
    write_json_atomic(Path(f"{out_prefix}.json"), merged)
    return out_prefix


@quiet_on_closed_stdout
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mtp-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("inspect", help="counts, dtype, vocabulary and a few decoded documents")
    p.add_argument("dataset")
    p.add_argument("--decode", type=int, default=2)
    p.add_argument("--tokenizer")
    p.add_argument("--vocab-size", type=int, help="check token ids against a model's vocabulary "
                                                  "(default: the manifest's vocab_size)")
    m = sub.add_parser("merge", help="merge datasets or shards into one .idx/.bin pair")
    m.add_argument("output", help="output prefix (writes OUTPUT.idx, OUTPUT.bin, OUTPUT.json)")
    m.add_argument("datasets", nargs="+")
    f = sub.add_parser("finalize", help="write dataset.json of an mtp-preprocess folder whose partitions are all "
                                        "complete (refused, naming those that are not)")
    f.add_argument("output")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "inspect":
            inspect(args.dataset, args.decode, args.tokenizer, args.vocab_size)
        elif args.cmd == "finalize":
            s = finalize(Path(args.output))
            print(f"wrote {Path(args.output) / 'dataset.json'}: {len(s['shards'])} shards, {s['documents']} documents, "
                  f"{s['tokens']} tokens")
        else:
            print(f"wrote {merge(args.output, args.datasets)}")
    except (FileNotFoundError, ValueError, PreprocessError) as e:
        print(f"mtp-data: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        raise  # the reader stopped early (| head): not an error to report
    except OSError as e:  # an output that cannot be written: a path under a file, permission, disk full
        print(f"mtp-data: {e.filename}: {e.strerror}" if e.filename else f"mtp-data: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mtp-data: interrupted; nothing was written under the output's name", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
