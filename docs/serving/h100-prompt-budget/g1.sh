# Session of 2026-12-07 (tenth).
# 1. Issue 11: llama-160m with 4 KV heads has groups of 3 query heads, which ONNX Runtime's XQA decode kernel does not
#    take (cuDNN's attention runs, at 2.7 TB/s against 2.96 at 12 heads). Its query heads padded to groups of 4 (16
#    heads of 64, hidden 768; random weights, timing only) make XQA eligible. Bench the 12-head none, the 4-head
#    none, and the padded 4-head with XQA on and off.
# 2. Issue 13: the uniform serving load, none then every:2 with the engine's first-prompt batches no longer split by
#    the token budget, then every:2 again with the line reverted (an A/B on one machine).
# 3. Time left: the benches of 1 again, and a profile of the padded export with XQA.
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
R=/tmp/resg; mkdir -p $R; SECONDS=0; DEADLINE=${DEADLINE:-570}
random_model llama-160m 12; random_model llama-160m 4
python3 - <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, "samples")
from make_random_model import CONFIGS
from transformers import AutoTokenizer
from kvexport.exporter.checkpoint import write_random_checkpoint
from kvexport.models import DEFAULT_MODEL, shipped_directory
config_class, model_class, fields = CONFIGS["llama-160m"]
config = config_class(**{**fields, "num_attention_heads": 16, "head_dim": 64, "num_key_value_heads": 4}, dtype="float16")
write_random_checkpoint(model_class, config, Path("/tmp/llama-160m-kv4pad"))
AutoTokenizer.from_pretrained(shipped_directory(DEFAULT_MODEL)).save_pretrained("/tmp/llama-160m-kv4pad")
PY
echo "models at $SECONDS s"
bench() {  # NAME MODEL [VAR=VALUE ...]
  local name=$1 model=$2; shift 2
  env "$@" timeout 100 python3 -m kvexport bench --model $model --share none --backends ort-static --cuda-graph \
    --batch 1 64 --context 128 2048 --steps 32 --warmup 8 --output $R/$name >$R/$name.log 2>&1 || tail -3 $R/$name.log
  grep "^| ort-static" $R/$name/bench.md | cut -d'|' -f4-7 | tr '\n' ';' | sed "s/^/$name: /"; echo " at $SECONDS s"
  tar -czf $OUT/res.tar.gz -C $R .
}
benches() {
  bench kv12-$1 /tmp/llama-160m-kv12
  bench kv4-$1 /tmp/llama-160m-kv4
  bench kv4pad-xqa-$1 /tmp/llama-160m-kv4pad ORT_ENABLE_XQA=1
  bench kv4pad-cudnn-$1 /tmp/llama-160m-kv4pad
}
benches 1
serve() {  # NAME RUNS
  OUT=$R/$1 API_SERVERS=4 HTTP_REQUESTS=6000 SERVER_RUNS="$2" timeout $((DEADLINE - SECONDS)) \
    bash samples/gpu_serving.sh server 2>&1 | grep -v Memcpy | grep "http\|Error\|error" ; echo "$1 at $SECONDS s"
  tar -czf $OUT/res.tar.gz -C $R .
}
mkdir -p $R/serving-new $R/serving-old
serve serving-new "none-continuous every2-continuous"
sed -i 's/(len(fresh) >= batch_at and size > budget)/(fresh and size > budget)/' runtime/engine.py
grep -c "(fresh and size > budget)" runtime/engine.py
serve serving-old "every2-continuous"
sed -i 's/(fresh and size > budget)/(len(fresh) >= batch_at and size > budget)/' runtime/engine.py
(( SECONDS < DEADLINE - 100 )) && benches 2
if (( SECONDS < DEADLINE - 70 )); then
  python3 -m kvexport export --model /tmp/llama-160m-kv4pad --share none --static --dtype float16 --no-validate \
    --max-new-tokens 0 --output /tmp/e-pad >/dev/null 2>&1
  ORT_ENABLE_XQA=1 timeout 60 python3 samples/profile_decode.py /tmp/e-pad 2>&1 | grep -v Memcpy > $R/profile-pad-xqa.txt
  grep -A14 "batch 64 context 2048" $R/profile-pad-xqa.txt
fi
tar -czf $OUT/res.tar.gz -C $R .; echo "all done at $SECONDS s"
