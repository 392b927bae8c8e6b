"""Everything before the first step: processes, tokenizer, datasets, model and DeepSpeed engine.

The config, tokenizer and data come first, so that a bad dataset fails in seconds, before a 6B model
loads. The order of the seeding and of the random initialisation is part of reproducibility.
"""
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .console import log
from .data import load_datasets
from .distributed import Dist, deepspeed_config, param_groups, setup_distributed, train_dtype
from .errors import ConfigError
from .rng import set_seed
from .runs import recover_run_folder
from .source import Source, check_model_parallel, load_for_training, make_trainable, resolve_source


@dataclass
class Session:
    args: object
    dist: Dist
    source: Source
    tokenizer: object
    tokenizer_dir: Path
    train_set: torch.utils.data.Dataset
    valid_set: Optional[torch.utils.data.Dataset]
    test_set: Optional[torch.utils.data.Dataset]
    global_batch: int            # samples per iteration over all processes
    engine: object               # the DeepSpeed engine around the model
    config: dict                 # the model_config.json to save with checkpoints
    trainable: int               # trainable parameters


def open_session(args) -> Session:
    """Set up a training job from parsed flags (fills in args.train_iters when --epochs or unset)."""
    dist = setup_distributed(args)
    dtype = train_dtype(args, dist.device)
    set_seed(args.seed)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    source = resolve_source(args)
    check_model_parallel(source, dist.mp_size)
    tokenizer_dir, tokenizer = _load_tokenizer(args, source)
    if source.kind == "load":
        source.iteration = recover_run_folder(source.path, dist)
    train_set, valid_set, test_set = load_datasets(args, tokenizer, source.config)
    global_batch = _plan_iterations(args, dist, train_set, valid_set, test_set)
    engine, config, trainable = _build_engine(args, source, dist, dtype, tokenizer)
    # dropout: the ranks of one model-parallel group draw alike (their replicated activations must stay
    # equal); a resumed run restores its saved state when it loads
    set_seed(args.seed + dist.dp_rank)
    return Session(args, dist, source, tokenizer, tokenizer_dir, train_set, valid_set, test_set, global_batch,
                   engine, config, trainable)


def _load_tokenizer(args, source: Source):
    from model.sat.loading import find_tokenizer_dir, load_tokenizer
    tokenizer_dir = find_tokenizer_dir(source.folder, source.config.get("tokenizer_type"), args.tokenizer)
    tokenizer = load_tokenizer(tokenizer_dir)
    if len(tokenizer) > source.config["vocab_size"]:
        raise ConfigError(f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model only "
                          f"{source.config['vocab_size']}; they do not belong together (pass --tokenizer)")
    return tokenizer_dir, tokenizer


def _plan_iterations(args, dist: Dist, train_set, valid_set, test_set) -> int:
    """Samples per iteration; --epochs (or the default of 10000) becomes args.train_iters."""
    global_batch = args.batch_size * args.gradient_accumulation_steps * dist.dp_world
    if args.train_iters is None:
        args.train_iters = math.ceil(args.epochs * len(train_set) / global_batch) if args.epochs else 10000
    log(f"data: {len(train_set)} training samples"
        + (f", {len(valid_set)} validation" if valid_set else "") + (f", {len(test_set)} test" if test_set else "")
        + f"; {args.train_iters} iterations of {global_batch} samples "
        f"({args.batch_size} x {args.gradient_accumulation_steps} accumulation x {dist.dp_world} "
        + (f"copies of the model, each split across {dist.mp_size} processes)" if dist.mp_size > 1 else "processes)"))
    note = _validation_note(args, valid_set)
    if note:
        log(note)
    return global_batch


def _validation_note(args, valid_set) -> str:
    """Say plainly when no loss this run reports measures anything but the training data."""
    if valid_set is None:
        return ("no validation set: no validation loss will be reported (give --valid-data, or --split 9,1,0 "
                "to hold out a tenth of --train-data)")
    trained = {Path(f).resolve() for f in args.train_data or [] if Path(f).is_file()}
    if args.valid_data and trained & {Path(f).resolve() for f in args.valid_data}:
        return ("warning: the validation data is training data (a --valid-data file is also in --train-data): "
                "its loss shows how well the model fits what it trains on, not how it does on new data")
    return ""


def _build_engine(args, source: Source, dist: Dist, dtype: torch.dtype, tokenizer):
    """(DeepSpeed engine, config to save, trainable parameter count)."""
    import deepspeed
    qlora = source.adapters.get('use_qlora') and not source.adapters.get('use_lora')
    where = 'cpu, quantized on the way to ' + str(dist.device) if qlora else dist.device
    log(f"loading {source.path} ({'random init, ' if source.kind == 'config' else ''}{str(dtype)[6:]} on {where})")
    model, config = load_for_training(args, source, dist, dtype)
    config.setdefault("pad_token_id", tokenizer.pad_token_id)  # marks the [Q|K|V] layout (spec 1.3)
    trainable = make_trainable(model, args, config)
    if args.checkpoint_activations:  # (sat uses DeepSpeed's checkpointing on CUDA, torch's on the CPU)
        model.transformer.checkpoint_activations = True
        model.transformer.checkpoint_num_layers = args.checkpoint_num_layers
    model.train()
    mpu = None
    if dist.mp_size > 1:   # DeepSpeed then averages gradients over data-parallel ranks only
        from model.sat.parallel import init_model_parallel
        mpu = init_model_parallel(dist.mp_size)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=param_groups(model), mpu=mpu,
                                           config=deepspeed_config(args, dist.dp_world))
    return engine, config, trainable
