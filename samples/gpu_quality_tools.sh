#!/usr/bin/env bash
# On the GPU machine: the quality tools at real sizes (docs/results.md), each timed by samples/measure.py (wall
# time, peak host and device memory) into $OUT/measure.jsonl. Needs only torch there (no ONNX Runtime GPU build)
# and, for the uptraining parts, .train/ carried (python samples/train_tiny.py extract / texts).
#   bash samples/gpu_quality_tools.sh real     # Llama-2-7B shape: search, eval of 3 strategies, LoRA uptraining
#   bash samples/gpu_quality_tools.sh heads    # Llama-2-7B shape: compress-heads --kv-heads 8
#   bash samples/gpu_quality_tools.sh small    # pythia-1.4b full uptraining on one GPU; tiny-neox LoRA vs full
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
measure() { label=$1; shift; python3 samples/measure.py --label "$label" --log "$OUT/measure.jsonl" -- "$@"; }
seven() { [ -d /tmp/llama-7b ] || python3 samples/make_random_model.py llama-7b /tmp/llama-7b; }
case $1 in
real)
  seven
  measure search-7b python3 -m kvexport search --model /tmp/llama-7b --shared-layers 8 --device cuda \
    -o /tmp/search-7b.json 2>&1 | grep -v "kvsharer search:"
  cp /tmp/search-7b.json "$OUT/"
  measure eval-7b python3 -m kvexport eval --model /tmp/llama-7b --share every:2 /tmp/search-7b.json --device cuda \
    --output /tmp/eval-7b 2>&1 | grep "^|"
  cp /tmp/eval-7b/eval.json "$OUT/eval-7b.json"
  measure lora-7b python3 -m kvexport uptrain --model /tmp/llama-7b --share every:2 --lora 16 \
    --gradient-checkpointing --data .train/select.txt --steps 12 --batch-size 16 --length 256 --eval-every 100 \
    --eval-windows 16 -o /tmp/lora-7b 2>&1 | grep -v "uptrain:"
  python3 -c "import json; r = json.load(open('/tmp/lora-7b/kvexport_uptrain.json')); r.pop('history'); \
print(json.dumps(r))" > "$OUT/lora-7b.json"
  rm -rf /tmp/lora-7b  # 13.5 GB of disk, for the compress-heads part
  ;;
heads)
  seven
  measure compress-heads-7b python3 -m kvexport compress-heads --model /tmp/llama-7b --kv-heads 8 --device cuda \
    -o /tmp/heads-7b 2>&1 | grep -v "fitting layers:"
  cp /tmp/heads-7b/kvexport_compression.json "$OUT/compress-heads-7b.json"  # per-layer errors and seconds by phase
  ;;
small)
  python3 samples/make_random_model.py pythia-1.4b /tmp/pythia-1.4b
  measure full-pythia-1.4b python3 -m kvexport uptrain --model /tmp/pythia-1.4b --share every:2 \
    --data .train/select.txt --steps 12 --batch-size 16 --length 256 --eval-every 100 --eval-windows 16 \
    -o /tmp/full-p14 2>&1 | grep -v "uptrain:"
  python3 -c "import json; r = json.load(open('/tmp/full-p14/kvexport_uptrain.json')); r.pop('history'); \
print(json.dumps(r))" > "$OUT/full-pythia-1.4b.json"
  for run in "full" "lora --lora 16 --lr 1e-3"; do
    name=${run%% *}; flags=${run#"$name"}
    # shellcheck disable=SC2086
    measure "$name-tiny-neox" python3 -m kvexport uptrain --model tiny-neox --share every:2 $flags \
      --data .train/train.txt --eval-data .train/select.txt --steps 1500 --batch-size 32 --length 256 \
      --eval-every 100 --patience 4 -o "/tmp/$name-tiny" 2>&1 | grep -v "uptrain:" | tail -2
    python3 -m kvexport eval --model "/tmp/$name-tiny" --share "/tmp/$name-tiny/strategy.json" --device cuda \
      --output "/tmp/eval-$name-tiny" 2>&1 | grep "^|"
    cp "/tmp/eval-$name-tiny/eval.json" "$OUT/eval-$name-tiny-neox.json"
    cp "/tmp/$name-tiny/kvexport_uptrain.json" "$OUT/uptrain-$name-tiny-neox.json"
  done
  ;;
esac
