"""The model to train: where its weights come from (a checkpoint, a run to resume, or a config for a
random init), which adapters it gets, and which of its parameters train."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .console import log
from .errors import ConfigError
from .runs import complete_iterations

ADAPTER_FLAGS = ("use_lora", "use_qlora", "use_ptuning")


@dataclass
class Source:
    """Where the weights come from: a checkpoint folder, a run to resume, or a config (random init)."""
    kind: str                    # "pretrained", "load" or "config"
    path: Path                   # the checkpoint / run folder, or the config file
    config: dict                 # its model_config.json
    adapters: dict               # adapter entries for the model to build (finetune mode)
    iteration: Optional[int] = None

    @property
    def folder(self) -> Path:
        return self.path.parent if self.kind == "config" else self.path


def resolve_source(args) -> Source:
    """Read the model config (not the weights) and decide which adapters to build."""
    from model.sat.checkpoint import read_config, resolve_checkpoint_dir
    from model.sat.finetune import adapter_config
    if args.load:
        return _run_to_resume(args)
    want = adapter_config(args) if args.mode == "finetune" else {}
    if args.from_config:
        path = Path(args.from_config)
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read --from_config {path}: {e}") from e
        source = Source("config", path, config, want)
    else:
        folder = resolve_checkpoint_dir(args.from_pretrained)
        source = Source("pretrained", folder, read_config(folder), want)
    _settle_adapters(args, source, want)
    return source


def _run_to_resume(args) -> Source:
    from model.sat.checkpoint import read_config, resolve_checkpoint_dir
    from model.sat.finetune import ADAPTER_ARGS
    run = resolve_checkpoint_dir(args.load, download=False)
    config = read_config(run)
    is_finetune = config.get("model_class") == "FineTuneVisualGLMModel"
    if (args.mode == "finetune") != is_finetune:
        raise ConfigError(f"--load {run} holds a {config.get('model_class')}; resume it with "
                          f"--mode {'finetune' if is_finetune else 'pretrain'}")
    adapters = {k: config[k] for k in ADAPTER_ARGS if k in config}
    done = complete_iterations(run)   # the session settles it with recover_run_folder before loading
    return Source("load", run, config, adapters, done[-1] if done else None)


def _settle_adapters(args, source: Source, want: dict) -> None:
    """Without adapter flags, a checkpoint's own adapters keep training; otherwise the flags decide.
    Fine-tuning needs an adapter, and training every weight needs a model without any."""
    from model.sat.finetune import ADAPTER_ARGS
    has = [k for k in ADAPTER_FLAGS if source.config.get(k)]
    if args.mode == "finetune" and not any(want.get(k) for k in ADAPTER_FLAGS) and has:
        source.adapters = {k: source.config[k] for k in ADAPTER_ARGS if k in source.config}
        log(f"note: continuing to train the adapters of {source.path} ({', '.join(has)})")
    if args.mode == "finetune" and not any(source.adapters.get(k) for k in ADAPTER_FLAGS):
        raise ConfigError("--mode finetune needs an adapter: --use_lora, --use_qlora or --use_ptuning "
                          "(or --mode pretrain to train every weight)")
    if args.mode == "pretrain" and has:
        raise ConfigError(f"{source.path} has adapters ({', '.join(has)}); fold LoRA into the weights first "
                          f"(python -m model.sat.merge_lora) to train all weights")


def check_model_parallel(source: Source, mp_size: int) -> None:
    """Model-parallel training (N > 1) is LoRA fine-tuning of a checkpoint: sat's P-tuning prefixes hold
    every head on every rank and its QLoRA layers are not parallel layers, so neither splits."""
    if mp_size == 1:
        return
    if source.kind == "config":
        raise ConfigError("--model-parallel-size > 1 loads a checkpoint (--from_pretrained), not --from_config")
    if not source.adapters.get("use_lora") or source.adapters.get("use_ptuning"):
        has = ", ".join(k for k in ADAPTER_FLAGS if source.adapters.get(k)) or "no adapters"
        raise ConfigError(f"--model-parallel-size {mp_size} trains LoRA only (--use_lora); this job has {has}. "
                          f"sat's P-tuning and QLoRA layers cannot be split across ranks: use --model-parallel-size 1")


def load_for_training(args, source: Source, dist, dtype: torch.dtype):
    """The model to train, on its device (QLoRA: on the CPU; bitsandbytes quantizes when DeepSpeed
    moves it to the GPU), and the config to save with it."""
    from model.sat.checkpoint import build_args, load_model, model_class
    from model.sat.finetune import is_adapter_key
    qlora = bool(source.adapters.get("use_qlora")) and not source.adapters.get("use_lora")
    device = "cpu" if qlora else dist.device
    overwrite = dict(source.adapters, seed=args.seed,
                     model_class="FineTuneVisualGLMModel" if args.mode == "finetune" else "VisualGLMModel")
    allow_missing = is_adapter_key if args.mode == "finetune" and source.kind != "load" else (lambda key: False)
    if dist.mp_size > 1:   # this rank's part only; a run saved this way keeps one file per rank
        from model.sat.mp_split import with_parallel_size
        from model.sat.parallel import load_model_parallel
        model = load_model_parallel(str(source.path), str(dist.device), dtype, overwrite_config=overwrite,
                                    allow_missing=allow_missing)
        config = with_parallel_size(model.config, dist.mp_size)
        return model, {k: v for k, v in config.items() if k != "seed"}
    if source.kind == "config":
        config = {**source.config, **overwrite}
        cls = model_class(config["model_class"])
        model_args = build_args(cls, config, skip_init=False)
        model = cls(model_args, params_dtype=torch.float32)   # sat's random init, seeded by args.seed
        model.args, model.config = model_args, config
        model = model.to(dtype=dtype)            # (QLoRA layers stay unquantized until moved to a device)
        if torch.device(device).type != "cpu":
            model = model.to(device)
    else:
        model = load_model(str(source.path), device=device, dtype=dtype, overwrite_config=overwrite,
                           allow_missing=allow_missing)
    return model, {k: v for k, v in model.config.items() if k != "seed"}


def count_parameters(module):
    """(trainable, total, trainable tensors); a 4-bit tensor packs two weights per byte."""
    total = trainable = tensors = 0
    for p in module.parameters():
        n = p.numel() * (2 if p.dtype == torch.uint8 and getattr(p, "bnb_quantized", False) else 1)
        total += n
        if p.requires_grad:
            trainable += n
            tensors += 1
    return trainable, total, tensors


def make_trainable(model, args, config: dict) -> int:
    """Finetune: only the adapters train; pretrain: every floating-point weight. Returns the count."""
    if args.mode == "finetune":
        model.disable_untrainable_params()
    else:
        for p in model.parameters():
            p.requires_grad_(p.is_floating_point())
    trainable, total, tensors = count_parameters(model)
    if trainable == 0:
        raise ConfigError("no parameter is trainable")
    adapters = ', '.join(k for k in ADAPTER_FLAGS if config.get(k)) or 'all weights'
    log(f"trainable parameters: {trainable:,} of {total:,} ({100.0 * trainable / total:.3f}%) in {tensors} tensors "
        f"[{args.mode}; {adapters}]")
    return trainable
