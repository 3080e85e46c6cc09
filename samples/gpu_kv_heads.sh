#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: decode at 12 and at 4 KV heads, none and every:2, one shape per call
# (llama-160m or pythia-160m), then the same 64 x 2048 points with ONNX Runtime's XQA decode kernel off.
# Results land in $OUT/SHAPE-kv12, $OUT/SHAPE-kv4 and $OUT/SHAPE-kv*-noxqa.
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
for heads in 12 4; do
  ORT_ENABLE_XQA=0 python3 -m kvexport bench --model "/tmp/$shape-kv$heads" --share none --backends ort-static \
    --cuda-graph --batch 64 --context 2048 --steps 32 --warmup 8 --output "/tmp/$shape-kv$heads-noxqa" \
    >"/tmp/$shape-kv$heads-noxqa.log" 2>&1
  cat "/tmp/$shape-kv$heads-noxqa/bench.md"
  mkdir -p "$OUT/$shape-kv$heads-noxqa" && cp "/tmp/$shape-kv$heads-noxqa"/bench.json "$OUT/$shape-kv$heads-noxqa/"
done
