#!/usr/bin/env bash
# On the GPU machine: the uptraining runs of docs/results.md on tiny-neox, one `kvexport uptrain` per strategy, each followed by
# `kvexport eval` on the shipped held-out text (the windows of docs/results.md's strategy table). Needs, carried:
# .train/train.txt and .train/select.txt (python samples/train_tiny.py texts ...) and .train/strategies/kvsharer{2,4,6}.json
# (kvexport search --model tiny-neox --shared-layers N --threshold -1). Results: $OUT/uptrain-NAMES.tar.gz.
#   bash samples/gpu_uptrain.sh none every:2          # names: none, every:K, or kvsharerN
#   HEADS=2 bash samples/gpu_uptrain.sh none every:2  # tiny-llama compressed to 2 KV heads (compress-heads) instead,
#                                                     # with its evaluation before uptraining
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
STEPS=${STEPS:-1500}
mkdir -p /tmp/uptrain-results
start=(--model tiny-neox); prefix=""
if [[ -n ${HEADS:-} ]]; then
  python3 -m kvexport compress-heads --model tiny-llama --kv-heads "$HEADS" -o "/tmp/tl-kv$HEADS" 2>&1 | tail -1
  start=(--model tiny-llama --kv-heads-model "/tmp/tl-kv$HEADS"); prefix="tiny-llama-kv$HEADS-"
  python3 -m kvexport eval --model "/tmp/tl-kv$HEADS" --share "$@" --output "/tmp/uptrain-results/${prefix}before" \
    2>&1 | grep "^|"
fi
for name in "$@"; do
  spec=$name; [[ $name == kvsharer* ]] && spec=.train/strategies/$name.json
  label=$prefix${name/:/}
  python3 -m kvexport uptrain "${start[@]}" --share "$spec" --data .train/train.txt --eval-data .train/select.txt \
    --steps "$STEPS" --batch-size 32 --length 256 --lr "${LR:-3e-4}" --eval-every 100 --patience 4 -o "/tmp/up-$label" 2>&1 \
    | grep -v "uptrain:" | tail -3
  python3 -m kvexport eval --model "/tmp/up-$label" --share "/tmp/up-$label/strategy.json" \
    --output "/tmp/eval-$label" 2>&1 | tail -4
  mkdir -p "/tmp/uptrain-results/$label"
  cp "/tmp/up-$label"/{kvexport_uptrain.json,loss.png} "/tmp/eval-$label/eval.json" "/tmp/uptrain-results/$label/"
done
tar -czf "$OUT/uptrain-results.tar.gz" -C /tmp/uptrain-results .
