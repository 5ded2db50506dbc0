"""The lm-eval model `mtplm` through lm-eval's own evaluator, on task files written here (no hub): scores equal
those of lm-eval's hf backend on the mtp-export-hf export of the same model; speculative generations equal plain
ones; sampling is the generator's; a bad model_args is one line."""

import json
import os
import subprocess
import sys
import tempfile

import pytest
import torch
from conftest import tiny_model_config
from dist_launch import REPO

# Task files are read by datasets' local json builder: nothing may reach for the hub, and the cache stays here.
os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="mtplm-datasets-"))

lm_eval = pytest.importorskip("lm_eval")

from mtplm.data.tokenizer import load_tokenizer, train_sentencepiece  # noqa: E402
from mtplm.inference.lm_eval_model import MTPLM, MTPLMError  # noqa: E402
from mtplm.inference.speculative import MTPGenerator  # noqa: E402
from mtplm.model.transformer import MTPTransformer  # noqa: E402
from mtplm.model.weights import save_model  # noqa: E402

SOURCE = REPO / "inference" / "speculative.py"  # text the tokenizer learns from and the tasks quote


def task_yaml(name, data, body):
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random n=4 model (heads copied from head 1, so drafts are accepted where the text repeats) with its
    SentencePiece tokenizer, its fp32 HF export, and three local tasks: multiple choice, rolling perplexity,
    generation with stop strings."""
    from mtplm.conversion.hf_export import export_hf

    tmp = tmp_path_factory.mktemp("lmeval")
    text = SOURCE.read_text()
    tok_path = train_sentencepiece([text], tmp / "sp", 400)
    torch.manual_seed(0)
    model = MTPTransformer(tiny_model_config(vocab_size=400, max_seq_len=64)).eval()
    for j in range(1, 4):
        model.head_block(j).load_state_dict(model.head_block(0).state_dict())
    # Byte-fallback, unknown and control tokens get logit 0, below the largest of the others' random logits, so
    # greedy text is plain text: transformers' tokenizer decodes stray bytes and <unk> differently from
    # SentencePiece's, tokens being equal.
    sp = load_tokenizer(tok_path).sp
    with torch.no_grad():
        model.output.weight[[i for i in range(400) if sp.is_byte(i) or sp.is_unknown(i) or sp.is_control(i)]] = 0
    save_model(model, tmp / "model", {"tokenizer.model": tok_path})
    export_hf(tmp / "model", tmp / "hf", dtype="fp32")

    lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 20]
    mc = [{"question": lines[i][:12], "choices": [lines[i][12:30], lines[i + 1][5:25], lines[i + 2][:8], " x"],
           "answer": i % 4} for i in range(0, 60, 3)]
    docs = [{"text": "\n".join(lines[i:i + 6])} for i in range(0, 40, 8)]  # several 64-token windows each
    gen = [{"prompt": lines[i][:25], "answer": lines[i][25:]} for i in range(0, 24, 2)] + [{"prompt": "", "answer": ""}]
    tasks = tmp / "tasks"
    tasks.mkdir()
    for name, rows in (("mc", mc), ("docs", docs), ("gen", gen)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "mtp_mc.yaml").write_text(task_yaml("mtp_mc", tasks / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
    (tasks / "mtp_docs.yaml").write_text(task_yaml("mtp_docs", tasks / "docs.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")))
    (tasks / "mtp_gen.yaml").write_text(task_yaml("mtp_gen", tasks / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: [')', 'self']\n  max_gen_toks: 20\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    return tmp


def evaluate(setup, model, model_args, tasks, **kw):
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, batch_size=kw.pop("batch_size", 4),
                                   device="cpu", log_samples=True, task_manager=TaskManager(include_path=str(
                                       setup / "tasks")), **kw)


def responses(results, task):
    """Each document's responses (loglikelihoods and greedy flags, or text), in document order, flattened."""
    def flat(x):
        return [y for item in x for y in flat(item)] if isinstance(x, (list, tuple)) else [x]

    return [flat(s["resps"]) for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_scores_equal_the_hf_backend_on_the_export(setup):
    tasks = ["mtp_mc", "mtp_docs"]
    ours = evaluate(setup, "mtplm", f"model={setup / 'model'}", tasks)
    hf = evaluate(setup, "hf", f"pretrained={setup / 'hf'},dtype=float32", tasks)
    for task in tasks:
        got, want = responses(ours, task), responses(hf, task)
        assert len(got) == len(want) > 0
        for g, w in zip(got, want):
            assert [type(x) for x in g] == [type(x) for x in w]
            assert [x for x in g if isinstance(x, bool)] == [x for x in w if isinstance(x, bool)]  # greedy flags
            assert [x for x in g if isinstance(x, float)] == pytest.approx([x for x in w if isinstance(x, float)],
                                                                           rel=1e-5, abs=1e-4)
    for metric in ("acc,none", "acc_norm,none"):
        assert ours["results"]["mtp_mc"][metric] == hf["results"]["mtp_mc"][metric]
    for metric in ("word_perplexity,none", "bits_per_byte,none"):
        assert ours["results"]["mtp_docs"][metric] == pytest.approx(hf["results"]["mtp_docs"][metric], rel=1e-5)
    # the rolling documents span several windows of the 64-token context, so the windows are what is compared
    tok = load_tokenizer(setup / "model" / "tokenizer.model")
    assert min(len(tok.encode(d["doc"]["text"])) for d in ours["samples"]["mtp_docs"]) > 2 * 64


def test_speculative_generations_equal_plain_and_hf_greedy(setup):
    spec = evaluate(setup, "mtplm", f"model={setup / 'model'},draft_heads=3,measure_plain=true", ["mtp_gen"],
                    batch_size=3)
    plain = evaluate(setup, "mtplm", f"model={setup / 'model'},draft_heads=0", ["mtp_gen"], batch_size=5)
    hf = evaluate(setup, "hf", f"pretrained={setup / 'hf'},dtype=float32", ["mtp_gen"], batch_size=5)
    texts = [r[0] for r in responses(spec, "mtp_gen")]
    assert texts == [r[0] for r in responses(plain, "mtp_gen")]
    # the last document's prompt is empty: mtplm starts it from the prefix token, the hf backend from padding
    assert texts[:-1] == [r[0] for r in responses(hf, "mtp_gen")][:-1]
    assert not any(")" in t or "self" in t for t in texts)  # cut at lm-eval's stop strings
    decoding = spec["config"]["mtplm"]["decoding"]["mtp_gen"]
    assert decoding["draft_heads"] == 3 and decoding["requests"] == len(texts)
    assert decoding["tokens_per_forward"] > 1 and len(decoding["acceptance"]) == 3
    assert decoding["greedy_outputs_differing"] == 0 and decoding["plain"]["seconds"] > 0
    assert plain["config"]["mtplm"]["decoding"]["mtp_gen"]["tokens_per_forward"] == 1.0


def test_generation_stops_at_the_token_that_completes_a_stop_string(setup):
    """Each sequence ends on the token whose text completes a stop string (or at max_gen_toks), not at the end of
    its budget: the tokens generated are counted against plain decoding's stream cut there by hand."""
    from lm_eval.api.instance import Instance

    lm = MTPLM(model=str(setup / "model"), batch_size=2)
    prompts = ["def generate(self", "        return", "x", "class Progress"]
    until, budget = [" ", "e"], 20
    reqs = [Instance("generate_until", {}, (p, {"until": until, "max_gen_toks": budget, "do_sample": False}), i,
                     metadata=("t", i, 1)) for i, p in enumerate(prompts)]
    outs = lm.generate_until(reqs, disable_tqdm=True)
    gen, used = MTPGenerator(lm.model), 0
    for p, o in zip(prompts, outs):
        (full,), _ = gen.generate([lm.tok.encode(p)], budget, 0, stop_tokens=[lm.tok.eod_id])
        ends = [n for n in range(1, len(full) + 1) if any(s in lm.tok.decode(full[:n]) for s in until)]
        used += ends[0] if ends else len(full)
        assert o == lm.tok.decode(full).split(" ")[0].split("e")[0]
    assert lm.decoding["t"]["tokens"] == used < budget * len(prompts)


def test_sampling_is_the_generators_speculative_sampler(setup):
    from lm_eval.api.instance import Instance

    lm = MTPLM(model=str(setup / "model"), batch_size=8, seed=5)
    prompts = ["def generate(self", "        return", "x", "class Progress"]
    opts = {"until": [], "max_gen_toks": 12, "do_sample": True, "temperature": 0.9, "top_p": 0.8}
    reqs = [Instance("generate_until", {}, (p, opts), i, metadata=("s", i, 1)) for i, p in enumerate(prompts)]
    outs = lm.generate_until(reqs, disable_tqdm=True)
    order = sorted(range(4), key=lambda i: -len(lm.tok.encode(prompts[i])))  # longest first, as batched
    want, _ = lm.generator.generate([lm.tok.encode(prompts[i]) for i in order], 12, 3, 0.9, 0.8,
                                    stop_tokens=[lm.tok.eod_id], seed=5)
    assert [outs[i] for i in order] == [lm.tok.decode(w) for w in want]
    greedy = lm.generate_until([Instance("generate_until", {}, (p, {**opts, "do_sample": False}), i, metadata=("g", i, 1))
                                for i, p in enumerate(prompts)], disable_tqdm=True)
    assert greedy != outs  # sampling happened
    with pytest.raises(MTPLMError, match="task s: generation option top_k"):
        lm.generate_until([Instance("generate_until", {}, ("x", {**opts, "top_k": 5}), 0, metadata=("s", 0, 1))])


@pytest.mark.parametrize("model_args, message", [
    ("model={model},draft_heads=9", "model_args draft_heads=9: the model has 3 extra heads"),
    ("model={model},dtype=fp8", "model_args dtype=fp8: expected one of fp32"),
    ("model={model},batch_size=auto", "batch_size auto: mtplm takes a number"),
    ("draft_heads=2", "model_args: model=PATH is required"),
])
def test_bad_model_args_are_named(setup, model_args, message):
    with pytest.raises(MTPLMError, match=f"^{message}"):
        MTPLM.create_from_arg_string(model_args.format(model=setup / "model"))


@pytest.mark.parametrize("model_args, message", [
    ("model=/no/such/folder", "model_args model=/no/such/folder: "),
    ("model={model},heads=2", "model_args: unknown argument heads; mtplm takes model, draft_heads"),
])
def test_bad_model_args_get_one_line_from_the_command(setup, model_args, message):
    proc = subprocess.run([sys.executable, "-m", "mtplm.inference.lm_eval_cli", "--model_args",
                           model_args.format(model=setup / "model"), "--tasks", "mtp_mc", "--include_path",
                           str(setup / "tasks"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, cwd=setup)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mtp-lm-eval: {message}"), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_an_hf_export_with_heads_loads_as_the_consolidated_model(setup):
    from lm_eval.api.instance import Instance

    reqs = [Instance("loglikelihood", {}, ("def generate(self", ", prompts"), 0, metadata=("l", 0, 1)),
            Instance("generate_until", {}, ("class Progress", {"max_gen_toks": 10}), 1, metadata=("g", 1, 1))]
    consolidated, export = MTPLM(model=str(setup / "model")), MTPLM(model=str(setup / "hf"))
    assert export.kind == "hf_export" and export.draft_heads == 3
    [(got, got_greedy)] = export.loglikelihood(reqs[:1], disable_tqdm=True)
    [(want, want_greedy)] = consolidated.loglikelihood(reqs[:1], disable_tqdm=True)
    assert got == pytest.approx(want, rel=1e-6) and got_greedy == want_greedy
    assert export.generate_until(reqs[1:], disable_tqdm=True) == consolidated.generate_until(reqs[1:], disable_tqdm=True)
    assert export.decoding["g"]["tokens_per_forward"] == consolidated.decoding["g"]["tokens_per_forward"]
