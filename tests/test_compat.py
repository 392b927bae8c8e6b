"""Each compatibility fix in model/sat/compat.py, shown against the upstream behaviour it works around."""
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from model.sat.compat import SAT_QLORA_BUG_VERSIONS, _sat_version, fix_sat_qlora_dtype, skip_deepspeed_shm_comm

ROOT = Path(__file__).resolve().parent.parent


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_plain_sat_import_needs_triton_but_ours_does_not():
    block_triton = "import sys; sys.modules['triton'] = None\n"  # as if triton were not installed
    upstream = run(block_triton + "import sat")
    assert upstream.returncode != 0 and "triton" in upstream.stderr
    ours = run(block_triton + "import model.sat, sat\nfrom model.sat.checkpoint import build_model\n"
               "from model.configs import tiny_config\nbuild_model(tiny_config(), device='cpu')\nprint('ok')")
    assert ours.returncode == 0 and "ok" in ours.stdout, ours.stderr


def test_sat_import_without_wandb_when_deepspeed_is_installed():
    hide = ("import importlib.util, sys\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n == 'wandb' else real(n, *a)\n"
            "sys.modules['wandb'] = None\n")
    no_triton = ("import types; stub = types.ModuleType('triton_rotary'); stub.apply_rotary = None\n"
                 "sys.modules['sat.model.position_embedding.triton_rotary'] = stub\n")
    upstream = run(hide + no_triton + "import sat")
    assert upstream.returncode != 0 and "wandb" in upstream.stderr
    ours = run(hide + "import model.sat, sat\nprint('ok', hasattr(sat, 'training_main'))")
    assert ours.returncode == 0 and "ok False" in ours.stdout, ours.stderr


@pytest.mark.skipif(_sat_version() not in SAT_QLORA_BUG_VERSIONS, reason="the fix targets sat 0.4.12")
def test_sat_lora_linear_qlora_name_error_and_its_fix():
    pytest.importorskip("bitsandbytes")
    assert fix_sat_qlora_dtype()
    assert fix_sat_qlora_dtype()                        # idempotent
    from sat.model.finetune import lora2
    original = nn.Linear(64, 32).half()

    # upstream sat 0.4.12: the qlora branch never assigns `dtype`
    upstream = lora2.LoraLinear.__init__._upstream
    with pytest.raises(NameError, match="dtype"):
        upstream(lora2.LoraLinear.__new__(lora2.LoraLinear), nn.Linear, 1, 64, 32, 4, qlora=True,
                 original_obj=original)

    layer = lora2.LoraLinear(nn.Linear, 1, 64, 32, 4, qlora=True, original_obj=original)
    assert isinstance(layer.original, lora2.HackLinearNF4)
    assert torch.equal(layer.original.weight.data, original.weight.data)   # float until .to(device)
    assert torch.equal(layer.original.bias.data, original.bias.data)
    assert layer.matrix_A[0].dtype == layer.matrix_B[0].dtype == torch.float16
    assert tuple(layer.matrix_A[0].shape) == (4, 64) and tuple(layer.matrix_B[0].shape) == (32, 4)
    # and the non-QLoRA path is unchanged
    plain = lora2.LoraLinear(nn.Linear, 1, 64, 32, 4, original_obj=nn.Linear(64, 32))
    assert type(plain.original) is lora2.HackLinear


@pytest.mark.skipif(torch.cuda.is_available(), reason="the op is only built for DeepSpeed's CPU accelerator")
def test_deepspeed_cpu_shm_comm_op_is_not_built():
    from deepspeed.comm.torch import build_shm_op
    skip_deepspeed_shm_comm()
    start = time.time()
    assert build_shm_op() is None                        # upstream: a ~100 s g++ build on first use
    assert time.time() - start < 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="DeepSpeed logs the warning only on machines without CUDA")
def test_deepspeed_cpu_accelerator_warning_is_dropped_and_its_other_messages_kept():
    upstream = run("import deepspeed")
    assert "Setting accelerator to CPU" in upstream.stdout       # on stdout, where programs print results
    ours = run("import model.sat, sat, deepspeed\nfrom deepspeed.utils import logger\n"
               "logger.warning('another DeepSpeed warning')\nprint('ok')")
    assert ours.returncode == 0 and ours.stdout.strip().endswith("ok"), ours.stderr
    assert "Setting accelerator" not in ours.stdout + ours.stderr
    assert "another DeepSpeed warning" in ours.stdout


def test_importing_model_sat_does_not_import_sat():
    """The fixes are in place before sat loads, but sat (and DeepSpeed) load only when a model is needed,
    so that `python -m model.sat.merge_lora --help` and flag errors are quick."""
    done = run("import sys, model.sat, model.sat.checkpoint, model.sat.merge_lora\n"
               "print(sorted(m for m in ('sat', 'deepspeed') if m in sys.modules))\n"
               "print(model.sat.VisualGLMModel.__name__, 'sat' in sys.modules)")
    assert done.returncode == 0 and done.stdout.split("\n")[:2] == ["[]", "VisualGLMModel True"], done.stderr
