"""Split a sat checkpoint into N model-parallel shards, and merge shards back into one file.

    python -m model.sat.mp_split split visualglm-6b ./visualglm-6b-mp2 --mp 2
    python -m model.sat.mp_split merge ./visualglm-6b-mp2 ./visualglm-6b-merged

A split folder is what sat writes for model_parallel_size N: `model_config.json` (with
"model_parallel_size": N), `latest` and `<iter>/mp_rank_00_model_states.pt` ... `mp_rank_{N-1}_...`.
cli_demo_mp.py loads either kind (a single file is split at load time). The round trip is bit-exact;
the output folder must not exist (nothing is overwritten), and it appears all at once.

How a tensor is cut follows the sat layer that owns it (sat/mpu/layers.py, the rule of its
partition() / merge()); `partition_plan` reads it off a built model:

    VocabParallelEmbedding.weight        rows: rank r gets the r-th of N equal blocks of rows
    ColumnParallelLinear .weight/.bias   rows, per stride: query_key_value (stride 3) is [Q | K | V]
                                         and rank r gets [Q_r | K_r | V_r], so its heads stay whole
    RowParallelLinear.weight             columns (its bias is added after the all-reduce: whole)
    anything else                        whole on every rank (layer norms, biases of row layers, ...)

The vision encoder (EVA ViT and Q-Former, sat models too) is split the same way as the GLM, so every
attention's head count must divide by N: 32 GLM, 16 EVA and 12 Q-Former heads for VisualGLM-6B
give N = 1, 2 or 4. Adapter checkpoints (LoRA / P-tuning) are refused: merge LoRA first.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple

import torch

from ..defaults import TOKENIZER_FILES
from .checkpoint import (CheckpointError, build_model, checkpoint_file, convert_glm_qkv, detect_qkv_layout,
                         fsync_tree, read_config, read_state_dict, resolve_checkpoint_dir, save_error)

Plan = Dict[str, Tuple[int, int]]      # state-dict key -> (dimension cut, stride); absent: whole


def partition_plan(model) -> Plan:
    """Which tensors of a sat model are cut, along which dimension and with which stride. The same for
    a model built with any model-parallel size: it depends only on the layer types."""
    from sat.mpu import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    plan: Plan = {}
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, ColumnParallelLinear):
            stride = module.stride if isinstance(module.stride, int) else None
            if stride is None:   # sat also allows ratios ([2, 1, 1]); VisualGLM never uses them
                raise CheckpointError(f"{name}: uneven strides {module.stride} are not supported")
            plan[prefix + "weight"] = (0, stride)
            if module.bias is not None and module.bias.numel():
                plan[prefix + "bias"] = (0, stride)
        elif isinstance(module, RowParallelLinear):
            plan[prefix + "weight"] = (1, 1)
        elif isinstance(module, VocabParallelEmbedding):
            plan[prefix + "weight"] = (0, 1)
    return plan


def shard(tensor: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank `rank`'s piece of `tensor`: each of its `stride` blocks along `dim` is cut into `size` equal
    parts, and the rank's parts are concatenated (sat's partition())."""
    blocks = tensor.chunk(stride, dim)                      # stride x [n / stride, ...]
    if any(b.shape[dim] % size for b in blocks) or tensor.shape[dim] % stride:
        raise CheckpointError(f"a tensor of shape {list(tensor.shape)} cannot be cut into {size} equal "
                              f"parts along dimension {dim} (stride {stride})")
    return torch.cat([b.chunk(size, dim)[rank] for b in blocks], dim).clone()


def unshard(pieces: List[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """The inverse of shard over all ranks' pieces (sat's merge())."""
    blocks = [p.chunk(stride, dim) for p in pieces]         # ranks x stride
    return torch.cat([torch.cat([b[s] for b in blocks], dim) for s in range(stride)], dim)


def shard_state_dict(state: dict, plan: Plan, rank: int, size: int) -> dict:
    return {k: shard(v, *plan[k], rank, size) if k in plan else v for k, v in state.items()}


def merge_state_dicts(states: List[dict], plan: Plan) -> dict:
    first = states[0]
    if any(set(s) != set(first) for s in states):
        raise CheckpointError("the shards do not hold the same tensor names")
    return {k: unshard([s[k] for s in states], *plan[k]) if k in plan else first[k] for k in first}


def with_parallel_size(config: dict, size: int) -> dict:
    """The model config for `size` ranks: sat checks that every (nested) model agrees on it."""
    config = dict(config, model_parallel_size=size)
    for key in ("eva_args", "qformer_args"):
        if isinstance(config.get(key), dict):
            config[key] = dict(config[key], model_parallel_size=size)
    return config


def build_parallel(config: dict, size: int, **kw):
    """The model of `config` built for `size` ranks (sat's groups must be of that size), or a clear error
    when its heads or sizes do not divide."""
    try:
        return build_model(with_parallel_size(config, size), **kw)
    except AssertionError as e:         # sat's mpu.divide: "5 is not divisible by 2"
        raise CheckpointError(f"this model cannot be split across {size} ranks ({e}): every head count "
                              f"(GLM {config.get('num_attention_heads')}, EVA "
                              f"{config.get('eva_args', {}).get('num_attention_heads')}, Q-Former "
                              f"{config.get('qformer_args', {}).get('num_attention_heads')}) and the "
                              f"vocabulary ({config.get('vocab_size')}) must divide by it") from None


def _plan_for(config: dict) -> Plan:
    if config.get("model_class") != "VisualGLMModel":
        raise CheckpointError(f"only plain VisualGLMModel checkpoints can be split or merged, this one is a "
                              f"{config.get('model_class')} (with adapters); merge LoRA into it first "
                              f"(python -m model.sat.merge_lora).")
    return partition_plan(build_parallel(config, 1, device="meta"))


def _write_folder(dst: Path, states: List[dict], config: dict, iteration: str, tokenizer_from: Path) -> None:
    """Write a sat folder with one file per rank under a temporary name, sync it and rename it into place."""
    if dst.exists():
        raise CheckpointError(f"{dst} already exists; mp_split writes a new folder and never overwrites one.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        try:
            (tmp / iteration).mkdir()
            for rank, state in enumerate(states):
                torch.save({"module": state}, tmp / iteration / f"mp_rank_{rank:02d}_model_states.pt")
            (tmp / "latest").write_text(iteration)
            (tmp / "model_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
            for name in TOKENIZER_FILES:
                if (tokenizer_from / name).is_file():
                    shutil.copyfile(tokenizer_from / name, tmp / name)
            fsync_tree(tmp)
        except (OSError, RuntimeError) as e:
            raise save_error(e, dst, "nothing was written") from e
        if dst.exists():   # appeared meanwhile: still never overwrite
            raise CheckpointError(f"{dst} appeared while writing; nothing was overwritten.")
        os.rename(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _iteration(ckpt_dir: Path) -> str:
    return checkpoint_file(ckpt_dir).parent.name


def split(src, dst, size: int) -> Path:
    ckpt_dir = resolve_checkpoint_dir(src, download=False)
    config = read_config(ckpt_dir)
    if config.get("model_parallel_size", 1) != 1:
        raise CheckpointError(f"{ckpt_dir} is already split for {config['model_parallel_size']} ranks; "
                              "merge it first.")
    if size < 1:
        raise CheckpointError(f"--mp must be at least 1, got {size}")
    state = read_state_dict(checkpoint_file(ckpt_dir))
    layout = detect_qkv_layout(config)
    state = convert_glm_qkv(state, config["num_attention_heads"], layout)  # cut [Q|K|V], not heads
    if layout != "blocks":
        config = dict(config, pad_token_id=config.get("pad_token_id", 3))   # marks the [Q|K|V] layout
    plan = _plan_for(config)
    states = [shard_state_dict(state, plan, rank, size) for rank in range(size)]
    _write_folder(Path(dst), states, with_parallel_size(config, size), _iteration(ckpt_dir), ckpt_dir)
    return Path(dst)


def merge(src, dst) -> Path:
    ckpt_dir = resolve_checkpoint_dir(src, download=False)
    config = read_config(ckpt_dir)
    size = int(config.get("model_parallel_size", 1))
    if size == 1:
        raise CheckpointError(f"{ckpt_dir} is a single-file checkpoint (model_parallel_size 1): nothing to merge.")
    states = [read_state_dict(checkpoint_file(ckpt_dir, rank)) for rank in range(size)]
    merged = merge_state_dicts(states, _plan_for(config))
    _write_folder(Path(dst), [merged], with_parallel_size(config, 1), _iteration(ckpt_dir), ckpt_dir)
    return Path(dst)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="one file -> N model-parallel shards")
    s.add_argument("src", help="checkpoint name or folder (model_parallel_size 1)")
    s.add_argument("dst", help="new folder")
    s.add_argument("--mp", type=int, required=True, help="number of shards (ranks / GPUs)")
    m = sub.add_parser("merge", help="N model-parallel shards -> one file")
    m.add_argument("src", help="split checkpoint folder")
    m.add_argument("dst", help="new folder")
    args = p.parse_args(argv)
    try:
        out = split(args.src, args.dst, args.mp) if args.command == "split" else merge(args.src, args.dst)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
