"""Training state on disk, as torchtitan's components/checkpoint.py and Megatron-Core's dist_checkpointing/:

    checkpoint.py  save and resume on DeepSpeed's checkpoints: layout, `latest`, pruning, RNG, the checks a
                   resume makes (configuration, data, every rank reading the same checkpoint)
    reshard.py     resume on another layout, through a checkpoint's layout-free form
    init_from.py   start from a consolidated model's weights (train.init_from), with another number of heads

Nothing here imports the training loop (setup.cfg's import contracts).
"""
