"""The Triton GEMV of the fast path's decoding: a few rows of x against a whole weight, each weight byte
read once. It serves fp16 / bf16 weights at one row (decoding at batch 1: measured faster than cuBLAS on
every layer shape of the 7.8B model on an H200, see docs/benchmarks.md) and the int8 layers of
model/fast/quant.py at up to 16 rows.

Triton exists only on CUDA machines, so nothing here imports it at module load: gemv() builds its kernel
on first call, and tunes its tile per (rows bucket, N, K, weight kind) on the first call of a shape (tiles
that suit a 4096-wide layer do not suit the 130528-row LM head, nor one row sixteen). torch.compile sees
it as one opaque op, visualglm::gemv, so a compiled decoding step has no graph break at each layer.

Tiles are (BLOCK_M rows of x, BLOCK_N output features, BLOCK_K input columns, warps). BLOCK_M 1: one row per
program, products summed on CUDA cores (batch-1 decoding). BLOCK_M 16: up to 16 rows per program through
tl.dot, so each weight is read once for all of them (batched decoding).
"""
import importlib.util
from typing import Optional

import torch

CONFIGS = ((1, 4, 512, 2), (1, 4, 512, 4), (1, 4, 512, 8), (1, 4, 1024, 4), (1, 8, 256, 2), (1, 8, 512, 4),
           (1, 8, 1024, 4), (1, 16, 256, 4), (1, 16, 512, 4), (1, 16, 1024, 8), (1, 32, 128, 4), (1, 32, 256, 4),
           (1, 32, 256, 8), (1, 32, 512, 4), (1, 64, 128, 4), (1, 64, 128, 8),
           # longer rows per step, for the int8 words (a 4096 x 4096 int8 layer ran at 2.2 TB/s with the above)
           (1, 2, 1024, 2), (1, 2, 2048, 4), (1, 4, 2048, 4), (1, 4, 2048, 8), (1, 8, 2048, 8),
           (16, 32, 128, 4), (16, 64, 64, 4), (16, 64, 128, 4), (16, 128, 64, 4), (16, 32, 256, 4))

_built = None          # (triton, the kernel, its autotuned form), made on first use
_counters = {}         # device -> int32 counters (counters())


# Whether Triton is installed (CUDA builds of torch bring it; a CPU machine may not have it). A constant,
# so that a compiled step reads it without tracing a lookup (which would break its graph at every layer).
AVAILABLE = importlib.util.find_spec("triton") is not None


def rows_bucket(m: int) -> int:
    """The tuning key for m rows: 1, 2, 4, 8 or 16 (a batch of 5 runs the tile tuned for 8)."""
    return 1 << max(m - 1, 0).bit_length()


def _prune(configs, named_args, **kwargs):
    """One row: only the one-row tiles (a 16-row tile would waste 15/16 of its loads of x)."""
    rows = named_args.get("ROWS", kwargs.get("ROWS"))
    return [c for c in configs if c.kwargs["BLOCK_M"] == 1] if rows == 1 else configs


def graph_bench(kernel_call, quantiles):
    """How the GEMVs' autotuning times a tile: launched back to back in a CUDA graph, each launch starting
    as the last one ends (PDL), as a decoding step runs them. Triton's default times one launch at a time
    after flushing L2, which on an H200 chose a tile for the 7.8B model's qkv layer that took 26.7 us a
    layer in a chain of its 28 layers where the best took 24.8 (docs/benchmarks.md).
    Triton runs the tiles on a stream of its own that does not wait for the current one, so everything
    queued before is finished first: else a tile could write the output, a block the caching allocator
    just handed over, while work queued earlier still reads that block as a freed temporary (on an H200
    this corrupted a reference product queued before an int8 GEMV's first call, bench_inference --check)."""
    from triton.testing import do_bench_cudagraph
    torch.cuda.synchronize()
    return do_bench_cudagraph(kernel_call, rep=20, quantiles=quantiles)


def _build():
    import triton

    from .triton_gemv import kernel

    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for m, n, k, w in CONFIGS]
    tuned = triton.autotune(configs=configs, key=["ROWS", "N", "K", "QUANT", "PACKED"],
                            prune_configs_by={"early_config_prune": _prune}, do_bench=graph_bench)(kernel)
    return triton, kernel, tuned


_pdl = {}             # device -> whether its kernels launch with PDL (pdl())


def pdl(device) -> bool:
    """Whether the kernels that take pdl_options (this GEMV, kernels_int4.py's, attention.py's) and the
    decode step's compiled kernels launch with programmatic dependent launch on `device`: CUDA GPUs of
    compute capability 9.0 and later (the PTX `griddepcontrol` they call needs it). Such a kernel starts
    while the one before it still runs, reads its first weights then, and waits for it before touching
    anything that kernel may write (triton_gemv.after_previous)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _pdl:
        _pdl[device] = torch.cuda.get_device_capability(device)[0] >= 9
    return _pdl[device]


def pdl_options(device) -> dict:
    """A kernel's PDL constant and launch option on `device` (the option only with PDL: Triton's
    interpreter takes no such option)."""
    return {"PDL": True, "launch_pdl": True} if pdl(device) else {"PDL": False}


def counters(device, n: int = 1) -> torch.Tensor:
    """Zeroed int32 counters on `device`, at least n, for kernels whose last program to finish completes
    the work (attention.py's merge); each kernel leaves them zero again. Kernels on a device run one at a
    time (one stream), so they share them. A kernel's first call is eager (a warm-up), so they exist
    before any graph is captured."""
    device = torch.device(device)
    have = _counters.get(device)
    if have is None or have.numel() < n:
        have = _counters[device] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return have


def gemv(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
         config=None, gelu: bool = False) -> torch.Tensor:
    """x [M, K] fp16/bf16 (contiguous), w [N, K] in x's dtype, or int8 with scale [N]; bias [N] or None
    -> y [M, N] in x's dtype; gelu: GELU (tanh) applied before rounding to it. config (one of CONFIGS)
    skips the tuning."""
    global _built
    if _built is None:
        _built = _build()
    _, plain, tuned = _built
    M, K = x.shape
    N = w.shape[0]
    quant = w.dtype == torch.int8
    if quant != (scale is not None):
        raise ValueError("an int8 weight needs its row scales, and only an int8 weight takes them")
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    args = (x, w, scale if quant else w, bias if bias is not None else w, y, M, N, K, rows_bucket(M))
    # on a GPU only: Triton's interpreter (CPU tensors, the CPU tests) cannot run the packed path's PTX
    packed = quant and w.is_cuda and K % 4 == 0 and w.data_ptr() % 4 == 0
    launch(tuned, plain, args, dict(QUANT=quant, HAS_BIAS=bias is not None, GELU=gelu, PACKED=packed,
                                    **pdl_options(x.device)),
           M, N, config, "BLOCK_K")
    return y


def launch(tuned, plain, args, constants: dict, M: int, N: int, config, third: str) -> None:
    """Run a GEMV kernel (this one or kernels_int4's) over its grid of (N / BLOCK_N, M / BLOCK_M) programs:
    the autotuned form, or `plain` at config = (BLOCK_M, BLOCK_N, the tile's third size named `third`, warps).
    constants: the kernel's constants and launch options (pdl_options among them)."""
    import triton
    if config is None:
        tuned[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), triton.cdiv(M, meta["BLOCK_M"]))](*args, **constants)
    else:
        m, n, t, warps = config
        plain[(triton.cdiv(N, n), triton.cdiv(M, m))](*args, **constants, BLOCK_M=m, BLOCK_N=n, **{third: t},
                                                        num_warps=warps)


# torch.compile traces through this as one op (the kernel itself is launched by gemv() at run time)
@torch.library.custom_op("visualglm::gemv", mutates_args=())
def gemv_op(x: torch.Tensor, w: torch.Tensor, scale: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            gelu: bool = False) -> torch.Tensor:
    return gemv(x, w, scale, bias, gelu=gelu)


@gemv_op.register_fake
def _(x, w, scale, bias, gelu=False):
    return x.new_empty(x.shape[0], w.shape[0])
