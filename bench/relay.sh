#!/usr/bin/env bash
# Carries onnxruntime-gpu's CUDA provider (284 MB; too big for the device tool's 64 MiB carry) to the
# lent GPU machine in chunks, one per consecutive warm call (../shared/RECIPES.md).
#
#   here:  bash bench/relay.sh pack          # → bench/relay/part.00 … part.NN + SHA256SUMS, and a plan
#   there: bash bench/relay.sh receive       # each call: stash the chunks carried; the call that
#                                            # completes the set assembles, checks and unpacks them
#          eval "$(bash bench/relay.sh env)" # ORT_DYLIB_PATH and LD_LIBRARY_PATH for the CUDA EP
#
# The device tool carries ignored paths named in `carry` (≤ 64 MiB in all, 8 paths): carry
# "bench/relay/part.K" (and SHA256SUMS) per call; files outside $OUT survive between calls on a
# warm machine, so the stash builds up in STASH.
set -euo pipefail
cd "$(dirname "$0")/.."
CHUNK_MB=${CHUNK_MB:-40}
STASH=${STASH:-/root/stash}
VERSION=1.31.1
case "${1:-}" in
  pack)
    w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_28_x86_64 --python-version 3.11 \
      "onnxruntime-gpu==$VERSION" -d "$w"
    unzip -q -j "$w"/onnxruntime_gpu-*.whl "onnxruntime/capi/libonnxruntime*" -d "$w/capi"
    rm -rf bench/relay && mkdir -p bench/relay
    tar -C "$w/capi" -cf - . | xz -6 -T2 | split -b "${CHUNK_MB}M" -d - bench/relay/part.
    (cd bench/relay && sha256sum part.* > SHA256SUMS)
    n=$(ls bench/relay/part.* | wc -l)
    echo "bench/relay: $n chunks of ≤ $CHUNK_MB MB ($(du -sh bench/relay | cut -f1) in all), libraries: $(ls "$w/capi" | tr '\n' ' ')"
    echo "plan: $n device calls, each carrying [\"bench/relay/part.K\", \"bench/relay/SHA256SUMS\"] and running \`bash bench/relay.sh receive\`"
    ;;
  receive)
    mkdir -p "$STASH/parts"
    cp bench/relay/SHA256SUMS "$STASH/parts/" 2>/dev/null || true
    for p in bench/relay/part.*; do [ -f "$p" ] && cp "$p" "$STASH/parts/"; done
    want=$(wc -l < "$STASH/parts/SHA256SUMS")
    have=$(ls "$STASH"/parts/part.* 2>/dev/null | wc -l)
    echo "relay: $have of $want chunks in $STASH/parts"
    if [ "$have" -eq "$want" ] && [ ! -f "$STASH/ort/libonnxruntime.so.$VERSION" ]; then
      (cd "$STASH/parts" && sha256sum -c --quiet SHA256SUMS)
      mkdir -p "$STASH/ort"
      cat "$STASH"/parts/part.* | xz -d | tar -C "$STASH/ort" -xf -
      rm -rf "$STASH/parts"
      echo "relay: unpacked $(ls "$STASH/ort" | tr '\n' ' ')"
    fi
    ;;
  env)
    echo "export ORT_DYLIB_PATH=$STASH/ort/libonnxruntime.so.$VERSION"
    echo "export LD_LIBRARY_PATH=$STASH/ort:/usr/local/cuda/targets/x86_64-linux/lib:/lib/x86_64-linux-gnu:\${LD_LIBRARY_PATH:-}"
    ;;
  *) echo "usage: bash bench/relay.sh pack|receive|env" >&2; exit 2 ;;
esac
