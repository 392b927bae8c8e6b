"""Fold the LoRA (or QLoRA) adapters of a fine-tune run into the base weights.

    python -m model.sat.merge_lora --from checkpoints/finetune-visualglm-6b-05-19-07-36 --to checkpoints/merged
    python cli_demo.py --from_pretrained checkpoints/merged [--quant 4]

Each wrapped layer becomes W' = W + concat_i(B_i A_i) / r (computed in fp32, stored in the checkpoint's
dtype), giving a plain VisualGLMModel checkpoint with the original key names, in sat format, with the
tokenizer files copied along. QLoRA runs store their base weights as the dequantized NF4 values, so the
merge needs no bitsandbytes and gives the weights the fine-tuned model computed with. A run that also
has P-tuning keeps it (P-tuning cannot be folded into weights): the output is then a
FineTuneVisualGLMModel with P-tuning only. A model-parallel run (MP_SIZE > 1: one mp_rank_XX file per
rank) is put together into whole tensors first, in one process; the output is one file either way
(split it again with model.sat.mp_split for cli_demo_mp.py). The output folder must not exist.
"""
import argparse
import shutil
import sys
from pathlib import Path

import torch

from .checkpoint import (CheckpointError, _recompute_buffers, build_model, check_state_dict, checkpoint_file,
                         load_model, read_config, read_state_dict, resolve_checkpoint_dir, save_checkpoint)
from ..defaults import TOKENIZER_FILES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def stored_dtype(ckpt_dir: Path) -> torch.dtype:
    state = read_state_dict(checkpoint_file(ckpt_dir))
    weight = state.get("transformer.word_embeddings.weight")
    if weight is None:
        weight = next(v for v in state.values() if v.is_floating_point())
    return weight.dtype


def _load_run(ckpt_dir: Path, config: dict, dtype: torch.dtype, device):
    """The run as one LoRA model in this process. QLoRA files hold float weights: they load as LoRA,
    without bitsandbytes. A model-parallel run (one mp_rank_XX file per rank) is put together first."""
    overwrite = {"use_lora": True, "use_qlora": False}
    size = int(config.get("model_parallel_size", 1))
    if size == 1:
        return load_model(str(ckpt_dir), device=device, dtype=dtype, overwrite_config=overwrite)
    from .mp_split import merge_state_dicts, with_parallel_size
    from .parallel import parallel_plan
    model = build_model({**with_parallel_size(config, 1), **overwrite}, device="meta", dtype=dtype)
    shards = [read_state_dict(checkpoint_file(ckpt_dir, rank)) for rank in range(size)]
    state = merge_state_dicts(shards, parallel_plan(model))     # each tensor whole, as one process has it
    check_state_dict(model, state)
    model.load_state_dict({k: v.to(device, dtype if v.is_floating_point() else v.dtype) for k, v in state.items()},
                          strict=False, assign=True)                # (check_state_dict checked every key)
    _recompute_buffers(model, device)
    return model.eval()


def merge_lora(src, dst, dtype="auto", device="cpu") -> Path:
    """Merge the run `src` into the new folder `dst`; returns dst."""
    from .finetune import ADAPTER_ARGS   # (imports sat: not at module level, so that --help is quick)
    ckpt_dir = resolve_checkpoint_dir(src, download=False)
    config = read_config(ckpt_dir)
    if not (config.get("use_lora") or config.get("use_qlora")):
        raise CheckpointError(f"{ckpt_dir} has no LoRA/QLoRA adapters to merge (model_class "
                              f"{config.get('model_class')}, use_lora/use_qlora not set).")
    dst = Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; merge_lora writes a new folder and never overwrites one.")
    dtype = stored_dtype(ckpt_dir) if dtype == "auto" else DTYPES[dtype]
    model = _load_run(ckpt_dir, config, dtype, device)
    wrapped = sum(1 for m in model.transformer.modules() if type(m).__name__ == "LoraLinear")
    model.merge_lora()
    out_config = {k: v for k, v in model.config.items() if k != "seed"}
    out_config.setdefault("pad_token_id", 3)  # marks the [Q|K|V] layout the weights are in (spec 1.3)
    if model.use_ptuning:
        out_model = model
        out_config.update(use_lora=False, use_qlora=False, layer_range=None)
    else:
        out_config = {k: v for k, v in out_config.items() if k not in ADAPTER_ARGS}
        out_config["model_class"] = "VisualGLMModel"
        out_model = build_model(out_config, device="meta", dtype=dtype)
        out_model.load_state_dict(model.state_dict(), strict=True, assign=True)
        _recompute_buffers(out_model, device)  # rotary inv_freq: sat never loads it
    save_checkpoint(out_model, dst, iteration=1, config=out_config)
    for name in TOKENIZER_FILES:
        if (ckpt_dir / name).is_file():
            shutil.copy(ckpt_dir / name, dst / name)
    print(f"merged LoRA into {wrapped} layers of {ckpt_dir}; wrote a {type(out_model).__name__} "
          f"checkpoint ({str(dtype).replace('torch.', '')}) to {dst}")
    return dst


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="src", required=True, help="fine-tune run folder (model_config.json, latest, ...)")
    p.add_argument("--to", dest="dst", required=True, help="new folder for the merged checkpoint")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: as stored in the run")
    p.add_argument("--device", default="cpu", help="where to do the arithmetic (cpu or cuda)")
    args = p.parse_args(argv)
    try:
        merge_lora(args.src, args.dst, dtype=args.dtype, device=args.device)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
