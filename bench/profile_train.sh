#!/usr/bin/env bash
# Where a stage-1 training step's CPU time goes, by category, from `perf record` (software clock, so
# it works without hardware counters) over the steady steps only (recording starts after a delay that
# skips model loading and the first step, whose heap growth is page faults the later steps reuse).
#   bash bench/profile_train.sh [tiny|bench-small]      (needs perf: Debian's linux-perf)
# Prints one markdown table: share of all CPU samples (every thread) per category.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPE=${1:-bench-small}
cargo build -q --release -p trainer --bin qadapt-train
T=target/release/qadapt-train
W=$(mktemp -d)
case $SHAPE in
  tiny) size=32; config=configs/tiny-bunny.json; bs=32; maxlen=256; steps=30; delay=3000 ;;
  bench-small) size=224; config=configs/bench-small-bunny.json; bs=8; maxlen=512; steps=5; delay=45000 ;;
  *) echo "unknown shape $SHAPE" >&2; exit 2 ;;
esac
"$T" synth --out "$W/data" --n 200 --size "$size" >/dev/null 2>&1
"$T" init --config "$config" --out "$W/base" --data "$W/data/train.json" >/dev/null 2>&1
perf record -q -e cpu-clock -F 500 -D "$delay" -o "$W/perf.data" -- "$T" stage1 --model "$W/base" \
  --data "$W/data/train.json" --images "$W/data" --out "$W/run" --task all --batch-size "$bs" \
  --max-steps "$steps" --epochs 100 --lora-r 32 --lora-alpha 64 --max-length "$maxlen" >/dev/null 2>&1
perf report -i "$W/perf.data" --no-children --sort symbol --stdio -g none 2>/dev/null | python3 -c '
import re, sys
cats = [
    ("matmul (gemm kernels)", r"gemm"),
    ("fused training ops (LoRA, LayerNorm, GELU, softmax, rotary, constants)", r"models::(lora|pointwise|softmax|rope|frozen)|tanh|expf|erf"),
    ("autograd bookkeeping (zeroed gradients, gradient sums)", r"memset|binary_map"),
    ("copies (contiguous, cat, transpose)", r"memmove|memcpy|copy_strided|copy2d|cat_contiguous"),
    ("other candle element-wise and reductions", r"candle_core::cpu|unary_map|reduce|vec_sum|affine"),
    ("dropout masks and RNG", r"rand_|splitmix|Mask::draw"),
    ("allocation (malloc, page faults, kernel memory)", r"malloc|_int_|free|\[k\] .*(page|fault|folio|pte|lru|mm_|memcg|clear_page)|brk|madvise"),
    ("thread pool (spin, wake, barrier)", r"rayon|futex|Barrier|sched|backtrace|wake|switch|spin_lock|spin_unlock|yield|swapgs|syscall"),
]
tot = {c: 0.0 for c, _ in cats}
other = 0.0
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)%\s+(\[[.k]\])\s+(.*)", line)
    if not m:
        continue
    pct, kind, sym = float(m.group(1)), m.group(2), m.group(3)
    name = kind + " " + sym
    for c, rx in cats:
        if re.search(rx, name):
            tot[c] += pct
            break
    else:
        other += pct
print("| category | share of CPU samples |")
print("|---|---:|")
for c, _ in cats:
    print(f"| {c} | {tot[c]:.1f} % |")
print(f"| everything else | {other:.1f} % |")
'
python3 -c "
import json
s = json.load(open('$W/run/summary.json'))
print(f\"step median {s['step_ms_median']:.0f} ms over {s['steps']} steps, peak RSS {s['peak_rss_mb']/1024:.2f} GB\")"
rm -rf "$W"
