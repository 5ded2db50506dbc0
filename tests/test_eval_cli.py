"""mtp-eval: loss and acceptance on a dataset from every kind of model folder, against a naive computation on
the same samples; task accuracy against plain greedy decoding done another way; bad task files."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model_config
from dist_launch import REPO

from mtplm.data.config import DataConfig
from mtplm.data.synthetic import write_token_dataset
from mtplm.inference.acceptance import acceptance_counts
from mtplm.inference.dataset_eval import eval_samples
from mtplm.inference.evaluate import main as eval_main
from mtplm.inference.task_eval import read_tasks
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import load_model, save_model

SEQ = 32
DATA_ARGS = ["--data-split", "0.5", "0.5", "0", "--seq-len", str(SEQ), "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny n=4 model trained a few steps by the real trainer (ZeRO-1 checkpoint + final/), its HF export, and
    a dataset folder of the same synthetic stream."""
    sys.path.insert(0, str(REPO / "tests" / "workers"))
    from train_synthetic import sample

    from mtplm.conversion.hf_export import export_hf

    tmp = tmp_path_factory.mktemp("eval")
    proc = subprocess.run(
        [sys.executable, "tests/workers/train_synthetic.py", "--config", "configs/tiny.yaml", "--model.vocab_size",
         "200", "--data.seq_len", str(SEQ), "--train.steps", "8", "--train.eval_interval", "0",
         "--train.out_dir", str(tmp / "run"), "--deepspeed_config", "ds_configs/zero1.json"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    export_hf(tmp / "run" / "final", tmp / "hf", dtype="fp32")
    docs = [sample(i, 40 + (13 * i) % 50, 200).tolist() for i in range(60)]
    write_token_dataset(tmp / "data", docs, 200)
    return tmp


def naive_figures(model, samples, limit):
    """Per-head cross-entropy written out by hand from all heads' logits, and acceptance from their argmax."""
    batch = torch.stack([samples[i] for i in range(limit)])
    n = model.cfg.n_future_tokens
    with torch.no_grad():
        logits = model(batch[:, :SEQ], all_heads=True).logits  # (n, B, T, V)
    losses = [F.cross_entropy(logits[k].flatten(0, 1), batch[:, 1 + k: 1 + k + SEQ].flatten()).item()
              for k in range(n)]
    return losses, acceptance_counts(logits.argmax(-1))


@pytest.mark.parametrize("kind", ["checkpoint", "consolidated", "hf_export"])
def test_dataset_figures_from_every_kind_of_folder(run, tmp_path, kind, capsys):
    folder = {"checkpoint": run / "run" / "checkpoints", "consolidated": run / "run" / "final",
              "hf_export": run / "hf"}[kind]
    out = tmp_path / "eval.json"
    # 7 samples in batches of 3: a smaller last batch, whose loss must weigh by its rows
    assert eval_main([str(folder), "--data", str(run / "data"), *DATA_ARGS, "--limit", "7", "--batch-size", "3",
                      "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert res["model"]["kind"] == kind and res["model"]["config"]["n_future_tokens"] == 4
    assert res["command"].startswith("mtp-eval ") and str(run / "data") in res["command"]
    d = res["dataset"]
    assert d["datasets"] == [str(run / "data")] and d["split"] == "valid" and d["samples"] == 7
    model = load_model(run / "run" / "final").eval()
    samples = eval_samples(DataConfig(datasets=[str(run / "data")], split=[0.5, 0.5, 0], seq_len=SEQ), "valid",
                           4, 200, None)
    losses, counts = naive_figures(model, samples, 7)
    assert d["head_losses"] == pytest.approx(losses, rel=1e-4)
    assert d["head_perplexities"] == pytest.approx([float(torch.tensor(h).exp()) for h in losses], rel=1e-3)
    assert d["loss"] == pytest.approx(sum(losses), rel=1e-4)
    nan_as_null = [None if x != x else x for x in counts.acceptance]  # strict JSON: a position never judged
    assert d["acceptance"] == pytest.approx(nan_as_null) and len(d["tokens_per_forward"]) == 3
    assert d["tokens_per_forward"] == pytest.approx(counts.tokens_per_forward)
    assert f"{d['loss']:.4f}" in printed and "tokens per forward" in printed


def test_training_checkpoint_defaults_to_the_runs_data_settings(run, tmp_path):
    out = tmp_path / "eval.json"
    assert eval_main([str(run / "run" / "checkpoints"), "--data", str(run / "data"), "--data-split", "0.5", "0.5",
                      "0", "--limit", "2", "--output", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["dataset"]["seq_len"] == SEQ  # the run's data.seq_len, not max_seq_len


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    torch.manual_seed(3)
    model = MTPTransformer(tiny_model_config(vocab_size=256, max_seq_len=64)).eval()
    folder = save_model(model, tmp_path_factory.mktemp("byte") / "model")
    return model, folder


def plain_greedy(model, prompt: str, budget: int, lead: list[int] = ()) -> str:
    """Greedy decoding with full forwards of head 1 and no cache: the reference for the decoder's output."""
    ids = [*lead, *prompt.encode()]
    out = []
    with torch.no_grad():
        for _ in range(budget):
            tok = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            if tok == 0:  # the byte tokenizer's end of document
                break
            out.append(tok)
    return bytes(t for t in out if 0 < t < 256).decode("utf-8", errors="replace")


def test_task_accuracy_against_plain_greedy_decoding(byte_model, tmp_path, capsys):
    """Answers are plain greedy completions (cut at a stop string) for some records and something else for the
    others; the accuracy per group must be exactly the share of the former."""
    model, folder = byte_model
    prompts = ["abc", "hello wor", "1 + 1 =", "xyz", "def f(", "the cat"]
    budget = 12
    full = [plain_greedy(model, p, budget) for p in prompts]
    stop = next(ch for ch in full[0][1:] if not ch.isspace())  # a character the first completion holds
    cut = [c[: c.find(stop)] if stop in c else c for c in full]
    right = [True, False, True, True, False, True]
    records = [{"prompt": p, "answer": (c if ok else c + "#wrong"), "difficulty": "easy" if i % 2 else "hard",
                "level": i % 3} for i, (p, c, ok) in enumerate(zip(prompts, cut, right))]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    out, written = tmp_path / "eval.json", tmp_path / "logs" / "completions.jsonl"
    assert eval_main([str(folder), "--tasks", str(tasks), "--max-new-tokens", str(budget), "--stop", stop,
                      "--batch-size", "4", "--output", str(out), "--completions", str(written),
                      "--no-progress"]) == 0
    res = json.loads(out.read_text())["tasks"][0]
    logged = [json.loads(line) for line in written.read_text().splitlines()]
    assert [r["completion"] for r in logged] == cut and [r["correct"] for r in logged] == right
    assert [r["where"] for r in logged] == [f"{tasks}:{i}" for i in range(1, 7)]
    assert logged[3]["groups"] == {"difficulty": "easy", "level": "0"} and logged[3]["answer"] == records[3]["answer"]
    assert res["records"] == 6 and res["correct"] == 4 and res["accuracy"] == pytest.approx(4 / 6)
    by = res["by"]
    assert by["difficulty"]["hard"]["correct"] == sum(right[i] for i in (0, 2, 4))
    assert by["difficulty"]["easy"]["correct"] == sum(right[i] for i in (1, 3, 5))
    assert {v: s["records"] for v, s in by["level"].items()} == {"0": 2, "1": 2, "2": 2}
    assert [by["level"][str(v)]["accuracy"] for v in range(3)] == [sum(right[v::3]) / 2 for v in range(3)]
    assert res["tokens_per_forward"] >= 1.0
    # --limit takes the first records only
    assert eval_main([str(folder), "--tasks", str(tasks), "--max-new-tokens", str(budget), "--stop", stop,
                      "--limit", "2", "--output", str(out), "--no-progress"]) == 0
    assert json.loads(out.read_text())["tasks"][0]["records"] == 2


def test_prepend_eod_starts_every_prompt_with_the_end_of_document_token(byte_model, tmp_path):
    """--prepend-eod: each completion is plain greedy decoding after [end of document] + prompt (as documents
    start in packed training data), and differs from the unprefixed one for some prompt of this model."""
    model, folder = byte_model
    prompts = ["abc", "hello wor", "1 + 1 =", "xyz", "def f(", "the cat"]
    after_eod = [plain_greedy(model, p, 8, lead=[0]) for p in prompts]
    assert after_eod != [plain_greedy(model, p, 8) for p in prompts]  # the test can tell the two apart
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": p, "answer": c}) + "\n" for p, c in zip(prompts, after_eod)))
    out, written = tmp_path / "eval.json", tmp_path / "completions.jsonl"
    assert eval_main([str(folder), "--tasks", str(tasks), "--max-new-tokens", "8", "--prepend-eod", "--output",
                      str(out), "--completions", str(written), "--no-progress"]) == 0
    assert [json.loads(line)["completion"] for line in written.read_text().splitlines()] == after_eod
    res = json.loads(out.read_text())["tasks"][0]
    assert res["accuracy"] == 1.0 and res["prepend_eod"] is True


@pytest.mark.parametrize("line, error", [
    ('{"prompt": "a"}', 'tasks.jsonl:2: field "answer" is missing'),
    ('{"prompt": 1, "answer": "a"}', 'tasks.jsonl:2: field "prompt": expected a string, got int'),
    ('["a", "b"]', "tasks.jsonl:2: expected a JSON object, got a JSON list"),
    ('{"prompt": "a", "answer": "b"', "tasks.jsonl:2: not a JSON object"),
    ('{"prompt": "a", "answer": "b", "tags": ["x"]}', 'tasks.jsonl:2: field "tags": a grouping field must hold'),
])
def test_bad_task_files_name_file_line_and_field(tmp_path, line, error):
    f = tmp_path / "tasks.jsonl"
    f.write_text('{"prompt": "p", "answer": "a"}\n' + line + "\n")
    with pytest.raises(ValueError, match="^" + str(tmp_path).replace("\\", "\\\\") + "/" + error.replace("[", r"\[")):
        read_tasks(f)


def test_bad_task_file_is_one_line_from_the_command(byte_model, tmp_path, capsys):
    _, folder = byte_model
    f = tmp_path / "tasks.jsonl"
    f.write_text('{"prompt": "p"}\n')
    assert eval_main([str(folder), "--tasks", str(f), "--output", str(tmp_path / "e.json"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f'mtp-eval: {f}:1: field "answer" is missing (keys: prompt)'
    assert not (tmp_path / "e.json").exists()
    f.write_text("")
    assert eval_main([str(folder), "--tasks", str(f), "--no-progress"]) == 1
    assert "holds no records" in capsys.readouterr().err


def test_console_command_needs_an_evaluation(byte_model):
    _, folder = byte_model
    proc = subprocess.run(["mtp-eval", str(folder)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "give at least one of --data, --tasks, --code" in proc.stderr
