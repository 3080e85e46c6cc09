# Session of 2026-12-06 (seventh), same machine right after a7.sh: issue 13 on the long-tailed load (16 to 896 new
# tokens, log-uniform) beside the uniform long one: the engine alone, then through the server. Results in
# $OUT/res.tar.gz after each step.
set +e
nvidia-smi --query-gpu=name --format=csv,noheader
export R=/tmp/res2; mkdir -p $R /tmp/o2
keep() { mkdir -p $R/$1; mv /tmp/o2/* $R/$1/ 2>/dev/null; tar -czf $OUT/res.tar.gz -C $R .; }
SECONDS=0
OUT=/tmp/o2 ENGINE_LOADS=tail timeout 200 bash samples/gpu_serving.sh engine 2>&1 | grep -v Memcpy; keep engine-tail; echo "engine tail done at $SECONDS s"
OUT=/tmp/o2 SERVER_LOAD=tail API_SERVERS=4 HTTP_REQUESTS=6000 timeout 240 bash samples/gpu_serving.sh server 2>&1 | grep -v Memcpy; keep server-tail; echo "server tail done at $SECONDS s"
OUT=/tmp/o2 API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="none-continuous every2-continuous" timeout $((${DEADLINE:-585} - SECONDS)) bash samples/gpu_serving.sh server 2>&1 | grep -v Memcpy; keep server-long; echo "server long done at $SECONDS s"
