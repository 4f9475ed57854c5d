#!/usr/bin/env bash
# The main job on the embedded default, no downloads: synthetic EIQA data → random tiny Q-Adapt →
# stage 1 → stage 2 → merge → ONNX export → answers and a quality score from candle and from
# qadapt-run on ONNX Runtime (when ORT_DYLIB_PATH is set) → a held-out evaluation.
#
#   bash scripts/pipeline.sh            # WORK=/tmp/qadapt-pipeline N=1000 EPOCHS1=4 EPOCHS2=1 to change
#
# Stage 1 trains on all the data (--task all), not only the explanations as in the paper: a random
# LLM cannot learn the short-answer formats through stage 2's connector and prompt module alone.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/qadapt-pipeline}
N=${N:-1000}
EPOCHS1=${EPOCHS1:-4}
EPOCHS2=${EPOCHS2:-1}
if [ -z "${QADAPT_TRAIN:-}" ]; then
  cargo build -q -p trainer --bin qadapt-train -p exporter --bin qadapt-export -p runtime --bin qadapt-run
  QADAPT_TRAIN=target/debug/qadapt-train
fi
T=$QADAPT_TRAIN
rm -rf "$WORK" && mkdir -p "$WORK"
common=(--images "$WORK/data" --batch-size 8 --max-length 256)

echo "== synth: $N images with known distortions"
"$T" synth --out "$WORK/data" --n "$N" --size 32
echo "== init: random tiny Q-Adapt (configs/tiny-qadapt.json), BPE + WordPiece trained on the data"
"$T" init --config configs/tiny-qadapt.json --out "$WORK/base" --data "$WORK/data/train.json"
echo "== stage 1: LoRA on phi and SigLIP + connector"
"$T" stage1 --model "$WORK/base" --data "$WORK/data/train.json" "${common[@]}" --out "$WORK/run1" --task all \
  --epochs "$EPOCHS1" --lora-r 32 --lora-alpha 64 --lr 1e-3 --connector-lr 1e-3 --lora-dropout 0
echo "== stage 2: prompt module + connector, stage-1 LoRA merged and frozen"
"$T" stage2 --model "$WORK/base" --stage1 "$WORK/run1" --data "$WORK/data/train.json" "${common[@]}" --out "$WORK/run2" \
  --epochs "$EPOCHS2" --lr 1e-3 --connector-lr 1e-3
echo "== merge"
"$T" merge --model "$WORK/base" --stage1 "$WORK/run1" --stage2 "$WORK/run2" --out "$WORK/merged"
echo "== export: ONNX graphs (vision, embed, decoder with KV cache) + qadapt.json"
if [ -n "${ORT_DYLIB_PATH:-}" ]; then verify=(); else
  echo "   (ORT_DYLIB_PATH unset: graphs not verified through ONNX Runtime; see scripts/get-onnxruntime.sh)"; verify=(--no-verify); fi
"${QADAPT_EXPORT:-target/debug/qadapt-export}" --model "$WORK/merged" --out "$WORK/export" "${verify[@]}"
img=$(awk -F, '$3=="test"{print $1; exit}' "$WORK/data/labels.csv")
echo "== infer on a held-out image ($img)"
"$T" infer --model "$WORK/merged" --image "$WORK/data/$img" --ask "Describe the quality of this image and explain your judgement." --max-new-tokens 48
"$T" infer --model "$WORK/merged" --image "$WORK/data/$img" --score
if [ -n "${ORT_DYLIB_PATH:-}" ]; then
  echo "== qadapt-run (ONNX Runtime, CPU) on the same image"
  R=${QADAPT_RUN:-target/debug/qadapt-run}
  "$R" --model "$WORK/export" --image "$WORK/data/$img" --ask "Describe the quality of this image and explain your judgement." --max-new-tokens 48
  "$R" --model "$WORK/export" --image "$WORK/data/$img" --score
  echo "== qadapt-run eval: Q-Bench-style held-out questions, and SROCC / PLCC of the score (scatter: $WORK/scatter.png)"
  "$R" eval --model "$WORK/export" --qbench "$WORK/data/qbench.json" --images "$WORK/data"
  "$R" eval --model "$WORK/export" --iqa "$WORK/data/labels.csv" --split test --images "$WORK/data" --plot "$WORK/scatter.png"
else
  echo "== qadapt-run skipped: set ORT_DYLIB_PATH (bash scripts/get-onnxruntime.sh prints it)"
fi
echo "== eval on held-out images"
"$T" eval --model "$WORK/merged" --data "$WORK/data/test.json" --images "$WORK/data" --labels "$WORK/data/labels.csv" ${EVAL_JSON:+--json}
