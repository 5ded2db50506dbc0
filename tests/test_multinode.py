"""Two nodes simulated on 127.0.0.1: one torchrun launcher per node (node ranks 0 and 1, one rank each), each
node with its own working folder and its own copy of the data, as on a cluster whose nodes read local disks.
Every rank must read the same data and share the checkpoint folder, or the run stops before the first step
with one message; a resume finds moved data by its fingerprint, and all ranks resume from rank 0's choice."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_launch import REPO, free_port, wait_all
from mtplm.data.config import DataConfig
from mtplm.data.fingerprint import data_fingerprint, differences, digest
from mtplm.data.indexed_dataset import IndexedDatasetWriter, token_dtype
from mtplm.data.synthetic import write_token_dataset
from mtplm.pretrain.checkpointing.checkpoint import DATA_KEY, data_problem
from test_checkpoint_resume import metrics

VOCAB = 200
CONFIG = {
    "model": {"dim": 32, "n_layers": 3, "n_heads": 2, "n_kv_heads": 1, "vocab_size": VOCAB, "multiple_of": 16,
              "n_future_tokens": 2, "max_seq_len": 32},
    "data": {"seq_len": 16, "split": [0.9, 0.1, 0.0], "weights": [0.6, 0.4], "seed": 5, "num_workers": 0},
    "optim": {"lr": 0.003, "warmup_steps": 1},
    "train": {"steps": 4, "micro_batch_size": 2, "eval_interval": 0, "log_interval": 1, "save_interval": 2,
              "keep_last": 3},
}


def documents(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, VOCAB, rng.integers(10, 60)).tolist() for _ in range(n)]


def make_data(folder: Path, extra_document: bool = False) -> list[str]:
    """A dataset folder (with manifests) and a bare Megatron prefix (none), blended."""
    code = write_token_dataset(folder / "code", documents(40, 0), VOCAB, docs_per_shard=15)
    (folder / "books").mkdir(parents=True)
    w = IndexedDatasetWriter(folder / "books" / "part", token_dtype(VOCAB))
    for d in documents(31 if extra_document else 30, 1):
        w.add(d)
    return [str(code), str(w.finish())]


def two_nodes(tmp: Path, node_args, timeout=300) -> list[tuple[int, str]]:
    """Start one torchrun per node, node n in tmp/node{n} with `node_args[n]` after the common config;
    returns each node's (exit code, output)."""
    config = tmp / "config.json"
    config.write_text(json.dumps(CONFIG))
    port = free_port()
    procs = []
    for n, args in enumerate(node_args):
        cwd = tmp / f"node{n}"
        cwd.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "pretrain" / "train.py"), "--config", str(config), "--deepspeed_config",
               str(REPO / "ds_configs" / "zero1.json"), *args]
        env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return wait_all(procs, timeout)


def node_data(tmp: Path, n: int, where: str = "data", extra_document: bool = False) -> list[str]:
    return make_data(tmp / f"node{n}" / where, extra_document)


def datasets(specs) -> list[str]:
    return ["--data.datasets", json.dumps(specs)]


def assert_ok(results):
    for n, (rc, out) in enumerate(results):
        assert rc == 0, f"node {n} exit {rc}:\n{out[-4000:]}"


def assert_refused_before_training(results, *needles, out_dir=None):
    """Both nodes exit non-zero, each printing the one message (with every needle) from mtp-train."""
    for n, (rc, out) in enumerate(results):
        assert rc != 0, f"node {n} trained:\n{out[-3000:]}"
        assert "Every rank stopped before the first step" in out, f"node {n}:\n{out[-4000:]}"
        assert "(exitcode: 2)" in out, f"node {n}:\n{out[-4000:]}"  # mtp-train's refusal, a clean exit
        worker = out.split("failed (exitcode")[0]  # then torchrun's own report
        assert worker.count("mtp-train: ") == 1 and "Traceback" not in worker, f"node {n}:\n{out[-4000:]}"
        for needle in needles:
            assert needle in worker, f"node {n}: {needle!r} missing from:\n{out[-4000:]}"
    if out_dir is not None:
        assert not (out_dir / "metrics.jsonl").exists()


def test_moved_data_resumes_exactly_like_an_uninterrupted_run(tmp_path):
    """Node-local copies train; a resume with every node's copy at a new path continues exactly."""
    shared = tmp_path / "shared"
    full = shared / "full"
    results = two_nodes(tmp_path, [datasets(node_data(tmp_path, n)) + ["--train.out_dir", str(full)]
                                   for n in range(2)])
    assert_ok(results)
    assert sorted(metrics(full)) == [1, 2, 3, 4]
    # each node built its own index cache beside its own copy
    assert all(any((tmp_path / f"node{n}" / "data" / "code" / "index_cache").iterdir()) for n in range(2))

    # The state of a run stopped after step 2, on the shared filesystem; the data then moved on every node.
    resumed = shared / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step_00000002", resumed / "checkpoints" / "step_00000002")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    moved = []
    for n in range(2):
        (tmp_path / f"node{n}" / "data").rename(tmp_path / f"node{n}" / f"moved{n}")
        moved.append([str(tmp_path / f"node{n}" / f"moved{n}" / "code"),
                      str(tmp_path / f"node{n}" / f"moved{n}" / "books" / "part")])
    results = two_nodes(tmp_path, [datasets(moved[n]) + ["--train.out_dir", str(resumed), "--train.resume", "auto"]
                                   for n in range(2)])
    assert_ok(results)
    assert "resumed from" in results[0][1] and "at step 2" in results[0][1]
    a, b = metrics(full), metrics(resumed)
    assert sorted(b) == [3, 4]
    for step in (3, 4):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6, abs=1e-6), f"step {step}"
        assert b[step]["lr"] == a[step]["lr"]
    wa, wb = (load_file(str(out / "final" / "model.safetensors")) for out in (full, resumed))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=1e-5, atol=1e-6), k


def test_data_differing_by_one_document_is_refused_before_the_first_step(tmp_path):
    out = tmp_path / "shared" / "run"
    specs = [node_data(tmp_path, 0), node_data(tmp_path, 1, extra_document=True)]
    results = two_nodes(tmp_path, [datasets(specs[n]) + ["--train.out_dir", str(out)] for n in range(2)])
    assert_refused_before_training(results, "ranks would read different data", "data.datasets[1]", "books/part",
                                   "31 documents", "30 documents", "rank 1 (node 1, host", out_dir=out)
    assert "data.datasets[0]" not in results[0][1]  # the identical dataset is not blamed


def test_node_local_checkpoint_folder_is_refused_with_the_reason(tmp_path):
    """A relative out_dir is a different folder on each node. Node 0 even holds a checkpoint there that node 1
    cannot see: without the check, node 0 would resume it while node 1 started from step 0."""
    local = Path("run")  # in each node's own working folder
    ckpt = tmp_path / "node0" / local / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("2\n")
    (ckpt / "mtp_config.json").write_text(json.dumps(CONFIG))
    results = two_nodes(tmp_path, [datasets(node_data(tmp_path, n)) + ["--train.out_dir", str(local),
                                                                       "--train.resume", "auto"] for n in range(2)])
    assert_refused_before_training(results, "checkpoint folder is not shared by every rank",
                                   "rank 1 (node 1, host", "filesystem that every node mounts")
    for n in range(2):
        assert not (tmp_path / f"node{n}" / local / "metrics.jsonl").exists()
        assert not list((tmp_path / f"node{n}" / local / "checkpoints").glob(".shared-probe-*"))


DECIDE = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    import torch.distributed as dist
    from mtplm.pretrain.checkpointing.checkpoint import decide_resume
    from mtplm.pretrain.config import TrainConfig
    from mtplm.pretrain.consistency import RunRefused, agree_on_data, check_shared_folder

    results = []
    for k, (paths, mode) in enumerate(json.loads(sys.argv[1])):
        if not dist.is_initialized():  # a refusal leaves the process group; a new store for the next one
            dist.init_process_group("gloo", init_method=f"file://{Path.cwd()}/store{k}",
                                    rank=int(os.environ["RANK"]), world_size=2)
        cfg = TrainConfig()
        cfg.train.out_dir, cfg.train.resume = paths[dist.get_rank()], "auto"
        try:
            if mode == "data":
                cfg.data.datasets = [paths[dist.get_rank()]]
                results.append(["data", str(agree_on_data(cfg.data, 1)["datasets"][0]["documents"])])
                continue
            if mode == "probe":
                check_shared_folder(Path(cfg.train.out_dir) / "checkpoints")
            results.append(["resume", str(decide_resume(cfg))])
        except RunRefused as e:
            results.append(["refused", str(e)])
    dist.destroy_process_group()
    print("RESULTS", json.dumps(results))
""")


def decide(tmp: Path, scenarios) -> list[list[tuple[str, str]]]:
    """Per scenario (a path for each rank, mode), what each of two gloo ranks got: mode "resume" runs
    decide_resume with that out_dir, "probe" the shared-folder check first, "data" agree_on_data on that dataset
    (one process for all scenarios: each is a few collectives)."""
    script = tmp / "decide.py"
    script.write_text(DECIDE)
    arg = json.dumps([[[str(d) for d in dirs], mode] for dirs, mode in scenarios])
    procs = [subprocess.Popen(
        [sys.executable, str(script), arg], cwd=tmp, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, RANK=str(r), GROUP_RANK=str(r), OMP_NUM_THREADS="1")) for r in range(2)]
    per_rank = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out[-3000:]
        per_rank.append(json.loads(next(x for x in out.splitlines() if x.startswith("RESULTS")).split(" ", 1)[1]))
    return [tuple(map(tuple, both)) for both in zip(*per_rank)]


OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"


def fake_checkpoint(out_dir: Path, step: int, optim_bytes: int | None = 10) -> Path:
    folder = out_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    files = {"mtp_config.json": b"{}", "mp_rank_00_model_states.pt": b"m" * 10, "COMPLETE": f"{step}\n".encode()}
    if optim_bytes is not None:
        files[OPTIM] = b"o" * optim_bytes
    for name, data in files.items():
        (folder / name).write_bytes(data)
    (out_dir / "checkpoints" / "latest").write_text(folder.name + "\n")
    return folder


def test_ranks_that_see_different_checkpoints_or_lack_data_stop_together(tmp_path):
    """Rank 0 decides; a rank whose view of that checkpoint differs (node-local copy, stale cache) stops every
    rank with one message; a rank that merely sees more than rank 0 follows rank 0's decision."""
    ok, missing, short, newer = (tmp_path / n for n in ("ok", "missing", "short", "newer"))
    fake_checkpoint(ok, 2)
    fake_checkpoint(missing, 2, optim_bytes=None)
    fake_checkpoint(short, 2, optim_bytes=9)  # half-synced
    fake_checkpoint(newer, 2)
    fake_checkpoint(newer, 4)  # seen by rank 1 only
    data = make_data(tmp_path / "data")[0]
    results = decide(tmp_path, [([ok, missing], "resume"), ([ok, short], "resume"), ([ok, newer], "resume"),
                                ([tmp_path / "empty", newer], "resume"), ([ok, ok], "probe"),
                                ([data, tmp_path / "absent"], "data"), ([data, data], "data")])
    (kind0, message), (kind1, message1) = results[0]
    assert kind0 == kind1 == "refused" and message == message1
    assert "rank 0 resumes from step_00000002" in message
    assert "rank 1 (node 1, host" in message and OPTIM in message and "missing" in message
    assert "rank 0 (" not in message  # rank 0 can read it
    assert results[1][0][0] == "refused" and "differ in size" in results[1][0][1]
    # rank 0's choice holds for both, each in its own view of the folder
    assert results[2] == (("resume", str(ok / "checkpoints" / "step_00000002")),
                          ("resume", str(newer / "checkpoints" / "step_00000002")))
    assert results[3] == (("resume", "None"),) * 2  # nothing to resume on rank 0: nobody resumes
    # one folder seen by both: the shared-folder check passes, the probe is gone, both resume the same checkpoint
    assert results[4] == (("resume", str(ok / "checkpoints" / "step_00000002")),) * 2
    assert not list((ok / "checkpoints").glob(".shared-probe-*"))
    # a rank without its copy of the data does not leave the others waiting in the collective
    (kind0, message), (kind1, _) = results[5]
    assert kind0 == kind1 == "refused" and "rank 1 (node 1, host" in message and "absent" in message
    assert results[6] == (("data", "40"),) * 2


def test_fingerprint_follows_content_not_path(tmp_path):
    cfg = lambda specs, **kw: DataConfig(datasets=specs, **{"weights": [0.6, 0.4], **kw})
    base = data_fingerprint(cfg(make_data(tmp_path / "a")), 2)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    copy = data_fingerprint(cfg([str(tmp_path / "copy" / "code"), str(tmp_path / "copy" / "books" / "part")]), 2)
    assert digest(copy) == digest(base) and differences(base, copy, "a", "b") == []
    extra = data_fingerprint(cfg(make_data(tmp_path / "x", extra_document=True)), 2)
    assert digest(extra) != digest(base)
    assert [line.split(":")[0] for line in differences(base, extra, "a", "b")] == ["data.datasets[1]"]
    for changed in (cfg(base_specs := [d["path"] for d in base["datasets"]], seq_len=32),
                    cfg(base_specs, split=[0.8, 0.2, 0.0]), cfg(base_specs, seed=1)):
        assert digest(data_fingerprint(changed, 2)) != digest(base)
    assert differences(base, data_fingerprint(cfg(base_specs), 4), "a", "b") == [
        "model.n_future_tokens: a 2, b 4"]


def test_resume_compares_datasets_by_fingerprint(tmp_path):
    cfg = lambda specs: DataConfig(datasets=specs, weights=[0.6, 0.4])
    saved = data_fingerprint(cfg(make_data(tmp_path / "old")), 2)
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    (folder / "mtp_config.json").write_text(json.dumps({"data": {"datasets": [d["path"] for d in saved["datasets"]]}}))
    moved = data_fingerprint(cfg(make_data(tmp_path / "new")), 2)
    assert data_problem(folder, {DATA_KEY: saved}, moved, None) is None
    reweighted = data_fingerprint(DataConfig(datasets=[d["path"] for d in moved["datasets"]], weights=[1, 1]), 2)
    assert data_problem(folder, {DATA_KEY: saved}, reweighted, None) is None  # blending may change on resume
    other = data_fingerprint(cfg(make_data(tmp_path / "other", extra_document=True)), 2)
    problem = data_problem(folder, {DATA_KEY: saved}, other, None)
    assert "trained on other data" in problem and "data.datasets[1]" in problem and "data.datasets[0]" not in problem
    assert "30 documents" in problem and "31 documents" in problem
    # a checkpoint from before fingerprints: compared by path, as it was
    assert data_problem(folder, {}, saved, None) is None
    assert "compared by path" in data_problem(folder, {}, moved, None)
