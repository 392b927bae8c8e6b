#!/usr/bin/env bash
# One device call: prepare, train under a wall-clock cap (saving every SAVE_EVERY), export, evaluate,
# and leave the exported checkpoint (split in parts) and logs under $OUT. Used to make the shipped model.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
WORK=/tmp/tiny
T0=$(date +%s)
python3 -m synthetic.tiny_model prepare --out $WORK --train-images ${TRAIN_IMAGES:-24000} --shards 16 --seed 1 || exit 1
echo "prepared in $(( $(date +%s) - T0 )) s"
timeout ${TRAIN_SECONDS:-330} python3 finetune_visualglm.py --mode pretrain --from_config $WORK/model_config.json \
  --tokenizer $WORK/tokenizer --train-data $(cat $WORK/train_files.txt) --valid-data $WORK/data/valid/dataset.json \
  --max_source_length 128 --max_target_length 64 --batch-size ${BATCH:-64} --train-iters ${ITERS:-3000} \
  --lr ${LR:-1e-3} --lr-decay-style cosine --warmup 0.02 --weight-decay 0.01 --gradient-clipping 1.0 \
  --bf16 --seed 1 --num-workers 12 --log-interval 100 --eval-interval 500 --eval-iters 10 \
  --save $WORK/runs --save-interval ${SAVE_EVERY:-500} --experiment-name visualglm-tiny 2>&1 \
  | grep -v "Deprecation\|warnings.warn\|UserWarning\|return func\|kaiming"
echo "trained until $(( $(date +%s) - T0 )) s"
RUN=$(ls -d $WORK/runs/visualglm-tiny-* | tail -n 1)
python3 -m synthetic.tiny_model export --from "$RUN" --to /tmp/visualglm-tiny --tokenizer $WORK/tokenizer --overwrite 2>&1 | tail -2
timeout ${EVAL_SECONDS:-120} python3 evaluate.py --from_pretrained /tmp/visualglm-tiny --generate ${EVAL_IMAGES:-300} --seed 2 \
  --json $OUT/eval.json 2>&1 | grep -v "Deprecation\|warnings.warn\|UserWarning\|return func"
cd /tmp/visualglm-tiny && tar cf /tmp/tiny.tar . && split -b 15M /tmp/tiny.tar $OUT/tiny.tar.part.
cp $RUN/train_log.jsonl $OUT/ 2>/dev/null
echo "total $(( $(date +%s) - T0 )) s"
