#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: each strategy's computed max batch in a 16 GiB budget, allocated and
# measured (a shape, llama-160m by default, at 12 and 4 KV heads, context 2048). Results in $OUT/cap12, $OUT/cap4.
# KV_CACHE=int8 measures both strategies with an int8 cache too (12 KV heads), in $OUT/cap12-int8.
source samples/gpu_setup.sh
shape=${1:-llama-160m}
trap 'tail -n 20 /tmp/*.log' ERR
capacity() {  # name heads extra-flags...
  python3 -m kvexport bench --model "/tmp/$shape-kv$2" --share none every:2 --backends ort-static --allocate \
    --batch 1 --context 2048 --steps 4 --warmup 2 --memory-budget-gib 16 --output "/tmp/$1" "${@:3}" \
    >"/tmp/$1.log" 2>&1
  cat "/tmp/$1/bench.md"
  mkdir -p "$OUT/$1" && cp "/tmp/$1/bench.json" "/tmp/$1/bench.md" "$OUT/$1/"
}
for heads in 12 4; do
  random_model "$shape" "$heads"
  capacity "cap$heads" "$heads"
done
[ -z "${KV_CACHE:-}" ] || capacity "cap12-$KV_CACHE" 12 --kv-cache "$KV_CACHE"
