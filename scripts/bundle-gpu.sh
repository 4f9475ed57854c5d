#!/usr/bin/env bash
# The bundle a lent GPU machine runs from (it has no Rust and compiles nothing): bench/bin/ with the
# CUDA trainer and the release exporter, runtime and generation bench, stripped and xz-compressed,
# checked to fit the device tool's 64 MiB carry with room for one relay chunk (bench/relay.sh).
#   bash scripts/bundle-gpu.sh            # NO_CUDA=1 leaves the (8-minute) CUDA trainer build out
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${NO_CUDA:-}" ] && [ ! -f bench/bin/qadapt-train.xz ]; then
  bash scripts/build-cuda.sh
fi
cargo build -q --release -p exporter --bin qadapt-export -p runtime --bin qadapt-run
cargo build -q --release -p runtime --example bench_run
mkdir -p bench/bin
for b in target/release/qadapt-export target/release/qadapt-run target/release/examples/bench_run; do
  n=$(basename "$b")
  cp "$b" "bench/bin/$n" && strip "bench/bin/$n" && xz -6 -f "bench/bin/$n"
done
ls -la bench/bin
total=$(cat bench/bin/* | wc -c)
echo "bundle: $((total / 1024 / 1024)) MiB (carry limit 64 MiB; a relay chunk is 40 MB)"
[ "$total" -lt $(( 64 * 1024 * 1024 )) ] || { echo "bundle over the carry limit" >&2; exit 1; }
