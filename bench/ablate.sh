#!/usr/bin/env bash
# The progressive-tuning ablation (`qadapt-train ablate`) on the synthetic set, at a budget this
# 2-core machine affords: 600 images (480 train / 120 held out), a random tiny Q-Adapt
# (configs/tiny-qadapt.json), the recipes of Table 9 (joint, two-stage, progressive; RECIPES=all for
# Table 8's rows too) over 3 seeds, 1,200 optimizer steps of 8 rows per recipe. No peer: the
# comparison is between recipes, all run by the same binary in the same run.
#
#   bash bench/ablate.sh            # WORK=/tmp/qadapt-ablate RECIPES=main SEEDS=1,2,3 STEPS=1200 N=600
#
# The trainer is built in release unless QADAPT_TRAIN names one. Results: $WORK/out/ablation.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/qadapt-ablate}
RECIPES=${RECIPES:-main}
SEEDS=${SEEDS:-1,2,3}
STEPS=${STEPS:-1200}
N=${N:-600}
if [ -z "${QADAPT_TRAIN:-}" ]; then
  cargo build --release -p trainer --bin qadapt-train
fi
T=${QADAPT_TRAIN:-target/release/qadapt-train}
rm -rf "$WORK" && mkdir -p "$WORK"
"$T" synth --out "$WORK/data" --n "$N" --size 32
"$T" init --config configs/tiny-qadapt.json --out "$WORK/base" --data "$WORK/data/train.json"
start=$(date +%s)
"$T" ablate --model "$WORK/base" --data "$WORK/data/train.json" --images "$WORK/data" --test "$WORK/data/test.json" \
  --labels "$WORK/data/labels.csv" --out "$WORK/out" --recipes "$RECIPES" --seeds "$SEEDS" --max-steps "$STEPS" \
  --batch-size 8 --max-length 256 --lora-r 32 --lora-alpha 64 --lora-dropout 0 --lr 1e-3 --connector-lr 1e-3
echo "ablate took $(( $(date +%s) - start )) s; results in $WORK/out"
