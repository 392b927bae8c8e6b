"""The trainer's messages: printed at once, by the first process only unless asked otherwise."""
import os

import torch


def rank() -> int:
    # before the process group exists, the launcher's RANK says which process this is
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else int(os.environ.get("RANK", 0))


def log(*parts, rank0_only=True):
    if not rank0_only or rank() == 0:
        print(*parts, flush=True)
