"""The job an mtp-preprocess output folder holds: the tokenizer (by sha256), every setting that changes
the tokens and the shard size, recorded in job.json before the first shard. A re-run must match it or is
refused before it writes anything, so one folder never mixes two tokenizations."""

from __future__ import annotations

from pathlib import Path

from .manifest import DATASET_MANIFEST, read_manifest
from .tokenizer import BYTE_TOKENIZER, load_tokenizer


class PreprocessError(RuntimeError):
    pass


JOB_FILE = "job.json"
# Compared in this order; inputs, include/exclude, workers and on_error may change between runs
# (adding inputs to a dataset is a new run of the same job).
JOB_KEYS = ("tokenizer", "tokenizer_sha256", "vocab_size", "tokenizer_type", "tokenizer_sample_mb", "append_eod",
            "format", "text_key", "shard_bytes")
# Settings that change how tokens are cut into shards, not the tokens. Still refused: a continued run must write
# the very shards (and bytes) one uninterrupted run would.
LAYOUT_KEYS = ("shard_bytes",)


def job_settings(cfg, tok) -> dict:
    job = {"format": cfg.format, "text_key": cfg.text_key, "append_eod": cfg.append_eod,
           "shard_bytes": cfg.shard_bytes}
    if cfg.train_tokenizer:  # the tokenizer's sha256 is known once it is trained
        job.update(tokenizer="trained", vocab_size=cfg.vocab_size, tokenizer_type=cfg.tokenizer_type,
                   tokenizer_sample_mb=cfg.tokenizer_sample_mb)
    else:
        job.update(tokenizer=BYTE_TOKENIZER if tok.path is None else str(tok.path.resolve()),
                   tokenizer_sha256=tok.sha256, vocab_size=tok.vocab_size)
    return job


def recorded_job(out: Path, shard_names: list[str], train_tokenizer: bool) -> dict | None:
    """The folder's job: job.json, or what the manifests of a folder written before job.json existed say."""
    if (out / JOB_FILE).is_file():
        return read_manifest(out / JOB_FILE)
    manifests = [read_manifest(out / f"{name}.json") for name in shard_names]
    if (out / DATASET_MANIFEST).is_file():
        manifests.append(read_manifest(out / DATASET_MANIFEST))
    seen = {(m.get("tokenizer_sha256"), m.get("eod_id") is not None) for m in manifests}
    if len(seen) > 1:
        raise PreprocessError(f"{out}: its manifests name {len(seen)} different tokenizer/EOD settings; the folder "
                              f"already mixes tokenizations, so it cannot be continued (start a new --output)")
    job = {}
    if seen:
        job["tokenizer_sha256"], job["append_eod"] = seen.pop()
    model = out / "tokenizer.model"
    if train_tokenizer and model.is_file():
        job["vocab_size"] = load_tokenizer(model).vocab_size
    return job or None


def _show(key: str, settings: dict) -> str:
    value = settings[key]
    if key == "tokenizer_sha256":  # which tokenizer has that hash
        return f"{value} ({_show('tokenizer', settings)})" if settings.get("tokenizer") else value
    if key == "tokenizer" and value not in (BYTE_TOKENIZER, "trained"):
        return f"{value} (a SentencePiece file)"
    return repr(value) if isinstance(value, str) else str(value)


def check_job(out: Path, recorded: dict | None, job: dict) -> None:
    if recorded is None:
        return
    diffs, layout = [], []
    for key in JOB_KEYS:
        old, new = recorded.get(key), job.get(key)
        if old is None or new is None:
            continue
        if key == "tokenizer":  # where both are known, the tokenizers' sha256 decides, not how they were given
            if recorded.get("tokenizer_sha256") and job.get("tokenizer_sha256"):
                continue
            old, new = (v if v in (BYTE_TOKENIZER, "trained") else "a SentencePiece file" for v in (old, new))
        if old != new:
            (layout if key in LAYOUT_KEYS else diffs).append(
                f"{key}: {_show(key, recorded)} in {out}, {_show(key, job)} in this run")
    if not diffs and not layout:
        return
    if diffs:
        why = "holds another job's data, refusing to mix tokenizations: " + "; ".join(diffs)
        if layout:
            why += "; layout settings differ too: " + "; ".join(layout)
    else:
        why = ("holds the same tokenization in other shards, refusing to change its shard layout (the tokens "
               "would be the same, but a continued run must write the shards one run would): " + "; ".join(layout))
    raise PreprocessError(f"{out} {why} (re-run with the settings in {out / JOB_FILE}, or choose another --output)")
