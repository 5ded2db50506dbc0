"""Task accuracy (mtp-eval --tasks): greedy completions of prompts, exact match against answers.

A task file is JSONL, one {"prompt": str, "answer": str, ...} object per line (blank lines skipped). Every
other field whose value is a string, number, boolean or null is a grouping: accuracy is reported for each of
its values (e.g. "difficulty": "easy"/"hard"); a field holding a list or an object is refused, naming it.

A completion is the model's greedy continuation (self-speculative decoding, identical to plain greedy decoding)
until the end-of-document token or max_new_tokens, cut at the first occurrence of the stop string if one is
given; it is correct when it equals the answer after stripping whitespace at both ends of each.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from .speculative import MTPGenerator, fit_prompt

_SCALARS = (str, int, float, bool, type(None))


@dataclass
class TaskRecord:
    where: str  # file:line
    prompt: str
    answer: str
    groups: dict[str, str] = field(default_factory=dict)


def read_lines(path: str | Path, what: str) -> list[str]:
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the {what} file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None


def read_jsonl_objects(path: str | Path, what: str) -> list[tuple[str, dict]]:
    """(file:line, object) for each non-blank line; ValueError naming the file and line of anything else."""
    out = []
    for n, line in enumerate(read_lines(path, what), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON object ({e}); a {what} file holds one object per line") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object, got a JSON {type(obj).__name__}")
        out.append((f"{path}:{n}", obj))
    if not out:
        raise ValueError(f"{path}: holds no records (it is empty or blank)")
    return out


def require_str(where: str, obj: dict, key: str) -> str:
    if key not in obj:
        raise ValueError(f'{where}: field "{key}" is missing (keys: {", ".join(obj) or "none"})')
    if not isinstance(obj[key], str):
        raise ValueError(f'{where}: field "{key}": expected a string, got {type(obj[key]).__name__}')
    return obj[key]


def read_tasks(path: str | Path) -> list[TaskRecord]:
    records = []
    for where, obj in read_jsonl_objects(path, "task"):
        prompt, answer = require_str(where, obj, "prompt"), require_str(where, obj, "answer")
        groups = {}
        for key, value in obj.items():
            if key in ("prompt", "answer"):
                continue
            if not isinstance(value, _SCALARS):
                raise ValueError(f'{where}: field "{key}": a grouping field must hold a string, number, boolean '
                                 f"or null, got {type(value).__name__}")
            groups[key] = value if isinstance(value, str) else json.dumps(value)
        records.append(TaskRecord(where, prompt, answer, groups))
    return records


def cut_at_stop(text: str, stop: list[str]) -> str:
    """text up to the earliest occurrence of any stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def complete(generator: MTPGenerator, tokenizer, prompts: list[tuple[str, str]], max_new_tokens: int,
             draft_heads: int | None, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop: list[str] = (), prepend_eod: bool = False) -> tuple[list[str], object]:
    """Completions (decoded, cut at a stop string) of named prompts [(file:line, text)], and GenerationStats.
    prepend_eod starts every prompt with the end-of-document token, as every document but a sample's first
    starts in packed training data. A prompt that leaves no room in the model's context is refused with its name."""
    max_len = generator.max_seq_len
    lead = [tokenizer.eod_id] if prepend_eod else []
    ids = [fit_prompt(lead + tokenizer.encode(p) or [tokenizer.eod_id], max_len, "error", name) for name, p in prompts]
    outs, stats = generator.generate(ids, max_new_tokens, draft_heads, temperature, top_p,
                                     stop_tokens=[tokenizer.eod_id], seed=seed)
    return [cut_at_stop(tokenizer.decode(o), list(stop)) for o in outs], stats


def is_correct(record: TaskRecord, completion: str) -> bool:
    return completion.strip() == record.answer.strip()


def score(records: list[TaskRecord], completions: list[str]) -> dict:
    """Accuracy overall and per value of every grouping field."""
    correct = [is_correct(r, c) for r, c in zip(records, completions)]
    by: dict = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for r, ok in zip(records, correct):
        for key, value in r.groups.items():
            by[key][value][0] += ok
            by[key][value][1] += 1
    return {
        "records": len(records), "correct": sum(correct), "accuracy": sum(correct) / len(records),
        "by": {key: {value: {"correct": c, "records": t, "accuracy": c / t} for value, (c, t) in sorted(vals.items())}
               for key, vals in sorted(by.items())},
    }


def evaluate_tasks(model, tokenizer, records: list[TaskRecord], max_new_tokens: int, batch_size: int,
                   draft_heads: int | None = None, stop: list[str] = (), progress: bool | None = None,
                   prepend_eod: bool = False) -> tuple[dict, list[str]]:
    """Greedy completions of every record in batches; accuracy overall and by group, tokens per forward."""
    from tqdm import tqdm

    gen = MTPGenerator(model)
    completions, totals = [], None
    bar = tqdm(total=len(records), desc="tasks", unit="record", disable=None if progress is None else not progress)
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        outs, stats = complete(gen, tokenizer, [(r.where, r.prompt) for r in chunk], max_new_tokens, draft_heads,
                               stop=stop, prepend_eod=prepend_eod)
        completions += outs
        totals = stats if totals is None else totals + stats
        right = sum(is_correct(r, c) for r, c in zip(records, completions))
        bar.update(len(chunk))
        bar.set_postfix(accuracy=f"{right / len(completions):.3f}")
    bar.close()
    result = score(records, completions)
    result["tokens_per_forward"] = totals.tokens_per_forward
    result["acceptance"] = totals.acceptance
    return result, completions
