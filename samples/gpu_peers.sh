#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh (onnxruntime-gpu and GenAI in /tmp/site): one `kvexport bench` run per
# benchmark shape against both peers (GenAI's left out where it was not staged), then a kernel profile of kvexport's
# static graph. Results land in $OUT.
#   bash samples/gpu_peers.sh llama-160m     # or pythia-160m, llama-7b, llama-13b
#   WEIGHTS=int4 BATCHES=1 CONTEXTS=2048 bash samples/gpu_peers.sh llama-7b   # int4 projections against GenAI's int4
# PROFILE_POINTS sets the profile's batch x context points (default "1x128 64x2048"; 64 x 2048 of a 7B's cache is
# 64 GiB: give such shapes "1x2048").
source samples/gpu_setup.sh
shape=$1
[ -d "/tmp/$shape" ] || python3 samples/make_random_model.py "$shape" "/tmp/$shape" >/dev/null 2>&1
backends="ort-genai hf-compile ort-static"
python3 -c "import onnxruntime_genai" 2>/dev/null \
  || { backends="hf-compile ort-static"; echo "ONNX Runtime GenAI is not staged (gpu-pack --genai): no GenAI column"; }
python3 -m kvexport bench --model "/tmp/$shape" --share none every:2 --backends $backends ${WEIGHTS:+--weights $WEIGHTS} \
  --cuda-graph --batch ${BATCHES:-1 8 32 64} --context ${CONTEXTS:-128 2048} --steps 32 --warmup 8 \
  --output "/tmp/bench-$shape" 2>&1 \
  | grep -v "bench:"
mkdir -p "$OUT/$shape" && cp /tmp/bench-"$shape"/bench.* /tmp/bench-"$shape"/*.png "$OUT/$shape/"
suffix=${WEIGHTS:+-$WEIGHTS}  # the bench names quantized exports so
# shellcheck disable=SC2086
python3 samples/profile_decode.py "/tmp/bench-$shape/exports/none$suffix" "/tmp/bench-$shape/exports/every2$suffix" \
  --points ${PROFILE_POINTS:-1x128 64x2048} | tee "$OUT/$shape/profile.txt"
