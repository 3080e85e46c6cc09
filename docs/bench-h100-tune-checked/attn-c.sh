# Which attention kernel ONNX Runtime 1.31's GroupQueryAttention should run for 12 and 4 KV heads: its default
# (cuDNN's SDPA on the H100) against ORT_ENABLE_CUDNN_FLASH_ATTENTION=0; and for llama-160m at 12 heads the
# default with GEMM auto-tuning off (peak device memory with and without the tuning's buffer). bench files in $R/attn.
source samples/gpu_setup.sh
set +e +o pipefail
for shape in llama-160m pythia-160m; do for heads in 12 4; do
  random_model $shape $heads
  variants="default ORT_ENABLE_CUDNN_FLASH_ATTENTION=0"
  [[ $shape$heads == llama-160m12 ]] && variants="$variants ORT_CUDA_GEMM_AUTO_TUNE=0"
  for v in $variants; do
    tag=$shape-$heads-$(echo ${v%=*} | tr -dc 'A-Z' | tail -c 8)
    env KV_UNUSED=1 ${v/default/} timeout 100 python3 -m kvexport bench --model /tmp/$shape-kv$heads --share none \
      --backends ort-static --cuda-graph --batch 1 64 --context 128 2048 --steps 32 --warmup 8 --output /tmp/a-$tag \
      >/tmp/a.log 2>&1 || tail -3 /tmp/a.log
    grep "^| ort-static" /tmp/a-$tag/bench.md | cut -d'|' -f4-7,11 | sed "s/^/$shape kv$heads $v /"
    mkdir -p $R/attn/$tag; cp /tmp/a-$tag/bench.{json,md} $R/attn/$tag/
    echo "  at $SECONDS s"
  done
done; done
