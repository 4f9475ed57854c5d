#!/usr/bin/env bash
# Issue 6 in one device call: the GPU claims of the trainer, exporter and runtime, measured next to
# their peers in the same run. Nothing is compiled here; the bundle (carried, built on the CPU machine):
#   bench/bin/qadapt-train(.xz)   the CUDA build (bash scripts/build-cuda.sh)
#   bench/bin/qadapt-export(.xz), bench/bin/bench_run(.xz), bench/bin/qadapt-run(.xz)   release builds
# and ORT_DYLIB_PATH = onnxruntime-gpu 1.31.1's libonnxruntime with its CUDA provider beside it (on the
# lent machine the provider is relayed in 4 chunks: ../shared/RECIPES.md). Python there has torch,
# transformers and peft (the peers).
#   ORT_DYLIB_PATH=/root/stash/ort/libonnxruntime.so.1.31.1 bash bench/gpu.sh
#
# The device plan (15 minutes of device time in all; the machine stays warm 30 s between calls):
#   here:    bash scripts/bundle-gpu.sh     (bench/bin: CUDA trainer + release binaries, ~15 MB xz)
#            bash bench/relay.sh pack       (bench/relay: onnxruntime-gpu in 5 chunks of ≤ 40 MB)
#   calls 1-4, back to back: carry ["bench/relay/part.0K", "bench/relay/SHA256SUMS"],
#            command `bash bench/relay.sh receive`
#   call 5:  carry ["bench/relay/part.04", "bench/relay/SHA256SUMS", "bench/bin"], command
#            `bash bench/relay.sh receive && eval "$(bash bench/relay.sh env)" && bash bench/gpu.sh`
# Sections (each prints its table; SKIP=parity,train,stage2,run leaves some out):
#   1. parity: the fixture exports on the CUDA EP give the CPU EP's greedy ids; TensorRT's absence is a
#      clear error and --ep auto says what it took;
#   2. train: stage-1 steps at Bunny-3B shapes, bf16, ours vs PyTorch + PEFT (bench/gpu_train.sh);
#   3. stage2: stage-2 steps at Q-Adapt-3B shapes, bf16 (ours; no PyTorch peer of the prompt module);
#   4. run: TTFT and decode ms/token at batch 1 and 8, f16, vs HF eager and static cache, with the
#      floors (bench/gpu_run.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bench/bin}
SKIP=${SKIP:-}
EP=${EP:-cuda}
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to the libonnxruntime of onnxruntime-gpu 1.31.1}"
export LD_LIBRARY_PATH=$(dirname "$ORT_DYLIB_PATH"):/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
for t in qadapt-train qadapt-export qadapt-run bench_run; do
  f=$BIN/$t; [ -x "$f" ] || f=$BIN/examples/$t
  if [ ! -x "$f" ] && [ -f "$BIN/$t.xz" ]; then xz -dkf "$BIN/$t.xz"; chmod +x "$BIN/$t"; fi
done
tool() { if [ -x "$BIN/$1" ]; then echo "$BIN/$1"; else echo "$BIN/examples/$1"; fi; }
W=$(mktemp -d)
skip() { [[ ",$SKIP," == *",$1,"* ]]; }
section() { echo; echo "## $1 ($(date +%T))"; }
T0=$(date +%s)

if ! skip parity; then
  section "1. parity: fixture exports, EP $EP vs CPU"
  echo "| fixture | greedy ids $EP = cpu | score $EP | score cpu | |Δ| |"
  echo "|---|---|---:|---:|---:|"
  for c in bunny_f32_bpe qadapt_f32_sharded qadapt_f16 bunny_bf16_sharded; do
    "$(tool qadapt-export)" --model tests/fixtures/$c/model --out "$W/fx-$c" --no-verify >/dev/null 2>&1 || { echo "| $c | export failed | | | |"; continue; }
    q=$(python3 -c "import json;print(json.load(open('tests/fixtures/$c/expected.json'))['questions']['ask'])")
    n=$(python3 -c "import json;print(json.load(open('tests/fixtures/$c/expected.json'))['max_new_tokens'])")
    for ep in cpu "$EP"; do
      "$(tool qadapt-run)" --model "$W/fx-$c" --image tests/fixtures/$c/image.png --ask "$q" --max-new-tokens "$n" --json --ep "$ep" > "$W/$c-$ep-ask.json" 2> "$W/$c-$ep.err"
      "$(tool qadapt-run)" --model "$W/fx-$c" --image tests/fixtures/$c/image.png --score --json --ep "$ep" > "$W/$c-$ep-score.json" 2>> "$W/$c-$ep.err"
    done
    python3 - "$W" "$c" "$EP" <<'PY'
import json, sys
w, c, ep = sys.argv[1:]
def load(f):
    try: return json.load(open(f"{w}/{f}"))
    except Exception: return None
a, b, s, t = load(f"{c}-cpu-ask.json"), load(f"{c}-{ep}-ask.json"), load(f"{c}-cpu-score.json"), load(f"{c}-{ep}-score.json")
if not (a and b and s and t):
    print(f"| {c} | FAILED: {open(f'{w}/{c}-{ep}.err').read().strip()[:200]} | | | |")
else:
    print(f"| {c} | {'yes' if a['token_ids'] == b['token_ids'] else 'NO'} | {t['score']:.6f} | {s['score']:.6f} | {abs(t['score'] - s['score']):.2e} |")
PY
  done
  c=bunny_f32_bpe
  for ep in tensorrt auto; do
    out=$("$(tool qadapt-run)" --model "$W/fx-$c" --image tests/fixtures/$c/image.png --score --ep $ep 2>&1); rc=$?
    echo "--ep $ep: exit $rc: $(echo "$out" | head -2 | tr '\n' ' ' | cut -c1-220)"
  done
fi

if ! skip train; then
  section "2. stage-1 training, Bunny-3B shapes, bf16: ours vs PyTorch + PEFT"
  QADAPT_TRAIN=$(tool qadapt-train) bash bench/gpu_train.sh || echo "stage-1 benchmark failed"
fi

if ! skip stage2; then
  section "3. stage-2 training, Q-Adapt-3B shapes, bf16 (ours)"
  "$(tool qadapt-train)" synth --out "$W/s2data" --n 32 --size 384 >/dev/null 2>&1
  mkdir -p "$W/qa"; cp configs/qadapt-3b.json "$W/qa/config.json"
  cp tests/fixtures/qadapt_f32_sharded/model/tokenizer*.json "$W/qa/"; cp -r tests/fixtures/qadapt_f32_sharded/model/qformer "$W/qa/"
  if "$(tool qadapt-train)" stage2 --model "$W/qa" --random-weights --data "$W/s2data/train.json" --images "$W/s2data" --out "$W/s2" \
      --device cuda --dtype bf16 --batch-size 4 --max-steps 8 --epochs 1000 2> "$W/s2.log"; then
    python3 -c "
import json; o = json.load(open('$W/s2/summary.json'))
print(f\"stage-2 step {o['step_ms_median']:.1f} ms at batch 4 ({o['samples_per_s']:.2f} samples/s), {o['trainable_params']} trainable parameters\")"
  else
    echo "stage-2 failed: $(tail -3 "$W/s2.log")"
  fi
fi

if ! skip run; then
  section "4. generation: qadapt-run ($EP) vs HF transformers fp16"
  BIN=$BIN EP=$EP bash bench/gpu_run.sh || echo "generation benchmark failed"
fi
echo; echo "total $(( $(date +%s) - T0 )) s"
