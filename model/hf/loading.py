"""One call for the *_hf.py front ends: a Hugging Face VisualGLM folder -> (model, tokenizer) on a device.

The folder is one written by `python -m model.convert sat-to-hf` (model.safetensors, config.json,
ice_text.model, tokenizer_config.json), the released THUDM/visualglm-6b layout, a bundled model converted
at set-up (`visualglm-tiny-hf` = pretrained/visualglm-tiny-hf, written by setup.sh) or a Hub name already
in the local cache. The tokenizer is our ChatGLM tokenizer (model/tokenizer.py); trust_remote_code is
never needed.
"""
from pathlib import Path

import torch

from ..defaults import TOKENIZER_FILES

CONVERT_HINT = "Convert a sat checkpoint with: python -m model.convert sat-to-hf SAT_DIR HF_DIR"
BUNDLED_DIR = Path(__file__).resolve().parents[2] / "pretrained"     # the repository's pretrained/ (as in model/sat)


def resolve_hf_dir(name_or_path) -> str:
    """An existing folder as given, else pretrained/<name> when it holds a config.json, else the name
    unchanged (a Hub name, looked up in the local cache by transformers)."""
    name = str(name_or_path)
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    bundled = BUNDLED_DIR / name
    return str(bundled) if (bundled / "config.json").is_file() else name


def _try_bundled_hint() -> str:
    """Without the 6B weights (offline), the bundled tiny model converted at set-up runs everything."""
    ready = sorted(p.name for p in BUNDLED_DIR.glob("*-hf") if (p / "config.json").is_file())
    return f" To try everything offline on a CPU, use the bundled model: --from_pretrained {ready[0]}." if ready else ""


def _missing_bundled_hint(name: str) -> str:
    """visualglm-tiny-hf asked for before setup.sh converted it: say how to make it."""
    sat_name = name.removesuffix("-hf")
    if name == sat_name or not (BUNDLED_DIR / sat_name / "model_config.json").is_file():
        return ""
    return (f" {name} is the bundled {sat_name} in Hugging Face format, which bash setup.sh writes; or run: "
            f"python -m model.convert sat-to-hf {sat_name} pretrained/{name}")


class HFLoadError(RuntimeError):
    """The Hugging Face folder cannot be found or does not fit together."""


def load_hf_model_and_tokenizer(name_or_path, device=None, dtype=None, tokenizer=None):
    """device: cuda when available; dtype: fp16 on a GPU, fp32 on the CPU."""
    from transformers import AutoConfig
    from ..tokenizer import ChatGLMTokenizer
    from . import VisualGLMForConditionalGeneration
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if str(device).startswith("cuda") else torch.float32)
    name, name_or_path = str(name_or_path), resolve_hf_dir(name_or_path)
    if name_or_path == name and not Path(name).expanduser().is_dir():                          # not a folder
        if _missing_bundled_hint(name):
            raise HFLoadError(f"No Hugging Face model folder {name!r}.{_missing_bundled_hint(name)}")
        if Path(name).expanduser().is_absolute() or name.startswith((".", "~")):                 # a path, not a Hub name
            raise HFLoadError(f"{name} is not a folder.{_try_bundled_hint()}")
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        model = VisualGLMForConditionalGeneration.from_pretrained(name_or_path, config=config, dtype=dtype)
    except (OSError, ValueError) as e:
        hint = _missing_bundled_hint(name) or _try_bundled_hint() + f" {CONVERT_HINT}"
        raise HFLoadError(f"Cannot load a VisualGLM Hugging Face model from {name!r}: {str(e).rstrip('.')}.{hint}") from None
    tok_dir = Path(tokenizer or name_or_path).expanduser()
    if not all((tok_dir / f).is_file() for f in TOKENIZER_FILES):
        raise HFLoadError(f"No tokenizer ({' and '.join(TOKENIZER_FILES)}) in {tok_dir}; pass --tokenizer FOLDER.")
    tok = ChatGLMTokenizer.from_pretrained(tok_dir)
    if len(tok) > model.config.vocab_size:
        raise HFLoadError(f"The tokenizer has {len(tok)} tokens but the model only {model.config.vocab_size} rows.")
    for name in ("bos_token_id", "gmask_token_id", "pad_token_id"):
        if getattr(tok, name) != getattr(model.config, name):
            raise HFLoadError(f"Tokenizer {name}={getattr(tok, name)} but config.json says "
                              f"{getattr(model.config, name)}: wrong tokenizer for this model.")
    return model.to(device).eval(), tok
