# Session of 2026-12-06 (seventh), commit with GEMM auto-tuning on by default: the GPU checks of both shipped models,
# the attention-kernel comparison (with peak memory, tuning on and off), then issue 16's llama-160m peers run,
# until DEADLINE seconds. Results in $OUT/res.tar.gz after each step.
set +e
nvidia-smi --query-gpu=name --format=csv,noheader
export R=/tmp/res; mkdir -p $R /tmp/o
keep() { mkdir -p $R/$1; mv /tmp/o/* $R/$1/ 2>/dev/null; tar -czf $OUT/res.tar.gz -C $R .; }
SECONDS=0
OUT=/tmp/o timeout 100 bash samples/gpu_checks.sh 2>&1 | grep -v "Memcpy" | tail -30; keep checks; echo "checks done at $SECONDS s"
timeout 300 bash .gpu/work/attn-c.sh; keep attn; echo "attention kernels done at $SECONDS s"
OUT=/tmp/o timeout $((${DEADLINE:-585} - SECONDS)) bash samples/gpu_peers.sh llama-160m; keep peers; echo "llama peers done at $SECONDS s"
