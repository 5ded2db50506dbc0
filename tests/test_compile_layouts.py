"""train.compile under the real trainer and DeepSpeed, for each layout: several optimizer steps of the tiny n=4
model must reproduce the eager single-process naive reference (losses, per-head losses, gradient norm and every
final weight, within the 1e-5 of the eager layout tests); the single process is test_compile.py's. Inductor for
every layout but ZeRO-3, whose blocks compile in several graphs around DeepSpeed's parameter hooks (about 5
minutes of code generation on a 2-core CPU); it runs aot_eager (the same Dynamo and AOTAutograd graphs, without
code generation) to keep the test time down.
Selective recomputation rides along on ZeRO-3 (DeepSpeed's parameter hooks inside the checkpoint) and on the
pipeline (the block's own hook inside a stage)."""

import pytest

from dist_training import assert_matches, ds_json, train

pytestmark = pytest.mark.distributed

SELECTIVE = ("--train.activation_checkpointing", "true", "--train.activation_checkpoint_policy", "selective")
LAYOUTS = {
    "zero1": (2, 1, ()),
    "pp2": (2, 1, ("--parallel.pipeline", "2", "--train.grad_accum_steps", "4", *SELECTIVE)),
    "tp2": (2, 1, ("--parallel.tensor", "2", "--train.grad_accum_steps", "4")),
    "zero3": (2, 3, ("--train.compile_backend", "aot_eager", *SELECTIVE)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_training_matches_eager_single_process(tmp_path, reference, layout):
    world, stage, args = LAYOUTS[layout]
    got = train(tmp_path, layout, world, "--train.compile", "true", *args,
                "--deepspeed_config", str(ds_json(tmp_path, f"zero{stage}.json")))
    assert_matches(reference, got)
