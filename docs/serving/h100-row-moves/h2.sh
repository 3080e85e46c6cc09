# Call B, the same machine, the shipped weights in the tree: the GPU checks (the engine against the static graph,
# rows moved included); every:2 static on call A's long-tailed load (continuous / static); then every:2 continuous
# on that load with the moves turned off in place (A/B).
source samples/gpu_setup.sh
set +e +o pipefail
SECONDS=0
timeout 200 bash samples/gpu_checks.sh 2>&1 | grep -v Memcpy | grep -i "agreement\|equal\|moved\|error" ; echo "checks at $SECONDS s"
R=/tmp/resh; mkdir -p $R/static $R/off
OUT=$R/static SERVER_LOAD=tail API_SERVERS=4 HTTP_REQUESTS=12000 SERVER_RUNS="every2-static" \
  timeout $((540 - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "static at $SECONDS s"
cp $R/static/*.json $OUT/
sed -i 's/if self.batching != "continuous" or not used:/if True:/' runtime/engine.py; grep -c "if True:" runtime/engine.py
OUT=$R/off SERVER_LOAD=tail API_SERVERS=4 HTTP_REQUESTS=12000 SERVER_RUNS="every2-continuous" \
  timeout $((545 - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "off at $SECONDS s"
sed -i 's/if True:/if self.batching != "continuous" or not used:/' runtime/engine.py
for f in $R/off/*.json; do cp $f $OUT/off-$(basename $f); done
