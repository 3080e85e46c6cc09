#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: issue #13's H100 figures. pythia-160m shape (random fp16 weights),
# `none` with 32 slots and `every:2` with 64 slots of 1024 tokens (the same KV bytes: 2.25 GiB), continuous and
# static batching; first the engine alone (samples/engine_bench.py), then through `kvexport serve` over loopback
# with an open-loop load (samples/load_test.py). The server part needs fastapi and uvicorn on that machine, which
# reaches no registry and gets neither from .gpu/stage.sh: carry their wheels in .whl (pip download fastapi uvicorn
# and their dependencies; see the device tool's README); without them it is skipped. Results in $OUT.
source samples/gpu_setup.sh
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
python3 samples/make_random_model.py pythia-160m /tmp/p160 >/dev/null
for s in none every:2; do
  python3 -m kvexport export --model /tmp/p160 --share $s --dtype float16 --static --max-new-tokens 0 \
    --output /tmp/p160-${s/:/} 2>&1 | grep -v Memcpy | tail -1
done
run_engine() {  # name export slots batching
  python3 samples/engine_bench.py "$2" --provider cuda --cuda-graph --max-slots "$3" --max-length 1024 \
    --requests 1024 --batching "$4" --output "/tmp/engine-$1.json" 2>&1 | grep -v Memcpy \
    | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); e=r['engine']; print('$1', round(r['tokens_per_s']), 'tok/s, tpot p50/p99', round(r['tpot_p50_ms'],2), round(r['tpot_p99_ms'],2), 'ms, steady step', round(e['steady_step_ms'],3), 'graph', round(e['steady_graph_step_ms'],3), 'overhead', round(e['scheduler_overhead'],3), 'steps', e['decode_steps'])"
}
parts=${*:-engine server}  # bash samples/gpu_serving.sh [engine] [server]
if [[ $parts == *engine* ]]; then
  run_engine none-continuous /tmp/p160-none 32 continuous
  run_engine every2-continuous /tmp/p160-every2 64 continuous
  run_engine every2-static /tmp/p160-every2 64 static
  cp /tmp/engine-*.json "$OUT/"
fi
[[ $parts == *server* ]] || exit 0
python3 -c "import fastapi, uvicorn" || { echo "server part skipped: fastapi/uvicorn do not import (carry .whl)"; exit 0; }
run_server() {  # name export slots batching rate
  python3 -m kvexport serve "$2" --provider cuda --cuda-graph --max-slots "$3" --max-length 1024 --batching "$4" \
    --max-queue 4096 --model-name m --port 8000 >/tmp/serve-$1.log 2>&1 &
  pid=$!
  until curl -sf localhost:8000/health >/dev/null; do  # a server that failed to start ends the script
    kill -0 $pid 2>/dev/null || { cat /tmp/serve-$1.log; exit 1; }; sleep 0.5
  done
  # 96 clients: more requests in flight than the 64 slots of every:2, which 32 clients never filled (2026-11-25)
  python3 samples/load_test.py --url http://127.0.0.1:8000 --model m --requests 3000 --rate "$5" --concurrency 96 \
    --server-pid $pid --ignore-eos --output "/tmp/load-$1.json" >/dev/null
  kill -TERM $pid; wait $pid || true
  grep -v "^\s*$" /tmp/serve-$1.log | tail -n 3
  python3 -c "import json; r=json.load(open('/tmp/load-$1.json')); print('$1 http', r['served_tokens_per_s'], 'tok/s, tpot p50/p99 s', r['tpot_p50_s'], r['tpot_p99_s'], 'errors', r['errors'], 'overhead', r['server_metrics'].get('kvexport_scheduler_overhead'))"
}
run_server none-continuous /tmp/p160-none 32 continuous 400
run_server every2-continuous /tmp/p160-every2 64 continuous 400
run_server every2-static /tmp/p160-every2 64 static 400
cp /tmp/load-*.json "$OUT/"
