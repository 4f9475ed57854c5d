#!/usr/bin/env bash
# Builds qadapt-train with candle's CUDA backend on a machine WITHOUT a GPU or CUDA toolkit, for a
# GPU server with CUDA 13 and driver R580+ (the lent H100/H200). Output: bench/bin/qadapt-train.
# Measured here: 8.3 min clean on 2 cores; the binary needs libcuda.so.1, libcudart.so.13,
# libcublas(Lt).so.13 and libcurand.so.10 at start-up (present on the GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CUDA_VENV:-/work/cuda-venv}
HOME_DIR=${CUDA_LINK_DIR:-/work/cuda-home}
# nvcc is pinned to 13.0.x: the R580 driver rejects PTX from newer compilers.
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-cccl==13.0.85 nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 \
    nvidia-curand==10.4.0.35
fi
SP=$("$VENV/bin/python" -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13'))")
mkdir -p "$HOME_DIR/lib"
# No wheel ships libcuda: link against a stub exporting the driver symbols cudarc declares.
cargo fetch -q
SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | head -1)
grep -ohP "^\s+fn \Kcu[A-Za-z0-9_]+(?=\()" "$SYS" | sort -u | awk '{print "void " $1 "(void) {}"}' > "$HOME_DIR/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$HOME_DIR/lib/libcuda.so" "$HOME_DIR/stub.c"
for l in cublas cublasLt nvrtc cudart; do ln -sf "$(ls "$SP"/lib/lib$l.so.13* | head -1)" "$HOME_DIR/lib/lib$l.so"; done
ln -sf "$(ls "$SP"/lib/libcurand.so.10* | head -1)" "$HOME_DIR/lib/libcurand.so"
ln -sfn "$SP/include" "$HOME_DIR/include"
ln -sfn "$SP/bin" "$HOME_DIR/bin"
PATH="$HOME_DIR/bin:$PATH" CUDA_HOME="$HOME_DIR" CUDA_PATH="$HOME_DIR" LIBRARY_PATH="$HOME_DIR/lib" \
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} CUDAFORGE_THREADS=2 CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target-cuda} \
  cargo build --release --features cuda -p trainer
mkdir -p bench/bin
cp "${CARGO_TARGET_DIR:-target-cuda}/release/qadapt-train" bench/bin/qadapt-train
strip bench/bin/qadapt-train
# ~58 MB stripped: compressed so that it travels within the device tool's 64 MiB carry.
xz -6 -f -k bench/bin/qadapt-train && rm bench/bin/qadapt-train
ls -la bench/bin/
