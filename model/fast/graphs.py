"""Recording a CUDA graph, the one way every captured part of the fast path does it."""
from typing import Callable, Dict, Tuple

import torch

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
