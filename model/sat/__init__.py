"""The sat flavour: VisualGLM-6B as SwissArmyTransformer models. The only package that imports sat.

Importing it applies the compatibility fixes of compat.py before sat loads, and registers our model
classes with sat's registry (so checkpoints naming them in model_config.json resolve).
"""
from .compat import import_sat as _import_sat

_import_sat()

from .visualglm import VisualGLMModel  # noqa: E402
from .finetune import FineTuneVisualGLMModel  # noqa: E402

__all__ = ["VisualGLMModel", "FineTuneVisualGLMModel"]
