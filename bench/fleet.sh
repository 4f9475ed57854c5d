#!/usr/bin/env bash
# Failover of a qadapt-run fleet behind a real load balancer, loopback only: nginx (Debian's package,
# installed if missing) in front of 3 `qadapt-run serve` replicas of a fixture export; 32 clients send
# score and chat requests for DURATION s; replica 1 gets SIGKILL at KILL_AT s, replica 2 SIGTERM at
# DRAIN_AT s and is restarted once drained. nginx's retries (bench/fleet.py: proxy_next_upstream with
# non_idempotent) must leave 0 failed client requests. Bounded: every process is stopped at the end.
#
#   bash bench/fleet.sh            # DURATION=60 CLIENTS=32 KILL_AT=15 DRAIN_AT=30 OUT=bench/fleet-result.json
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-60}
CLIENTS=${CLIENTS:-32}
KILL_AT=${KILL_AT:-15}
DRAIN_AT=${DRAIN_AT:-30}
OUT=${OUT:-bench/fleet-result.json}
command -v nginx >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx >/dev/null; }
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(bash scripts/get-onnxruntime.sh)}
if [ -z "${QADAPT_RUN:-}" ] || [ -z "${QADAPT_EXPORT:-}" ]; then
  cargo build -q --release -p runtime --bin qadapt-run -p exporter --bin qadapt-export
fi
R=${QADAPT_RUN:-target/release/qadapt-run}
X=${QADAPT_EXPORT:-target/release/qadapt-export}
W=$(mktemp -d)
trap 'pkill -KILL -f "$W/export" 2>/dev/null || true; [ -f "$W/nginx.pid" ] && kill -KILL "$(cat "$W/nginx.pid")" 2>/dev/null || true; rm -rf "$W"' EXIT
"$X" --model tests/fixtures/bunny_f32_bpe/model --out "$W/export" --no-verify >/dev/null
python3 bench/fleet.py --qadapt-run "$R" --export "$W/export" --image tests/fixtures/bunny_f32_bpe/image.png \
  --work "$W" --replicas 3 --clients "$CLIENTS" --duration "$DURATION" --kill-at "$KILL_AT" --drain-at "$DRAIN_AT" \
  --out "$OUT"
