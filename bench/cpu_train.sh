#!/usr/bin/env bash
# Stage-1 training throughput on CPU at the tiny test shapes: qadapt-train next to PyTorch + PEFT
# doing the same steps (same batch, image + text tokens, LoRA rank), in one run on the same machine.
#   PYTHON=/path/to/venv/bin/python bash bench/cpu_train.sh     (the venv needs torch, transformers, peft)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
BS=${BS:-32}
STEPS=${STEPS:-20}
W=$(mktemp -d)
cargo build -q -p trainer --bin qadapt-train
T=target/debug/qadapt-train   # dependencies (candle, gemm) are built at opt-level 3 in this profile
"$T" synth --out "$W/data" --n 200 --size 32 2>/dev/null
"$T" init --config configs/tiny-bunny.json --out "$W/base" --data "$W/data/train.json" 2>/dev/null
"$T" stage1 --model "$W/base" --data "$W/data/train.json" --images "$W/data" --out "$W/run" --task all \
  --batch-size "$BS" --max-steps $((STEPS + 2)) --epochs 100 --lora-r 32 --lora-alpha 64 --max-length 256 2>/dev/null
text=$("$PYTHON" -c "import json;print(round(json.load(open('$W/run/summary.json'))['mean_text_tokens']))")
"$PYTHON" bench/peer_train.py --config configs/tiny-bunny.json --device cpu --dtype f32 --batch-size "$BS" \
  --text-tokens "$text" --answer-tokens 20 --steps "$STEPS" --lora-r 32 --lora-alpha 64 > "$W/peer.json" 2>/dev/null
"$PYTHON" - "$W/run/summary.json" "$W/peer.json" "$(nproc)" <<'PY'
import json, sys
o = json.load(open(sys.argv[1])); p = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
print(f"stage-1 step on CPU ({sys.argv[3]} cores), tiny Bunny (configs/tiny-bunny.json), f32, batch {o['samples']//max(o['steps'],1)}, "
      f"{o['image_tokens']} image + {o['mean_text_tokens']:.0f} text tokens, LoRA r32")
print(f"| {'':<16} | {'step ms':>8} | {'samples/s':>9} | {'trainable':>10} |")
print(f"| qadapt-train    | {o['step_ms_median']:8.1f} | {1000*o['samples']/o['steps']/o['step_ms_median']:9.1f} | {o['trainable_params']:10d} |")
print(f"| pytorch + peft  | {p['step_ms']:8.1f} | {p['samples_per_s']:9.1f} | {p['trainable_params']:10d} |")
print(f"ratio qadapt/peer step time: {o['step_ms_median']/p['step_ms']:.2f}  (torch {p['torch']})")
PY
