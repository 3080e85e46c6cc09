#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: the serving figures of docs/results.md. pythia-160m shape (random fp16 weights), `none`
# with 32 slots and `every:2` with 64 slots of 1024 tokens (the same KV bytes: 1152 MiB), continuous and static
# batching, under loads of the shipped held-out text's prompts (1 to 60 words): short answers (8 to 64 new tokens,
# uniform; more prompt tokens than new ones), long ones (64 to 512, uniform) and long-tailed ones (16 to 896,
# log-uniform: median 117, mean 219). First the engine alone (samples/engine_bench.py, the engine in its own process
# as the server runs it), then, for the long answers (SERVER_LOAD=tail: the long-tailed ones), through `kvexport
# serve` over loopback with an open-loop load (samples/load_test.py). The server part needs fastapi and uvicorn on
# that machine, which reaches no registry and gets neither from .gpu/stage.sh: carry their wheels in .whl (pip
# download fastapi uvicorn and their dependencies, which for fastapi 0.165 include opentelemetry-api and
# importlib-metadata; see the device tool's README); without them it is skipped. STREAM_INTERVAL=N passes
# --stream-interval N to the server, API_SERVERS=N --api-servers N (default 1), LOAD_PROCESSES=N runs the load from N
# processes (default 4: one reads about 20k events/s), CONCURRENCY=N caps the load's connections (default 96),
# HTTP_REQUESTS=N sends N requests (default 2000; more weigh the load's start and end less), SERVER_RUNS and
# ENGINE_RUNS pick runs by name, ENGINE_LOADS loads (short, long, tail), STEPS_IN_FLIGHT=N passes --steps-in-flight N
# to the engine (default 2), PREFILL_BATCH=N caps the engine part's batches of first prompts at N (engine_bench.py
# --prefill-batch; the engine also waits for fewer new prompts before running a batch), PY_SPY=1 (py-spy carried in
# .whl too) samples the stacks of each thread of the server's processes, native and idle frames included, for 8 s from
# 8 s into each load: where the engine's host time goes. SHAPE=NAME serves another random-weight shape (default
# pythia-160m; llama-7b for the 7B figures), ROWS=N gives `none` N rows and `every:2` 2N (default 32), LENGTH=N tokens
# per row (default 1024) and RATE=N the load's requests per second (default 400). KV_CACHE=int8 exports `every:2` with
# an int8 cache and gives it 4N rows (the same KV bytes as `none`'s N rows in float16). Results in $OUT.
source samples/gpu_setup.sh
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PATH=/tmp/site/bin:$PATH  # py-spy's binary, when carried
fi
# the model and its exports are kept from an earlier invocation on the same machine
model=/tmp/${SHAPE:-pythia-160m} rows=${ROWS:-32} length=${LENGTH:-1024} rate=${RATE:-400}
[ -d "$model" ] || python3 samples/make_random_model.py "${SHAPE:-pythia-160m}" "$model" >/dev/null
every2=$model-every2${KV_CACHE:+-$KV_CACHE} every2_rows=$((${KV_CACHE:+2 *} 2 * rows))
export_once() {  # output share flags...
  [ -d "$1" ] || python3 -m kvexport export --model "$model" --share "$2" --dtype float16 --max-new-tokens 0 \
    --output "$1" "${@:3}" 2>&1 | grep -v Memcpy | tail -1
}
export_once "$model-none" none
export_once "$every2" every:2 ${KV_CACHE:+--kv-cache $KV_CACHE}
declare -A NEW_TOKENS=([short]="8 64" [long]="64 512" [tail]="16 896")
declare -A SPREAD=([short]=uniform [long]=uniform [tail]=log-uniform)
declare -A REQUESTS=([short]=1024 [long]=512 [tail]=512)
run_engine() {  # name export slots batching load
  python3 samples/engine_bench.py "$2" --provider cuda --cuda-graph --max-slots "$3" --max-length "$length" \
    --requests "${REQUESTS[$5]}" --new-tokens ${NEW_TOKENS[$5]} --spread ${SPREAD[$5]} --batching "$4" --process \
    ${STEPS_IN_FLIGHT:+--steps-in-flight $STEPS_IN_FLIGHT} \
    ${PREFILL_BATCH:+--prefill-batch $PREFILL_BATCH} --output "/tmp/engine-$1-$5.json" 2>&1 | grep -v Memcpy \
    | python3 -c "import json,sys; r=json.loads(sys.stdin.read()); e=r['engine']; print('$1 $5', round(r['tokens_per_s']), 'tok/s, saturated', round(r['saturated_tokens_per_s']), 'tpot p50/p99', round(r['tpot_p50_ms'],2), round(r['tpot_p99_ms'],2), 'ms, steady step', round(e['steady_step_ms'],3), 'graph', round(e['steady_graph_step_ms'],3), 'overhead', round(e['scheduler_overhead'],3), 'steps', e['decode_steps'], 'loop/prefill/queue/device wait/delivery s', *(round(e[k + '_seconds'], 2) for k in ('loop', 'prefill', 'queue', 'device_wait', 'delivery')), 'device decode/prefill s', *(round(e[k + '_device_seconds'], 2) for k in ('decode', 'prefill')))"
}
parts=${*:-engine server}  # bash samples/gpu_serving.sh [engine] [server]
if [[ $parts == *engine* ]]; then
  runs=${ENGINE_RUNS:-none-continuous every2-continuous every2-static}
  for load in ${ENGINE_LOADS:-short long}; do
    [[ $runs == *none-continuous* ]] && run_engine none-continuous "$model-none" "$rows" continuous $load
    [[ $runs == *every2-continuous* ]] && run_engine every2-continuous "$every2" "$every2_rows" continuous $load
    [[ $runs == *every2-static* ]] && run_engine every2-static "$every2" "$every2_rows" static $load
  done
  cp /tmp/engine-*.json "$OUT/"
fi
[[ $parts == *server* ]] || exit 0
python3 -c "import fastapi, uvicorn" || { echo "server part skipped: fastapi/uvicorn do not import (carry .whl)"; exit 0; }
interval=${STREAM_INTERVAL:-1}  # tokens per streamed event, at least (kvexport serve --stream-interval)
api=${API_SERVERS:-1}
requests=${HTTP_REQUESTS:-2000}
load=${SERVER_LOAD:-long}
tag=i$interval-a$api-c${CONCURRENCY:-96}-r$requests${STEPS_IN_FLIGHT:+-f$STEPS_IN_FLIGHT}-$load
run_server() {  # name export slots batching rate
  python3 -m kvexport serve "$2" --provider cuda --cuda-graph --max-slots "$3" --max-length "$length" --batching "$4" \
    --max-queue 4096 --model-name m --port 8000 --stream-interval "$interval" --api-servers "$api" \
    ${STEPS_IN_FLIGHT:+--steps-in-flight $STEPS_IN_FLIGHT} >/tmp/serve-$1.log 2>&1 &
  pid=$!
  until curl -sf localhost:8000/health >/dev/null; do  # a server that failed to start ends the script
    kill -0 $pid 2>/dev/null || { cat /tmp/serve-$1.log; exit 1; }; sleep 0.5
  done
  if [[ ${PY_SPY:-0} == 1 ]]; then
    (sleep 8; for child in $(python3 -c "import sys; sys.path.insert(0, 'samples'); from load_test import children
print(*children($pid))"); do
       py-spy record -p "$child" -d 8 -r 200 --native --idle --threads -f raw -o "/tmp/spy-$1-$tag-$child.txt" \
         >/dev/null 2>&1 &
     done; wait) &
  fi
  # 96 clients: more requests in flight than the 64 slots of every:2, which 32 clients never filled (2026-11-25)
  python3 samples/load_test.py --url http://127.0.0.1:8000 --model m --requests "$requests" --rate "$5" \
    --concurrency "${CONCURRENCY:-96}" \
    --new-tokens ${NEW_TOKENS[$load]} --spread ${SPREAD[$load]} --server-pid $pid --ignore-eos \
    --processes "${LOAD_PROCESSES:-4}" \
    --output "/tmp/load-$1-$tag.json" >/dev/null
  # CPU seconds of each of the server's processes (the engine, the API servers): which one bounds the load
  python3 -c "import os,sys; sys.path.insert(0, 'samples'); from load_test import children; from pathlib import Path
print('$1 cpu s', sorted(round(sum(map(int, Path(f'/proc/{k}/stat').read_text().rsplit(')', 1)[1].split()[11:13]))
      / os.sysconf('SC_CLK_TCK'), 1) for k in children($pid)))"
  kill -TERM $pid; wait $pid || true
  grep -v "^\s*$" /tmp/serve-$1.log | tail -n 3
  python3 -c "import json; r=json.load(open('/tmp/load-$1-$tag.json')); print('$1 $tag http', round(r['served_tokens_per_s']), 'tok/s, tpot p50/p99 ms', round(1e3*r['tpot_p50_s'],2), round(1e3*r['tpot_p99_s'],2), 'ttft p50/p99 s', round(r['ttft_p50_s'],3), round(r['ttft_p99_s'],3), 'errors', r['errors'], 'moved', r['server_metrics'].get('kvexport_rows_moved'), 'overhead', r['server_metrics'].get('kvexport_scheduler_overhead'), 'tokens/step', round(r['server_metrics']['kvexport_generated_tokens'] / max(1, r['server_metrics']['kvexport_decode_steps']), 1), 'loop/prefill/queue/device wait/delivery s', *(round(r['server_metrics'].get(f'kvexport_{k}_seconds', 0), 2) for k in ('loop', 'prefill', 'queue', 'device_wait', 'delivery')), 'device decode/prefill s', *(round(r['server_metrics'].get(f'kvexport_{k}_device_seconds', 0), 2) for k in ('decode', 'prefill')))"
}
runs=${SERVER_RUNS:-none-continuous every2-continuous every2-static}
[[ $runs == *none-continuous* ]] && run_server none-continuous "$model-none" "$rows" continuous "$rate"
[[ $runs == *every2-continuous* ]] && run_server every2-continuous "$every2" "$every2_rows" continuous "$rate"
[[ $runs == *every2-static* ]] && run_server every2-static "$every2" "$every2_rows" static "$rate"
cp /tmp/load-*-$tag.json "$OUT/"
if ls /tmp/spy-*-$tag-*.txt >/dev/null 2>&1; then tar -czf "$OUT/spy-$tag.tar.gz" -C /tmp $(cd /tmp && ls spy-*-$tag-*.txt); fi
