#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root: the preset proofs of issue "On the GPU". A random-
# weight full-size SD 1.5 (tools/make_random_sd15.py) is trained with `lora-studio train` on the generated dataset
# .bench/ds (24 images, 3 aspect ratios) for 200 steps with latent caching and samples every 50 steps, once per
# preset, while ballast.py holds all but the preset's card size of the GPU. Needs dist/lora-studio.xz and .bench/
# (ballast.py, the diffusers wheel, ds/). Results go to $OUT.
#   bash tools/gpu_train.sh sd15-6gb:5.5 sd15-8gb:7.5      (preset:GiB left free; the model is made once per machine)
# Env: RUN_TIMEOUT (seconds per run, default 280), EXTRA_ARGS (more `train` arguments, e.g. "--set training.recompute=true"),
#      TAG (appended to the output names, to keep several variants of one preset apart).
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BIN=/tmp/lora-studio
xz -dc dist/lora-studio.xz > "$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
export CUDA_CACHE_PATH=/tmp/jit; mkdir -p /tmp/jit
[ -f dist/jitcache.tar.gz ] && tar -C /tmp/jit -xzf dist/jitcache.tar.gz
python3 -m pip install -q --no-index --no-deps --target /tmp/site .bench/whl/*.whl > /dev/null 2>&1
if [ ! -f /tmp/sd15/model_index.json ]; then
  SECONDS=0
  PYTHONPATH=/tmp/site python3 tools/make_random_sd15.py /tmp/sd15 > "$OUT/make_model.log" 2>&1
  echo "model made in ${SECONDS}s" >> "$OUT/make_model.log"
fi
prove() { # preset leave_gib
  local preset=$1 leave=$2 name=$1${TAG:-}
  SECONDS=0
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of words
  timeout "${RUN_TIMEOUT:-280}" python3 .bench/ballast.py --leave-gib "$leave" -- "$BIN" train --json --preset "$preset" \
    --model /tmp/sd15 --dataset .bench/ds --output "/tmp/run-$name" --name "$name" --steps 200 \
    --sample-every 50 --save-every 100 --sample-prompt "zkcircles, colorful circles" ${EXTRA_ARGS:-} \
    > "$OUT/train-$name.jsonl" 2> "$OUT/train-$name.log"
  echo "exit $? after ${SECONDS}s" >> "$OUT/train-$name.log"
  ls -la "/tmp/run-$name" "/tmp/run-$name/samples" >> "$OUT/train-$name.log" 2>&1
  cp "/tmp/run-$name/samples/"*step000200* "$OUT/" 2>/dev/null
}
for spec in "$@"; do prove "${spec%%:*}" "${spec##*:}"; done
tar -C /tmp/jit -czf "$OUT/jitcache.tar.gz" .
