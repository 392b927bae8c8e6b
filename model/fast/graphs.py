"""Recording a CUDA graph, the one way every captured part of the fast path does it."""
import logging
from typing import Callable, Dict, Optional, Tuple

import torch

log = logging.getLogger("visualglm.fast")

# One warm-up stream per device for every recording. Why: the caching allocator keeps the blocks freed on
# a stream for that stream; with a new stream per recording, the warm-ups of the 39 graphs captured at a
# server's start left 16.5 GiB cached and unusable on an H200.
_SIDE: Dict[int, "torch.cuda.Stream"] = {}


def _side_stream() -> "torch.cuda.Stream":
    device = torch.cuda.current_device()
    if device not in _SIDE:
        _SIDE[device] = torch.cuda.Stream()
    return _SIDE[device]


def record(run: Callable[[], torch.Tensor], warmups: int = 1, pool=None) -> Tuple["torch.cuda.CUDAGraph", torch.Tensor]:
    """Run `run` `warmups` times on a side stream (kernels chosen, workspaces allocated, torch.compile
    done), then capture one more run. Returns the graph and the tensor that run returned, which every
    replay refills. `run` must read and write only static tensors on the GPU (see require_cuda)."""
    side = _side_stream()
    side.wait_stream(torch.cuda.current_stream())
    # Without autograd: a capture keeps every tensor alive that its run's autograd graph saved (the model's
    # parameters require grad). The image encoder's graphs held 0.47 GiB per image that way on an H200,
    # 16.8 GiB for its batch sizes 1-8; a replay never needed any of it.
    with torch.no_grad():
        with torch.cuda.stream(side):
            for _ in range(warmups):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = run()
    return graph, out


def require_cuda(tensor: torch.Tensor) -> None:
    """On a GPU machine, capturing work on CPU tensors records an empty graph: refuse it."""
    if tensor.device.type != "cuda":
        raise RuntimeError(f"CUDA graphs capture CUDA work only, not {tensor.device}")


def try_record(run: Callable[[], torch.Tensor], on: torch.Tensor, what: str,
               pool: Optional[Callable] = None) -> Optional[Tuple["torch.cuda.CUDAGraph", torch.Tensor]]:
    """record(run) for a part that can also run eagerly: None, with a warning naming `what`, when `on`
    (a tensor of its) is not on CUDA or the capture fails; the caller then runs eagerly from now on
    (slower, never wrong). pool: gives the memory pool to share, asked for only once CUDA is known."""
    try:
        require_cuda(on)
        return record(run, pool=pool() if pool is not None else None)
    except (RuntimeError, AssertionError) as e:
        log.warning("%s: CUDA graph capture failed, running eagerly (%s)", what, e)
        return None
