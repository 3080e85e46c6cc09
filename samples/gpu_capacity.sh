#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: each strategy's computed max batch in a 16 GiB budget, allocated and
# measured (a shape, llama-160m by default, at 12 and 4 KV heads, context 2048). Results in $OUT/cap12, $OUT/cap4.
source samples/gpu_setup.sh
shape=${1:-llama-160m}
trap 'tail -n 20 /tmp/*.log' ERR
for heads in 12 4; do
  random_model "$shape" "$heads"
  python3 -m kvexport bench --model "/tmp/$shape-kv$heads" --share none every:2 --backends ort-static --allocate \
    --batch 1 --context 2048 --steps 4 --warmup 2 --memory-budget-gib 16 --output "/tmp/cap$heads" \
    >"/tmp/cap$heads.log" 2>&1
  cat "/tmp/cap$heads/bench.md"
  mkdir -p "$OUT/cap$heads" && cp /tmp/cap"$heads"/bench.json /tmp/cap"$heads"/bench.md "$OUT/cap$heads/"
done
