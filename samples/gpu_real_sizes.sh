#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: the real-size measurements of docs/results.md, one part per run.
#   bash samples/gpu_real_sizes.sh export llama-7b     # random fp16 weights of the shape; export every:2, validated
#   bash samples/gpu_real_sizes.sh export llama-13b
#   bash samples/gpu_real_sizes.sh prefill             # pythia-1.4b at 16 x 2048: peak device memory and capacity
# Results are printed and copied to $OUT.
source samples/gpu_setup.sh
nproc; free -g | head -2; df -h /tmp | tail -1
case "$1" in
  export)
    python3 samples/make_random_model.py "$2" "/tmp/$2"
    python3 -m kvexport export --model "/tmp/$2" --share every:2 --dtype float16 --max-new-tokens 0 \
      --output "/tmp/$2.every2" 2>&1 | tee "$OUT/export-$2.txt"
    python3 -m kvexport inspect "/tmp/$2.every2" | tee -a "$OUT/export-$2.txt"
    rm -rf "/tmp/$2" "/tmp/$2.every2" ;;
  prefill)
    python3 samples/make_random_model.py pythia-1.4b /tmp/p14
    python3 -m kvexport bench --model /tmp/p14 --share none every:2 --backends ort-static --provider cuda --cuda-graph --allocate \
      --batch 16 --context 2048 --steps 8 --warmup 3 --memory-budget-gib 16 --output /tmp/p14-bench 2>&1 \
      | grep -v "^exporting"
    cp /tmp/p14-bench/bench.json /tmp/p14-bench/bench.md "$OUT/"
    bash samples/gpu_checks.sh ;;
esac
