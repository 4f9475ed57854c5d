#!/usr/bin/env bash
# Fetches libonnxruntime (CPU) from the PyPI `onnxruntime` wheel — the only place a registry ships it —
# into target/onnxruntime/ and prints its path. No Python packages are installed: pip only downloads
# the wheel, and Python's zipfile unpacks the libraries from it.
#
#   export ORT_DYLIB_PATH=$(bash scripts/get-onnxruntime.sh)
#   bash scripts/get-onnxruntime.sh gpu    # onnxruntime-gpu's library, its shared and TensorRT provider
#                                          # bridges, WITHOUT the 284 MB CUDA provider: enough to test
#                                          # how a GPU build behaves where providers cannot load
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${ORT_VERSION:-1.31.1}
if [ "${1:-}" = gpu ]; then
    PKG=onnxruntime_gpu; PIP=onnxruntime-gpu; DIR=target/onnxruntime-gpu
    FILES="libonnxruntime.so.$VERSION libonnxruntime_providers_shared.so libonnxruntime_providers_tensorrt.so"
else
    PKG=onnxruntime; PIP=onnxruntime; DIR=target/onnxruntime
    FILES="libonnxruntime.so.$VERSION"
fi
LIB="$DIR/libonnxruntime.so.$VERSION"
if [ ! -f "$LIB" ]; then
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null; }
    python3 -m pip --version >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null; }
    mkdir -p "$DIR/wheel"
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
        --python-version 3.11 "$PIP==$VERSION" -d "$DIR/wheel" >&2
    python3 - "$DIR" "$PKG-$VERSION" $FILES <<'PY'
import glob, sys, zipfile
d, stem, files = sys.argv[1], sys.argv[2], sys.argv[3:]
whl = glob.glob(f"{d}/wheel/{stem}-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    for name in files:
        with open(f"{d}/{name}", "wb") as f:
            f.write(z.read(f"onnxruntime/capi/{name}"))
PY
    rm -rf "$DIR/wheel"
fi
realpath "$LIB"
