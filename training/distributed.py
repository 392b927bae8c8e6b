"""Processes and precision: the torch.distributed group (NCCL on GPUs, gloo on the CPU), the training
dtype, DeepSpeed's configuration and optimizer groups, and the collectives the loop needs."""
import datetime
import json
import os
import socket
from dataclasses import dataclass
from typing import List

import torch

from .console import log
from .errors import ConfigError


@dataclass
class Dist:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    mp_size: int = 1     # ranks that share one copy of the model (sat's model parallelism)

    # sat's groups: ranks r*N .. r*N+N-1 hold one model together, and the ranks with the same
    # model-parallel rank form the data-parallel groups; ranks of one model see the same batches
    @property
    def mp_rank(self) -> int:
        return self.rank % self.mp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.mp_size

    @property
    def dp_world(self) -> int:
        return self.world // self.mp_size


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(args) -> Dist:
    """torch.distributed before DeepSpeed and sat: NCCL on GPUs, gloo on the CPU. A single process
    without launcher variables gets a private TCP rendezvous."""
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank if args.local_rank is not None else 0))
    os.environ["LOCAL_RANK"] = str(local_rank)     # DeepSpeed insists on it
    backend = args.distributed_backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not cuda:
        log("warning: --distributed-backend nccl needs CUDA; using gloo on this CPU-only machine")
        backend = "gloo"
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        from model.sat.compat import skip_deepspeed_shm_comm
        skip_deepspeed_shm_comm()
    if not torch.distributed.is_initialized():
        _init_process_group(backend, rank, world)
    else:  # e.g. sat already made a one-process group in this interpreter
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mp_size = args.model_parallel_size
    if world % mp_size:
        raise ConfigError(f"--model-parallel-size {mp_size} does not divide the {world} processes started")
    _init_sat_and_deepspeed(backend, cuda, args.seed, mp_size)
    return Dist(rank, world, local_rank, device, mp_size)


def _init_process_group(backend: str, rank: int, world: int) -> None:
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        init_method = "env://"
    elif world == 1:
        init_method = f"tcp://127.0.0.1:{_free_port()}"
    else:
        raise ConfigError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (use the deepspeed launcher)")
    torch.distributed.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world,
                                         timeout=datetime.timedelta(minutes=30))


def _init_sat_and_deepspeed(backend: str, cuda: bool, seed: int, mp_size: int) -> None:
    """sat's model-parallel groups and DeepSpeed's view of the group made above."""
    from model.sat.parallel import init_model_parallel
    mpu = init_model_parallel(mp_size)
    if mpu.get_model_parallel_world_size() != mp_size:   # set up earlier in this interpreter
        raise ConfigError(f"sat's model-parallel groups already exist with size {mpu.get_model_parallel_world_size()}; "
                          f"--model-parallel-size {mp_size} needs a new process")
    import deepspeed
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)  # wraps the group
    if cuda:
        # On CUDA, sat's attention dropout and activation checkpointing draw from DeepSpeed's model-parallel
        # RNG tracker, which sat seeds only when it creates the process group itself.
        deepspeed.checkpointing.configure(mpu, partition_activations=False)
        mpu.model_parallel_cuda_manual_seed(seed)


def train_dtype(args, device) -> torch.dtype:
    if args.fp16 and device.type != "cuda":
        log("warning: --fp16 on a machine without CUDA: training in fp32 instead (use --bf16 for bfloat16)")
        args.fp16 = False
    return torch.float16 if args.fp16 else torch.bfloat16 if args.bf16 else torch.float32


def deepspeed_config(args, world: int) -> dict:
    """DeepSpeed's configuration from the flags, on top of --deepspeed_config when given (world: the
    data-parallel processes, i.e. copies of the model)."""
    config = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config, encoding="utf-8") as f:
            config = json.load(f)
    config.update({
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "train_batch_size": args.batch_size * args.gradient_accumulation_steps * world,
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    })
    config.setdefault("gradient_clipping", args.gradient_clipping)
    zero = config.setdefault("zero_optimization", {})
    zero["stage"] = args.zero_stage
    optimizer = config.setdefault("optimizer", {"type": "Adam", "params": {}})
    params = optimizer.setdefault("params", {})
    params.update({"lr": args.lr, "weight_decay": args.weight_decay})
    params.setdefault("betas", [0.9, 0.95])
    params.setdefault("eps", 1e-8)
    params.setdefault("torch_adam", True)   # no JIT build of fused Adam; adapters are small anyway
    params.setdefault("adam_w_mode", True)
    _set_precision(config, args)
    return config


def _set_precision(config: dict, args) -> None:
    if args.fp16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "loss_scale_window": 400, "hysteresis": 2,
                          "min_loss_scale": 1, "initial_scale_power": 16, **config.get("fp16", {})}
        config["fp16"]["enabled"] = True
    elif args.bf16:
        config["bf16"] = {**config.get("bf16", {}), "enabled": True}
    for key, other in (("fp16", args.fp16), ("bf16", args.bf16)):   # a base config's other precision goes off
        if key in config and not other:
            config[key]["enabled"] = False


def param_groups(module) -> List[dict]:
    """Trainable parameters; biases, layer norms and other vectors without weight decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "bias" in name or "layernorm" in name else decay).append(p)
    groups = [{"params": decay}] if decay else []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def all_mean(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return float(t.item()) / torch.distributed.get_world_size()


def any_rank(failed: bool, device) -> bool:
    """True on every rank when one of them failed (so that all stop together)."""
    flag = torch.tensor([1.0 if failed else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
