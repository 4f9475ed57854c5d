#!/usr/bin/env bash
# qadapt-run's generation loop vs Python onnxruntime on the same graphs and the same inputs, on CPU,
# in one run: time to first token (decoded image → first token, preprocessing included on both sides:
# PIL + numpy in Python) and decode ms/token, greedy, batch 1 and 4.
# The model is a random Q-Adapt at reduced shapes (configs/bench-small-qadapt.json: phi 1024×8,
# vocab 50295, SigLIP 384×4 at 224 px, Q-Former 256×2), exported in f32.
#   ORT_DYLIB_PATH=… PYTHON=/path/to/venv/bin/python bash bench/cpu_run.sh   (venv: onnxruntime, numpy, pillow)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
NEW=${NEW:-32}
REPS=${REPS:-5}
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH (bash scripts/get-onnxruntime.sh prints it)}"
cargo build -q --release -p trainer -p exporter --bins
cargo build -q --release -p runtime --example bench_run
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
R=target/release
"$R/qadapt-train" synth --out "$W/data" --n 20 --size 224 >/dev/null 2>&1
"$R/qadapt-train" init --config configs/bench-small-qadapt.json --out "$W/base" --data "$W/data/train.json" >/dev/null 2>&1
"$R/qadapt-export" --model "$W/base" --out "$W/export" --no-verify >/dev/null 2>&1
IMG=$(ls "$W"/data/images/*.png | head -1)
Q="Describe the quality of this image."
for B in 1 4; do
  QADAPT_BENCH_DUMP="$W/inputs.json" "$R/examples/bench_run" "$W/export" "$IMG" "$Q" "$NEW" "$REPS" "$B" > "$W/ours$B.json"
  "$PYTHON" bench/peer_run.py --export "$W/export" --inputs "$W/inputs.json" --image "$IMG" --new "$NEW" --reps "$REPS" --batch "$B" > "$W/peer$B.json"
done
"$PYTHON" - "$W" "$(nproc)" "$(du -sb "$W/export" | cut -f1)" "$(cat "$W"/export/decoder.onnx* | wc -c)" <<'PY'
import json, sys
w, cores, size, dec = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
print(f"CPU ({cores} cores), random Q-Adapt at bench-small shapes, f32 export {size/1e6:.0f} MB, greedy")
print("| batch | | TTFT ms | decode ms/token | tokens |")
print("|---:|---|---:|---:|---:|")
for b in (1, 4):
    o = json.load(open(f"{w}/ours{b}.json")); p = json.load(open(f"{w}/peer{b}.json"))
    same = "same ids" if o["ids"] == p["ids"] else "IDS DIFFER"
    print(f"| {b} | qadapt-run (Rust, IO binding) | {o['ttft_ms']:.1f} | {o['decode_ms_per_token']:.2f} | {o['tokens']} |")
    print(f"| {b} | Python onnxruntime {p['onnxruntime']} (numpy loop) | {p['ttft_ms']:.1f} | {p['decode_ms_per_token']:.2f} | {p['tokens']} |")
    print(f"| {b} | **ratio ours/peer** | **{o['ttft_ms']/p['ttft_ms']:.2f}** | **{o['decode_ms_per_token']/p['decode_ms_per_token']:.2f}** | {same} |")
o = json.load(open(f"{w}/ours1.json"))
print(f"batch-1 decode reads the decoder's {dec/1e6:.0f} MB of weights per token: {dec/1e6/o['decode_ms_per_token']:.1f} GB/s effective")
PY
