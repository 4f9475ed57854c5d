#!/usr/bin/env bash
# Soak test of `qadapt-run serve` on loopback: a release build serves the tiny bunny_f32_bpe fixture while
# bench/soak.py runs 64 well-behaved clients (chat, streamed chat, score) beside adversarial ones
# (slow headers, mid-stream disconnects, image bombs from tests/bad-inputs, a 1 GB Content-Length) and
# samples the server's RSS and /ready every second; then SIGTERM, and the server must exit 0.
# Goal: 0 failed well-behaved requests, RSS flat (±10%) after the 60 s warm-up, no restart, clean exit.
#   bash bench/soak.sh [SECONDS=600]        (ORT_DYLIB_PATH: from scripts/get-onnxruntime.sh unless set)
# Env: CLIENTS (64), MAX_NEW (64: the server's --max-new-tokens, also the max_tokens of the streams
# closed mid-way), PYTHON (python3, stdlib only), OUT (bench/soak-result.json; the server's stderr goes
# beside it as *-server.log).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-600}
CLIENTS=${CLIENTS:-64}
MAX_NEW=${MAX_NEW:-64}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-bench/soak-result.json}
LOG=${OUT%.json}-server.log
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(bash scripts/get-onnxruntime.sh)}
cargo build -q --release -p runtime -p exporter
R=target/release
W=$(mktemp -d)
SERVER=
alive() { [ -r "/proc/$1/status" ] && ! grep -q '^State:[[:space:]]*[ZX]' "/proc/$1/status" 2>/dev/null; }  # a zombie is gone
cleanup() {
  if [ -n "$SERVER" ] && alive "$SERVER"; then kill -KILL "$SERVER" 2>/dev/null || true; fi
  rm -rf "$W"
}
trap cleanup EXIT
"$R/qadapt-export" --model tests/fixtures/bunny_f32_bpe/model --out "$W/export" --no-verify >/dev/null
"$R/qadapt-run" serve --model "$W/export" --host 127.0.0.1 --port 0 \
  --max-queue 256 --max-batch 8 --max-new-tokens "$MAX_NEW" 2>"$LOG" &
SERVER=$!
URL=
for _ in $(seq 240); do  # up to 120 s to load the model
  URL=$(grep -o 'listening on http://[0-9.:]*' "$LOG" | head -1 | sed 's/^listening on //' || true)
  [ -n "$URL" ] && break
  alive "$SERVER" || { cat "$LOG" >&2; echo "soak: the server exited before listening" >&2; exit 1; }
  sleep 0.5
done
[ -n "$URL" ] || { cat "$LOG" >&2; echo "soak: no 'listening on' line from the server within 120 s" >&2; exit 1; }
echo "soak: server pid $SERVER at $URL, $SECS s with $CLIENTS clients" >&2

SOAK=0
"$PYTHON" bench/soak.py --url "$URL" --pid "$SERVER" --duration "$SECS" --clients "$CLIENTS" \
  --images tests/fixtures/*/image.png --bombs tests/bad-inputs --disconnect-max-tokens "$MAX_NEW" \
  --out "$OUT" >"$W/summary.md" || SOAK=$?

# Graceful shutdown: SIGTERM, then up to 60 s to finish and exit 0.
STOP=0
if alive "$SERVER"; then
  t0=$(date +%s.%N)
  kill -TERM "$SERVER"
  for _ in $(seq 120); do alive "$SERVER" || break; sleep 0.5; done
  if alive "$SERVER"; then
    SHUTDOWN="still running 60 s after SIGTERM (killed)"; STOP=1
  else
    RC=0; wait "$SERVER" || RC=$?
    SERVER=
    took=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$RC" -eq 0 ]; then SHUTDOWN="SIGTERM → exit 0 in $took s"; else SHUTDOWN="SIGTERM → exit $RC in $took s"; STOP=1; fi
  fi
else
  SHUTDOWN="the server was not running at the end"; STOP=1
fi

cat "$W/summary.md"
echo
echo "Shutdown: $SHUTDOWN. Server log: $LOG"
if [ "$SOAK" -ne 0 ] || [ "$STOP" -ne 0 ]; then
  echo "soak: FAIL (soak.py exit $SOAK, shutdown: $SHUTDOWN)" >&2
  tail -n 20 "$LOG" >&2
  exit 1
fi
