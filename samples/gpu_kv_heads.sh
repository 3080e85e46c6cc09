#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: decode at 12 and at 4 KV heads, none and every:2, one shape per call
# (llama-160m or pythia-160m). Results land in $OUT/SHAPE-kv12 and $OUT/SHAPE-kv4.
source samples/gpu_setup.sh
shape=${1:-llama-160m}
trap 'tail -n 20 /tmp/*.log' ERR
for heads in 12 4; do
  random_model "$shape" "$heads"
  python3 -m kvexport bench --model "/tmp/$shape-kv$heads" --share none every:2 --backends ort-static --cuda-graph \
    --batch 1 64 --context 2048 --steps 32 --warmup 8 --output "/tmp/$shape-kv$heads-bench" >"/tmp/$shape-kv$heads.log" 2>&1
  cat "/tmp/$shape-kv$heads-bench/bench.md"
  mkdir -p "$OUT/$shape-kv$heads" && cp "/tmp/$shape-kv$heads-bench"/bench.{json,md} "$OUT/$shape-kv$heads/"
done
