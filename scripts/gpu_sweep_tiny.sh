#!/usr/bin/env bash
# Device call used while developing the recipe: several initial checkpoints (synthetic.tiny_model init
# options) trained side by side on one GPU from scratch, each evaluated and probed
# (scripts/probe_image_tokens.py); every model comes back (split in parts) under $OUT.
# Variants: VARIANTS="name=init options;name=init options;..."
set -uo pipefail
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
W=/tmp/tiny; T0=$(date +%s)
VARIANTS=${VARIANTS:-"spatial=--lattice 5;older=--lattice 0 --qformer-layernorm post"}
python3 -m synthetic.tiny_model prepare --out $W --train-images ${TRAIN_IMAGES:-24000} --shards 16 --seed 1 > $OUT/prepare.log 2>&1 || { tail $OUT/prepare.log; exit 1; }
IFS=';' read -ra VS <<< "$VARIANTS"
NAMES=()
for v in "${VS[@]}"; do
  name=${v%%=*}; opts=${v#*=}; NAMES+=("$name")
  # shellcheck disable=SC2086
  python3 -m synthetic.tiny_model init --work $W --out $W/init-$name $opts > /dev/null 2>&1 || echo "init $name failed"
done
echo "prepared in $(( $(date +%s) - T0 )) s: ${NAMES[*]}"
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader -l 20 > $OUT/gpu_util.txt 2>&1 &
SMI=$!
PIDS=()
for name in "${NAMES[@]}"; do
  timeout ${TRAIN_SECONDS:-300} python3 finetune_visualglm.py --mode pretrain --from_pretrained $W/init-$name --tokenizer $W/tokenizer \
    --train-data $(cat $W/train_files.txt) --valid-data $W/data/valid/dataset.json \
    --max_source_length 192 --max_target_length 64 --batch-size ${BATCH:-128} --train-iters ${ITERS:-20000} \
    --lr ${LR:-1e-3} --lr-decay-style ${DECAY:-constant} --warmup ${WARMUP:-0.01} --weight-decay 0.01 --gradient-clipping 1.0 \
    --bf16 --seed 1 --num-workers ${WORKERS:-4} --log-interval 100 --eval-interval 100000 \
    --save $W/runs-$name --save-interval ${SAVE_INTERVAL:-200} --experiment-name visualglm-tiny > $OUT/train-$name.log 2>&1 &
  PIDS+=($!)
done
wait "${PIDS[@]}"; kill $SMI 2>/dev/null
echo "trained until $(( $(date +%s) - T0 )) s"
for name in "${NAMES[@]}"; do
  RUN=$(ls -d $W/runs-$name/visualglm-tiny-* | tail -n 1)
  ( python3 -m synthetic.tiny_model export --from "$RUN" --to $W/out-$name --tokenizer $W/tokenizer --overwrite > /dev/null 2>&1
    timeout ${EVAL_SECONDS:-100} python3 evaluate.py --from_pretrained $W/out-$name --generate ${EVAL_IMAGES:-100} --seed 2 \
      --json $OUT/eval-$name.json > $W/eval-$name.txt 2>&1
    timeout 100 python3 scripts/probe_image_tokens.py --from_pretrained $W/out-$name --scenes 600 > $W/probe-$name.txt 2>&1 ) &
done
wait
for name in "${NAMES[@]}"; do
  echo "== $name"; grep "iteration" $OUT/train-$name.log | tail -2
  grep -E "^(describe|colour|shape|count|position|exists|multi|overall)" $W/eval-$name.txt
  grep -E "^(relative|ViT|32)" $W/probe-$name.txt
  mkdir -p $OUT/$name && cd $W/out-$name && tar cf /tmp/$name.tar . && split -b 15M /tmp/$name.tar $OUT/$name/tiny.tar.part. && cd - > /dev/null
done
echo "total $(( $(date +%s) - T0 )) s"
