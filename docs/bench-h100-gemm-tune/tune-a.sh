# Session of 2026-12-06 (sixth): does ONNX Runtime 1.31's GEMM auto-tuning (tinygemm2 on SM 9.0 for M <= 64) speed
# up the static decode graph? Same exports, three settings, interleaved.
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
SECONDS=0
run() {  # tag shape heads env...
  local tag=$1 shape=$2 heads=$3; shift 3
  env "$@" timeout 150 python3 -m kvexport bench --model /tmp/$shape-kv$heads --share none --backends ort-static \
    --cuda-graph --batch 1 64 --context 128 2048 --steps 32 --warmup 8 --output /tmp/b-$tag-$shape-$heads \
    >/tmp/b-$tag-$shape-$heads.log 2>&1 || tail -5 /tmp/b-$tag-$shape-$heads.log
  grep "^| ort-static" /tmp/b-$tag-$shape-$heads/bench.md | cut -d'|' -f3-8 | sed "s/^/$tag $shape kv$heads /"
  mkdir -p $OUT/$tag-$shape-kv$heads; cp /tmp/b-$tag-$shape-$heads/bench.{json,md} $OUT/$tag-$shape-kv$heads/
  echo "  at $SECONDS s"
}
for shape in llama-160m pythia-160m; do
  for heads in 12 4; do
    random_model $shape $heads
    run base $shape $heads KV_UNUSED=1
    run tune $shape $heads ORT_CUDA_GEMM_AUTO_TUNE=1
    run replay $shape $heads ORT_CUDA_GEMM_AUTO_TUNE=1 ORT_CUDA_GEMM_GRAPH_REPLAY_TUNING=1
  done
done
ORT_CUDA_GEMM_AUTO_TUNE=1 timeout 60 python3 samples/profile_decode.py /tmp/b-tune-llama-160m-12/exports/none \
  2>&1 | grep -v Memcpy | tee $OUT/profile-tune-llama.txt | head -60
