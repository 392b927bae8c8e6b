#!/usr/bin/env bash
# Continue training the bundled small model on the natural rewordings: many phrasings per question
# type (synthetic/phrasing.py), yes/no questions that name no colour ("Is there a star?") and questions
# about a shape that is not there ("Where is the red circle?" -> "There is no red circle in the
# picture."), mixed with the original templates so that those stay answered (the `trained` wording of
# synthetic/qa.py). The shipped model: the fifth stage, then ITERS=1400, then ITERS=1000 from each export.
#   bash recipes/continue_visualglm_tiny.sh          # one GPU: 1,300 iterations of batch 512, bf16 (~7 min on an H100)
# Smoke run (CPU, about a minute):
#   WORK=/tmp/tiny-continue ITERS=3 BATCH=4 WORKERS=0 PRECISION= SAVE_INTERVAL=2 EVAL_IMAGES=4 \
#       bash recipes/continue_visualglm_tiny.sh
# Environment: FROM (the model to continue, default pretrained/visualglm-tiny), WORK (scratch folder,
# emptied first; default work/tiny-continue), OUT_DIR (the fp16 export, default $WORK/model; it is
# replaced when it exists, so name pretrained/visualglm-tiny only to ship the result), ITERS, BATCH,
# LR (peak, cosine decay to a tenth), WARMUP, SEED, WORKERS (loader processes), PRECISION (default
# --bf16; empty for fp32), TRAIN_SECONDS (wall-clock guard: stop then and export the last checkpoint;
# 0: none), SAVE_INTERVAL, EVAL_IMAGES (0: no evaluation), PYTHON.
#
# Data: every sample a new scene (--train-data synthetic:<samples>:<seed>:trained); the background
# question stays held out (the few-shot task). Starts from the shipped weights with a fresh optimizer:
# the learning rate is a third of the last stage's peak, so the model adds the new forms without
# forgetting what it knows.
set -euo pipefail
cd "$(dirname "$0")/.."
FROM=${FROM:-pretrained/visualglm-tiny}
WORK=${WORK:-work/tiny-continue}
OUT=${OUT_DIR:-$WORK/model}
ITERS=${ITERS:-1300}
BATCH=${BATCH:-512}
LR=${LR:-3e-4}
WARMUP=${WARMUP:-0.02}
SEED=${SEED:-71}
WORKERS=${WORKERS:-15}
PRECISION=${PRECISION---bf16}
TRAIN_SECONDS=${TRAIN_SECONDS:-0}
SAVE_INTERVAL=${SAVE_INTERVAL:-100}
if [[ -n "${PYTHON:-}" ]]; then PY=$PYTHON; elif [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
[[ -f "$FROM/model_config.json" ]] || { echo "error: $FROM is not a model folder (no model_config.json)" >&2; exit 1; }

rm -rf "$WORK"
mkdir -p "$WORK/tokenizer"
# the tokenizer and the fine-tuning defaults travel with the model (copied first: OUT_DIR may be FROM)
cp "$FROM/ice_text.model" "$FROM/tokenizer_config.json" "$WORK/tokenizer/"
[[ -f "$FROM/finetune_defaults.env" ]] && cp "$FROM/finetune_defaults.env" "$WORK/"

# the guard stops the trainer at TRAIN_SECONDS (status 124); its checkpoints are written whole or not at all
GUARD=()
[[ "$TRAIN_SECONDS" != 0 ]] && GUARD=(timeout "$TRAIN_SECONDS")
status=0
"${GUARD[@]}" $PY finetune_visualglm.py --mode pretrain --from_pretrained "$FROM" --tokenizer "$WORK/tokenizer" \
    --train-data "synthetic:50000000:$SEED:trained" \
    --max_source_length 192 --max_target_length 64 --batch-size "$BATCH" --train-iters "$ITERS" \
    --lr "$LR" --lr-decay-style cosine --warmup "$WARMUP" --weight-decay 0.01 --gradient-clipping 1.0 \
    $PRECISION --seed "$SEED" --num-workers "$WORKERS" --log-interval 50 --eval-interval 100000 --eval-iters 1 \
    --save "$WORK/runs" --save-interval "$SAVE_INTERVAL" --experiment-name visualglm-tiny-continued || status=$?
if [[ $status == 124 ]]; then
    echo "stopped by TRAIN_SECONDS=$TRAIN_SECONDS; exporting the last saved iteration" >&2
elif [[ $status != 0 ]]; then
    exit "$status"
fi
RUN=$(ls -d "$WORK/runs"/visualglm-tiny-continued-* 2>/dev/null | tail -n 1)
[[ -n "$RUN" && -f "$RUN/latest" ]] || { echo "error: no checkpoint was saved in $WORK/runs" >&2; exit 1; }
echo "exporting $RUN (iteration $(cat "$RUN/latest"))"
$PY -m recipes.tiny_model export --from "$RUN" --to "$OUT" --tokenizer "$WORK/tokenizer" --overwrite
[[ -f "$WORK/finetune_defaults.env" ]] && cp "$WORK/finetune_defaults.env" "$OUT/"
if [[ "${EVAL_IMAGES:-200}" != 0 ]]; then
    # the original templates (must stay >= 95% per type), then the held-out rewordings
    $PY evaluate.py --from_pretrained "$OUT" --generate "${EVAL_IMAGES:-200}" --seed 2
    $PY evaluate.py --from_pretrained "$OUT" --generate "${EVAL_IMAGES:-200}" --seed 2 --wording rewordings
fi
