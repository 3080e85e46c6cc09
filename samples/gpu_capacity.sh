#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: each strategy's computed max batch in a 16 GiB budget, allocated and
# measured (llama-160m shape at 12 and 4 KV heads, context 2048). Results in $OUT/cap12 and $OUT/cap4.
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for heads in 12 4; do
  python3 samples/make_random_model.py llama-160m "/tmp/l160-kv$heads" --kv-heads "$heads" >/dev/null 2>&1
  python3 -m kvexport bench --model "/tmp/l160-kv$heads" --share none every:2 --backends ort-static --allocate \
    --batch 1 --context 2048 --steps 4 --warmup 2 --memory-budget-gib 16 --output "/tmp/cap$heads" 2>&1 \
    | grep -A12 "^Max batch"
  mkdir -p "$OUT/cap$heads" && cp /tmp/cap"$heads"/bench.json /tmp/cap"$heads"/bench.md "$OUT/cap$heads/"
done
