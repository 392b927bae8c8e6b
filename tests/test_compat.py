"""Each compatibility fix in model/compat.py, shown against the upstream behaviour it works around."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(code):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_plain_sat_import_needs_triton_but_ours_does_not():
    block_triton = "import sys; sys.modules['triton'] = None\n"  # as if triton were not installed
    upstream = run(block_triton + "import sat")
    assert upstream.returncode != 0 and "triton" in upstream.stderr
    ours = run(block_triton + "import model, sat\nfrom model.checkpoint import build_model\n"
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
    ours = run(hide + "import model, sat\nprint('ok', hasattr(sat, 'training_main'))")
    assert ours.returncode == 0 and "ok False" in ours.stdout, ours.stderr
