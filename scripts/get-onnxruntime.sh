#!/usr/bin/env bash
# Fetches libonnxruntime (CPU) from the PyPI `onnxruntime` wheel — the only place a registry ships it —
# into target/onnxruntime/ and prints its path. No Python packages are installed: pip only downloads
# the wheel, and Python's zipfile unpacks the one library from it.
#
#   export ORT_DYLIB_PATH=$(bash scripts/get-onnxruntime.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=${ORT_VERSION:-1.31.1}
DIR=target/onnxruntime
LIB="$DIR/libonnxruntime.so.$VERSION"
if [ ! -f "$LIB" ]; then
    command -v python3 >/dev/null || { apt-get update -qq && apt-get install -y -qq python3 python3-pip >/dev/null; }
    python3 -m pip --version >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq python3-pip >/dev/null; }
    mkdir -p "$DIR/wheel"
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 \
        --python-version 3.11 "onnxruntime==$VERSION" -d "$DIR/wheel" >&2
    python3 - "$DIR" "$VERSION" <<'PY'
import glob, sys, zipfile
d, v = sys.argv[1], sys.argv[2]
whl = glob.glob(f"{d}/wheel/onnxruntime-{v}-*.whl")[0]
with zipfile.ZipFile(whl) as z:
    with open(f"{d}/libonnxruntime.so.{v}", "wb") as f:
        f.write(z.read(f"onnxruntime/capi/libonnxruntime.so.{v}"))
PY
    rm -rf "$DIR/wheel"
fi
realpath "$LIB"
