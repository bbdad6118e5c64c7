#!/usr/bin/env bash
# A CUDA 13.0 toolkit from PyPI wheels, for building `--features cuda` on a machine without a GPU or a system
# toolkit. CUDA 13.0 exactly: its PTX is what a 13.0 (580) driver accepts. Usage: tools/cuda-toolkit.sh PREFIX
# Then: export CUDA_HOME=PREFIX/nvidia/cu13 PATH=$CUDA_HOME/bin:$PATH LIBRARY_PATH=$CUDA_HOME/lib:$CUDA_HOME/lib/stubs
#       CUDA_COMPUTE_CAP=90 (H100/H200; RTX 30xx 86, 40xx 89) and cargo build --release --features cuda
set -euo pipefail
PREFIX=${1:?usage: $0 PREFIX}; mkdir -p "$PREFIX"; PREFIX=$(cd "$PREFIX" && pwd)
# One pip call: a second `pip install --target` into the same PREFIX silently skips the existing nvidia/ folder.
python3 -m pip install --quiet --no-deps --no-compile --target "$PREFIX" \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 \
  nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
CU=$PREFIX/nvidia/cu13
chmod +x "$CU"/bin/* "$CU"/nvvm/bin/*
for n in cublas cublasLt cudart nvrtc; do ln -sf lib$n.so.13 "$CU/lib/lib$n.so"; done   # -lX needs plain names
ln -sf libcurand.so.10 "$CU/lib/libcurand.so"; ln -sfn lib "$CU/lib64"
# The driver library (libcuda.so) is in no wheel and cudarc links it: a link-time stub with soname libcuda.so.1
# exporting every cu* function cudarc declares. The real driver is used at run time.
CUDARC_SRC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
mkdir -p "$CU/lib/stubs"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+\(' "$CUDARC_SRC/src/driver/sys/mod.rs" | sed -E 's/pub unsafe fn ([A-Za-z0-9_]+)\(/\1/' \
  | sort -u | awk '{print "int " $1 "(void) { return 999; }"}' > "$CU/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -o "$CU/lib/stubs/libcuda.so" -Wl,-soname,libcuda.so.1 "$CU/lib/stubs/libcuda_stub.c"
echo "CUDA toolkit ready: export CUDA_HOME=$CU"
