"""Recipe presets: the paper's settings as published, --set changes, the seeds' verdicts, and the global batch
that keeps a preset's batch on any number of GPUs."""

import pytest

from mtplm.config import ConfigError, from_dict
from mtplm.pretrain.config import TrainConfig
from mtplm.pretrain.parallel.layout import check_world_size
from mtplm.recipes.presets import PRESETS, with_changes
from mtplm.recipes.report import curves_by_tokens, summarise, verdict
from mtplm.recipes.run import model_config, prepare_data, train_config


def test_paper_presets_are_the_papers_settings(tmp_path):
    """Table S13 and Figs. 7, 8, S16: sizes, 2^18 tokens per step, 100k steps, LR 1e-4 with 2000 warmup steps
    and cosine decay to 0.03, test sets of 100 stories and 2000 problems per m."""
    ind, poly = PRESETS["induction"]["paper"], PRESETS["polynomial"]["paper"]
    assert {k: (v["dim"], v["n_layers"], v["n_heads"]) for k, v in ind.sizes.items()} == {
        "1M": (128, 5, 4), "3M": (256, 4, 8), "10M": (384, 6, 8), "30M": (512, 10, 8), "100M": (768, 14, 12),
        "300M": (1024, 25, 16), "1B": (1536, 36, 24)}
    assert {k: (v["dim"], v["n_layers"], v["n_heads"]) for k, v in poly.sizes.items()} == {
        "30M": (512, 10, 8), "100M": (768, 14, 12)}
    for preset, size in [(ind, "1M"), (ind, "1B"), (poly, "30M"), (poly, "100M")]:
        s = preset.shape(size)
        assert s["seq_len"] * s["batch_size"] == 2**18 and preset.steps == 100_000
        cfg = train_config(preset, size, model_config(preset, size, 2), 1, tmp_path, tmp_path)
        assert cfg["optim"] == {"lr": 1e-4, "warmup_steps": 2000, "min_lr_ratio": 0.03}
        assert cfg["train"]["global_batch_size"] == s["batch_size"] and cfg["data"]["seq_len"] == s["seq_len"]
        from_dict(TrainConfig, cfg)  # a valid training config
    assert poly.shape("30M")["seq_len"] == 1024 and poly.shape("100M")["seq_len"] == 2048
    assert ind.test_docs == 100 and poly.test_docs == 2000 and poly.ring_terms == 5 and poly.train_max_m == 5


def test_set_changes_scalar_fields_with_their_types():
    base = PRESETS["induction"]["cpu"]
    p = with_changes(base, ["lr=1e-3", "steps=2e3", "story=paper", "decode_compiled=false"])
    assert (p.lr, p.steps, p.story, p.sizes) == (1e-3, 2000, "paper", base.sizes) and isinstance(p.steps, int)
    assert p.decode_compiled is False and with_changes(p, ["decode_compiled=True"]).decode_compiled is True
    with pytest.raises(ValueError, match="decode_compiled takes a bool, got '0'"):
        with_changes(base, ["decode_compiled=0"])
    with pytest.raises(ValueError, match="the sizes 30M set their own seq_len"):  # would be silently ignored
        with_changes(PRESETS["polynomial"]["paper"], ["seq_len=512"])
    with pytest.raises(ValueError, match="KEY one of"):
        with_changes(base, ["sizes=3"])
    with pytest.raises(ValueError, match="steps takes a int, got 'many'"):
        with_changes(base, ["steps=many"])


def test_verdicts_need_seeds_that_do_not_overlap():
    assert verdict([0.5, 0.6], [0.1, 0.2]) == "indistinguishable"  # p = 1/6: too few seeds to call
    assert verdict([0.5, 0.6, 0.7], [0.1, 0.2, 0.45]) == "better"
    assert verdict([0.1, 0.2, 0.3], [0.35, 0.4, 0.5]) == "worse"
    assert verdict([0.1, 0.5, 0.6], [0.2, 0.3, 0.4]) == "indistinguishable"
    rows = [{"size": "s", "n": n, "seed": seed, "accuracy": a, "accuracy_by": {"2": a}}
            for n, accs in ((1, (0.1, 0.2, 0.3)), (2, (0.4, 0.5, 0.6))) for seed, a in enumerate(accs)]
    one, two = summarise(rows)
    assert "verdict" not in one["accuracy"] and two["accuracy"]["verdict"] == "better"
    assert two["accuracy"]["mean"] == pytest.approx(0.5) and two["accuracy_by"]["2"]["min"] == 0.4


def test_accuracy_curves_average_only_the_checkpoints_every_seed_has():
    """A run stopped and continued keeps a checkpoint at its stop; averaging that one seed would draw a dip."""
    def row(seed, points):
        return {"size": "s", "n": 1, "seed": seed, "curve": [{"tokens": t, "accuracy": a} for t, a in points]}
    rows = [row(1, [(100, 0.1), (200, 0.3)]), row(2, [(100, 0.2), (150, 0.0), (200, 0.5)])]
    assert curves_by_tokens(rows) == {("s", 1): [(100, pytest.approx(0.15), 0.1, 0.2),
                                                 (200, pytest.approx(0.4), 0.3, 0.5)]}


def test_global_batch_size_sets_the_accumulation_for_the_data_parallel_size():
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.train.global_batch_size = 16, 128
    assert check_world_size(cfg, 4) == 4 and cfg.train.grad_accum_steps == 2
    assert check_world_size(cfg, 4) == 4 and cfg.train.grad_accum_steps == 2  # checked again: the same
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.parallel.tensor = 16, 128, 2
    assert check_world_size(cfg, 4) == 2 and cfg.train.grad_accum_steps == 4
    with pytest.raises(ConfigError, match="128 sequences cannot be made of micro-batches of 16 on 3"):
        check_world_size(cfg, 6)
    cfg = TrainConfig()
    cfg.train.micro_batch_size, cfg.train.global_batch_size, cfg.train.grad_accum_steps = 16, 128, 3
    with pytest.raises(ConfigError, match="global_batch_size .128. and train.grad_accum_steps .3. disagree"):
        check_world_size(cfg, 2)


def test_a_presets_training_problems_have_at_most_train_max_m_operations(tmp_path):
    """train_max_m bounds the training problems' operations (the cpu analogue trains on fewer than the paper's 5);
    the test sets keep every m, so m beyond it is out of domain."""
    import json

    from mtplm.recipes.run import prepare_data

    preset = with_changes(PRESETS["polynomial"]["tiny"], ["train_max_m=2", "ring_terms=3"])
    prepare_data("polynomial", preset, tmp_path, 0)
    docs = [json.loads(line)["text"] for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    ops = [sum(d.split("=")[0].count(c) for c in "-+*@") for d in docs]
    assert len(docs) == preset.train_docs and set(ops) == {1, 2}
    assert all(len(d.split("=")[1]) == 3 for d in docs)
    tests = [json.loads(line) for line in (tmp_path / "data" / "test.jsonl").read_text().splitlines()]
    assert {t["m"] for t in tests} == set(range(1, 11))


def test_a_preset_without_training_operations_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="train_max_m must be 1 or more"):
        prepare_data("polynomial", with_changes(PRESETS["polynomial"]["tiny"], ["train_max_m=0"]), tmp_path, 0)
