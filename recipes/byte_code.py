"""Bytes (the paper's Table S3, "faster"): a byte-level model trained on code, decoded self-speculatively.

Data: the Python standard library's non-test sources, which every machine has. Files are held out by a hash of
their path within the library (one in twenty), so the held-out code is never trained on; each file is one
document. Test prompts: one per held-out file, the PROMPT_BYTES bytes that start at the first line boundary
after a third of the file (past the licence and imports, into the code).

Decoding: every held-out prompt is continued greedily by NEW_BYTES bytes at batch 1, with k = 0 (plain, head 1
only) .. n-1 drafts, eager and compiled (inference/static_decode.py); tokens per forward, acceptance per draft
position, tokens/s and the speed-up over plain decoding of the same mode, and how many outputs differ from eager
plain greedy decoding (none may in float32 eager; compiled kernels round differently and may flip a near-tie).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__"}
HOLD_OUT = 20  # one file in this many is held out
PROMPT_BYTES = 128
NEW_BYTES = 128


def stdlib_sources() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not SKIP_PARTS & set(f.relative_to(root).parts))
    return root, files


def held_out(relative: str) -> bool:
    return int(hashlib.sha256(relative.encode()).hexdigest(), 16) % HOLD_OUT == 0


def prompt_of(text: str) -> str | None:
    """PROMPT_BYTES of ASCII code from the first line start after a third of the file; None if too short."""
    start = text.find("\n", len(text) // 3) + 1
    prompt = text[start:start + PROMPT_BYTES]
    return prompt if start and len(prompt) == PROMPT_BYTES and prompt.isascii() else None


def make_datasets(train_size: int, test_size: int) -> tuple[list[dict], list[dict]]:
    """(training documents {"file", "text"}, test prompts {"file", "prompt"}); train_size and test_size cap
    their counts (0: every file)."""
    root, files = stdlib_sources()
    if not files:
        raise ValueError(f"no Python sources under {root}: the bytes recipe trains on the standard library's code")
    train, tests = [], []
    for f in files:
        rel = f.relative_to(root).as_posix()
        text = f.read_text(encoding="utf-8", errors="replace")
        if held_out(rel):
            prompt = prompt_of(text)
            if prompt is not None:
                tests.append({"file": rel, "prompt": prompt})
        elif text.strip():
            train.append({"file": rel, "text": text})
    return train[: train_size or None], tests[: test_size or None]


def decoding_speed(model, prompts: list[list[int]], new_tokens: int, compile: bool, repeats: int = 1) -> list[dict]:
    """For k = 0..n-1 drafts at batch 1: tokens per forward, acceptance by draft position, tokens/s (fastest of
    `repeats` runs over all prompts), the speed-up over k = 0 in the same mode, and the outputs unlike eager
    plain greedy decoding's."""
    from mtplm.inference.speculative import MTPGenerator

    gen = MTPGenerator(model)
    ks = range(model.cfg.n_future_tokens)
    reference = [gen.generate([p], new_tokens, draft_heads=0)[0][0] for p in prompts]
    rows = []
    for k in ks:
        if compile:  # one compilation per k, before the timed runs
            gen.generate([prompts[0]], new_tokens, draft_heads=k, compile=True)
        best = None
        for _ in range(repeats):
            outs, total = [], None
            for p in prompts:
                o, s = gen.generate([p], new_tokens, draft_heads=k, compile=compile)
                outs += o
                total = s if total is None else total + s
            if best is None or total.seconds < best.seconds:
                best = total
        rows.append({"k": k, "tokens_per_forward": best.tokens_per_forward, "acceptance": best.acceptance,
                     "tokens_per_second": best.tokens_per_second, "seconds": best.seconds,
                     "differ": sum(a != b for a, b in zip(outs, reference))})
    for r in rows:
        r["speedup"] = r["tokens_per_second"] / rows[0]["tokens_per_second"]
    return rows
