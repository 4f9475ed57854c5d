"""HF transformers peer of `qadapt-run` generation: Bunny's shapes (SigLIP without its last layer,
mlp2x_gelu connector, phi-2) with random weights, image → first token (TTFT) and decode ms/token at a
batch, greedy, through `PhiForCausalLM.generate(inputs_embeds=…)`: eager (dynamic cache) or with
`cache_implementation="static"` (HF compiles the forward; the strongest PyTorch decode peer).
The Q-Former prompt module of Q-Adapt has no HF class: compare against a Bunny export.
Also measures the floors: device copy bandwidth and the half-precision matmul rate.
Prints one JSON line.

    python3 bench/peer_hf_gen.py --config configs/bunny-3b.json --batch 1 --prompt-tokens 60 --new 64
"""
import argparse
import json
import time

import torch
from transformers import PhiForCausalLM, SiglipVisionModel

from peer_shapes import DTYPES, bunny_shapes

ap = argparse.ArgumentParser()
ap.add_argument("--config", required=True)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--prompt-tokens", type=int, default=60, help="text tokens around the image")
ap.add_argument("--new", type=int, default=64)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--device", default="cuda")
ap.add_argument("--dtype", default="f16")
ap.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
ap.add_argument("--floors", action="store_true")
a = ap.parse_args()

vcfg, pcfg, mm, d, v = bunny_shapes(a.config)
dev = torch.device(a.device)
dt = getattr(torch, DTYPES[a.dtype])
torch.manual_seed(0)
vision = SiglipVisionModel(vcfg).to(dev, dt).eval()
connector = torch.nn.Sequential(torch.nn.Linear(mm, d), torch.nn.GELU(), torch.nn.Linear(d, d)).to(dev, dt).eval()
llm = PhiForCausalLM(pcfg).to(dev, dt).eval()
S = v["image_size"]
pixels = torch.randn(a.batch, 3, S, S, device=dev, dtype=dt)
ids = torch.randint(0, 50000, (a.batch, a.prompt_tokens), device=dev)


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def run(n):
    sync()
    t = time.perf_counter()
    img = connector(vision(pixel_values=pixels).last_hidden_state)
    emb = llm.get_input_embeddings()(ids)
    x = torch.cat([emb[:, :40], img, emb[:, 40:]], 1)
    mask = torch.ones(x.shape[:2], device=dev, dtype=torch.long)
    kw = {"cache_implementation": "static"} if a.cache == "static" else {}
    out = llm.generate(inputs_embeds=x, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kw)
    sync()
    return (time.perf_counter() - t) * 1e3, out.shape[1]


for _ in range(2 if a.cache == "dynamic" else 3):  # the static cache compiles on its first calls
    run(a.new)
    run(1)
t1s, tns = [], []
for _ in range(a.reps):
    t1s.append(run(1)[0])
    ms, n = run(a.new)
    tns.append(ms)
t1s.sort()
tns.sort()
t1, tn = t1s[len(t1s) // 2], tns[len(tns) // 2]
res = {"peer": f"hf-{a.cache}", "batch": a.batch, "dtype": a.dtype, "ttft_ms": t1, "decode_ms_per_token": (tn - t1) / max(n - 1, 1),
       "tokens": n, "torch": torch.__version__, "image_tokens": (S // v["patch_size"]) ** 2}
if a.floors:
    # Decode reads every weight once per step: weight bytes / copy bandwidth. Prefill is matmul-bound:
    # 2·params·tokens FLOPs / the measured matmul rate.
    # Every weight but the embedding table (a step reads one row of it).
    emb = llm.get_input_embeddings().weight
    nbytes = sum(p.numel() * p.element_size() for p in llm.parameters()) - emb.numel() * emb.element_size()
    buf = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(buf)
    for _ in range(3):
        dst.copy_(buf)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        dst.copy_(buf)
    sync()
    bw = 2 * 10 * (1 << 30) / (time.perf_counter() - t)  # bytes moved per second: each copy reads and writes 1 GiB
    m = torch.randn(4096, 4096, device=dev, dtype=dt)
    for _ in range(3):
        m @ m
    sync()
    t = time.perf_counter()
    for _ in range(20):
        m @ m
    sync()
    flops = 20 * 2 * 4096 ** 3 / (time.perf_counter() - t)
    vparams = sum(p.numel() for p in vision.parameters()) + sum(p.numel() for p in connector.parameters())
    lparams = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    seq = a.prompt_tokens + res["image_tokens"]
    prefill_flops = a.batch * (2 * vparams * res["image_tokens"] + 2 * lparams * seq)
    res.update(copy_gb_s=bw / 1e9, matmul_tflops=flops / 1e12, llm_weight_bytes=nbytes,
               decode_floor_ms=nbytes / bw * 1e3, ttft_floor_ms=prefill_flops / flops * 1e3)
print(json.dumps(res))
