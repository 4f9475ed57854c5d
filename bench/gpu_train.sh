#!/usr/bin/env bash
# Stage-1 training at the real Bunny-3B shapes in bf16 on a lent GPU: qadapt-train (candle CUDA)
# next to PyTorch + PEFT doing the same steps (same batch, same image + text tokens), in one run.
# Prints step time (median after warm-up), samples/s and peak GPU memory for both, and the ratio.
#
# Prepare here (no compiling on the GPU machine): `bash scripts/build-cuda.sh` writes
# bench/bin/qadapt-train.xz; then run it there with the device tool: carry ["bench/bin"], command
# `bash bench/gpu_train.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${QADAPT_TRAIN:-bench/bin/qadapt-train}
if [ ! -x "$BIN" ] && [ -f "$BIN.xz" ]; then xz -dkf "$BIN.xz"; chmod +x "$BIN"; fi
STEPS=${STEPS:-6}
BS=${BS:-4}
W=$(mktemp -d)
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}

"$BIN" synth --out "$W/data" --n 32 --size 384 2>/dev/null
mkdir -p "$W/model"
cp configs/bunny-3b.json "$W/model/config.json"
cp tests/fixtures/bunny_bf16_sharded/model/tokenizer.json "$W/model/"

gpu_mem() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1; }
# Peak of nvidia-smi's used memory while PID runs, minus what was used before it started.
watch_peak() {
  local pid=$1 base=$2 peak=0 m
  while kill -0 "$pid" 2>/dev/null; do m=$(gpu_mem); [ "$m" -gt "$peak" ] && peak=$m; sleep 0.1; done
  echo $((peak - base))
}

base=$(gpu_mem)
"$BIN" stage1 --model "$W/model" --random-weights --data "$W/data/train.json" --images "$W/data" --out "$W/run" \
  --task all --device cuda --dtype bf16 --batch-size "$BS" --max-steps $((STEPS + 2)) --epochs 1000 --max-length 2048 \
  2> "$W/ours.log" &
pid=$!
ours_peak=$(watch_peak $pid "$base")
wait $pid || { cat "$W/ours.log"; exit 1; }
text=$(python3 -c "import json;print(round(json.load(open('$W/run/summary.json'))['mean_text_tokens']))")

base=$(gpu_mem)
python3 bench/peer_train.py --config configs/bunny-3b.json --batch-size "$BS" --text-tokens "$text" --steps "$STEPS" > "$W/peer.json" &
pid=$!
peer_peak=$(watch_peak $pid "$base")
wait $pid

python3 - "$W/run/summary.json" "$W/peer.json" "$ours_peak" "$peer_peak" <<'PY'
import json, sys
o = json.load(open(sys.argv[1])); p = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
om, pm = int(sys.argv[3]), int(sys.argv[4])
print(f"stage-1 step, Bunny-3B shapes, bf16, batch {o['samples']//max(o['steps'],1)}, sequence {o['image_tokens']} image + {o['mean_text_tokens']:.0f} text tokens")
print(f"| {'':<16} | {'step ms':>8} | {'samples/s':>9} | {'peak GiB (nvidia-smi)':>21} | {'trainable':>10} |")
print(f"| qadapt-train    | {o['step_ms_median']:8.1f} | {o['samples_per_s']:9.2f} | {om/1024:21.1f} | {o['trainable_params']:10d} |")
print(f"| pytorch + peft  | {p['step_ms']:8.1f} | {p['samples_per_s']:9.2f} | {pm/1024:21.1f} | {p['trainable_params']:10d} |")
print(f"ratio qadapt/peer step time: {o['step_ms_median']/p['step_ms']:.2f}")
PY
