#!/usr/bin/env bash
# On a machine with several GPUs: uptraining under torchrun with FSDP2 (docs/cli.md), each run timed by
# samples/measure.py into $OUT/measure.jsonl (peak device memory is the busiest GPU's). Needs only torch there and
# .train/ carried (python samples/train_tiny.py extract / texts).
#   bash samples/gpu_fsdp.sh scaling        # pythia-1.4b, every:2, the same global batch on 1, 2 and 4 GPUs
#   bash samples/gpu_fsdp.sh llama-7b       # Llama-2-7B shape, full fine-tuning on 4 GPUs, killed and resumed
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
measure() { label=$1; shift; python3 samples/measure.py --label "$label" --log "$OUT/measure.jsonl" -- "$@"; }
uptrain() {  # processes model output extra...
  local processes=$1 model=$2 output=$3; shift 3
  torchrun --standalone --nproc-per-node "$processes" -m kvexport uptrain --model "$model" --share every:2 \
    --data .train/train.txt --eval-data .train/select.txt --batch-size 32 --length 256 --eval-windows 16 \
    -o "$output" "$@" 2>&1 | grep -v "uptrain:" | tail -2
}
record() {  # output name: the run's record without its per-step losses
  python3 -c "import json; r = json.load(open('$1/kvexport_uptrain.json')); \
r['history'] = [h for h in r['history'] if 'heldout_ppl' in h]; print(json.dumps(r))" > "$OUT/$2.json"
}
case $1 in
scaling)
  [ -d /tmp/pythia-1.4b ] || python3 samples/make_random_model.py pythia-1.4b /tmp/pythia-1.4b
  for gpus in 1 2 4; do
    measure "pythia-1.4b-$gpus-gpus" uptrain "$gpus" /tmp/pythia-1.4b "/tmp/p14-$gpus" --steps 40 --eval-every 20
    record "/tmp/p14-$gpus" "pythia-1.4b-$gpus-gpus"
  done
  ;;
llama-7b)
  [ -d /tmp/llama-7b ] || python3 samples/make_random_model.py llama-7b /tmp/llama-7b
  measure llama-7b-4-gpus uptrain 4 /tmp/llama-7b /tmp/l7-ref --steps 30 --eval-every 10 --gradient-checkpointing
  record /tmp/l7-ref llama-7b-4-gpus
  # the same run killed once its first state is saved, then resumed: its history must be the one above
  (uptrain 4 /tmp/llama-7b /tmp/l7-full --steps 30 --eval-every 10 --gradient-checkpointing) &
  until [ -f /tmp/.l7-full.uptrain/state/progress.json ]; do sleep 1; done
  pkill -9 -f "kvexport uptrain" || true
  wait || true
  measure llama-7b-4-gpus-resumed uptrain 4 /tmp/llama-7b /tmp/l7-full --steps 30 --eval-every 10 \
    --gradient-checkpointing --resume
  record /tmp/l7-full llama-7b-4-gpus-resumed
  python3 -c "import json; a, b = (json.load(open(d + '/kvexport_uptrain.json'))['history'] for d in \
('/tmp/l7-ref', '/tmp/l7-full')); print('resumed history (every step) equal:', a == b)"
  rm -rf /tmp/l7-ref
  python3 -m kvexport --model /tmp/l7-full --share /tmp/l7-full/strategy.json --dtype float16 --max-new-tokens 0 \
    --output /tmp/l7-export 2>&1 | tail -2
  ;;
esac
