"""PyTorch + PEFT peer of `qadapt-train stage1`: the same model shapes (SigLIP without its last layer,
mlp2x_gelu connector, phi-2), LoRA on all their linears, connector trainable, AdamW, the same batch and
sequence (image tokens + text tokens), random weights. Prints one JSON line with the step time
(median after warm-up), samples/s, peak GPU memory and the process's peak RSS.
`--gradient-checkpointing` recomputes each SigLIP and phi layer in the backward pass, as HF does it.

    python3 bench/peer_train.py --config configs/bunny-3b.json --batch-size 4 --text-tokens 300 --steps 8
"""
import argparse
import json
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import PhiForCausalLM, SiglipVisionModel

from peer_shapes import DTYPES, bunny_shapes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=300)
    ap.add_argument("--answer-tokens", type=int, default=60)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=128)
    ap.add_argument("--lora-alpha", type=float, default=256)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    a = ap.parse_args()
    vcfg, pcfg, mm, d, v = bunny_shapes(a.config)
    dev = torch.device(a.device)
    dt = getattr(torch, DTYPES[a.dtype])
    torch.manual_seed(0)

    class Bunny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = SiglipVisionModel(vcfg)
            self.connector = torch.nn.Sequential(torch.nn.Linear(mm, d), torch.nn.GELU(), torch.nn.Linear(d, d))
            self.llm = PhiForCausalLM(pcfg)

        def forward(self, pixels, ids, labels):
            f = self.vision(pixel_values=pixels).last_hidden_state  # Bunny drops the last layer: built without it
            img = self.connector(f)
            emb = torch.cat([img, self.llm.get_input_embeddings()(ids)], 1)
            ign = torch.full(img.shape[:2], -100, device=ids.device, dtype=ids.dtype)
            return self.llm(inputs_embeds=emb, labels=torch.cat([ign, labels], 1)).loss

    model = Bunny().to(dev, dt)
    if a.gradient_checkpointing:
        for m in (model.vision, model.llm):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.05,
                      target_modules=["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2", "out_proj"],
                      modules_to_save=["connector"])
    model = get_peft_model(model, lcfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # f32 master copies, as qadapt-train keeps them
        p.data = p.data.float()
    opt = torch.optim.AdamW([{"params": [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n], "lr": 2e-4},
                             {"params": [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n], "lr": 2e-5}])
    b, s = a.batch_size, v["image_size"]
    pixels = torch.randn(b, 3, s, s, device=dev, dtype=dt)
    ids = torch.randint(0, min(50000, pcfg.vocab_size), (b, a.text_tokens), device=dev)
    labels = ids.clone()
    labels[:, : a.text_tokens - a.answer_tokens] = -100
    times = []
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(a.steps + a.warmup):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=dt, enabled=dt != torch.float32):
            loss = model(pixels, ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if step >= a.warmup:
            times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    print(json.dumps({"peer": "pytorch+peft", "torch": torch.__version__, "step_ms": ms, "samples_per_s": b / (ms / 1000),
                      "peak_gib": peak, "trainable_params": sum(p.numel() for p in trainable),
                      "seq": (s // v["patch_size"]) ** 2 + a.text_tokens, "loss": float(loss),
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "gradient_checkpointing": a.gradient_checkpointing}))


if __name__ == "__main__":
    main()
