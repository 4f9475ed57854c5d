#!/usr/bin/env python3
"""Turn a Bunny (or qadapt) checkpoint directory into a plain HF PhiForCausalLM directory.

    python bench/phi_from_bunny.py BUNNY_DIR OUT_DIR [--no-verify]

Keeps only the phi language-model tensors (embeddings, decoder layers, final layernorm, lm_head),
drops the vision tower / projector / Q-Former, adds a zero `lm_head.bias` when absent (HF Phi's
lm_head has a bias, Bunny's does not), writes everything as f32 `model.safetensors`, a `PhiConfig`
config.json and copies the tokenizer files. Then loads the result with transformers'
PhiForCausalLM and prints the parameter count.

Used to feed onnxruntime-genai's model builder (bench/peer_genai.py), which only knows stock HF
architectures. Needs torch, safetensors and transformers (target/genai-venv has them).
"""
import argparse
import json
import os
import re
import shutil
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
]

KEEP = [
    re.compile(r"^model\.embed_tokens\.weight$"),
    re.compile(
        r"^model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|dense)|mlp\.(fc1|fc2)|input_layernorm)\.(weight|bias)$"
    ),
    re.compile(r"^model\.final_layernorm\.(weight|bias)$"),
    re.compile(r"^lm_head\.(weight|bias)$"),
]


def shard_files(src):
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            wm = json.load(f)["weight_map"]
        return sorted(set(wm.values()))
    files = sorted(f for f in os.listdir(src) if re.match(r"^model.*\.safetensors$", f))
    if not files:
        sys.exit(f"no model*.safetensors in {src}")
    return files


def load_lm_tensors(src):
    out = {}
    dropped = set()
    for fn in shard_files(src):
        with safe_open(os.path.join(src, fn), framework="pt") as f:
            for k in f.keys():
                if any(p.match(k) for p in KEEP):
                    out[k] = f.get_tensor(k).to(torch.float32).contiguous()
                else:
                    dropped.add(k.split(".")[0] + "." + k.split(".")[1] if "." in k else k)
    return out, sorted(dropped)


def phi_config(src_cfg, n_layers_found):
    c = src_cfg
    hidden = c["hidden_size"]
    heads = c["num_attention_heads"]
    if c.get("hidden_act", "gelu_new") != "gelu_new":
        print(f"warning: hidden_act {c.get('hidden_act')!r}, PhiConfig default is gelu_new", file=sys.stderr)
    if c.get("qk_layernorm"):
        sys.exit("qk_layernorm=true is not supported by this converter")
    layers = c["num_hidden_layers"]
    if layers != n_layers_found:
        sys.exit(f"config says {layers} layers, checkpoint has {n_layers_found}")
    cfg = {
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": c["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": c["intermediate_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": c.get("num_key_value_heads") or heads,
        "max_position_embeddings": c.get("max_position_embeddings", 2048),
        "layer_norm_eps": c.get("layer_norm_eps", 1e-5),
        "rope_theta": c.get("rope_theta", 10000.0),
        "partial_rotary_factor": c.get("partial_rotary_factor", 0.4),
        "hidden_act": c.get("hidden_act", "gelu_new"),
        "qk_layernorm": False,
        "tie_word_embeddings": False,
        "rope_scaling": None,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attention_dropout": 0.0,
        "initializer_range": c.get("initializer_range", 0.02),
        "use_cache": True,
        "torch_dtype": "float32",
    }
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if c.get(k) is not None:
            cfg[k] = c[k]
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="Bunny checkpoint directory (config.json + model*.safetensors)")
    ap.add_argument("out", help="output HF PhiForCausalLM directory")
    ap.add_argument("--no-verify", action="store_true", help="skip the transformers load check")
    a = ap.parse_args()

    with open(os.path.join(a.src, "config.json")) as f:
        src_cfg = json.load(f)
    mt = src_cfg.get("model_type", "")
    if "phi" not in mt and "bunny" not in mt and "qadapt" not in mt:
        print(f"warning: unexpected model_type {mt!r}", file=sys.stderr)

    tensors, dropped = load_lm_tensors(a.src)
    if "lm_head.weight" not in tensors:
        sys.exit("checkpoint has no lm_head.weight")
    if "lm_head.bias" not in tensors:
        tensors["lm_head.bias"] = torch.zeros(tensors["lm_head.weight"].shape[0], dtype=torch.float32)
    layer_ids = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")}
    cfg = phi_config(src_cfg, len(layer_ids))

    # sanity-check shapes against the config
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    assert tuple(tensors["model.embed_tokens.weight"].shape) == (v, h), tensors["model.embed_tokens.weight"].shape
    assert tuple(tensors["lm_head.weight"].shape) == (v, h), tensors["lm_head.weight"].shape
    per_layer = 14  # ln w/b, q/k/v/dense w/b, fc1/fc2 w/b
    expect = 1 + 2 + 2 + per_layer * len(layer_ids)  # embed, final ln w/b, lm_head w/b, layers
    if len(tensors) != expect:
        sys.exit(f"expected {expect} tensors, got {len(tensors)}: missing biases or layer parts?")

    os.makedirs(a.out, exist_ok=True)
    save_file(dict(sorted(tensors.items())), os.path.join(a.out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in cfg}
    with open(os.path.join(a.out, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)
        f.write("\n")
    copied = []
    for fn in TOKENIZER_FILES:
        p = os.path.join(a.src, fn)
        if os.path.exists(p):
            shutil.copy2(p, os.path.join(a.out, fn))
            copied.append(fn)
    print(f"wrote {a.out}: {len(tensors)} tensors, {len(layer_ids)} layers; dropped prefixes {dropped}; tokenizer {copied}")

    if not a.no_verify:
        from transformers import PhiForCausalLM

        m = PhiForCausalLM.from_pretrained(a.out, torch_dtype=torch.float32)
        n = sum(p.numel() for p in m.parameters())
        sd = m.state_dict()
        for k, t in tensors.items():
            if not torch.equal(sd[k], t):
                sys.exit(f"tensor {k} differs after load")
        print(f"PhiForCausalLM loaded: {n} parameters")


if __name__ == "__main__":
    main()
