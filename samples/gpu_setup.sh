# Sourced by the samples/gpu_*.sh scripts on the GPU machine, after .gpu/stage.sh: strict mode, the staged
# ONNX Runtime GPU build on the path, kvexport installed from this checkout.
set -euo pipefail
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1

# random_model SHAPE HEADS: /tmp/SHAPE-kvHEADS, random weights of that shape with HEADS KV heads.
random_model() {
  python3 samples/make_random_model.py "$1" "/tmp/$1-kv$2" --kv-heads "$2" >/dev/null 2>&1
}
