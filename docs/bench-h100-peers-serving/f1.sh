# Written in the eighth session, run in the ninth (2026-12-07, commit 2fce2a7), main: pythia-160m against transformers + torch.compile with the GEMM tuning and the
# arena setting (its last table is from 3113eaa), one kvexport bench run and a profile; then issue 13's uniform load
# through the server again, every:2 (64 slots) against none (32 slots) in the same KV memory.
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
DEADLINE=${DEADLINE:-300}; R=/tmp/resf; mkdir -p $R/peers $R/serving; SECONDS=0
OUT=$R/peers timeout 200 bash samples/gpu_peers.sh pythia-160m 2>&1 | grep -v "Memcpy\|_warn_once\|UserWarning"
tar -czf $OUT/res.tar.gz -C $R .; echo "peers done at $SECONDS s"
OUT=$R/serving API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="none-continuous every2-continuous" \
  timeout $((DEADLINE - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep -v Memcpy
tar -czf $OUT/res.tar.gz -C $R .; echo "serving done at $SECONDS s"
