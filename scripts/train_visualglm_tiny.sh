#!/usr/bin/env bash
# Train the bundled small model from scratch and export it to pretrained/visualglm-tiny.
#   bash scripts/train_visualglm_tiny.sh            # the recorded recipe (one GPU, a few minutes)
# Sizes can be overridden for a smoke run: TRAIN_IMAGES=64 ITERS=4 BATCH=4 bash scripts/train_visualglm_tiny.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-work/tiny}
OUT=${OUT_DIR:-pretrained/visualglm-tiny}
TRAIN_IMAGES=${TRAIN_IMAGES:-24000}
SHARDS=${SHARDS:-16}
ITERS=${ITERS:-8000}
BATCH=${BATCH:-64}
LR=${LR:-1e-3}
WORKERS=${WORKERS:-8}
PRECISION=${PRECISION:---bf16}
SEED=${SEED:-1}
PY=${PYTHON:-python}

rm -rf "$WORK"
$PY -m synthetic.tiny_model prepare --out "$WORK" --train-images "$TRAIN_IMAGES" --shards "$SHARDS" --seed "$SEED"
# shellcheck disable=SC2046
$PY finetune_visualglm.py --mode pretrain --from_pretrained "$WORK/init" --tokenizer "$WORK/tokenizer" \
  --train-data $(cat "$WORK/train_files.txt") --valid-data "$WORK/data/valid/dataset.json" \
  --max_source_length 192 --max_target_length 64 --batch-size "$BATCH" --train-iters "$ITERS" \
  --lr "$LR" --lr-decay-style cosine --warmup 0.02 --weight-decay 0.01 --gradient-clipping 1.0 \
  $PRECISION --seed "$SEED" --num-workers "$WORKERS" --log-interval 100 --eval-interval 1000 --eval-iters 10 \
  --save "$WORK/runs" --save-interval 1000 --experiment-name visualglm-tiny
RUN=$(ls -d "$WORK"/runs/visualglm-tiny-* | tail -n 1)
$PY -m synthetic.tiny_model export --from "$RUN" --to "$OUT" --tokenizer "$WORK/tokenizer" --overwrite
$PY evaluate.py --from_pretrained "$OUT" --generate "${EVAL_IMAGES:-100}" --seed 2
