"""Convert VisualGLM checkpoints between the sat format and the Hugging Face format (spec 2.4).

    python -m model.convert sat-to-hf SAT_DIR HF_DIR     # model.safetensors + config.json + tokenizer files
    python -m model.convert hf-to-sat HF_DIR SAT_DIR     # model_config.json + latest + 1/mp_rank_00_model_states.pt

The weights are the same tensors under other names, except the GLM query_key_value rows: per head
[q_h; k_h; v_h] in HF, [all Q | all K | all V] in current sat files (spec 1.3). Nothing is cast or
rounded, so sat -> HF -> sat gives back the same bits. The output folder must not exist (or be empty).
Checkpoints with unmerged LoRA / P-tuning adapters are refused: fold LoRA in first with
`python -m model.sat.merge_lora`. Only the sat checkpoint *file* format is read and written here; sat
itself is never imported.
"""
import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .defaults import TOKENIZER_FILES
from .sat.checkpoint import (CheckpointError, checkpoint_file, convert_glm_qkv, detect_qkv_layout,
                             qkv_blocks_to_head_first, qkv_head_first_to_blocks, read_config, read_state_dict,
                             resolve_checkpoint_dir)

LM_HEAD, INV_FREQ = "mixins.chatglm-final.lm_head.weight", "mixins.chatglm-attn.rotary_emb.inv_freq"
SAT_VISION, HF_VISION = "mixins.eva.model.", "image_encoder."
SAT_ONLY = {"transformer.position_embeddings.weight"}          # in released sat files, never used
GLM_QKV = re.compile(r"transformer\.layers\.\d+\.attention\.query_key_value\.(weight|bias)$")
HF_INV_FREQ = re.compile(r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq$")
SHARED_KEYS = ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "max_sequence_length",
               "image_length", "bos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id")
ADAPTER_HINT = ("it has unmerged fine-tuning adapters ({what}). Fold LoRA into the weights first: "
                "python -m model.sat.merge_lora --from {src} --to MERGED_DIR (P-tuning prefixes have no "
                "Hugging Face equivalent).")


class ConvertError(RuntimeError):
    pass


# -- configs ---------------------------------------------------------------------------------------

def sat_config_to_hf(config: dict, eos_token_id: int) -> dict:
    hidden = config["hidden_size"]
    out = {k: config[k] for k in SHARED_KEYS if k in config}
    out.update(inner_hidden_size=config.get("inner_hidden_size") or 4 * hidden, layernorm_epsilon=1e-5,
               eva_config=config["eva_args"], qformer_config=config["qformer_args"], eos_token_id=eos_token_id,
               tokenizer_type=config.get("tokenizer_type"))
    return out


def hf_config_to_sat(config: dict) -> dict:
    out = {"model_class": "VisualGLMModel", "tokenizer_type": config.get("tokenizer_type") or "THUDM/chatglm-6b"}
    out.update({k: config[k] for k in SHARED_KEYS if k in config})
    out.update(inner_hidden_size=config["inner_hidden_size"], layernorm_order="post", model_parallel_size=1,
               eva_args=config["eva_config"], qformer_args=config["qformer_config"])
    return out


# -- weights ---------------------------------------------------------------------------------------

def refuse_adapters(config: dict, state: dict, source) -> None:
    flags = [f for f in ("use_lora", "use_qlora", "use_ptuning") if config.get(f)]
    keys = [k for k in state if ".matrix_A." in k or ".original." in k or k.startswith("mixins.ptuning")]
    if flags or keys:
        raise ConvertError(f"Cannot convert {source}: " + ADAPTER_HINT.format(what=", ".join(flags or keys[:3]), src=source))


def sat_state_to_hf(state: dict, config: dict) -> dict:
    heads, layers = config["num_attention_heads"], config["num_layers"]
    state = convert_glm_qkv(state, heads, detect_qkv_layout(config))      # old files: already head-first
    out = {}
    for key, value in state.items():
        if key in SAT_ONLY:
            continue
        if key == LM_HEAD:
            out["lm_head.weight"] = value
        elif key == INV_FREQ:
            for i in range(layers):
                out[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = value.clone()
        elif key.startswith(SAT_VISION):
            out[HF_VISION + key[len(SAT_VISION):]] = value
        elif GLM_QKV.match(key):
            out[key] = qkv_blocks_to_head_first(value, heads)
        elif key.startswith("transformer."):
            out[key] = value
        else:
            raise ConvertError(f"Unknown key {key!r} in the sat checkpoint: not a VisualGLM weight.")
    if INV_FREQ not in state:
        from .positions import inverse_frequencies
        freq = inverse_frequencies(config["hidden_size"] // heads // 2)
        for i in range(layers):
            out[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = freq.clone()
    return out


def hf_state_to_sat(state: dict, config: dict) -> dict:
    heads = config["num_attention_heads"]
    out = {}
    for key, value in state.items():
        if key == "lm_head.weight":
            out[LM_HEAD] = value
        elif HF_INV_FREQ.match(key):
            out.setdefault(INV_FREQ, value)                                  # one shared buffer in sat
        elif key.startswith(HF_VISION):
            out[SAT_VISION + key[len(HF_VISION):]] = value
        elif GLM_QKV.match(key):
            out[key] = qkv_head_first_to_blocks(value, heads)
        elif key.startswith("transformer."):
            out[key] = value
        else:
            raise ConvertError(f"Unknown key {key!r} in the Hugging Face checkpoint: not a VisualGLM weight.")
    return out


def read_hf_state(hf_dir: Path) -> dict:
    from safetensors.torch import load_file
    index = hf_dir / "model.safetensors.index.json"
    if (hf_dir / "model.safetensors").is_file():
        return load_file(hf_dir / "model.safetensors")
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(hf_dir / shard).items()}
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bins:
        return {k: v for b in bins for k, v in torch.load(b, map_location="cpu", weights_only=True).items()}
    raise ConvertError(f"{hf_dir} has no model.safetensors, safetensors index or pytorch_model*.bin.")


# -- folders ---------------------------------------------------------------------------------------

def _fresh_output(out_dir: Path) -> Path:
    """A temporary folder beside out_dir, renamed into place by _publish; out_dir must not hold anything."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ConvertError(f"{out_dir} already exists and is not empty; refusing to overwrite it.")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))


def _publish(tmp: Path, out_dir: Path) -> Path:
    for path in [tmp, *tmp.rglob("*")]:                  # mkdtemp makes 0700; the files are for everyone to read
        path.chmod(0o755 if path.is_dir() else 0o644)
    if out_dir.exists():
        out_dir.rmdir()                                   # empty, checked by _fresh_output
    os.replace(tmp, out_dir)
    return out_dir


def _copy_tokenizer(src_dirs, dst: Path) -> None:
    for src in src_dirs:
        if all((Path(src) / f).is_file() for f in TOKENIZER_FILES):
            for f in TOKENIZER_FILES:
                shutil.copyfile(Path(src) / f, dst / f)
            return
    raise ConvertError(f"No tokenizer files ({', '.join(TOKENIZER_FILES)}) found in {', '.join(map(str, src_dirs))}.")


def sat_to_hf(sat_dir, hf_dir) -> Path:
    from safetensors.torch import save_file
    from .hf import VisualGLMConfig
    from .sat.loading import find_tokenizer_dir
    from .tokenizer import ChatGLMTokenizer
    src, out_dir = resolve_checkpoint_dir(str(sat_dir), download=False), Path(hf_dir)
    config = read_config(src)
    state = read_state_dict(checkpoint_file(src))
    refuse_adapters(config, state, src)
    tok_dir = find_tokenizer_dir(src, config.get("tokenizer_type"))
    hf_state = {k: v.contiguous() for k, v in sat_state_to_hf(state, config).items()}
    tmp = _fresh_output(out_dir)
    try:
        hf_config = VisualGLMConfig(**sat_config_to_hf(config, ChatGLMTokenizer.from_pretrained(tok_dir).eos_token_id))
        hf_config.architectures = ["VisualGLMForConditionalGeneration"]
        hf_config.dtype = str(hf_state["transformer.word_embeddings.weight"].dtype).removeprefix("torch.")
        hf_config.save_pretrained(tmp)
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        _copy_tokenizer([tok_dir], tmp)
        return _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hf_to_sat(hf_dir, sat_dir) -> Path:
    src, out_dir = Path(hf_dir), Path(sat_dir)
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src} is not a Hugging Face model folder: config.json is missing.")
    config = hf_config_to_sat(json.loads((src / "config.json").read_text(encoding="utf-8")))
    state = hf_state_to_sat(read_hf_state(src), config)
    tmp = _fresh_output(out_dir)
    try:
        (tmp / "1").mkdir()
        torch.save({"module": state}, tmp / "1" / "mp_rank_00_model_states.pt")
        (tmp / "latest").write_text("1")
        (tmp / "model_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        _copy_tokenizer([src], tmp)
        return _publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("sat-to-hf", help="sat checkpoint folder (or bundled name) -> Hugging Face folder")
    a.add_argument("sat_dir"), a.add_argument("hf_dir")
    b = sub.add_parser("hf-to-sat", help="Hugging Face folder -> sat checkpoint folder")
    b.add_argument("hf_dir"), b.add_argument("sat_dir")
    args = parser.parse_args(argv)
    try:
        out = sat_to_hf(args.sat_dir, args.hf_dir) if args.command == "sat-to-hf" else hf_to_sat(args.hf_dir, args.sat_dir)
    except (ConvertError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
