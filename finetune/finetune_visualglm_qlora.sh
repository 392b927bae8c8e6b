#!/usr/bin/env bash
# Fine-tune VisualGLM-6B with QLoRA: LoRA rank 10 on layers 0 and 14 over a 4-bit NF4 GLM, micro-batch 1
# with 4 accumulation steps (the original recipe, about 10 GB of GPU memory for the 6B model).
#
#   bash finetune/finetune_visualglm_qlora.sh [extra finetune_visualglm.py flags]
#
# Takes the environment variables of finetune_visualglm.sh (MODEL, TRAIN_DATA, SAVE, NUM_GPUS, ...);
# BATCH_SIZE defaults to 1 and GRAD_ACCUM to 4 here.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export ADAPTER=qlora
export BATCH_SIZE="${BATCH_SIZE:-1}"
export GRAD_ACCUM="${GRAD_ACCUM:-4}"
MODEL="${MODEL:-visualglm-6b}"
export EXPERIMENT="${EXPERIMENT:-finetune-$(basename "${MODEL%/}")-qlora}"
exec bash "$HERE/finetune_visualglm.sh" "$@"
