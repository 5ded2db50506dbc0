"""The lm-evaluation-harness model `mtplm`: this project's models in the harness, drafts included.

    import mtplm.inference.lm_eval_model  # registers "mtplm" with lm-eval's model registry
    lm_eval.simple_evaluate(model="mtplm", model_args="model=runs/1b/final,draft_heads=3", tasks=[...])

(or `mtp-lm-eval`, lm-eval's own command line with this model registered). `model` is what mtp-eval loads: a
consolidated folder, a Hugging Face export with its heads, or a training checkpoint.

Scoring (loglikelihood, loglikelihood_rolling) is head 1's, the plain next-token model that mtp-export-hf
exports, batched as lm-eval's `hf` backend batches it: the same tokens, the same left truncation to the
model's context, the same prefix token for an empty context, the same reuse of one forward for the choices
of a multiple-choice question that differ only in their last token. Generation (generate_until) is the
project's self-speculative decoding with `draft_heads` drafts (0: plain decoding), batched, stopping at
lm-eval's stop strings and `max_gen_toks`; greedy by default (lossless: the output equals plain greedy
decoding), else the generator's speculative sampler (`do_sample`, `temperature`, `top_p`). The decoding
figures of each task (tokens per forward, acceptance per draft position, wall time; unless measure_plain=false
also the wall time of plain decoding of the same requests) go into lm-eval's results, under config.mtplm.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import defaultdict
from pathlib import Path

import lm_eval.models  # noqa: F401  the harness's own models first: its registry fills itself only when empty
import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from .evaluate import load_for_eval, model_tokenizer
from .speculative import MTPGenerator

log = logging.getLogger("lm_eval.models.mtplm")  # shown and formatted as lm-eval's own log lines

_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
           "fp16": torch.float16, "float16": torch.float16}
# Generation options of lm-eval's task configs that the speculative generator implements; others are refused.
_GEN_OPTIONS = {"do_sample", "temperature", "top_p", "until", "max_gen_toks"}
MODEL_ARGS = ("model", "draft_heads", "dtype", "tokenizer", "prefix_token_id", "measure_plain", "compile", "seed",
              "batch_size", "device")


class MTPLMError(ValueError):
    """model_args that name no loadable model or hold a bad value, or a task's generation options that mtplm
    cannot honour: one line, naming the argument or the task."""


def _int_arg(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)) or not str(value).lstrip("-").isdigit():
        raise MTPLMError(f"model_args {name}={value}: expected an integer")
    if int(value) < low:
        raise MTPLMError(f"model_args {name}={value}: must be >= {low}")
    return int(value)


@register_model("mtplm")
class MTPLM(TemplateLM):
    # lm-eval's own default for generate_until requests that set no max_gen_toks (its hf backend's too)
    max_gen_toks = 256

    def __init__(self, model=None, draft_heads=None, dtype="fp32", tokenizer=None, prefix_token_id=None,
                 measure_plain=None, compile=False, seed=0, batch_size=1, device=None, max_batch_size=None,
                 **unknown):
        super().__init__()
        if unknown:
            raise MTPLMError(f"model_args: unknown argument {sorted(unknown)[0]}; mtplm takes "
                                 f"{', '.join(MODEL_ARGS)}")
        if model is None:
            raise MTPLMError("model_args: model=PATH is required (a consolidated folder, a Hugging Face export "
                                 "or a training checkpoint)")
        if str(batch_size).startswith("auto"):
            raise MTPLMError(f"batch_size {batch_size}: mtplm takes a number of requests per batch")
        if dtype not in _DTYPES:
            raise MTPLMError(f"model_args dtype={dtype}: expected one of {', '.join(_DTYPES)}")
        if measure_plain not in (None, True, False) or not isinstance(compile, bool):
            raise MTPLMError("model_args measure_plain and compile: expected true or false")
        self.batch_size = _int_arg("batch_size", batch_size, 1)
        self.seed = _int_arg("seed", seed, 0)
        self.path = Path(str(model))
        try:
            net, self.kind, train_cfg = load_for_eval(self.path)
            self.tok = model_tokenizer(self.path, net, train_cfg, tokenizer, flag="model_args tokenizer=PATH")
        except (OSError, ValueError, KeyError) as e:  # ConfigError is a ValueError
            raise MTPLMError(f"model_args model={model}: {e}") from None
        if self.tok.vocab_size > net.cfg.vocab_size:
            raise MTPLMError(f"model_args tokenizer: {self.tok.name} has {self.tok.vocab_size} tokens, more than "
                                 f"the model's vocabulary ({net.cfg.vocab_size})")
        extra = net.cfg.n_future_tokens - 1
        self.draft_heads = extra if draft_heads is None else _int_arg("draft_heads", draft_heads, 0)
        if self.draft_heads > extra:
            raise MTPLMError(f"model_args draft_heads={draft_heads}: the model has {extra} extra heads")
        self.custom_prefix = None if prefix_token_id is None else _int_arg("prefix_token_id", prefix_token_id, 0)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # The wall time without drafts is measured beside the one with them unless told not to (it decodes every
        # generate_until request twice); plain decoding alone has nothing to compare with.
        self.measure_plain = self.draft_heads > 0 if measure_plain is None else measure_plain
        self.dtype, self.compile = dtype, compile
        self.model = net.to(device=self._device, dtype=_DTYPES[dtype]).eval()
        self.generator = MTPGenerator(self.model)
        self.decoding: dict[str, dict] = {}  # per task: the figures of its generate_until requests (JSON)
        self._totals: dict[str, dict] = {}  # per task: the GenerationStats they were computed from

    # --- what lm-eval's TemplateLM needs --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored after: the hf backend's choice (BOS if the tokenizer has one,
        else end of document), so both score an export alike; model_args prefix_token_id overrides it."""
        if self.custom_prefix is not None:
            return self.custom_prefix
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eod_id

    @property
    def max_length(self) -> int:
        return self.model.cfg.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def get_model_info(self) -> dict:
        """Added to lm-eval's results (config), after the evaluation: the model and its decoding figures."""
        return {"mtplm": {"path": str(self.path.resolve()), "kind": self.kind, "dtype": self.dtype,
                          "config": dataclasses.asdict(self.model.cfg), "draft_heads": self.draft_heads,
                          "decoding": self.decoding}}

    # --- scoring: head 1 ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether it is head 1's greedy continuation) for each
        ((context, continuation) or None, context tokens, continuation tokens), longest first in batches."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        res = []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="mtplm loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            # The model reads context + continuation but its last token, cut from the left to its context.
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            width = max(len(x) for x in inputs)
            batch = torch.zeros(len(inputs), width, dtype=torch.long, device=self._device)
            for i, x in enumerate(inputs):  # right padding: causal attention keeps it out of earlier positions
                batch[i, : len(x)] = torch.tensor(x, device=self._device)
            logprobs = F.log_softmax(self.model(batch).logits.float(), dim=-1)
            for (request, ctx, cont), x, lp in zip(chunk, inputs, logprobs):
                lp = lp[len(x) - len(cont): len(x)].unsqueeze(0)  # (1, continuation, V)
                greedy = lp.argmax(-1)
                for request, cont, lp in collator.get_cache(req_str=request, cxt_toks=ctx, cont_toks=cont,
                                                            logits=lp):
                    target = torch.tensor(cont, device=self._device).unsqueeze(0)
                    answer = (float(lp.gather(2, target.unsqueeze(-1)).sum()),
                              bool((greedy[:, -target.shape[1]:] == target).all()))
                    res.append(answer)
                    if request is not None:
                        self.cache_hook.add_partial("loglikelihood", request, answer)
                    bar.update(1)
        bar.close()
        return collator.get_original(res)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood in disjoint windows of the model's context, each prediction made once
        (lm-eval's rolling windows, as the hf backend cuts them), the windows of all texts batched together."""
        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for w in lm_utils.get_rolling_token_windows(token_list=self.tok_encode(text),
                                                        prefix_token=self.prefix_token_id,
                                                        max_seq_len=self.max_length, context_len=1):
                windows.append((None, *lm_utils.make_disjoint_window(w)))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --- generation: self-speculative decoding --------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Completions, grouped by task and generation options, longest prompts first in batches."""
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups[(req.task_name or "", json.dumps(gen_kwargs, sort_keys=True, default=str))].append(i)
        out: list[str | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="mtplm generate_until")
        for (task, _), indices in groups.items():
            gen_kwargs = requests[indices[0]].args[1]
            texts, figures = self._generate_group(task, [requests[i].args[0] for i in indices], gen_kwargs, bar)
            for i, text in zip(indices, texts):
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
            self._record(task, figures)
        bar.close()
        return out

    def _options(self, task: str, gen_kwargs: dict):
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        unsupported = sorted(set(kwargs) - _GEN_OPTIONS)
        if unsupported:
            raise MTPLMError(f"task {task}: generation option {unsupported[0]} is not supported by mtplm "
                             f"(it takes {', '.join(sorted(_GEN_OPTIONS))})")
        eos = self.tok.decode([self.eot_token_id]) or None  # an end-of-document that decodes to text is a stop
        until = handle_stop_sequences(kwargs["until"], eos=eos)
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs["do_sample"] else 0.0
        top_p = float(kwargs.get("top_p") or 1.0)
        if not 0 < top_p <= 1 or temperature < 0:
            raise MTPLMError(f"task {task}: temperature must be >= 0 and top_p in (0, 1], got {temperature}, {top_p}")
        max_gen = int(kwargs["max_gen_toks"])
        if not 0 < max_gen < self.max_length:
            raise MTPLMError(f"task {task}: max_gen_toks {max_gen} leaves no room for a prompt in the model's "
                             f"context of {self.max_length} tokens")
        return until, max_gen, temperature, top_p

    def _stop_when(self, until: list[str]):
        """Whether a sequence's tokens have produced a stop string: the decoded tail that a stop string just
        completed can lie in (a token is at least one byte, a character at most four), not the whole text."""
        stops = [s for s in until if s]
        if not stops:
            return None
        tail = 4 * max(len(s) for s in stops) + 4
        return lambda tokens: any(s in self.tok.decode(tokens[-tail:]) for s in stops)

    def _generate_group(self, task: str, contexts: list[str], gen_kwargs: dict, bar):
        until, max_gen, temperature, top_p = self._options(task, gen_kwargs)
        room = self.max_length - max_gen  # the prompt's share of the context, as the hf backend leaves it
        prompts = []
        for c in contexts:
            ids = self.tok_encode(c) or [self.prefix_token_id]
            if len(ids) > room:
                log.warning("task %s: a prompt of %d tokens keeps its last %d (context %d - max_gen_toks %d)",
                            task, len(ids), room, self.max_length, max_gen)
            prompts.append(ids[-room:])
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        stop_when = self._stop_when(until)
        texts: list[str | None] = [None] * len(prompts)
        figures = {"requests": len(prompts), "spec": None, "plain": None, "differing": 0, "greedy": temperature == 0}
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            ids = [prompts[i] for i in batch]
            runs = [("spec", self.draft_heads)] + ([("plain", 0)] if self.measure_plain else [])
            outs = {}
            for name, k in runs:
                outs[name], stats = self.generator.generate(
                    ids, max_gen, k, temperature, top_p, stop_tokens=[self.eot_token_id], seed=self.seed + start,
                    compile=self.compile, stop_when=stop_when)
                figures[name] = stats if figures[name] is None else figures[name] + stats
            if "plain" in outs and temperature == 0:
                figures["differing"] += sum(a != b for a, b in zip(outs["spec"], outs["plain"]))
            for i, tokens in zip(batch, outs["spec"]):
                texts[i] = postprocess_generated_text(self.tok.decode(tokens), until, None)
            bar.update(len(batch))
        return texts, figures

    def _record(self, task: str, figures: dict) -> None:
        """The task's decoding figures, added to those of its earlier generate_until calls, and logged."""
        before = self._totals.get(task)
        if before is not None:
            figures = {"requests": before["requests"] + figures["requests"], "greedy": before["greedy"] and figures["greedy"],
                       "differing": before["differing"] + figures["differing"],
                       **{k: figures[k] if before[k] is None else before[k] + figures[k] for k in ("spec", "plain")}}
        self._totals[task] = figures
        spec, plain = figures["spec"], figures["plain"]
        entry = {"requests": figures["requests"], "draft_heads": self.draft_heads, "tokens": spec.tokens,
                 "forwards": spec.forwards, "tokens_per_forward": spec.tokens_per_forward,
                 "acceptance": [None if a != a else a for a in spec.acceptance], "seconds": spec.seconds,
                 "tokens_per_second": spec.tokens_per_second}
        if plain is not None:
            entry["plain"] = {"seconds": plain.seconds, "forwards": plain.forwards,
                              "tokens_per_second": plain.tokens_per_second}
            entry["speedup"] = plain.seconds / max(spec.seconds, 1e-9)
            # Greedy speculative decoding is lossless: a difference means numerics (e.g. bf16 batch shapes) or a bug.
            entry["greedy_outputs_differing"] = figures["differing"] if figures["greedy"] else None
        self.decoding[task] = entry
        log.info("mtplm %s: %d drafts, %.3f tokens per forward, acceptance %s, %.2f s%s", task, self.draft_heads,
                 spec.tokens_per_forward, " ".join("-" if a is None else f"{a:.3f}" for a in entry["acceptance"]),
                 spec.seconds, f" (plain decoding {plain.seconds:.2f} s)" if plain is not None else "")
