#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh (onnxruntime-gpu and GenAI in /tmp/site): one `kvexport bench` run per
# benchmark shape against both peers (GenAI's left out where it was not staged), then a kernel profile of kvexport's
# static graph. Results land in $OUT.
#   bash samples/gpu_peers.sh llama-160m     # or pythia-160m, llama-7b
#   WEIGHTS=int4 BATCHES=1 CONTEXTS=2048 bash samples/gpu_peers.sh llama-7b   # int4 projections against GenAI's int4
# PROFILE_POINTS sets the profile's batch x context points (default "1x128 64x2048"; 64 x 2048 of a 7B's cache is
# 64 GiB: give such shapes "1x2048").
#
# A shape of which two exports do not fit the disk (llama-13b: 26 GB each, GenAI's build as much again, 64 GiB):
# LARGEST="none:28 every:2:56" benches each strategy in a run of its own at 1 x 2048, 16 x 2048 and the largest
# batch given for it, the model in /dev/shm, the peers beside `none` only (they cannot share a cache), each export
# removed before the next run, and the host memory of each run measured; no profile.
#   LARGEST="none:28 every:2:56" bash samples/gpu_peers.sh llama-13b     # an H100; "none:64 every:2:128" an H200
source samples/gpu_setup.sh
shape=$1
backends="ort-genai hf-compile ort-static"
python3 -c "import onnxruntime_genai" 2>/dev/null \
  || { backends="hf-compile ort-static"; echo "ONNX Runtime GenAI is not staged (gpu-pack --genai): no GenAI column"; }
mkdir -p "$OUT/$shape"
if [ -n "${LARGEST:-}" ]; then
  model=/dev/shm/$shape
  [ -d "$model" ] || python3 samples/make_random_model.py "$shape" "$model" >/dev/null 2>&1
  for run in $LARGEST; do
    share=${run%:*} largest=${run##*:} name=${run%:*}; name=${name/:/}
    runs_peers=$([ "$share" = none ] && echo "$backends" || echo ort-static)
    # shellcheck disable=SC2086
    python3 samples/measure.py --label "$shape-$name" --log "$OUT/$shape/host.jsonl" -- python3 -m kvexport bench \
      --model "$model" --share "$share" --backends $runs_peers --cuda-graph --batch 1 16 "$largest" --context 2048 \
      --steps 32 --warmup 8 --output "/tmp/bench-$shape-$name" 2>&1 | grep -v "bench:"
    mkdir -p "$OUT/$shape/$name" && cp /tmp/bench-"$shape-$name"/bench.* /tmp/bench-"$shape-$name"/*.png "$OUT/$shape/$name/"
    rm -rf "/tmp/bench-$shape-$name/exports"
  done
  exit 0
fi
[ -d "/tmp/$shape" ] || python3 samples/make_random_model.py "$shape" "/tmp/$shape" >/dev/null 2>&1
python3 -m kvexport bench --model "/tmp/$shape" --share none every:2 --backends $backends ${WEIGHTS:+--weights $WEIGHTS} \
  --cuda-graph --batch ${BATCHES:-1 8 32 64} --context ${CONTEXTS:-128 2048} --steps 32 --warmup 8 \
  --output "/tmp/bench-$shape" 2>&1 \
  | grep -v "bench:"
cp /tmp/bench-"$shape"/bench.* /tmp/bench-"$shape"/*.png "$OUT/$shape/"
suffix=${WEIGHTS:+-$WEIGHTS}  # the bench names quantized exports so
# shellcheck disable=SC2086
python3 samples/profile_decode.py "/tmp/bench-$shape/exports/none$suffix" "/tmp/bench-$shape/exports/every2$suffix" \
  --points ${PROFILE_POINTS:-1x128 64x2048} | tee "$OUT/$shape/profile.txt"
