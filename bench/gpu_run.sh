#!/usr/bin/env bash
# qadapt-run generation on a GPU: time to first token (image → first token) and decode ms/token at
# batch 1 and 8, greedy, on a random export at the real Bunny-3B shapes in f16 (standard graphs, and the
# fused f16 and fused int4 variants, each also with its decode steps replayed as CUDA graphs:
# bench_run's `cuda-graph` mode, qadapt-run --cuda-graph), next to HF transformers
# fp16 (eager, and with its compiled static cache) in the same run, with the physical floors
# (LLM weight bytes / measured copy bandwidth; prefill FLOPs / measured matmul rate).
#
# Nothing is compiled where it runs. Bundle (built here, carried): BIN holds qadapt-train, qadapt-export
# and bench_run (plain or .xz); ORT_DYLIB_PATH points at libonnxruntime.so.1.31.1 of onnxruntime-gpu
# with its providers beside it (on the lent machine: the relay of bench/relay.sh).
#   BIN=bench/bin ORT_DYLIB_PATH=/root/stash/libonnxruntime.so.1.31.1 bash bench/gpu_run.sh
# The same script on CPU checks its plumbing at small shapes:
#   BIN=target/release CONFIG=configs/bench-small-bunny.json EP=cpu DEVICE=cpu DTYPE=f32 BATCHES="1 2" \
#     PYTHON=/path/to/venv/bin/python bash bench/gpu_run.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-bench/bin}
CONFIG=${CONFIG:-configs/bunny-3b.json}
EP=${EP:-cuda}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-f16}
BATCHES=${BATCHES:-1 8}
NEW=${NEW:-64}
REPS=${REPS:-3}
PYTHON=${PYTHON:-python3}
: "${ORT_DYLIB_PATH:?set ORT_DYLIB_PATH to the onnxruntime(-gpu) 1.31.1 library}"
tool() {  # a bundled binary, unpacked from .xz on first use
  local f
  for f in "$BIN/$1" "$BIN/examples/$1"; do
    if [ ! -x "$f" ] && [ -f "$f.xz" ]; then xz -dkf "$f.xz" && chmod +x "$f"; fi
    if [ -x "$f" ]; then echo "$f"; return; fi
  done
  echo "missing $1 in $BIN" >&2; exit 1
}
TRAIN=$(tool qadapt-train); EXPORT=$(tool qadapt-export); RUN=$(tool bench_run)
W=${WORK:-$(mktemp -d)}
t0=$(date +%s)
"$TRAIN" synth --out "$W/data" --n 4 --size 384 >/dev/null 2>&1
"$TRAIN" init --config "$CONFIG" --out "$W/base" --tokenizer tests/fixtures/bunny_bf16_sharded/model >/dev/null
"$EXPORT" --model "$W/base" --out "$W/export" --dtype "$( [ "$DTYPE" = f32 ] && echo f32 || echo f16 )" --no-verify --json > "$W/export.json"
FT=$( [ "$DTYPE" = f32 ] && echo f32 || echo f16 )
# The edge variants (issue 13): fused graphs (GroupQueryAttention, in-place cache) in the float type and
# with int4 weights. VARIANTS="" skips them.
VARIANTS=${VARIANTS:-fused fused-int4}
for V in $VARIANTS; do
  case $V in fused) X=(--fused);; fused-int4) X=(--fused --quantize int4);; *) echo "unknown variant $V" >&2; exit 1;; esac
  "$EXPORT" --model "$W/base" --out "$W/export-$V" --dtype "$FT" --no-verify --json "${X[@]}" > "$W/export-$V.json"
done
echo "model and export ready in $(( $(date +%s) - t0 )) s" >&2
IMG=$(ls "$W"/data/images/*.png | head -1)
Q="Describe the quality of this image."
for B in $BATCHES; do
  QADAPT_BENCH_DUMP="$W/inputs.json" "$RUN" "$W/export" "$IMG" "$Q" "$NEW" "$REPS" "$B" "$EP" > "$W/ours$B.json"
  # Fixed-shape steps: CUDA graphs on the CUDA provider; on the CPU the same steps run eagerly.
  GMODE=$( [ "$EP" = cuda ] && echo cuda-graph || echo cpu-fixed )
  for V in $VARIANTS; do
    "$RUN" "$W/export-$V" "$IMG" "$Q" "$NEW" "$REPS" "$B" "$EP" > "$W/ours-$V-$B.json" || echo '{"error": "run failed"}' > "$W/ours-$V-$B.json"
    "$RUN" "$W/export-$V" "$IMG" "$Q" "$NEW" "$REPS" "$B" "$GMODE" > "$W/ours-$V-graph-$B.json" \
      || echo '{"error": "run failed"}' > "$W/ours-$V-graph-$B.json"
  done
  ptok=$("$PYTHON" -c "import json;print(len(json.load(open('$W/inputs.json'))['prompt_ids']))")
  floors=$([ "$B" = "$(echo $BATCHES | cut -d' ' -f1)" ] && echo --floors || true)
  "$PYTHON" bench/peer_hf_gen.py --config "$CONFIG" --batch "$B" --prompt-tokens "$ptok" --new "$NEW" --reps "$REPS" \
    --device "$DEVICE" --dtype "$DTYPE" --cache dynamic $floors > "$W/eager$B.json"
  if [ "$DEVICE" = cuda ]; then
    "$PYTHON" bench/peer_hf_gen.py --config "$CONFIG" --batch "$B" --prompt-tokens "$ptok" --new "$NEW" --reps "$REPS" \
      --device "$DEVICE" --dtype "$DTYPE" --cache static > "$W/static$B.json" || echo '{"error": "static cache failed"}' > "$W/static$B.json"
  fi
done
"$PYTHON" - "$W" "$CONFIG" "$EP" "$BATCHES" "$VARIANTS" <<'PY'
import json, os, sys
w, config, ep, batches = sys.argv[1], sys.argv[2], sys.argv[3], [int(b) for b in sys.argv[4].split()]
variants = [x for v in sys.argv[5].split() for x in (v, v + "-graph")]
load = lambda f: json.load(open(f)) if os.path.exists(f) else None
fl = load(f"{w}/eager{batches[0]}.json")
print(f"generation, {config}, random weights, EP {ep}; HF {fl['dtype']} on torch {fl['torch']}")
print(f"floors: copy {fl['copy_gb_s']:.0f} GB/s → decode ≥ {fl['decode_floor_ms']:.2f} ms/token (batch 1, {fl['llm_weight_bytes']/1e9:.2f} GB of LLM weights read per step); "
      f"matmul {fl['matmul_tflops']:.3g} TFLOP/s → image→first token ≥ {fl['ttft_floor_ms']:.2f} ms (batch {batches[0]})")
print("| batch | | TTFT ms | decode ms/token | × floor (decode) | ours / peer (TTFT, decode) |")
print("|---:|---|---:|---:|---:|---:|")
for b in batches:
    o = load(f"{w}/ours{b}.json")
    print(f"| {b} | qadapt-run ({o['ep']}) | {o['ttft_ms']:.1f} | {o['decode_ms_per_token']:.2f} | {o['decode_ms_per_token']/fl['decode_floor_ms']:.2f} | |")
    for v in variants:
        f = load(f"{w}/ours-{v}-{b}.json")
        if not f or "error" in f:
            print(f"| {b} | qadapt-run {v} | failed | | | |")
            continue
        print(f"| {b} | qadapt-run {v} ({f['ep']}) | {f['ttft_ms']:.1f} | {f['decode_ms_per_token']:.2f} | "
              f"{f['decode_ms_per_token']/fl['decode_floor_ms']:.2f} | vs standard: {f['ttft_ms']/o['ttft_ms']:.2f}, {f['decode_ms_per_token']/o['decode_ms_per_token']:.2f} |")
    for name in ("eager", "static"):
        p = load(f"{w}/{name}{b}.json")
        if not p or "error" in p:
            continue
        print(f"| {b} | HF {p['peer']} | {p['ttft_ms']:.1f} | {p['decode_ms_per_token']:.2f} | {p['decode_ms_per_token']/fl['decode_floor_ms']:.2f} | "
              f"{o['ttft_ms']/p['ttft_ms']:.2f}, {o['decode_ms_per_token']/p['decode_ms_per_token']:.2f} |")
PY
