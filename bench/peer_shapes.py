"""The HF configs of the PyTorch peers (bench/peer_train.py, bench/peer_hf_gen.py): Bunny's shapes
from a qadapt config JSON — SigLIP (so400m unless `vision_config` says otherwise) without its last
layer and pooling head, phi-2 — and the connector's widths."""
import json

from transformers import PhiConfig, SiglipVisionConfig

# --dtype names of the peers' command lines.
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}

SIGLIP_SO400M = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
                 "image_size": 384, "patch_size": 14, "layer_norm_eps": 1e-6}


def bunny_shapes(path):
    """(SiglipVisionConfig, PhiConfig, connector input width, connector output width, vision dict)."""
    cfg = json.load(open(path))
    v = {**SIGLIP_SO400M, **cfg.get("vision_config", {})}
    vcfg = SiglipVisionConfig(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                              num_hidden_layers=v["num_hidden_layers"] - 1, num_attention_heads=v["num_attention_heads"],
                              image_size=v["image_size"], patch_size=v["patch_size"], layer_norm_eps=v["layer_norm_eps"],
                              vision_use_head=False)
    pcfg = PhiConfig(vocab_size=cfg.get("vocab_size", 50295), hidden_size=cfg.get("hidden_size", 2560),
                     num_hidden_layers=cfg.get("num_hidden_layers", 32), num_attention_heads=cfg.get("num_attention_heads", 32),
                     intermediate_size=cfg.get("intermediate_size", 10240), partial_rotary_factor=cfg.get("partial_rotary_factor", 0.4),
                     max_position_embeddings=cfg.get("max_position_embeddings", 2048))
    return vcfg, pcfg, cfg.get("mm_hidden_size", 1152), pcfg.hidden_size, v
