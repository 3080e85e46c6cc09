# Session 12: ragged row lengths against uniform, per attention kernel choice.
source samples/gpu_setup.sh
set +e +o pipefail
nvidia-smi --query-gpu=name --format=csv,noheader
[ -d /tmp/p160 ] || python3 samples/make_random_model.py pythia-160m /tmp/p160 >/dev/null
for s in none every:2; do
  [ -d /tmp/p160-${s/:/} ] || python3 -m kvexport export --model /tmp/p160 --share $s --dtype float16 --static \
    --max-new-tokens 0 --output /tmp/p160-${s/:/} 2>&1 | grep -v Memcpy | tail -1
done
for v in default ORT_ENABLE_XQA=1 ORT_ENABLE_CUDNN_FLASH_ATTENTION=0; do
  pairs=("none 32" "every2 64"); [[ $v == default ]] && pairs+=("every2 32")
  for pair in "${pairs[@]}"; do
    set -- $pair
    echo "$v $1 $2: $(env $([[ $v == default ]] || echo $v) python3 .gpu/work/ragged.py /tmp/p160-$1 $2 2>&1 | tail -1)" | tee -a $OUT/ragged.txt
  done
done
