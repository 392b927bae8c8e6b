"""Narrow compatibility fixes for third-party packages, each with the version it targets.

Importing the package `model.sat` applies the import-time fixes (`apply_fixes()`, which imports nothing
of sat, so it is cheap), so every module of model/sat that imports sat gets them first; `import_sat()`
applies them and imports sat. Every fix here is checked by tests/test_compat.py, which shows the
upstream bug.
"""
import importlib
import importlib.util
import logging
import os
import sys
import types
import warnings


def _stub_triton_rotary() -> None:
    """sat 0.4.12 imports `triton` at package import time (sat/model/position_embedding/triton_rotary.py)
    although only FastRotaryEmbedding (unused by ChatGLM/VisualGLM) needs it. triton is a ~1 GB
    install and useless on CPU, so when it is absent we register a stand-in for that one sat module.
    We never fake `triton` itself: torch._dynamo probes it and breaks on a fake package."""
    name = "sat.model.position_embedding.triton_rotary"
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(name)

    def apply_rotary(*args, **kwargs):
        raise RuntimeError("triton is not installed: FastRotaryEmbedding is unavailable "
                           "(VisualGLM does not use it)")

    stub.apply_rotary = apply_rotary
    sys.modules[name] = stub


TRAINER_DEPS = ("wandb", "tensorboardX", "datasets")


def _allow_sat_without_trainer_deps() -> None:
    """sat 0.4.12's __init__ imports its own DeepSpeed trainer whenever deepspeed is installed, and that
    trainer imports wandb, tensorboardX and datasets (wandb is not even a declared requirement), so
    `import sat` fails without them although models need none. When one is missing we mark that trainer
    module unavailable; sat then reports training_main as unavailable, exactly as it does without
    DeepSpeed. Our fine-tuning drives DeepSpeed itself and does not use sat's trainer."""
    name = "sat.training.deepspeed_training"
    if name in sys.modules or importlib.util.find_spec("deepspeed") is None:
        return
    if any(importlib.util.find_spec(dep) is None for dep in TRAINER_DEPS):
        sys.modules[name] = None  # importing it now raises ModuleNotFoundError naming 'deepspeed_training'


def _quiet_sat_logging() -> None:
    """sat logs its set-up chatter (model-only mode, LOCAL_WORLD_SIZE guesses, ...) at INFO on every
    model build; users of the demos should see warnings only. SAT_LOGLEVEL=INFO brings it back."""
    os.environ.setdefault("SAT_LOGLEVEL", "WARNING")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message="Initializing zero-element tensors is a no-op")
    # bitsandbytes (imported by sat's LoRA module) warns on AVX512-BF16 CPUs that it could not fetch an
    # optional 4-bit kernel from the Hugging Face hub; its built-in fallback is what runs either way.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


DEEPSPEED_CPU_WARNING = "Setting accelerator to CPU."


def _quiet_deepspeed_accelerator_warning() -> None:
    """deepspeed 0.19.8 logs "Setting accelerator to CPU. If you have GPU or other accelerator, we were
    unable to detect it." at import on every machine without CUDA, on stdout: every command (sat imports
    deepspeed) began with it and machine-readable output did not. The front ends pick the device
    themselves and say so where it matters, so only that one message of DeepSpeed's logger is dropped;
    its other warnings still show. The filter sits on the logger by name, so it works whether or not
    deepspeed is imported yet."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DropMessage) for f in logger.filters):
        logger.addFilter(_DropMessage(DEEPSPEED_CPU_WARNING))


def apply_fixes() -> None:
    """The fixes that must be in place before sat (or deepspeed) is imported. Imports neither."""
    _quiet_sat_logging()
    _quiet_deepspeed_accelerator_warning()
    _stub_triton_rotary()
    _allow_sat_without_trainer_deps()


def import_sat():
    """Import SwissArmyTransformer 0.4.12 with the fixes this project relies on applied."""
    apply_fixes()
    try:
        return importlib.import_module("sat")
    except ModuleNotFoundError as e:
        if e.name in ("sat",):
            raise ModuleNotFoundError(
                "SwissArmyTransformer is not installed. Run: pip install -r requirements.txt "
                "(or requirements_wo_ds.txt, then pip install --no-deps SwissArmyTransformer==0.4.12)"
            ) from e
        raise


# ----------------------------------------------------------------------------------------------
# sat 0.4.12: LoraLinear(..., qlora=True) raises NameError

SAT_QLORA_BUG_VERSIONS = ("0.4.12",)   # fixed in sat's git after 0.4.12; no later release on PyPI


def _sat_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("SwissArmyTransformer")
    except PackageNotFoundError:
        return "unknown"


def fix_sat_qlora_dtype(force: bool = False) -> bool:
    """sat 0.4.12, sat/model/finetune/lora2.py, `LoraLinear.__init__`: the `qlora=True` branch never
    assigns `dtype`, which the code after the branch needs to create matrix_A / matrix_B, so every
    QLoRA build fails with `NameError: cannot access free variable 'dtype'`.

    Fix (applied once, only to the versions listed above unless force=True): build the layer through
    the working non-QLoRA branch, which takes the dtype from the original layer (what upstream does
    now), then put a bitsandbytes NF4 layer holding the same weight and bias in `.original`, which is
    all the QLoRA branch was meant to do differently. Returns True if the fix is (now) in place."""
    import_sat()
    from sat.model.finetune import lora2
    init = lora2.LoraLinear.__init__
    if getattr(init, "_visualglm_fixed", False):
        return True
    if not force and _sat_version() not in SAT_QLORA_BUG_VERSIONS:
        return False
    upstream_init = init

    def __init__(self, original_cls, partition, in_dim, out_dim, r, lora_alpha=1., lora_dropout=0.,
                 qlora=False, original_obj=None):
        upstream_init(self, original_cls, partition, in_dim, out_dim, r, lora_alpha, lora_dropout,
                      qlora=False, original_obj=original_obj)
        if not qlora:
            return
        if not hasattr(lora2, "HackLinearNF4"):  # sat defines it only when bitsandbytes imports
            raise ImportError("QLoRA needs bitsandbytes (pip install bitsandbytes); "
                              "`from bitsandbytes.nn import LinearNF4` failed when sat was imported.")
        has_bias = original_obj.bias is not None
        nf4 = lora2.HackLinearNF4(in_dim, out_dim, bias=has_bias)
        nf4.weight.data = original_obj.weight.data.detach().clone()  # still float: bitsandbytes
        if has_bias:                                                  # quantizes on .to(device)
            nf4.bias.data = original_obj.bias.data.detach().clone()
        self.original = nf4

    __init__._visualglm_fixed = True
    __init__._upstream = upstream_init
    lora2.LoraLinear.__init__ = __init__
    return True


# ----------------------------------------------------------------------------------------------
# deepspeed on a CPU-only machine: a 100-second C++ build nobody needs

def skip_deepspeed_shm_comm() -> None:
    """deepspeed 0.19.8 (CPU accelerator): creating its communication backend (deepspeed.initialize,
    deepspeed.init_distributed) JIT-compiles the C++ op `deepspeed_shm_comm` (g++ + ninja; about 100 s
    on 2 cores, then cached in TORCH_EXTENSIONS_DIR), even for a single process. The op only speeds up
    all-reduce between CPU processes of one host; plain gloo does the same job. Marking it incompatible
    makes DeepSpeed skip it (`build_shm_op()` returns None). Only call this when training on the CPU."""
    import deepspeed.ops
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


# ----------------------------------------------------------------------------------------------
# sat 0.4.12: LoRA on row-parallel layers is wrong when model_parallel_size > 1

SAT_LORA_MP_BUG_VERSIONS = ("0.4.12",)   # the latest release (upstream's LoraLinear.forward is unchanged)


def fix_sat_lora_row_parallel(force: bool = False) -> bool:
    """sat 0.4.12, sat/model/finetune/lora2.py, `LoraLinear.forward`: every adapter computes
    `copy_to_model_parallel_region(x @ A^T) @ B^T`. That is right for column-parallel layers
    (query_key_value: x is whole, A is whole, B holds this rank's rows), but a row-parallel layer
    (attention.dense) gets only this rank's slice of x and holds the matching columns of A, so
    x @ A^T is a partial sum that must be all-reduced over the model-parallel ranks before B; upstream
    never does, and with N > 1 ranks the adapter adds the wrong values (N = 1 is unaffected).

    Fix (applied once, only to sat 0.4.12 unless force=True): the same forward, with
    reduce_from_model_parallel_region (all-reduce forward, identity backward) for row-parallel
    layers. Returns True if the fix is (now) in place. The bug needs two ranks to show: it is checked by
    tests/test_mp_finetune.py (two gloo ranks against one process, with and without this fix)."""
    import torch
    import_sat()
    from sat.model.finetune import lora2
    from sat.mpu import RowParallelLinear, copy_to_model_parallel_region, reduce_from_model_parallel_region
    forward = lora2.LoraLinear.forward
    if getattr(forward, "_visualglm_fixed", False):
        return True
    if not force and _sat_version() not in SAT_LORA_MP_BUG_VERSIONS:
        return False

    def forward_fixed(self, x):                       # x: [..., in] (row-parallel: [..., in / N])
        out = self.original(x)                        # [..., out] (column-parallel: [..., out / N])
        x = self.lora_dropout(x)
        # row-parallel: x @ A^T sums over this rank's inputs only; the sum over all ranks is the product
        region = reduce_from_model_parallel_region if isinstance(self.original, RowParallelLinear) \
            else copy_to_model_parallel_region
        lora = [(region(x @ a.T) @ b.T) * self.scaling for a, b in zip(self.matrix_A, self.matrix_B)]
        return out + torch.cat(lora, -1)

    forward_fixed._visualglm_fixed = True
    forward_fixed._upstream = forward
    lora2.LoraLinear.forward = forward_fixed
    return True
