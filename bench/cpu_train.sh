#!/usr/bin/env bash
# Stage-1 training on CPU: qadapt-train next to PyTorch + PEFT doing the same steps (same shapes,
# batch, tokens per sample, answer tokens, LoRA rank, f32), in one run on the same machine, at the
# tiny test shapes and at the bench-small shapes, each with and without gradient checkpointing.
# Prints one markdown table: step ms (median after 2 warm-up steps), samples/s and peak RSS.
#   PYTHON=/path/to/venv/bin/python bash bench/cpu_train.sh   (the venv needs torch, transformers, peft)
#   SHAPES="tiny" or "bench-small" to run one; STEPS / SMALL_STEPS set the timed steps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SHAPES=${SHAPES:-"tiny bench-small"}
W=$(mktemp -d)
cargo build -q --release -p trainer --bin qadapt-train
T=target/release/qadapt-train
row() { # shape ckpt batch size config maxlen steps
  local shape=$1 ck=$2 bs=$3 size=$4 config=$5 maxlen=$6 steps=$7
  local d="$W/$shape"
  [ -f "$d/data/train.json" ] || "$T" synth --out "$d/data" --n 200 --size "$size" >/dev/null 2>&1
  [ -f "$d/base/config.json" ] || "$T" init --config "$config" --out "$d/base" --data "$d/data/train.json" >/dev/null 2>&1
  local run="$d/run${ck:+-ck}"
  "$T" stage1 --model "$d/base" --data "$d/data/train.json" --images "$d/data" --out "$run" --task all \
    --batch-size "$bs" --max-steps $((steps + 2)) --epochs 100 --lora-r 32 --lora-alpha 64 --max-length "$maxlen" $ck >/dev/null 2>&1
  # The peer processes what our steps did: the mean padded length and answer tokens per sample.
  read -r text answers < <("$PYTHON" -c "
import json
ms=[json.loads(l) for l in open('$run/metrics.jsonl')]
s=json.load(open('$run/summary.json'))
print(round(sum(m['seq_len'] for m in ms)/len(ms)-s['image_tokens']), max(1,round(sum(m['loss_rows'] for m in ms)/len(ms)/$bs)))")
  "$PYTHON" bench/peer_train.py --config "$config" --device cpu --dtype f32 --batch-size "$bs" --text-tokens "$text" \
    --answer-tokens "$answers" --steps "$steps" --lora-r 32 --lora-alpha 64 $ck > "$run/peer.json" 2>/dev/null
  "$PYTHON" - "$run/summary.json" "$run/peer.json" "$shape" "${ck:+on}" "$bs" "$text" "$answers" <<'PY'
import json, sys
o = json.load(open(sys.argv[1])); p = json.loads(open(sys.argv[2]).read().strip().splitlines()[-1])
shape, ck, bs, text, answers = sys.argv[3], sys.argv[4] or "off", int(sys.argv[5]), sys.argv[6], sys.argv[7]
q_ms, p_ms = o["step_ms_median"], p["step_ms"]
q_rss, p_rss = o["peak_rss_mb"] / 1024, p["peak_rss_mb"] / 1024
print(f"| {shape} | {ck} | {bs} | {o['image_tokens']}+{text} ({answers}) | {q_ms:.0f} | {p_ms:.0f} | {q_ms / p_ms:.2f} "
      f"| {1000 * bs / q_ms:.2f} | {1000 * bs / p_ms:.2f} | {q_rss:.2f} | {p_rss:.2f} | {q_rss / p_rss:.2f} |")
PY
}
echo "stage-1 step on CPU ($(nproc) cores), f32, LoRA r32 on all linears + connector; torch $("$PYTHON" -c 'import torch;print(torch.__version__)')"
echo "| shapes | checkpointing | batch | tokens (answers) per sample | qadapt ms | peft ms | ratio | qadapt samples/s | peft samples/s | qadapt RSS GB | peft RSS GB | RSS ratio |"
echo "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"
for shape in $SHAPES; do
  for ck in "" "--gradient-checkpointing"; do
    case $shape in
      tiny) row tiny "$ck" 32 32 configs/tiny-bunny.json 256 "${STEPS:-20}" ;;
      bench-small) row bench-small "$ck" 8 224 configs/bench-small-bunny.json 512 "${SMALL_STEPS:-4}" ;;
    esac
  done
done
