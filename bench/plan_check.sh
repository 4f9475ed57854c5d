#!/usr/bin/env bash
# `qadapt-train plan` against the peak RSS a real run measures, at bench-small shapes
# (configs/bench-small-bunny.json, stage 1, LoRA r32, f32, CPU), batch 2 and 8, with and without
# gradient checkpointing. Each run's steps log their padded length and loss rows; the plan is asked
# about the step with the most tokens (the batch is padded to its longest sample) and compared with
# the run's peak RSS. Goal: within 15 %.
#   bash bench/plan_check.sh            (STEPS=3 BATCHES="2 8" to change; ~10 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${STEPS:-3}
BATCHES=${BATCHES:-"2 8"}
W=${W:-$(mktemp -d)}
cargo build -q --release -p trainer --bin qadapt-train
T=target/release/qadapt-train
[ -f "$W/data/train.json" ] || "$T" synth --out "$W/data" --n 64 --size 224 >/dev/null 2>&1
[ -f "$W/base/config.json" ] || "$T" init --config configs/bench-small-bunny.json --out "$W/base" --data "$W/data/train.json" >/dev/null 2>&1
printf "| batch | checkpointing | tokens | answers/sample | plan GB | measured peak RSS GB | plan / measured |\n|---:|---|---:|---:|---:|---:|---:|\n"
for B in $BATCHES; do
  for CK in "" "--gradient-checkpointing"; do
    run="$W/run-$B${CK:+-ck}"
    rm -rf "$run"
    "$T" stage1 --model "$W/base" --data "$W/data/train.json" --images "$W/data" --out "$run" --task all \
      --batch-size "$B" --max-steps "$STEPS" --lora-r 32 --lora-alpha 64 --max-length 512 $CK >/dev/null 2>&1
    # The step with the longest padding (ties: the most loss rows) and the run's peak.
    read -r len rows peak < <(python3 -c "
import json,sys
ms=[json.loads(l) for l in open('$run/metrics.jsonl')]
m=max(ms,key=lambda m:(m['seq_len'],m['loss_rows']))
print(m['seq_len'], m['loss_rows'], max(x['peak_rss_mb'] for x in ms))")
    answers=$(( (rows + B - 1) / B ))
    plan=$("$T" plan --config configs/bench-small-bunny.json --stage 1 --batch-size "$B" --max-length "$len" \
      --answer-tokens "$answers" --lora-r 32 --lora-alpha 64 --json $CK | python3 -c "import json,sys;print(json.loads(sys.stdin.readline())['peak'])")
    python3 -c "
p=$plan/1e9; m=$peak*1048576/1e9
print(f'| $B | {\"on\" if \"$CK\" else \"off\"} | $len | $answers | {p:.2f} | {m:.2f} | {p/m:.2f} |')"
  done
done
