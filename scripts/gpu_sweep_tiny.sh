#!/usr/bin/env bash
# Device call used while developing the recipe: several initial cross-attention gains trained side by
# side on one GPU, each evaluated; the best model comes back (split in parts) under $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
W=/tmp/tiny; T0=$(date +%s)
python3 -m synthetic.tiny_model prepare --out $W --train-images ${TRAIN_IMAGES:-24000} --shards 16 --seed 1 --cross-gain 20 || exit 1
for g in ${GAINS:-5 60}; do python3 -m synthetic.tiny_model init --work $W --out $W/init$g --cross-gain $g; done
mv $W/init $W/init20
echo "prepared in $(( $(date +%s) - T0 )) s"
for g in 20 ${GAINS:-5 60}; do
  timeout ${TRAIN_SECONDS:-300} python3 finetune_visualglm.py --mode pretrain --from_pretrained $W/init$g \
    --train-data $(cat $W/train_files.txt) --valid-data $W/data/valid/dataset.json \
    --max_source_length 128 --max_target_length 64 --batch-size 64 --train-iters ${ITERS:-2000} \
    --lr ${LR:-1e-3} --lr-decay-style cosine --warmup 0.02 --weight-decay 0.01 --gradient-clipping 1.0 \
    --bf16 --seed 1 --num-workers 5 --log-interval 250 --eval-interval 100000 \
    --save $W/runs$g --save-interval 500 --experiment-name visualglm-tiny > $W/train$g.log 2>&1 &
done
wait
echo "trained until $(( $(date +%s) - T0 )) s"
for g in 20 ${GAINS:-5 60}; do
  RUN=$(ls -d $W/runs$g/visualglm-tiny-* | tail -n 1)
  python3 -m synthetic.tiny_model export --from "$RUN" --to $W/out$g --tokenizer $W/tokenizer --overwrite > /dev/null 2>&1
  timeout ${EVAL_SECONDS:-100} python3 evaluate.py --from_pretrained $W/out$g --generate ${EVAL_IMAGES:-150} --seed 2 \
    --json $W/eval$g.json > $W/eval$g.txt 2>&1 &
done
wait
for g in 20 ${GAINS:-5 60}; do echo "== gain $g"; grep "iteration" $W/train$g.log | tail -3; grep -E "^(type|describe|colour|shape|count|position|exists|multi|overall)" $W/eval$g.txt; done
best=$(for g in 20 ${GAINS:-5 60}; do python3 -c "import json,sys; d=json.load(open('$W/eval$g.json')); print(d['overall']['all']['accuracy'], $g)" 2>/dev/null; done | sort -n | tail -1 | cut -d' ' -f2)
echo "best gain: $best"
cd $W/out$best && tar cf /tmp/best.tar . && split -b 15M /tmp/best.tar $OUT/tiny.tar.part.
cp $W/eval$best.json $OUT/; cat $W/train*.log | grep -v "Warn\|warn" > $OUT/train_logs.txt
echo "total $(( $(date +%s) - T0 )) s"
