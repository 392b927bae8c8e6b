"""Narrow compatibility fixes for third-party packages, each with the version it targets.

Import sat through `import_sat()` (or just import `model`, which calls it) so that these fixes are in
place first. Every fix here is checked by tests/test_compat.py, which shows the upstream bug.
"""
import importlib
import importlib.util
import sys
import types


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


def import_sat():
    """Import SwissArmyTransformer 0.4.12 with the fixes this project relies on applied."""
    _stub_triton_rotary()
    try:
        return importlib.import_module("sat")
    except ModuleNotFoundError as e:
        if e.name in ("sat",):
            raise ModuleNotFoundError(
                "SwissArmyTransformer is not installed. Run: pip install -r requirements.txt "
                "(or requirements_wo_ds.txt, then pip install --no-deps SwissArmyTransformer==0.4.12)"
            ) from e
        raise
