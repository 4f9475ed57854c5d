#!/usr/bin/env python3
"""Peer benchmark: onnxruntime-genai on CPU for a HF phi (PhiForCausalLM) directory.

    python bench/peer_genai.py --hf PHI_DIR --precision int4|fp32 --work DIR \
        [--prompt-len 300] [--new 32] [--batch 1] [--reps 3] [--threads N]

1. Builds DIR/genai-PRECISION with onnxruntime-genai's model builder (a subprocess, so its memory
   does not count in this process's peak RSS); skipped when DIR/genai-PRECISION/genai_config.json
   exists. Builder command:
     python -m onnxruntime_genai.models.builder -i PHI_DIR -o DIR/genai-PRECISION -p PRECISION \
         -e cpu -c DIR/builder-cache
   (int4 on CPU: builder defaults, i.e. MatMulNBits block 32, symmetric, accuracy_level 4.)
2. Times greedy generation with onnxruntime_genai: prompt = PROMPT_LEN fixed token ids
   (numpy default_rng(0) draws in [0, vocab), bos/eos/pad ids replaced), BATCH identical rows,
   max_length = PROMPT_LEN + NEW, min_length = max_length (so eos can't end a run early; with
   random weights it otherwise might). Every rep uses a fresh Generator; one warm-up rep first.
     ttft_ms   = wall time from the start of append_tokens (prefill) until the first new token is
                 available (append_tokens + the first generate_next_token, which only samples
                 the prefill logits).
     decode_ms_per_token = mean wall time of each later generate_next_token (one decoder step
                 over the previous token + greedy pick), i.e. NEW-1 steps per rep.
   Reported values are medians over REPS.
3. Prints one JSON line (see `result` below). peak_rss_mb is ru_maxrss of this process only,
   taken right after the timed reps.

Notes (onnxruntime-genai 0.18.0 / onnxruntime 1.31.1): the CPU GroupQueryAttention kernel needs
head_size % 8 == 0 (the tiny test fixtures, head_size 20, fail at append_tokens); the builder
merges the tokenizer's eos id into genai_config's eos_token_id list; int4 quantizes every MatMul
including lm_head (fused qkv, o, fc1, fc2, lm_head) while the embedding Gather stays float.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def build(hf, out, precision, cache, extra):
    if os.path.exists(os.path.join(out, "genai_config.json")):
        return None
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", out,
           "-p", precision, "-e", "cpu", "-c", cache]
    if extra:
        cmd += ["--extra_options", *extra]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    log = out + ".build.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        sys.exit(f"builder failed (rc {r.returncode}), see {log}: {' '.join(cmd)}")
    print(f"built {out} in {time.perf_counter() - t0:.1f}s: {' '.join(cmd)}", file=sys.stderr)
    return cmd


def model_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)
               if f.endswith(".onnx") or f.endswith(".onnx.data") or f.endswith(".data"))


def quant_info(d):
    """MatMulNBits attributes and which MatMuls stayed float (graph only, no weights loaded)."""
    import onnx
    from onnx import helper

    m = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
    nbits, fp_matmul, gathers = {}, [], []
    for n in m.graph.node:
        if n.op_type == "MatMulNBits":
            a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
            key = (a.get("bits"), a.get("block_size"), a.get("accuracy_level"),
                   len(n.input) > 3 and n.input[3] != "")
            nbits.setdefault(key, []).append(n.name)
        elif n.op_type == "MatMul":
            fp_matmul.append(n.name)
        elif n.op_type in ("Gather", "GatherBlockQuantized") and "embed" in n.name:
            gathers.append(f"{n.op_type}:{n.name}")
    groups = [{"bits": b, "block_size": bs, "accuracy_level": al, "has_zero_points": zp,
               "symmetric": not zp, "count": len(v),
               "lm_head": any("lm_head" in x for x in v)} for (b, bs, al, zp), v in nbits.items()]
    return {"matmulnbits": groups, "float_matmuls": fp_matmul, "embedding": gathers}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", required=True, help="HF PhiForCausalLM directory (see bench/phi_from_bunny.py)")
    ap.add_argument("--precision", required=True, choices=["int4", "int8", "fp32"])
    ap.add_argument("--work", required=True, help="work dir; the genai model goes to WORK/genai-PRECISION")
    ap.add_argument("--prompt-len", type=int, default=300)
    ap.add_argument("--new", type=int, default=32, help="new tokens per row (>= 2)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="intra_op_num_threads (0 = ORT default)")
    ap.add_argument("--extra-options", nargs="*", default=[], help="KEY=VALUE passed to the builder")
    ap.add_argument("--out-name", default=None, help="model dir name under WORK (default genai-PRECISION)")
    a = ap.parse_args()
    if a.new < 2:
        sys.exit("--new must be >= 2")

    out = os.path.join(a.work, a.out_name or f"genai-{a.precision}")
    build(a.hf, out, a.precision, os.path.join(a.work, "builder-cache"), a.extra_options)

    import onnxruntime_genai as og

    with open(os.path.join(out, "genai_config.json")) as f:
        gcfg = json.load(f)["model"]
    vocab = gcfg["vocab_size"]
    special = set()
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = gcfg.get(k)
        special |= set(v) if isinstance(v, list) else {v}
    ids = np.random.default_rng(0).integers(0, vocab, a.prompt_len).astype(np.int32)
    for i in range(len(ids)):
        while int(ids[i]) in special:
            ids[i] = (ids[i] + 1) % vocab
    prompt = np.tile(ids, (a.batch, 1))
    max_length = a.prompt_len + a.new

    config = og.Config(out)
    if a.threads:
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": a.threads}}}}))
    model = og.Model(config)

    def rep():
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=max_length, min_length=max_length,
                                  batch_size=a.batch)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(prompt)
        gen.generate_next_token()
        _ = gen.get_next_tokens()
        ttft = time.perf_counter() - t0
        steps = []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
        toks = [int(x) for x in gen.get_sequence(0)[a.prompt_len:]]
        for b in range(1, a.batch):
            if [int(x) for x in gen.get_sequence(b)[a.prompt_len:]] != toks:
                print(f"warning: row {b} differs from row 0", file=sys.stderr)
        del gen
        return ttft * 1e3, (sum(steps) / len(steps) * 1e3 if steps else float("nan")), toks

    rep()  # warm-up
    runs = [rep() for _ in range(a.reps)]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    toks = runs[-1][2]
    if len(toks) != a.new:
        print(f"warning: generated {len(toks)} tokens, expected {a.new}", file=sys.stderr)
    if any(r[2] != toks for r in runs):
        print("warning: tokens differ between reps", file=sys.stderr)

    result = {
        "engine": "onnxruntime-genai",
        "version": og.__version__ if hasattr(og, "__version__") else None,
        "onnxruntime": __import__("onnxruntime").__version__,
        "precision": a.precision,
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "new": a.new,
        "threads": a.threads or "default",
        "reps": a.reps,
        "ttft_ms": round(statistics.median(r[0] for r in runs), 3),
        "decode_ms_per_token": round(statistics.median(r[1] for r in runs), 3),
        "ttft_ms_all": [round(r[0], 3) for r in runs],
        "decode_ms_per_token_all": [round(r[1], 3) for r in runs],
        "model_bytes": model_bytes(out),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "tokens": toks,
        "quant": quant_info(out) if a.precision != "fp32" else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
