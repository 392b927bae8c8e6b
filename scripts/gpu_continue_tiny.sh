#!/usr/bin/env bash
# Device call: continue training a visualglm-tiny checkpoint on scenes generated on the fly by the loader
# workers (--train-data synthetic:<samples>:<SEED>, a new image every sample), export, evaluate; the
# result comes back split in parts under $OUT (unpack: cat tiny.tar.part.* | tar x -C <dir>).
# Env: FROM (checkpoint folder; default .tinyckpt, carried), TRAIN_SECONDS (stop then; the last saved
# iteration is exported), BATCH, LR, ITERS, DECAY (constant or cosine), WARMUP, SEED (data and dropout seed:
# give each call a new one), SAVE_INTERVAL, EVAL_IMAGES, EVAL_SECONDS, PROBE=1 (scripts/probe_image_tokens.py),
# NAME (runs side by side: each NAME gets its own work folder and $OUT/NAME/), WORKERS, EVAL_INTERVAL (validation loss).
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
NAME=${NAME:-}; W=/tmp/tiny${NAME:+-$NAME}; T0=$(date +%s); FROM=${FROM:-.tinyckpt}; SEED=${SEED:-2}
[ -n "$NAME" ] && OUT=$OUT/$NAME
mkdir -p $W $OUT
python3 -c "from synthetic.dataset import generate_split; generate_split('$W/valid', 200, seed=1002)" || exit 1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > $W/gpu_util.txt 2>&1 &
SMI=$!
timeout ${TRAIN_SECONDS:-480} python3 finetune_visualglm.py --mode pretrain --from_pretrained $FROM --tokenizer $FROM \
  --train-data synthetic:50000000:$SEED --valid-data $W/valid/dataset.json \
  --max_source_length 192 --max_target_length 64 --batch-size ${BATCH:-1024} --train-iters ${ITERS:-5000} \
  --lr ${LR:-1e-3} --lr-decay-style ${DECAY:-constant} --warmup ${WARMUP:-0.01} --weight-decay 0.01 --gradient-clipping 1.0 \
  --bf16 --seed $SEED --num-workers ${WORKERS:-15} --log-interval 50 --eval-interval ${EVAL_INTERVAL:-500} --eval-iters 1 \
  --save $W/runs --save-interval ${SAVE_INTERVAL:-250} --experiment-name visualglm-tiny > $OUT/train.log 2>&1
kill $SMI 2>/dev/null; echo "GPU busy: $(cut -d, -f1 $W/gpu_util.txt | tr '\n' ' ')"
grep -E "iteration|data:|trainable|rror" $OUT/train.log | awk 'NR<=3 || /validation/ || NR%4==0' | tail -24
echo "trained until $(( $(date +%s) - T0 )) s"
RUN=$(ls -d $W/runs/visualglm-tiny-* | tail -n 1)
python3 -m synthetic.tiny_model export --from "$RUN" --to $W/out --tokenizer $FROM --overwrite 2>&1 | grep exported
timeout ${EVAL_SECONDS:-90} python3 evaluate.py --from_pretrained $W/out --generate ${EVAL_IMAGES:-200} --seed 2 --json $W/eval.json 2>&1 \
  | grep -E "^(type|describe|colour|shape|count|position|exists|multi|overall)"
[ "${PROBE:-0}" = 1 ] && timeout 60 python3 scripts/probe_image_tokens.py --from_pretrained $W/out --scenes 600 2>&1 | grep -E "^(relative|probe|ViT|32)"
cd $W/out && tar cf $W/out.tar . && split -b 15M $W/out.tar $OUT/tiny.tar.part.
echo "total $(( $(date +%s) - T0 )) s"
