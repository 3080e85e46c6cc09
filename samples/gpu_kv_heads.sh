#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: decode at 12 and at 4 KV heads (llama-160m shape), none and every:2,
# one machine, one call. Results land in $OUT/kv12 and $OUT/kv4.
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
for heads in 12 4; do
  python3 samples/make_random_model.py llama-160m "/tmp/l160-kv$heads" --kv-heads "$heads" >/dev/null 2>&1
  python3 -m kvexport bench --model "/tmp/l160-kv$heads" --share none every:2 --backends ort-static --cuda-graph \
    --batch 1 64 --context 2048 --steps 32 --warmup 8 --output "/tmp/kv$heads" 2>&1 | grep "^| ort\|^| none\|^| every"
  mkdir -p "$OUT/kv$heads" && cp /tmp/kv"$heads"/bench.json /tmp/kv"$heads"/bench.md "$OUT/kv$heads/"
done
