"""sat's model parallelism: its process groups, and loading one rank's part of a checkpoint.

Tensor parallelism the sat way (Megatron style): every rank holds 1/N of each attention's heads and of
each MLP, and of the embedding rows; the layers all-reduce their outputs, and the LM head gathers the
full vocabulary, so every rank ends a forward with the same logits [B, S, V] and can run the same
decoding loop. The vision encoder (EVA ViT + Q-Former) is split the same way. Which tensor is cut how:
model/sat/mp_split.py.

Also used by the trainer (code outside model/sat that must not import sat) for sat's mpu module.
"""
import datetime
import os
from typing import Optional

import torch

from . import compat as _compat

_compat.import_sat()
from sat import mpu  # noqa: E402  (sat through compat first)


def init_model_parallel(size: int = 1):
    """Initialise sat's model-parallel groups once (over the existing torch.distributed group); return
    sat's mpu module, which DeepSpeed's activation checkpointing takes as its model-parallel unit."""
    if not mpu.model_parallel_is_initialized():
        mpu.initialize_model_parallel(size)
    return mpu


def init_from_launcher(device: Optional[str] = None) -> str:
    """In a process started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT set): the process
    group (NCCL on GPUs, gloo on the CPU) and sat's model parallelism over all of it (one model across
    the ranks, no data parallelism). Returns this rank's device."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                             timeout=datetime.timedelta(hours=2))   # rank 0 waits on the user
    init_model_parallel(torch.distributed.get_world_size())
    return device


def parallel_plan(model):
    """How every tensor of a (model-parallel) model is cut across ranks: sat's layers and LoRA's adapters."""
    from .finetune import lora_partition_plan
    from .mp_split import partition_plan
    return {**partition_plan(model), **lora_partition_plan(model)}


def mark_model_parallel(model, plan) -> None:
    """Flag the parameters that differ between ranks (`model_parallel`, what DeepSpeed's gradient norm
    reads: those count on every rank, the others on rank 0 only). Loading with assign=True replaces sat's
    parameters and drops its flags; sat also flags every LoRA B, the replicated one of dense's included."""
    for name, param in model.named_parameters():
        param.model_parallel = name in plan


def load_model_parallel(name_or_path, device: str, dtype: Optional[torch.dtype] = None, quant: Optional[int] = None,
                        overwrite_config: Optional[dict] = None, allow_missing=lambda key: False):
    """This rank's part of a checkpoint, as a model built for sat's current model-parallel size N: from
    the rank's own file when the folder is split for N (mp_rank_XX), or cut at load time from a single
    file (every rank reads the file, memory-mapped, and keeps its part). quant: 8 / 4 quantizes this
    rank's part (on the CPU, before it moves to the device). overwrite_config and allow_missing as for
    checkpoint.load_model: a LoRA model built on a plain checkpoint gets its adapters initialised the
    way one process would, then cut."""
    from .checkpoint import (CheckpointError, _recompute_buffers, check_state_dict, checkpoint_file, convert_glm_qkv,
                             default_dtype, detect_qkv_layout, read_config, read_state_dict, resolve_checkpoint_dir)
    from .mp_split import build_parallel, shard_state_dict
    size, rank = mpu.get_model_parallel_world_size(), mpu.get_model_parallel_rank()
    dtype = dtype or default_dtype(device)
    ckpt_dir = resolve_checkpoint_dir(name_or_path)
    config = {**read_config(ckpt_dir), **(overwrite_config or {})}
    stored = int(config.get("model_parallel_size", 1))
    if stored not in (1, size):
        raise CheckpointError(f"{ckpt_dir} is split for {stored} ranks, but {size} were started: start "
                              f"{stored}, or merge it (python -m model.sat.mp_split merge) and start any number.")
    state = read_state_dict(checkpoint_file(ckpt_dir, rank if stored == size else 0))
    state = convert_glm_qkv(state, config["num_attention_heads"], detect_qkv_layout(config))
    model = build_parallel(config, size, device="meta", dtype=dtype)
    adapt = getattr(model, "adapt_state_dict", None)   # LoRA: plain weights -> `.original`
    if adapt is not None:
        state = adapt(state)
    plan = parallel_plan(model)
    if stored == 1 and size > 1:
        state = shard_state_dict(state, plan, rank, size)
    check_state_dict(model, state, allow_missing)
    load_device = "cpu" if quant else device
    expected = model.state_dict()
    model.load_state_dict({k: v.to(load_device, dtype if v.is_floating_point() else v.dtype)
                           for k, v in state.items() if k in expected}, strict=False, assign=True)
    _recompute_buffers(model, load_device)
    leftover = [n for n, t in model.named_parameters() if t.is_meta]   # adapters new to this checkpoint
    if leftover:
        model.init_missing(leftover, device=load_device, dtype=dtype, parallel=(plan, rank, size))
    mark_model_parallel(model, plan)
    model.config = dict(config)               # what the front ends read (sizes, vocab) stays the file's
    model.checkpoint_dir = ckpt_dir
    if quant:
        from .quantization import quantize
        quantize(model, int(quant))
        model = model.to(device)
    return model.eval()


def broadcast(obj, src: int = 0):
    """A picklable object from rank `src` to every rank (each rank passes its own, only src's counts)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]
