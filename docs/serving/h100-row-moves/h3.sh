# Call C, the same machine: the uniform load again, every:2 first then none (the reverse of call A's order).
source samples/gpu_setup.sh
set +e +o pipefail
SECONDS=0; R=/tmp/resh; mkdir -p $R/uniform2
OUT=$R/uniform2 API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="every2-continuous" \
  timeout 200 bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "every2 at $SECONDS s"
OUT=$R/uniform2 API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="none-continuous" \
  timeout $((380 - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "none at $SECONDS s"
for f in $R/uniform2/*long.json; do cp $f $OUT/again-$(basename $f); done
