"""What is applied to the model from outside for a parallel layout, as torchtitan's distributed/ and
Megatron-Core's tensor_parallel/ and pipeline_parallel/:

    layout.py           the rank grid (pipeline x data x tensor, on DeepSpeed's topology), world size checks
    tensor_parallel.py  Megatron-style tensor parallelism of the blocks, embedding and unembedding
    pipeline.py         the pipeline layout: stages, their partition, the heads on the last stage
    lean_init.py        the ZeRO-0/1/2 build: only the rank's stage and shards materialised
    compile.py          torch.compile of the blocks and the cross-entropy chunk (train.compile)
    recompute.py        selective activation recomputation (train.activation_checkpoint_policy)

Nothing here knows of checkpoints or of the training loop (setup.cfg's import contracts).
"""
