#!/usr/bin/env bash
# Device call: continue training a carried visualglm-tiny checkpoint (.tinyckpt) on freshly generated
# data (same seed, same images), export, evaluate; the result comes back split in parts under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
W=/tmp/tiny; T0=$(date +%s)
python3 -m synthetic.tiny_model prepare --out $W --train-images ${TRAIN_IMAGES:-24000} --shards 16 --seed 1 > /dev/null 2>&1 || exit 1
echo "prepared in $(( $(date +%s) - T0 )) s"
timeout ${TRAIN_SECONDS:-480} python3 finetune_visualglm.py --mode pretrain --from_pretrained .tinyckpt --tokenizer .tinyckpt \
  --train-data $(cat $W/train_files.txt) --valid-data $W/data/valid/dataset.json \
  --max_source_length 128 --max_target_length 64 --batch-size 64 --train-iters ${ITERS:-5000} \
  --lr ${LR:-5e-4} --lr-decay-style cosine --warmup 0.01 --weight-decay 0.01 --gradient-clipping 1.0 \
  --bf16 --seed 2 --num-workers 15 --log-interval 250 --eval-interval 100000 \
  --save $W/runs --save-interval 500 --experiment-name visualglm-tiny 2>&1 | grep -E "iteration|saved|data:|trainable"
echo "trained until $(( $(date +%s) - T0 )) s"
RUN=$(ls -d $W/runs/visualglm-tiny-* | tail -n 1)
python3 -m synthetic.tiny_model export --from "$RUN" --to $W/out --tokenizer .tinyckpt --overwrite > /dev/null 2>&1
timeout ${EVAL_SECONDS:-80} python3 evaluate.py --from_pretrained $W/out --generate ${EVAL_IMAGES:-200} --seed 2 --json $OUT/eval.json 2>&1 \
  | grep -E "^(type|describe|colour|shape|count|position|exists|multi|overall)"
cd $W/out && tar cf /tmp/out.tar . && split -b 15M /tmp/out.tar $OUT/tiny.tar.part.
echo "total $(( $(date +%s) - T0 )) s"
