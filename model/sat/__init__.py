"""The sat flavour: VisualGLM-6B as SwissArmyTransformer models. The only package that imports sat.

Importing it applies the compatibility fixes of compat.py, which must precede any import of sat, but
does not import sat itself (about 3 s with DeepSpeed): `python -m model.sat.merge_lora --help` and the
other entry points stay fast until a model is needed. The model classes load on first use of their
names here; model/sat/checkpoint.py imports them before it asks sat's registry for a model_class.
"""
import importlib

from .compat import apply_fixes as _apply_fixes

_apply_fixes()

_CLASSES = {"VisualGLMModel": ".visualglm", "FineTuneVisualGLMModel": ".finetune"}


def __getattr__(name):
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_CLASSES)
