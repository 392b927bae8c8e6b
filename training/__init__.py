"""The parts of finetune_visualglm.py's trainer, one job per module.

data: the dataset format and datasets; batches: collation and a resumable batch order; objective:
loss and learning rate; distributed: process group and DeepSpeed settings; rng: seeds and random
state; source: the model to train; runs: run folders and crash-safe checkpoints; session: everything
before the first step; loop: the steps; console: messages. Nothing here exits the process: a job
that cannot start raises errors.ConfigError, data.DataError, ... for finetune_visualglm.main() to report.
"""
