"""Fine-tune VisualGLM (LoRA, QLoRA, P-tuning v2), or train all of its weights, with DeepSpeed.

    # one CPU process (tests, machines without a GPU)
    python finetune_visualglm.py --from_pretrained visualglm-6b --train-data fewshot-data/dataset.json \
        --use_lora --layer_range 0 14 --train-iters 300 --batch-size 4 --save ./checkpoints
    # several GPUs or nodes (NCCL): the DeepSpeed launcher, optionally with a hostfile
    deepspeed --num_gpus 8 finetune_visualglm.py --fp16 --zero-stage 1 ...   (see finetune/*.sh)
    # LoRA with every 2 processes sharing one copy of the model (sat's model parallelism)
    deepspeed --num_gpus 2 finetune_visualglm.py --model-parallel-size 2 --use_lora ...
    # train every weight of a new model from a config (random init)
    python finetune_visualglm.py --mode pretrain --from_config model_config.json --tokenizer <dir> ...

The flags are those of the original script (sat's training flags plus --max_source_length,
--max_target_length, --lora_rank, --layer_range, --pre_seq_len, --use_lora, --use_qlora, --use_ptuning,
--ignore_pad_token_for_loss). Differences from sat's trainer: `--mode pretrain` trains all weights
(no adapters); `--load <run dir>` resumes in both modes (weights, optimizer, iteration); no "auto
warm-up" at 5 % of the learning rate; batches are padded to their longest row, not to a fixed length.

Data (spec 8.4): a JSON list or JSON Lines file of
    {"img": "x.png", "prompt": "question", "label": "answer"}
    {"img": "x.png", "conversations": [{"prompt": q1, "label": a1}, {"prompt": q2, "label": a2}]}
("conversations" may also be role/content messages; every answer becomes one sample with the turns
before it as history; "img": null trains without an image; "lang": "en" uses the English template).
Images are looked up relative to the dataset file's folder, then its parent, then the working folder.
Tokens: ids("<img>") + image_length placeholders + ids("</img>问：{prompt}\\n答：") (truncated to
max_source_length - 1) + [gMASK] <sop> + ids(label) (truncated to max_target_length - 2) + <eop>;
only <sop>, the answer and <eop> are targets.

A run writes <save>/<experiment-name>-<month-day-hour-minute>/ in sat format: model_config.json,
latest, <iteration>/mp_rank_00_model_states.pt ({"module": tensors}, weights-only loadable), the
tokenizer files, train_log.jsonl, and <iteration>/deepspeed/ (optimizer state, for --load). Each
iteration folder is written under a temporary name and renamed into place with a complete.json, and
`latest` is updated after it, so a kill or a full disk never leaves a half-written checkpoint in use;
--load resumes from the newest complete iteration. With --model-parallel-size N, each rank loads its part of
the model and every iteration folder holds mp_rank_00 ... mp_rank_{N-1} (model_config.json says N);
python -m model.sat.merge_lora turns such a run into one file.
"""
import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from model.configs import add_finetune_model_args  # noqa: E402

__all__ = ["FineTuneVisualGLMModel", "build_parser", "parse_args", "run", "main"]


def __getattr__(name):
    # The original README's LoRA-merge snippet imports FineTuneVisualGLMModel from this module. It is
    # loaded on first use, like the trainer, so that --help and flag errors do not wait for sat.
    if name == "FineTuneVisualGLMModel":
        from model.sat.finetune import FineTuneVisualGLMModel
        return FineTuneVisualGLMModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {value!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--from_pretrained", default="visualglm-6b",
                   help="sat checkpoint: a name in $SAT_HOME, a bundled model or a folder (also a fine-tune run)")
    g.add_argument("--from_config", default=None,
                   help="model_config.json to build a randomly initialised model from (instead of --from_pretrained)")
    g.add_argument("--tokenizer", default=None, help="folder with ice_text.model (default: found with the checkpoint)")
    g.add_argument("--mode", default="finetune", choices=["finetune", "pretrain"],
                   help="finetune: only the adapters train; pretrain: every weight trains (no adapters)")
    g.add_argument("--model-parallel-size", type=int, default=1,
                   help="ranks that split one copy of the model (sat's tensor parallelism; LoRA only); the "
                        "processes started are copies x this")
    g.add_argument("--skip-init", action="store_true", help="accepted for compatibility (weights are never initialised twice)")
    g.add_argument("--checkpoint-activations", action="store_true", help="recompute GLM activations in backward")
    g.add_argument("--checkpoint-num-layers", type=int, default=1)
    add_finetune_model_args(p)  # FineTuneVisualGLMModel's flags: --pre_seq_len --lora_rank --use_* --layer_range ...

    g = p.add_argument_group("data")
    g.add_argument("--train-data", nargs="+", default=None,
                   help="JSON / JSON Lines dataset file(s); synthetic:<samples>[:<seed>] draws synthetic shape "
                        "scenes on the fly (synthetic/stream.py)")
    g.add_argument("--valid-data", nargs="*", default=None)
    g.add_argument("--test-data", nargs="*", default=None)
    g.add_argument("--split", default="1", help="train,valid,test weights to split --train-data when no --valid-data")
    g.add_argument("--max_source_length", type=int, default=64)
    g.add_argument("--max_target_length", type=int, default=256)
    g.add_argument("--ignore_pad_token_for_loss", type=_str2bool, nargs="?", const=True, default=True)
    g.add_argument("--source_prefix", default="", help="text put before every question")
    g.add_argument("--english", action="store_true", help="Q:/A: template for entries without a \"lang\" key")
    g.add_argument("--num-workers", type=int, default=1, help="data loader worker processes (0: in process)")
    g.add_argument("--resume-dataloader", action="store_true", help="with --load, continue the data order")

    g = p.add_argument_group("training")
    g.add_argument("--experiment-name", default="finetune-visualglm")
    g.add_argument("--train-iters", type=int, default=None)
    g.add_argument("--epochs", type=int, default=None, help="alternative to --train-iters")
    g.add_argument("--batch-size", type=int, default=4, help="micro-batch per GPU / process")
    g.add_argument("--gradient-accumulation-steps", type=int, default=1)
    g.add_argument("--lr", type=float, default=1.0e-4)
    g.add_argument("--lr-decay-style", default="linear", choices=["constant", "linear", "cosine", "exponential"])
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-ratio", type=float, default=0.1)
    g.add_argument("--warmup", type=float, default=0.01, help="fraction of the decay iterations")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--gradient-clipping", type=float, default=0.1)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    g.add_argument("--deepspeed", action="store_true", help="accepted for compatibility (DeepSpeed is always used)")
    g.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON used as the base of the generated config")
    g.add_argument("--distributed-backend", default=None, help="nccl or gloo (default: nccl with CUDA, else gloo)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")

    g = p.add_argument_group("logging, evaluation, checkpoints")
    g.add_argument("--log-interval", type=int, default=50)
    g.add_argument("--eval-interval", type=int, default=None)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--eval-batch-size", type=int, default=None)
    g.add_argument("--save", default=None, help="folder for runs (nothing is saved without it)")
    g.add_argument("--save-interval", type=int, default=5000)
    g.add_argument("--load", default=None, help="a run folder to resume (weights, optimizer state, iteration)")
    g.add_argument("--no-save-rng", action="store_true", help="do not store RNG states with the optimizer state")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--exit-interval", type=int, default=None, help="stop after this iteration")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """The flags, checked together: every problem is named in one `error: ...` exit (status 1)."""
    args = build_parser().parse_args(argv)
    errors = []
    if not args.train_data:
        errors.append("--train-data is required")
    if args.model_parallel_size < 1:
        errors.append("--model-parallel-size must be >= 1")
    elif args.model_parallel_size > 1 and (args.mode == "pretrain" or args.use_ptuning or args.from_config
                                           or (args.use_qlora and not args.use_lora)):
        errors.append("--model-parallel-size > 1 is for LoRA fine-tuning of a checkpoint (--use_lora, without "
                      "--use_ptuning, --use_qlora, --from_config or --mode pretrain): sat's other layers do not "
                      "split across ranks")
    if args.zero_stage == 3:
        errors.append("--zero-stage 3 is not supported (it partitions the weights); use 0, 1 or 2")
    if args.fp16 and args.bf16:
        errors.append("choose one of --fp16 and --bf16")
    if args.train_iters is not None and args.epochs is not None:
        errors.append("give --train-iters or --epochs, not both")
    for flag in ("--batch-size", "--gradient-accumulation-steps", "--max_source_length", "--log-interval",
                 "--eval-iters", "--save-interval"):
        if getattr(args, flag[2:].replace("-", "_")) < 1:
            errors.append(f"{flag} must be >= 1")
    if args.max_target_length < 2:
        errors.append("--max_target_length must be >= 2 (<sop> and <eop> need room)")
    adapters = args.use_lora or args.use_qlora or args.use_ptuning
    if args.mode == "pretrain" and adapters:
        errors.append("--mode pretrain trains every weight; --use_lora/--use_qlora/--use_ptuning are for --mode finetune")
    if errors:
        raise SystemExit("error: " + "; ".join(errors))
    if args.use_lora and args.use_qlora:
        from training.console import log
        log("warning: --use_lora and --use_qlora both given; LoRA takes precedence (as in the original)")
        args.use_qlora = False
    args.eval_batch_size = args.eval_batch_size or args.batch_size
    return args


def run(argv=None) -> "TrainResult":  # noqa: F821  (training.loop's, imported on use)
    from training.loop import train
    return train(parse_args(argv))


def main(argv=None) -> int:
    """The command line: train, or print `error: ...` on stderr and return 1 (flag errors exit from
    parse_args, as argparse's own do)."""
    from model.image import ImageLoadError
    from model.sat.checkpoint import CheckpointError
    from training.data import DataError
    from training.errors import ConfigError
    try:
        run(argv)
    except (ConfigError, DataError, CheckpointError, ImageLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
