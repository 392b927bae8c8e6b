"""One call that front ends use: checkpoint -> (model, tokenizer) on a device, optionally quantized."""
import os
from pathlib import Path

import torch

from ..defaults import TOKENIZER_FILES
from .checkpoint import CheckpointError, load_model, sat_home



def pick_device(device=None) -> str:
    if device:
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def find_tokenizer_dir(ckpt_dir: Path, tokenizer_type=None, explicit=None) -> Path:
    """The tokenizer files of a checkpoint: an explicit folder, the checkpoint folder itself (bundled
    models ship theirs), or the chatglm-6b tokenizer under $SAT_HOME or the Hugging Face cache."""
    candidates = []
    if explicit:
        candidates.append(Path(explicit).expanduser())
    candidates += [Path(ckpt_dir), Path(ckpt_dir) / "tokenizer"]
    if tokenizer_type:
        name = str(tokenizer_type)
        candidates += [Path(name).expanduser(), sat_home() / name.split("/")[-1]]
        hub = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"
        candidates += sorted((hub / f"models--{name.replace('/', '--')}" / "snapshots").glob("*"))
    for path in candidates:
        if all((path / f).is_file() for f in TOKENIZER_FILES):
            return path
    raise CheckpointError(
        f"No tokenizer found for {ckpt_dir} (tokenizer_type={tokenizer_type!r}). Looked for "
        f"{' and '.join(TOKENIZER_FILES)} in: {', '.join(str(c) for c in candidates)}. Copy the files of "
        f"THUDM/chatglm-6b (or THUDM/visualglm-6b) into one of these folders, or pass --tokenizer <folder>.")


def load_tokenizer(ckpt_dir, tokenizer_type=None, explicit=None):
    from ..tokenizer import ChatGLMTokenizer
    return ChatGLMTokenizer.from_pretrained(find_tokenizer_dir(ckpt_dir, tokenizer_type, explicit))


def load_model_and_tokenizer(name_or_path, device=None, quant=None, dtype=None, tokenizer=None, device_map=None,
                             backend=None, **kw):
    """Load a sat checkpoint for inference. quant: None, 8 or 4 (weight-only, GLM layers).
    Quantization happens on the CPU before moving to the GPU, so a small GPU never holds fp16 weights.
    backend: the --backend the caller will run; with quant on a GPU and backend "auto" / "fast", the fast
    path quantizes each GLM matrix onto the GPU and the model gets its FastBackend (model/fast/load.py).
    device_map: e.g. "vision=cuda:0,glm=cuda:1" puts the parts on several devices (model/sat/device_map.py);
    it replaces `device`."""
    if device_map:
        from .device_map import parse_device_map
        device_map = parse_device_map(device_map)
        device = next((d for d in device_map.devices if d.startswith("cuda")), device_map.devices[0])
    device = pick_device(device)
    if dtype is None:
        dtype = torch.float16 if device.startswith("cuda") else torch.float32
    load_device = "cpu" if quant or device_map else device
    model = load_model(name_or_path, device=load_device, dtype=dtype, **kw)
    if quant:
        from ..fast.load import fast_quantizes, quantize_onto
        if not device_map and fast_quantizes(device, backend, quant, getattr(model, "mixins", {})):
            quantize_onto(model, int(quant), device)
        else:
            from .quantization import quantize
            quantize(model, int(quant))
    if device_map:
        from .device_map import apply_device_map
        apply_device_map(model, device_map)
    elif quant:
        model = model.to(device)
    return model, tokenizer_for(model, tokenizer)


def tokenizer_for(model, explicit=None):
    """The tokenizer of a loaded model's checkpoint, checked against the model's config."""
    tok = load_tokenizer(model.checkpoint_dir, model.config.get("tokenizer_type"), explicit)
    vocab = model.config["vocab_size"]
    if len(tok) > vocab:
        raise CheckpointError(f"The tokenizer has {len(tok)} tokens but the model only {vocab} rows: "
                              f"they do not belong together.")
    for name in ("bos_token_id", "gmask_token_id", "pad_token_id"):
        if name in model.config and getattr(tok, name) != model.config[name]:
            raise CheckpointError(f"Tokenizer {name}={getattr(tok, name)} but the model config says "
                                  f"{model.config[name]}: wrong tokenizer for this checkpoint.")
    return tok
