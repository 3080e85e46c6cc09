# Session of 2026-12-07 (eleventh), call A: issue 13 with the engine moving requests to lower rows (this commit):
# the long-tailed load with 12,000 requests (the final drain weighs half as much as with 6,000), then the uniform
# load with 6,000; none then every:2, continuous.
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/resh; mkdir -p $R/tail $R/uniform; SECONDS=0
OUT=$R/tail SERVER_LOAD=tail API_SERVERS=4 HTTP_REQUESTS=12000 SERVER_RUNS="none-continuous every2-continuous" \
  timeout 330 bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "tail at $SECONDS s"
cp $R/tail/*.json $OUT/
OUT=$R/uniform API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="none-continuous every2-continuous" \
  timeout $((550 - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "uniform at $SECONDS s"
cp $R/uniform/*.json $OUT/
