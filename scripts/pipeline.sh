#!/usr/bin/env bash
# The main job on the embedded default, no model downloads: synthetic EIQA data → random tiny Q-Adapt →
# stage 1 → stage 2 → merge → ONNX export → answers and a quality score from candle and from
# qadapt-run on ONNX Runtime → held-out evaluations. Everything it writes is under $WORK.
#
#   bash scripts/pipeline.sh            # WORK=/tmp/qadapt-pipeline N=1000 EPOCHS1=4 EPOCHS2=1 to change
#
# The binaries are built (debug profile, shared with `cargo test`) unless QADAPT_TRAIN, QADAPT_EXPORT
# and QADAPT_RUN name them. libonnxruntime comes from ORT_DYLIB_PATH, else scripts/get-onnxruntime.sh
# fetches it from the PyPI `onnxruntime` wheel into target/onnxruntime/ (once).
#
# Stage 1 trains on all the data (--task all), not only the explanations as in the paper: a random
# LLM cannot learn the short-answer formats through stage 2's connector and prompt module alone.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/qadapt-pipeline}
N=${N:-1000}
EPOCHS1=${EPOCHS1:-4}
EPOCHS2=${EPOCHS2:-1}
if [ -z "${QADAPT_TRAIN:-}" ] || [ -z "${QADAPT_EXPORT:-}" ] || [ -z "${QADAPT_RUN:-}" ]; then
  echo "== build: qadapt-train, qadapt-export, qadapt-run (debug; the first build takes about 10 min on 2 cores)"
  cargo build -p trainer --bin qadapt-train -p exporter --bin qadapt-export -p runtime --bin qadapt-run
fi
T=${QADAPT_TRAIN:-target/debug/qadapt-train}
X=${QADAPT_EXPORT:-target/debug/qadapt-export}
R=${QADAPT_RUN:-target/debug/qadapt-run}
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
  echo "== libonnxruntime: ORT_DYLIB_PATH unset, fetching it (scripts/get-onnxruntime.sh)"
  ORT_DYLIB_PATH=$(bash scripts/get-onnxruntime.sh)
fi
export ORT_DYLIB_PATH
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
echo "== export: ONNX graphs (vision, embed, decoder with KV cache, cache join/select) + qadapt.json, verified on ONNX Runtime"
"$X" --model "$WORK/merged" --out "$WORK/export"
img=$(awk -F, '$3=="test"{print $1; exit}' "$WORK/data/labels.csv")
label=$(awk -F, -v img="$img" '$1==img{printf "MOS %s, distortion %s at strength %s", $2, $4, $5}' "$WORK/data/labels.csv")
ask="Describe the quality of this image and explain your judgement."
echo "== candle (qadapt-train infer) on a held-out image: $img"
echo "   its label: $label"
"$T" infer --model "$WORK/merged" --image "$WORK/data/$img" --ask "$ask" --max-new-tokens 48
"$T" infer --model "$WORK/merged" --image "$WORK/data/$img" --score
echo "== qadapt-run (ONNX Runtime, CPU) on the same image ($label)"
"$R" --model "$WORK/export" --image "$WORK/data/$img" --ask "$ask" --max-new-tokens 48
"$R" --model "$WORK/export" --image "$WORK/data/$img" --score
echo "== qadapt-run eval: Q-Bench-style held-out questions, by generation and by likelihood, beside chance"
"$R" eval --model "$WORK/export" --qbench "$WORK/data/qbench.json" --images "$WORK/data"
echo "== qadapt-run eval: SROCC / PLCC of the score on the held-out images (scatter: $WORK/scatter.png)"
"$R" eval --model "$WORK/export" --iqa "$WORK/data/labels.csv" --split test --images "$WORK/data" --plot "$WORK/scatter.png"
echo "== qadapt-train eval (candle): held-out conversations by question kind, the same Q-Bench rows, the score's correlation"
"$T" eval --model "$WORK/merged" --data "$WORK/data/test.json" --qbench "$WORK/data/qbench.json" --images "$WORK/data" \
  --labels "$WORK/data/labels.csv" ${EVAL_JSON:+--json}
echo "== done: outputs under $WORK (loss plots: $WORK/run1/loss.png, $WORK/run2/loss.png; export: $WORK/export)"
