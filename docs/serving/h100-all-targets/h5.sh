# Session of 2026-12-07 (thirteenth): issue 13 on another H100, code of a0461b9 (unchanged since): the long-tailed
# load with 12,000 requests, none then every:2, continuous; then, with the time left, the uniform load with 6,000.
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/resh; mkdir -p $R/tail $R/uniform; SECONDS=0; DEADLINE=${DEADLINE:-300}
OUT=$R/tail SERVER_LOAD=tail API_SERVERS=4 HTTP_REQUESTS=12000 SERVER_RUNS="none-continuous every2-continuous" \
  timeout $DEADLINE bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "tail at $SECONDS s"
cp $R/tail/*.json $OUT/
(( SECONDS + 170 < DEADLINE )) || exit 0
OUT=$R/uniform API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="none-continuous every2-continuous" \
  timeout $((DEADLINE - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "uniform at $SECONDS s"
cp $R/uniform/*.json $OUT/
