# Session of 2026-12-06 (seventh), commit with arena_extend_strategy kSameAsRequested: peak device memory and step
# time with GEMM tuning on and off, and with the arena's default (next power of two) as before (the option removed
# from runtime/ort_session.py for those runs), llama-160m and pythia-160m at 12 KV heads; then the GPU checks.
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/res3; mkdir -p $R /tmp/o3; SECONDS=0
cp runtime/ort_session.py /tmp/ort_session.py.new
for shape in llama-160m pythia-160m; do
  random_model $shape 12
  for v in default ORT_CUDA_GEMM_AUTO_TUNE=0 arena-pow2; do
    tag=$shape-$(echo ${v%=*} | tr -dc 'a-zA-Z' | tail -c 8)
    [[ $v == arena-pow2 ]] && sed -i 's/ "arena_extend_strategy": "kSameAsRequested",//' runtime/ort_session.py
    grep -c kSameAsRequested runtime/ort_session.py
    e=KV_UNUSED=1; [[ $v == *=* ]] && e=$v
    env $e timeout 100 python3 -m kvexport bench --model /tmp/$shape-kv12 \
      --share none --backends ort-static --cuda-graph --batch 1 64 --context 128 2048 --steps 32 --warmup 8 \
      --output /tmp/c-$tag >/tmp/c.log 2>&1 || tail -3 /tmp/c.log
    cp /tmp/ort_session.py.new runtime/ort_session.py
    grep "^| ort-static" /tmp/c-$tag/bench.md | cut -d'|' -f4-7,11,12 | sed "s/^/$shape $v /"
    mkdir -p $R/mem/$tag; cp /tmp/c-$tag/bench.{json,md} $R/mem/$tag/; tar -czf $OUT/res.tar.gz -C $R .
    echo "  at $SECONDS s"
  done
done
OUT=/tmp/o3 timeout 100 bash samples/gpu_checks.sh 2>&1 | grep -v "Memcpy" | grep "greedy\|summary" ; mkdir -p $R/checks; mv /tmp/o3/* $R/checks/; tar -czf $OUT/res.tar.gz -C $R .; echo "checks done at $SECONDS s"
