#!/usr/bin/env bash
# Fine-tune VisualGLM-6B with LoRA (rank 10 on GLM layers 0 and 14), the original recipe.
#
#   bash finetune/finetune_visualglm.sh [extra finetune_visualglm.py flags, which win over the defaults]
#
# Environment variables (defaults in brackets):
#   MODEL        checkpoint name or folder                       [visualglm-6b]
#   TRAIN_DATA   training set (DATA is an alias)                 [./fewshot-data/dataset.json]
#   VALID_DATA   validation set                                  [none: no validation loss]
#   SAVE         folder for runs                                 [./checkpoints]
#   EXPERIMENT   run name prefix                                 [finetune-<MODEL's folder name>]
#   ADAPTER      lora | qlora | ptuning                          [lora]
#   LORA_RANK [10]  LAYER_RANGE ["0 14"]  PRE_SEQ_LEN [4]
#   TRAIN_ITERS [300]  BATCH_SIZE [4]  GRAD_ACCUM [1]  LR [0.0001]  SAVE_INTERVAL [300]
#   NUM_GPUS     GPUs on this machine to use                     [all visible; 0 = CPU]
#                (several: data parallel, one process per GPU through the DeepSpeed launcher;
#                 the global batch is BATCH_SIZE x GRAD_ACCUM x GPUs / MP_SIZE)
#   MP_SIZE      model-parallel size (GPUs sharing one copy; LoRA only) [1; see docs/multi-gpu.md]
#   HOSTFILE     DeepSpeed hostfile for several nodes            [none: this machine only]
#                one line per node, "node1 slots=8" (slots = GPUs used there); every node needs
#                passwordless ssh from this one, the same paths and the same environment; this
#                machine must be able to reach MASTER_PORT on the first node of the file
#   MASTER_PORT  [16666]   PRECISION fp16 | bf16 | fp32          [fp16 on GPUs, fp32 on the CPU]
#   PYTHON       interpreter                   [the repository's .venv/bin/python if there, else python3]
# The training data is not used for validation: without VALID_DATA (or --split 9,1,0, which holds out
# a tenth of TRAIN_DATA) the run has no validation set and says so.
# Without a usable GPU (no nvidia-smi, or torch sees no CUDA device) the same training runs as one
# CPU process with gloo, in fp32 (or PRECISION=bf16).
#
# A checkpoint folder may carry its own recommended values in `finetune_defaults.env` (KEY=value
# lines for LORA_RANK, LAYER_RANGE, PRE_SEQ_LEN, TRAIN_ITERS, BATCH_SIZE, GRAD_ACCUM, LR): they replace
# the 6B recipe's defaults above, never a variable you set. The bundled visualglm-tiny has one (a 9 M
# model needs a far larger LoRA learning rate than the 6B). The folder is found like the Python
# loader finds it: MODEL as a path, then $SAT_HOME/MODEL, then pretrained/MODEL in this repository.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
# The project's environment when bash setup.sh made one, so that the commands in README.md work as
# written on a fresh clone, without activating anything first.
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

MODEL="${MODEL:-visualglm-6b}"
for folder in "$MODEL" "${SAT_HOME:-$HOME/.sat_models}/$MODEL" "$ROOT/pretrained/$MODEL"; do
  if [[ -f "$folder/finetune_defaults.env" ]]; then
    while IFS='=' read -r key value || [[ -n "$key" ]]; do
      case "$key" in
        LORA_RANK|LAYER_RANGE|PRE_SEQ_LEN|TRAIN_ITERS|BATCH_SIZE|GRAD_ACCUM|LR)
          if [[ -z "${!key:-}" ]]; then
            printf -v "$key" '%s' "${value//\"/}"
            echo "$key=${!key} (from $folder/finetune_defaults.env)" >&2
          fi ;;
        ''|\#*) ;;
        *) echo "ignoring unknown key '$key' in $folder/finetune_defaults.env" >&2 ;;
      esac
    done < "$folder/finetune_defaults.env"
    break
  fi
done
TRAIN_DATA="${TRAIN_DATA:-${DATA:-./fewshot-data/dataset.json}}"
# (validating on the training data would report its loss as a "validation loss")
VALID_DATA="${VALID_DATA:-}"
SAVE="${SAVE:-./checkpoints}"
# runs are named after the model they fine-tune: finetune-visualglm-tiny-<date> for MODEL=visualglm-tiny
EXPERIMENT="${EXPERIMENT:-finetune-$(basename "${MODEL%/}")}"
ADAPTER="${ADAPTER:-lora}"
LORA_RANK="${LORA_RANK:-10}"
LAYER_RANGE="${LAYER_RANGE:-0 14}"
PRE_SEQ_LEN="${PRE_SEQ_LEN:-4}"
TRAIN_ITERS="${TRAIN_ITERS:-300}"
BATCH_SIZE="${BATCH_SIZE:-4}"
GRAD_ACCUM="${GRAD_ACCUM:-1}"
LR="${LR:-0.0001}"
SAVE_INTERVAL="${SAVE_INTERVAL:-300}"
MASTER_PORT="${MASTER_PORT:-16666}"
MP_SIZE="${MP_SIZE:-1}"

case "$ADAPTER" in
  lora)    adapter_flags=(--use_lora) ;;
  qlora)   adapter_flags=(--use_qlora) ;;
  ptuning) adapter_flags=(--use_ptuning) ;;
  *) echo "ADAPTER must be lora, qlora or ptuning, not '$ADAPTER'" >&2; exit 2 ;;
esac

# GPUs: nvidia-smi present and torch sees CUDA devices
if [[ -z "${NUM_GPUS:-}" ]]; then
  NUM_GPUS=0
  if command -v nvidia-smi >/dev/null 2>&1; then
    NUM_GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0)"
  fi
fi
if ! [[ "$MP_SIZE" =~ ^[1-9][0-9]*$ ]]; then
  echo "MP_SIZE must be a positive number, not '$MP_SIZE'" >&2; exit 2
fi
if [[ "$MP_SIZE" -gt 1 && -z "${HOSTFILE:-}" ]] && (( NUM_GPUS % MP_SIZE != 0 )); then
  echo "MP_SIZE=$MP_SIZE needs a number of GPUs it divides (NUM_GPUS=$NUM_GPUS)" >&2; exit 2
fi
if [[ "$NUM_GPUS" -gt 0 ]]; then
  PRECISION="${PRECISION:-fp16}"
else
  PRECISION="${PRECISION:-fp32}"
fi
case "$PRECISION" in
  fp16) precision_flags=(--fp16) ;;
  bf16) precision_flags=(--bf16) ;;
  fp32) precision_flags=() ;;
  *) echo "PRECISION must be fp16, bf16 or fp32, not '$PRECISION'" >&2; exit 2 ;;
esac

# shellcheck disable=SC2206  # LAYER_RANGE is a list of layer numbers
options=(
  --experiment-name "$EXPERIMENT"
  --model-parallel-size "$MP_SIZE"
  --mode finetune
  --train-iters "$TRAIN_ITERS"
  --resume-dataloader
  --max_source_length 64
  --max_target_length 256
  --lora_rank "$LORA_RANK"
  --layer_range $LAYER_RANGE
  --pre_seq_len "$PRE_SEQ_LEN"
  --train-data "$TRAIN_DATA"
  --lr-decay-style cosine
  --warmup .02
  --save-interval "$SAVE_INTERVAL"
  --eval-interval 10000
  --save "$SAVE"
  --split 1
  --eval-iters 10
  --eval-batch-size 8
  --zero-stage 1
  --lr "$LR"
  --batch-size "$BATCH_SIZE"
  --gradient-accumulation-steps "$GRAD_ACCUM"
  --skip-init
  --from_pretrained "$MODEL"
  "${adapter_flags[@]}"
  "${precision_flags[@]}"
)
if [[ -n "$VALID_DATA" ]]; then
  options+=(--valid-data "$VALID_DATA")
fi

if [[ "$NUM_GPUS" -gt 0 ]]; then
  options+=(--checkpoint-activations --distributed-backend nccl)
  # the `deepspeed` command of $PYTHON's environment, which need not be on PATH
  launcher=("$PYTHON" -m deepspeed.launcher.runner --master_port "$MASTER_PORT")
  if [[ -n "${HOSTFILE:-}" ]]; then
    launcher+=(--hostfile "$HOSTFILE")
  else
    launcher+=(--num_gpus "$NUM_GPUS")
  fi
  echo "GPU training: ${HOSTFILE:+hostfile $HOSTFILE, }$NUM_GPUS GPU(s) per node, $PRECISION" >&2
  set -x
  exec "${launcher[@]}" "$ROOT/finetune_visualglm.py" "${options[@]}" "$@"
else
  echo "No CUDA GPU found: training on the CPU (one process, gloo, $PRECISION)" >&2
  set -x
  exec "$PYTHON" "$ROOT/finetune_visualglm.py" "${options[@]}" --distributed-backend gloo "$@"
fi
