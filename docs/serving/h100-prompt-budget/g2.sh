# Session of 2026-12-07 (tenth), second machine: the long-tailed load on one machine with commit df03e7d's engine:
# none, every:2 continuous and static, then every:2 continuous with the first-prompt budget line reverted (A/B).
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/resh; mkdir -p $R/new $R/old; SECONDS=0
OUT=$R/new SERVER_LOAD=tail API_SERVERS=4 HTTP_REQUESTS=6000 \
  SERVER_RUNS="none-continuous every2-continuous every2-static" timeout 300 bash samples/gpu_serving.sh server 2>&1 \
  | grep "http\|Error\|error"; echo "new at $SECONDS s"
sed -i 's/(len(fresh) >= batch_at and size > budget)/(fresh and size > budget)/' runtime/engine.py
rm -f /tmp/load-*.json
OUT=$R/old SERVER_LOAD=tail API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="every2-continuous" \
  timeout $((400 - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep "http\|Error\|error"; echo "old at $SECONDS s"
sed -i 's/(fresh and size > budget)/(len(fresh) >= batch_at and size > budget)/' runtime/engine.py
cp $R/new/*.json $OUT/; for f in $R/old/*.json; do cp $f $OUT/old-$(basename $f); done
