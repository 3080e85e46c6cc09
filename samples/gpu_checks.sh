#!/usr/bin/env bash
# On the GPU machine, after .gpu/stage.sh: samples/gpu_checks.py for both shipped models; results in $OUT.
source samples/gpu_setup.sh
python3 samples/gpu_checks.py --model tiny-neox --share samples/strategy.json --output /tmp/checks-neox 2>&1 | grep -v "^exporting\|^validation"
python3 samples/gpu_checks.py --model tiny-llama --share every:2 --output /tmp/checks-llama 2>&1 | grep -v "^exporting\|^validation"
cp /tmp/checks-neox/gpu_checks.json "$OUT/gpu_checks_tiny_neox.json"
cp /tmp/checks-llama/gpu_checks.json "$OUT/gpu_checks_tiny_llama.json"
