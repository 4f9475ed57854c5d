#!/usr/bin/env bash
# What quantization costs a trained model: the tiny Q-Adapt trained from random init on the synthetic
# EIQA data (the learning test's recipe: 1,000 images, stage 1 on all tasks for 4 epochs, stage 2 for
# one), merged, exported as standard f32, int8 and int4 and as --fused f32 and int4, each evaluated
# by qadapt-run on the held-out images: Q-Bench-format accuracy (by generation and by likelihood) and
# SROCC / PLCC of the Q-Align score against the synthetic MOS. Prints a Markdown table.
#   ORT_DYLIB_PATH=… bash bench/edge_accuracy.sh        (about 15 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH (bash scripts/get-onnxruntime.sh prints it)}"
cargo build -q --release -p trainer -p exporter -p runtime --bins
R=target/release
W=${WORK:-$(mktemp -d)}
mkdir -p "$W"
D="$W/data"
[ -d "$D" ] || "$R/qadapt-train" synth --out "$D" --n 1000 --size 32 >/dev/null
[ -d "$W/base" ] || "$R/qadapt-train" init --config configs/tiny-qadapt.json --out "$W/base" --data "$D/train.json" >/dev/null
COMMON=(--data "$D/train.json" --images "$D" --batch-size 8 --max-length 256 --lr 1e-3 --connector-lr 1e-3)
if [ ! -d "$W/merged" ]; then
  "$R/qadapt-train" stage1 --model "$W/base" --out "$W/run1" --task all --epochs 4 --lora-r 32 --lora-alpha 64 \
    --lora-dropout 0 "${COMMON[@]}" >/dev/null 2>&1
  "$R/qadapt-train" stage2 --model "$W/base" --stage1 "$W/run1" --out "$W/run2" --epochs 1 "${COMMON[@]}" >/dev/null 2>&1
  "$R/qadapt-train" merge --model "$W/base" --stage1 "$W/run1" --stage2 "$W/run2" --out "$W/merged" >/dev/null 2>&1
fi
VARIANTS="f32 int8 int4 fused-f32 fused-int4"
for V in $VARIANTS; do
  case $V in
    f32) X=();; int8) X=(--quantize int8);; int4) X=(--quantize int4);;
    fused-f32) X=(--fused);; fused-int4) X=(--fused --quantize int4);;
  esac
  [ -d "$W/export-$V" ] || "$R/qadapt-export" --model "$W/merged" --out "$W/export-$V" --json "${X[@]}" > "$W/export-$V.json"
  "$R/qadapt-run" eval --model "$W/export-$V" --images "$D" --qbench "$D/qbench.json" --json > "$W/qbench-$V.json"
  "$R/qadapt-run" eval --model "$W/export-$V" --images "$D" --iqa "$D/labels.csv" --split test --json > "$W/iqa-$V.json"
done
python3 - "$W" "$VARIANTS" <<'PY'
import json, sys
w, variants = sys.argv[1], sys.argv[2].split()
def walk(d):
    """Every dict inside a JSON value."""
    if isinstance(d, dict):
        yield d
        for v in d.values():
            yield from walk(v)
    elif isinstance(d, list):
        for v in d:
            yield from walk(v)
def number(d, key):
    return next((x[key] for x in walk(d) if isinstance(x.get(key), (int, float))), float("nan"))
print("| export | decoder MB | Q-Bench acc. (generate) | Q-Bench acc. (likelihood) | SROCC | PLCC | logit cosine vs f32 model |")
print("|---|---:|---:|---:|---:|---:|---:|")
for v in variants:
    q = json.load(open(f"{w}/qbench-{v}.json"))
    i = json.load(open(f"{w}/iqa-{v}.json"))
    e = json.load(open(f"{w}/export-{v}.json"))
    mb = sum(g["bytes"] for g in e["graphs"] if g["file"] == "decoder.onnx") / 1e6
    by = {x["by"]: x["overall"]["accuracy"] for x in walk(q) if "by" in x and "overall" in x}
    cos = (e.get("quant") or {}).get("logit_cosine_mean")
    print(f"| {v} | {mb:.2f} | {by.get('generate', float('nan')):.3f} | {by.get('likelihood', float('nan')):.3f} | "
          f"{number(i, 'srocc'):.3f} | {number(i, 'plcc'):.3f} | {'–' if cos is None else f'{cos:.5f}'} |")
PY
