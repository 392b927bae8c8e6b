#!/usr/bin/env bash
# Train the bundled small model from scratch and export it to pretrained/visualglm-tiny.
#   bash recipes/train_visualglm_tiny.sh            # the recorded recipe (one GPU, about 30 minutes on an H100)
# Sizes can be overridden for a smoke run (CPU, a few minutes):
#   WORK=/tmp/tiny-smoke OUT_DIR=/tmp/tiny-smoke-out STAGES="2 2 2 2" BATCH=4 WORKERS=0 EVAL_IMAGES=4 \
#       bash recipes/train_visualglm_tiny.sh
# Environment: WORK (scratch folder, emptied first; default work/tiny), OUT_DIR (default
# pretrained/visualglm-tiny, which it overwrites), STAGES (iterations of the four stages), BATCH,
# WORKERS (loader processes), PRECISION (default --bf16; empty for fp32), TOKENIZER (a folder whose
# tokenizer to reuse, default the shipped one; empty: train a new one), EVAL_IMAGES, PYTHON.
#
# Data: every sample is a new synthetic scene drawn by the loader workers (--train-data
# synthetic:<samples>:<seed>; each stage its own seed), so nothing is seen twice. The shipped checkpoint
# was made in four stages, each a separate run of the trainer that starts from the previous stage's fp16
# export with a fresh optimizer (the device runs that made it were limited to 10 minutes each):
#   1. from the initial checkpoint: batch 256, lr 1e-3 constant (warm-up 100), stopped at 1,500
#   2. batch 512, lr 1e-3 constant (warm-up 50), stopped at 1,400
#   3. batch 512, lr 1e-3 constant (warm-up 50), stopped at 1,500
#   4. batch 512, lr 1e-3 -> 1e-4 cosine (warm-up 30), 1,500 iterations
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-work/tiny}
OUT=${OUT_DIR:-pretrained/visualglm-tiny}
read -r S1 S2 S3 S4 <<< "${STAGES:-1500 1400 1500 1500}"
BATCH=${BATCH:-512}
WORKERS=${WORKERS:-15}
PRECISION=${PRECISION---bf16}
# the project's environment when bash setup.sh made one (nothing to activate), else whatever python3 is
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
FINETUNE_DEFAULTS=("# LoRA settings for finetune/finetune_visualglm.sh on this model" "LR=3e-3" "LAYER_RANGE=0 1 2 3")

rm -rf "$WORK"
# the shipped tokenizer (TOKENIZER= trains a new one; sentencepiece versions train slightly different ones)
TOKENIZER=${TOKENIZER-pretrained/visualglm-tiny}
$PY -m recipes.tiny_model prepare --out "$WORK" --train-images 0 --seed 1 ${TOKENIZER:+--tokenizer "$TOKENIZER"}

stage() {  # stage <n> <from> <batch> <seed> <train-iters> <exit at> <warmup> <decay> <export to>
  local n=$1 from=$2 batch=$3 seed=$4 iters=$5 stop=$6 warmup=$7 decay=$8 to=$9
  $PY finetune_visualglm.py --mode pretrain --from_pretrained "$from" --tokenizer "$WORK/tokenizer" \
    --train-data "synthetic:50000000:$seed" --valid-data "$WORK/data/valid/dataset.json" \
    --max_source_length 192 --max_target_length 64 --batch-size "$batch" --train-iters "$iters" --exit-interval "$stop" \
    --lr 1e-3 --lr-decay-style "$decay" --warmup "$warmup" --weight-decay 0.01 --gradient-clipping 1.0 \
    $PRECISION --seed "$seed" --num-workers "$WORKERS" --log-interval 50 --eval-interval 100000 --eval-iters 1 \
    --save "$WORK/runs-$n" --save-interval 100000 --experiment-name visualglm-tiny
  $PY -m recipes.tiny_model export --from "$(ls -d "$WORK/runs-$n"/visualglm-tiny-* | tail -n 1)" \
    --to "$to" --tokenizer "$WORK/tokenizer" --overwrite
}
stage 1 "$WORK/init" $((BATCH / 2)) 31 20000 "$S1" 0.005 constant "$WORK/stage-1"
stage 2 "$WORK/stage-1" "$BATCH" 41 10000 "$S2" 0.005 constant "$WORK/stage-2"
stage 3 "$WORK/stage-2" "$BATCH" 51 10000 "$S3" 0.005 constant "$WORK/stage-3"
stage 4 "$WORK/stage-3" "$BATCH" 61 "$S4" "$S4" 0.02 cosine "$OUT"
# the few-shot recipe that suits this model (read by finetune/finetune_visualglm.sh)
printf '%s\n' "${FINETUNE_DEFAULTS[@]}" > "$OUT/finetune_defaults.env"
$PY evaluate.py --from_pretrained "$OUT" --generate "${EVAL_IMAGES:-200}" --seed 2
