#!/usr/bin/env bash
# On the GPU machine (device tool), from the repository root: our kernel and training benchmarks and the PyTorch
# reference in the same run, on the same GPU. Needs dist/lora-studio.xz (the CUDA build, see README "GPU build") and .bench/
# (torch_ref_bench.py + the diffusers and peft wheels, see ../shared/bench/README.md). Results go to $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
BIN=/tmp/lora-studio
xz -dc dist/lora-studio.xz > "$BIN" && chmod +x "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
export CUDA_CACHE_PATH=/tmp/jit; mkdir -p /tmp/jit
[ -f dist/jitcache.tar.gz ] && tar -C /tmp/jit -xzf dist/jitcache.tar.gz
run_ours() {
  for args in "$@"; do
    echo "== $args" >> "$OUT/ours.log"
    # shellcheck disable=SC2086
    timeout 300 "$BIN" bench train --family sd15 --resolution 512 --rank 16 $args --json >> "$OUT/ours.jsonl" 2>> "$OUT/ours.log"
  done
}
"$BIN" bench kernels --batch 1 > "$OUT/kernels-b1.txt" 2>&1
"$BIN" bench kernels --batch 4 > "$OUT/kernels-b4.txt" 2>&1
run_ours "--batch 1 --recompute on" "--batch 1 --recompute off" "--batch 4 --recompute off" "--batch 4 --recompute on"
# The same engine with attention chunk by chunk instead of flash (the form flash replaced), for the per-change table.
echo "== LORA_STUDIO_FLASH=0 from here" >> "$OUT/ours.log"
LORA_STUDIO_FLASH=0 run_ours "--batch 1 --recompute on" "--batch 4 --recompute off"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .bench/whl/*.whl > /dev/null 2>&1
PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 400 python3 .bench/torch_ref_bench.py --cases sd15 --sdpa nocudnn \
  --json "$OUT/ref.json" > "$OUT/ref.log" 2>&1
tar -C /tmp/jit -czf "$OUT/jitcache.tar.gz" .
echo done >> "$OUT/ours.log"
