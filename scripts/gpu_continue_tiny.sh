#!/usr/bin/env bash
# Device call: continue training a carried visualglm-tiny checkpoint (.tinyckpt) on freshly generated
# data (same seeds, same images), export, evaluate; the result comes back split in parts under $OUT.
# Env: TRAIN_SECONDS (stop training then; the last saved iteration is exported), BATCH, LR, ITERS,
# DECAY (constant or cosine), BENCH=1 (first measure loader / step throughput with scripts/bench_train.py).
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
W=/tmp/tiny; T0=$(date +%s)
python3 -m synthetic.tiny_model prepare --out $W --train-images ${TRAIN_IMAGES:-24000} --shards 16 --seed 1 > $OUT/prepare.log 2>&1 || { tail $OUT/prepare.log; exit 1; }
echo "prepared in $(( $(date +%s) - T0 )) s"
if [ "${BENCH:-0}" = 1 ]; then
  timeout 150 python3 scripts/bench_train.py --from_pretrained .tinyckpt --train-data $W/data/train-0/dataset.json \
    --batch-sizes 64 256 --workers 15 --steps 20 --bf16 2>&1 | grep -vi "warn" | tail -6
fi
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > $OUT/gpu_util.txt 2>&1 &
SMI=$!
timeout ${TRAIN_SECONDS:-480} python3 finetune_visualglm.py --mode pretrain --from_pretrained .tinyckpt --tokenizer .tinyckpt \
  --train-data $(cat $W/train_files.txt) --valid-data $W/data/valid/dataset.json \
  --max_source_length 192 --max_target_length 64 --batch-size ${BATCH:-64} --train-iters ${ITERS:-5000} \
  --lr ${LR:-5e-4} --lr-decay-style ${DECAY:-cosine} --warmup ${WARMUP:-0.01} --weight-decay 0.01 --gradient-clipping 1.0 \
  --bf16 --seed ${SEED:-2} --num-workers 15 --log-interval 100 --eval-interval 100000 \
  --save $W/runs --save-interval ${SAVE_INTERVAL:-250} --experiment-name visualglm-tiny > $OUT/train.log 2>&1
kill $SMI 2>/dev/null
grep -E "iteration|saved|data:|trainable|rror" $OUT/train.log | tail -12
echo "trained until $(( $(date +%s) - T0 )) s"
RUN=$(ls -d $W/runs/visualglm-tiny-* | tail -n 1)
python3 -m synthetic.tiny_model export --from "$RUN" --to $W/out --tokenizer .tinyckpt --overwrite 2>&1 | grep exported
timeout ${EVAL_SECONDS:-80} python3 evaluate.py --from_pretrained $W/out --generate ${EVAL_IMAGES:-200} --seed 2 --json $OUT/eval.json 2>&1 \
  | grep -E "^(type|describe|colour|shape|count|position|exists|multi|overall)"
[ "${PROBE:-0}" = 1 ] && timeout 60 python3 scripts/probe_image_tokens.py --from_pretrained $W/out --scenes 600 2>&1 | grep -E "^(relative|probe|ViT|32)"
cd $W/out && tar cf /tmp/out.tar . && split -b 15M /tmp/out.tar $OUT/tiny.tar.part.
echo "total $(( $(date +%s) - T0 )) s"
