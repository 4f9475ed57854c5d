#!/usr/bin/env python3
"""Generate the parity fixtures under tests/fixtures/.

Run from anywhere:  /work/venv/bin/python tools/gen_fixtures.py

Everything is deterministic (fixed seeds, single-threaded torch). The reference computations use the
HF transformers modules (SiglipVisionModel, InstructBlipQFormerModel, PhiForCausalLM,
SiglipImageProcessorPil) plus plain torch modules for the parts HF has no module for (connector,
vlm_att_projector/ln/deprojector, and the T-V prompter `vlm_cross_attn`, an nn.MultiheadAttention
with a gate).

Outputs (all under tests/fixtures/):
  <case>/model/...            tiny random checkpoint in the hub layout (config.json, safetensors, tokenizers)
  <case>/image.png            input image of the case
  <case>/expected.safetensors reference tensors
  <case>/expected.json        reference scalars / ids / strings
  tokenizers.json             tokenizer parity cases (Bunny BPE + Q-Former WordPiece)
  preprocess/                 image preprocessing parity cases (+ cases.json)
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import PIL
import torch
import torch.nn as nn
import tokenizers
import transformers
from PIL import Image, ImageOps
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    InstructBlipQFormerConfig,
    InstructBlipQFormerModel,
    PhiConfig,
    PhiForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)
from transformers.image_utils import PILImageResampling
from transformers.models.bert.tokenization_bert import BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

IMAGE_TOKEN_INDEX = -200
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ASK_Q = "Describe the quality of this photo.\nIs the sky over-exposed?"
SCORE_Q = "How would you rate the quality of this image?"
SCORE_PREFIX = " The quality of the image is"
LEVELS = ["excellent", "good", "fair", "poor", "bad"]
LEVEL_WEIGHTS = [5.0, 4.0, 3.0, 2.0, 1.0]
MAX_NEW_TOKENS = 12
EOS = "<|endoftext|>"

# --------------------------------------------------------------------------------------------------
# tiny dimensions (shared by all cases unless a case overrides)
# --------------------------------------------------------------------------------------------------
PHI = dict(hidden_size=80, num_hidden_layers=2, num_attention_heads=4, intermediate_size=160,
           partial_rotary_factor=0.4, rope_theta=10000.0, layer_norm_eps=1e-5, hidden_act="gelu_new",
           max_position_embeddings=512)
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
              image_size=30, patch_size=6, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
              num_channels=3, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
QFORMER = dict(hidden_size=48, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
               cross_attention_freq=2, num_query=6, att_feat_size=40, layer_norm_eps=1e-12, hidden_act="gelu",
               att_ln_eps=1e-5, cross_attn_ffn_dim=24, cross_attn_num_heads=1, prompt_scale=0.1,
               max_text_length=32, truncation_side="left")

CASES = [
    dict(name="bunny_f32_bpe", model_type="bunny-phi", dtype="float32", shards=1, tok_kind="vocab_merges",
         added_tokens_json=True, image=dict(w=45, h=28, mode="RGB", src="astronaut"),
         vision_layers_saved=3, post_layernorm=True, siglip_head=True, want_eos=False, seed=1002),
    dict(name="qadapt_f32_sharded", model_type="bunny-qformer-phi_v3_bib", dtype="float32", shards=3,
         tok_kind="tokenizer_json", qformer_tok="vocab_txt", qformer_layers=3,
         image=dict(w=26, h=41, mode="RGB", src="coffee"),
         vision_layers_saved=2, post_layernorm=False, siglip_head=False, want_eos=True, seed=2007),
    dict(name="qadapt_f16", model_type="bunny-qformer-phi_v3_bib", dtype="float16", shards=1,
         tok_kind="vocab_merges", added_tokens_json=False, qformer_tok="tokenizer_json", qformer_layers=1,
         image=dict(w=43, h=30, mode="RGBA", src="chelsea"),
         vision_layers_saved=2, post_layernorm=True, siglip_head=False, want_eos=False, seed=3003),
    dict(name="bunny_bf16_sharded", model_type="bunny-phi", dtype="bfloat16", shards=2, tok_kind="tokenizer_json",
         image=dict(w=33, h=33, mode="RGB", src="astronaut_face"),
         vision_layers_saved=3, post_layernorm=True, siglip_head=False, want_eos=True, seed=4004),
]

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def is_qadapt(case):
    return case["model_type"].startswith("bunny-qformer")


def write_json(path: Path, obj, indent=2):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")


# ==================================================================================================
# 1. Bunny byte-level BPE tokenizer (phi-2 style, tiny)
# ==================================================================================================
BPE_VOCAB_TARGET = 400  # base vocab (256 bytes + merges); <|endoftext|> and added tokens come after
# phi-2 (CodeGen) ships non-special whitespace-run added tokens after <|endoftext|>; we mimic a few.
WHITESPACE_ADDED = ["    ", "   ", "  ", "\t\t\t", "\t\t"]

BPE_CORPUS = [
    SYSTEM,
    "USER: <image>\n" + ASK_Q + " ASSISTANT:",
    "USER: <image>\n" + SCORE_Q + " ASSISTANT: The quality of the image is good.",
    "The quality of the image is excellent.", "The quality of the image is good.",
    "The quality of the image is fair.", "The quality of the image is poor.",
    "The quality of the image is bad.",
    "The quality of this photo is excellent, with sharp details and vivid colors.",
    "The quality of this photo is good, but the sky is slightly over-exposed.",
    "The quality of this photo is fair because of visible noise in the dark areas.",
    "The quality of this photo is poor: the image is blurry and out of focus.",
    "The quality of this photo is bad, heavily compressed with blocking artifacts.",
    "Is the sky over-exposed? Yes, the sky is over-exposed and the clouds lose detail.",
    "Is the sky over-exposed? No, the exposure of the sky is well balanced.",
    "Describe the quality of this photo. The photo is sharp, the lighting is natural.",
    "How would you rate the quality of this image? I would rate it as good.",
    "How would you rate the quality of this image? I would rate it as poor.",
    "Rate the image quality: excellent, good, fair, poor or bad.",
    "excellent good fair poor bad excellent good fair poor bad",
    "The image has low contrast, motion blur, and a strong color cast.",
    "The main subject is in focus while the background is blurred.",
    "There is noticeable noise, and the highlights are clipped.",
    "Answer with the option's letter from the given choices directly.",
    "A. Yes\nB. No\nC. Not sure\n",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "A chat between a curious user and an artificial intelligence assistant.",
    "numbers 0 1 2 3 4 5 6 7 8 9 10 2024 3.14",
    "def f(x):\n    return x * 2\n\tif x:\n\t\tpass\n",
]


def train_bpe():
    """Train the tiny GPT-2 style byte-level BPE. Returns (vocab dict incl. <|endoftext|>, merges list)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_TARGET, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    corpus = BPE_CORPUS * 3
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(sorted(model["vocab"].items(), key=lambda kv: kv[1]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    assert sorted(vocab.values()) == list(range(len(vocab)))
    assert EOS not in vocab
    vocab[EOS] = len(vocab)  # GPT-2 / phi-2: <|endoftext|> is the last entry of vocab.json
    return vocab, merges


def build_bpe_tokenizer(vocab, merges, with_ws_added: bool) -> Tokenizer:
    t = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                             continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    t.normalizer = None
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    t.post_processor = processors.ByteLevel(trim_offsets=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    if with_ws_added:
        t.add_tokens([AddedToken(s, special=False, normalized=True) for s in WHITESPACE_ADDED])
    return t


def bpe_tokenizer_config(tok: Tokenizer):
    decoder = {}
    for tid, at in sorted(tok.get_added_tokens_decoder().items()):
        decoder[str(tid)] = dict(content=at.content, lstrip=at.lstrip, normalized=at.normalized,
                                 rstrip=at.rstrip, single_word=at.single_word, special=at.special)
    return {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": EOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": 2048,
        "pad_token": EOS,
        "padding_side": "right",
        "tokenizer_class": "CodeGenTokenizer",
        "unk_token": EOS,
    }


def save_bpe(dst: Path, kind: str, vocab, merges, with_ws_added: bool):
    dst.mkdir(parents=True, exist_ok=True)
    tok = build_bpe_tokenizer(vocab, merges, with_ws_added)
    cfg = bpe_tokenizer_config(tok)
    if kind == "tokenizer_json":
        (dst / "tokenizer.json").write_text(json.dumps(json.loads(tok.to_str()), indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    elif kind == "vocab_merges":
        write_json(dst / "vocab.json", vocab, indent=None)
        (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        if with_ws_added:
            added = {at.content: tid for tid, at in tok.get_added_tokens_decoder().items() if at.content != EOS}
            write_json(dst / "added_tokens.json", added)
        write_json(dst / "special_tokens_map.json",
                   {"bos_token": EOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS})
    else:
        raise ValueError(kind)
    write_json(dst / "tokenizer_config.json", cfg)
    return tok


# ==================================================================================================
# 2. Q-Former WordPiece tokenizer (bert-base-uncased style, tiny)
# ==================================================================================================
def qformer_vocab():
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    punct = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    chars = list("0123456789abcdefghijklmnopqrstuvwxyz") + ["图", "像"]
    words = ["the", "of", "this", "is", "a", "an", "and", "to", "in", "it", "image", "photo", "quality", "how",
             "would", "you", "rate", "describe", "sky", "over", "what", "are", "there", "any", "good", "bad",
             "poor", "fair", "excellent", "blur", "noise", "color", "light", "dark", "sharp", "focus", "ex",
             "with", "text", "end", "new", "line", "tab", "multiple", "space", "here", "digits", "cafe", "uber",
             "test", "upper", "lower", "mixed", "don", "stop", "me", "now", "leading", "trailing", "inside",
             "emoji", "nai", "resume", "and", "3", "14"]
    pieces = ["##pose", "##posed", "##s", "##ed", "##ing", "##ly", "##y", "##er", "##ness", "##ve", "##ure"]
    pieces += ["##" + c for c in "0123456789abcdefghijklmnopqrstuvwxyz"]
    out = []
    for w in specials + punct + chars + words + pieces:
        if w not in out:
            out.append(w)
    return out


def build_wordpiece_tokenizer(vocab_list) -> Tokenizer:
    vocab = {w: i for i, w in enumerate(vocab_list)}
    t = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    t.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=None,
                                              lowercase=True)
    t.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    t.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    t.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    t.add_special_tokens([AddedToken(s, special=True, normalized=False)
                          for s in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]])
    t.add_special_tokens([AddedToken("[DEC]", special=True, normalized=False)])
    assert t.token_to_id("[DEC]") == len(vocab_list)
    return t


def save_qformer_tok(dst: Path, kind: str, vocab_list):
    dst.mkdir(parents=True, exist_ok=True)
    if kind == "vocab_txt":
        # bert-base-uncased layout: vocab.txt only; [DEC] is added at load time (official code:
        # tokenizer.add_special_tokens({"bos_token": "[DEC]"}) -> id len(vocab)).
        (dst / "vocab.txt").write_text("\n".join(vocab_list) + "\n", encoding="utf-8")
    elif kind == "tokenizer_json":
        t = build_wordpiece_tokenizer(vocab_list)
        (dst / "tokenizer.json").write_text(json.dumps(json.loads(t.to_str()), indent=2, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
        decoder = {}
        for tid, at in sorted(t.get_added_tokens_decoder().items()):
            decoder[str(tid)] = dict(content=at.content, lstrip=at.lstrip, normalized=at.normalized,
                                     rstrip=at.rstrip, single_word=at.single_word, special=at.special)
        write_json(dst / "tokenizer_config.json", {
            "added_tokens_decoder": decoder,
            "bos_token": "[DEC]",
            "clean_up_tokenization_spaces": True,
            "cls_token": "[CLS]",
            "do_lower_case": True,
            "mask_token": "[MASK]",
            "model_max_length": 512,
            "pad_token": "[PAD]",
            "sep_token": "[SEP]",
            "strip_accents": None,
            "tokenize_chinese_chars": True,
            "tokenizer_class": "BertTokenizer",
            "truncation_side": "left",
            "unk_token": "[UNK]",
        })
    else:
        raise ValueError(kind)


def load_qformer_tokenizers(qdir: Path, kind: str, max_len: int):
    """Returns a list of (name, tokenizer) that must all agree; the first is the reference."""
    toks = []
    if kind == "vocab_txt":
        fast = BertTokenizer(vocab=str(qdir / "vocab.txt"), do_lower_case=True, truncation_side="left")
        slow = BertTokenizerLegacy(vocab_file=str(qdir / "vocab.txt"), do_lower_case=True, truncation_side="left")
        for t in (fast, slow):
            t.add_special_tokens({"bos_token": "[DEC]"})
        toks = [("BertTokenizer(vocab.txt)", fast), ("BertTokenizerLegacy(vocab.txt)", slow)]
    else:
        fast = AutoTokenizer.from_pretrained(str(qdir), truncation_side="left")
        toks = [("AutoTokenizer(tokenizer.json)", fast)]
        raw = Tokenizer.from_file(str(qdir / "tokenizer.json"))
        toks.append(("tokenizers.Tokenizer(tokenizer.json)", raw))
    return toks


def qformer_encode(tok, text: str, max_len: int):
    if isinstance(tok, Tokenizer):
        # raw tokenizers: left truncation of the content, then [CLS] ... [SEP]
        enc = tok.encode(text, add_special_tokens=False)
        ids = enc.ids[-(max_len - 2):] if len(enc.ids) > max_len - 2 else enc.ids
        return [tok.token_to_id("[CLS]")] + list(ids) + [tok.token_to_id("[SEP]")]
    return tok(text, truncation=True, max_length=max_len).input_ids


# ==================================================================================================
# 3. models
# ==================================================================================================
def init_module(module: nn.Module, gen: torch.Generator, emb_std=0.5):
    """Deterministic O(1)-activation init (HF's 0.02 init gives near-uniform logits and tiny margins)."""
    with torch.no_grad():
        for mname, mod in module.named_modules():
            for pname, p in mod.named_parameters(recurse=False):
                if isinstance(mod, nn.LayerNorm):
                    if pname == "weight":
                        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
                    else:
                        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
                elif isinstance(mod, nn.Embedding):
                    p.copy_(emb_std * torch.randn(p.shape, generator=gen))
                elif p.dim() >= 2:
                    fan_in = p.numel() // p.shape[0]
                    p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def round_module_(module: nn.Module, dtype):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).to(torch.float32))


class VlmCrossAttn(nn.Module):
    """T-V prompter (official `vlm_cross_attn`, forward_post) as used by the official code:
    query = visual tokens F, key = value = deprojected Q-Former output K."""

    def __init__(self, d, ffn):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(embed_dim=d, num_heads=1, batch_first=True)
        self.linear1 = nn.Linear(2 * d, ffn)
        self.linear2 = nn.Linear(ffn, 1)
        self.norm1 = nn.LayerNorm(2 * d)  # torch default eps 1e-5
        self.norm2 = nn.LayerNorm(d)

    def forward(self, f, k):
        a, _ = self.self_attn(f, k, k, need_weights=False)
        alpha = torch.sigmoid(self.linear2(torch.relu(self.linear1(self.norm1(torch.cat([f, a], dim=-1))))))
        return self.norm2((1 - alpha) * f + alpha * a)


def hf_qformer_to_lavis(name: str) -> str:
    """HF InstructBlipQFormerModel parameter name -> LAVIS / official `vlm_att_encoder.bert.*` suffix."""
    n = name
    n = n.replace("embeddings.layernorm.", "embeddings.LayerNorm.")
    n = n.replace(".attention.attention.", ".attention.self.")
    n = n.replace(".crossattention.attention.", ".crossattention.self.")
    return n


def make_phi_config(vocab_size, eos_id):
    return PhiConfig(vocab_size=vocab_size, hidden_size=PHI["hidden_size"],
                     intermediate_size=PHI["intermediate_size"], num_hidden_layers=PHI["num_hidden_layers"],
                     num_attention_heads=PHI["num_attention_heads"], hidden_act=PHI["hidden_act"],
                     max_position_embeddings=PHI["max_position_embeddings"], layer_norm_eps=PHI["layer_norm_eps"],
                     partial_rotary_factor=PHI["partial_rotary_factor"], rope_theta=PHI["rope_theta"],
                     resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                     bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, attn_implementation="eager")


def bunny_config(case, vocab_size, eos_id, qcfg):
    cfg = {
        "_name_or_path": f"qadapt-fixtures/{case['name']}",
        "architectures": ["BunnyQformer_PhiForCausalLM" if is_qadapt(case) else "BunnyPhiForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": eos_id,
        "embd_pdrop": 0.0,
        "eos_token_id": eos_id,
        "freeze_mm_mlp_adapter": False,
        "hidden_act": PHI["hidden_act"],
        "hidden_size": PHI["hidden_size"],
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": PHI["intermediate_size"],
        "layer_norm_eps": PHI["layer_norm_eps"],
        "max_position_embeddings": PHI["max_position_embeddings"],
        "mm_hidden_size": VISION["hidden_size"],
        "mm_projector_lr": 2e-05,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_tower": "google/siglip-so400m-patch14-384",
        "model_type": case["model_type"],
        "num_attention_heads": PHI["num_attention_heads"],
        "num_hidden_layers": PHI["num_hidden_layers"],
        "num_key_value_heads": PHI["num_attention_heads"],
        "pad_token_id": eos_id,
        "partial_rotary_factor": PHI["partial_rotary_factor"],
        "qk_layernorm": False,
        "resid_pdrop": 0.1,
        "rope_scaling": None,
        "rope_theta": PHI["rope_theta"],
        "tie_word_embeddings": False,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
        "torch_dtype": case["dtype"],
        "transformers_version": "4.39.2",
        "tune_mm_mlp_adapter": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": vocab_size,
        "vision_config": dict(VISION),
    }
    if is_qadapt(case):
        cfg["bert_type"] = "qformer_pretrain_freeze_part"
        cfg["num_query"] = QFORMER["num_query"]
        cfg["qformer_config"] = qcfg
    return cfg


def shard_split(keys, n):
    """Split sorted keys into n contiguous chunks of (roughly) equal count."""
    keys = list(keys)
    out, start = [], 0
    for i in range(n):
        end = round(len(keys) * (i + 1) / n)
        out.append(keys[start:end])
        start = end
    assert sum(len(c) for c in out) == len(keys) and all(out)
    return out


def save_checkpoint(dst: Path, tensors: dict, shards: int, extra_meta: bool):
    keys = sorted(tensors)
    if shards == 1:
        save_file({k: tensors[k] for k in keys}, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files, weight_map = [], {}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for i, chunk in enumerate(shard_split(keys, shards)):
        fn = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: tensors[k] for k in chunk}, str(dst / fn), metadata={"format": "pt"})
        files.append(fn)
        for k in chunk:
            weight_map[k] = fn
    meta = {"total_size": total}
    if extra_meta:
        meta = {"total_parameters": sum(t.numel() for t in tensors.values()), "total_size": total}
    write_json(dst / "model.safetensors.index.json", {"metadata": meta, "weight_map": weight_map})
    return files + ["model.safetensors.index.json"]


# ==================================================================================================
# 4. images
# ==================================================================================================
def skimage_photo(name):
    import skimage.data
    return {
        "astronaut": skimage.data.astronaut,
        "chelsea": skimage.data.chelsea,
        "coffee": skimage.data.coffee,
    }[name]()


def case_image(spec) -> Image.Image:
    src = spec["src"]
    if src == "astronaut_face":
        arr = skimage_photo("astronaut")[30:230, 150:350]
    else:
        arr = skimage_photo(src)
    img = Image.fromarray(arr).resize((spec["w"], spec["h"]), Image.Resampling.LANCZOS)
    if spec["mode"] == "RGBA":
        w, h = img.size
        yy, xx = np.mgrid[0:h, 0:w]
        alpha = ((xx * 255) // max(w - 1, 1)).astype(np.uint8)  # 0 on the left edge (colours kept under it)
        alpha[yy % 7 == 3] = 0
        rgba = np.dstack([np.asarray(img), alpha])
        img = Image.fromarray(rgba, "RGBA")
    return img


def expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    if width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    result = Image.new(pil_img.mode, (height, height), background_color)
    result.paste(pil_img, ((height - width) // 2, 0))
    return result


def image_processor(size, mean, std):
    return SiglipImageProcessorPil(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                                   image_mean=mean, image_std=std, do_resize=True, do_rescale=True,
                                   rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True)


def preprocess(img: Image.Image, size, mean, std, exif=False) -> torch.Tensor:
    if exif:
        img = ImageOps.exif_transpose(img)
    img = img.convert("RGB")
    img = expand2square(img, tuple(int(x * 255) for x in mean))
    pv = image_processor(size, mean, std)(img, return_tensors="pt")["pixel_values"]
    return pv.to(torch.float32)


# ==================================================================================================
# 5. one model case
# ==================================================================================================
def tokenizer_image_token(prompt, tok):
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    out = []
    for i, c in enumerate(chunks):
        if i:
            out.append(IMAGE_TOKEN_INDEX)
        out.extend(c)
    return out


def prompt_text(question, score=False):
    p = f"{SYSTEM} USER: <image>\n{question} ASSISTANT:"
    return p + SCORE_PREFIX if score else p


def qformer_text(question):
    # official data_utils_prompt: sentence.replace('<image>', '').replace('\n', '')
    return ("<image>\n" + question).replace("<image>", "").replace("\n", "")


def splice_embeds(llm, ids, image_features):
    emb = llm.get_input_embeddings()
    parts = []
    idx = ids.index(IMAGE_TOKEN_INDEX)
    pre, post = ids[:idx], ids[idx + 1:]
    parts.append(emb(torch.tensor([pre], dtype=torch.long)))
    parts.append(image_features)
    parts.append(emb(torch.tensor([post], dtype=torch.long)))
    return torch.cat(parts, dim=1)


def greedy(llm, embeds, eos_id):
    out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                       do_sample=False, max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=eos_id,
                       num_beams=1, return_dict_in_generate=True, output_logits=True, use_cache=True)
    seq = out.sequences[0].tolist()
    logits = [l[0] for l in out.logits]
    margins = []
    for l in logits:
        top = torch.topk(l, 2).values
        margins.append(float(top[0] - top[1]))
    stopped = False
    if seq and seq[-1] == eos_id:
        stopped = True
        seq = seq[:-1]
    return seq, stopped, margins, logits


def run_case(case, bpe_vocab, bpe_merges, qvocab_list, versions):
    name = case["name"]
    cdir = FIX / name
    mdir = cdir / "model"
    mdir.mkdir(parents=True, exist_ok=True)
    dtype = TORCH_DTYPES[case["dtype"]]
    gen = torch.Generator().manual_seed(case["seed"])

    # ---------------- tokenizers
    with_ws = case["tok_kind"] == "tokenizer_json" or case.get("added_tokens_json", False)
    save_bpe(mdir, case["tok_kind"], bpe_vocab, bpe_merges, with_ws)
    tok = AutoTokenizer.from_pretrained(str(mdir))
    eos_id = tok.convert_tokens_to_ids(EOS)
    assert eos_id == bpe_vocab[EOS] and tok.eos_token_id == eos_id and tok.bos_token_id == eos_id
    tok_len = len(tok)
    vocab_size = ((tok_len + 63) // 64) * 64 + 64  # padded (DESIGN 7.9)
    level_ids = {lv: tok(" " + lv).input_ids[0] for lv in LEVELS}
    assert len(set(level_ids.values())) == 5, level_ids

    qcfg = None
    qtoks = None
    if is_qadapt(case):
        qcfg = dict(QFORMER)
        qcfg["num_hidden_layers"] = case["qformer_layers"]
        qcfg["vocab_size"] = len(qvocab_list) + 1
        qcfg["dec_token_id"] = len(qvocab_list)
        save_qformer_tok(mdir / "qformer", case["qformer_tok"], qvocab_list)
        qtoks = load_qformer_tokenizers(mdir / "qformer", case["qformer_tok"], qcfg["max_text_length"])

    write_json(mdir / "config.json", bunny_config(case, vocab_size, eos_id, qcfg))

    # ---------------- modules
    vcfg = SiglipVisionConfig(hidden_size=VISION["hidden_size"], intermediate_size=VISION["intermediate_size"],
                              num_hidden_layers=VISION["num_hidden_layers"],
                              num_attention_heads=VISION["num_attention_heads"], image_size=VISION["image_size"],
                              patch_size=VISION["patch_size"], layer_norm_eps=VISION["layer_norm_eps"],
                              hidden_act=VISION["hidden_act"], num_channels=3, attention_dropout=0.0,
                              vision_use_head=True, attn_implementation="eager")
    vision = SiglipVisionModel(vcfg).eval()
    init_module(vision, gen)

    mm_hidden, hidden = VISION["hidden_size"], PHI["hidden_size"]
    connector = nn.Sequential(nn.Linear(mm_hidden, hidden), nn.GELU(), nn.Linear(hidden, hidden)).eval()
    init_module(connector, gen)

    llm = PhiForCausalLM(make_phi_config(vocab_size, eos_id)).eval()
    init_module(llm, gen)
    with torch.no_grad():
        # lm_head: larger scale on the real rows for clear greedy margins; padded rows small (never argmax);
        # bias zero (Bunny's lm_head has no bias, and it is not saved).
        w = llm.lm_head.weight
        w.mul_(2.0)
        w[tok_len:].mul_(0.05)
        llm.lm_head.bias.zero_()

    pm = None
    if is_qadapt(case):
        qf_cfg = InstructBlipQFormerConfig(
            vocab_size=qcfg["vocab_size"], hidden_size=qcfg["hidden_size"],
            num_hidden_layers=qcfg["num_hidden_layers"], num_attention_heads=qcfg["num_attention_heads"],
            intermediate_size=qcfg["intermediate_size"], hidden_act=qcfg["hidden_act"],
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            max_position_embeddings=qcfg["max_position_embeddings"], layer_norm_eps=qcfg["layer_norm_eps"],
            pad_token_id=0, cross_attention_frequency=qcfg["cross_attention_freq"],
            encoder_hidden_size=qcfg["att_feat_size"], attn_implementation="eager")
        pm = nn.Module()
        pm.qformer = InstructBlipQFormerModel(qf_cfg).eval()
        pm.query = nn.Parameter(torch.zeros(1, qcfg["num_query"], qcfg["hidden_size"]))
        pm.projector = nn.Linear(mm_hidden, qcfg["att_feat_size"])
        pm.ln = nn.LayerNorm(qcfg["att_feat_size"], eps=qcfg["att_ln_eps"])
        pm.deprojector = nn.Linear(qcfg["hidden_size"], mm_hidden)
        pm.cross = VlmCrossAttn(mm_hidden, qcfg["cross_attn_ffn_dim"])
        pm.eval()
        init_module(pm, gen)
        with torch.no_grad():
            pm.query.copy_(torch.randn(pm.query.shape, generator=gen))

    for m in [vision, connector, llm] + ([pm] if pm is not None else []):
        round_module_(m, dtype)

    # ---------------- image
    img = case_image(case["image"])
    img_path = cdir / "image.png"
    img.save(img_path, format="PNG")
    img_loaded = Image.open(img_path)
    img_loaded.load()
    pixel_values = preprocess(img_loaded, VISION["image_size"], VISION["image_mean"], VISION["image_std"])

    with torch.no_grad():
        vout = vision(pixel_values=pixel_values, output_hidden_states=True)
        assert len(vout.hidden_states) == VISION["num_hidden_layers"] + 1
        feats = vout.hidden_states[-2]
        # cross-check against Bunny's way: drop the last layer, take hidden_states[-1]
        vcfg2 = SiglipVisionConfig(**{**vcfg.to_dict(), "num_hidden_layers": VISION["num_hidden_layers"] - 1})
        vcfg2._attn_implementation = "eager"
        v2 = SiglipVisionModel(vcfg2).eval()
        missing = v2.load_state_dict(vision.state_dict(), strict=False)
        assert not missing.missing_keys, missing
        f2 = v2(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]
        assert torch.equal(f2, feats)

    expected = {"pixel_values": pixel_values.contiguous(), "vision_features": feats.contiguous()}
    info_prompts = {}

    def image_features_for(question):
        """Returns (dict of intermediate tensors, image_features)."""
        inter = {}
        f = feats
        if pm is not None:
            qtext = qformer_text(question)
            ref_name, ref_tok = qtoks[0]
            qids = qformer_encode(ref_tok, qtext, qcfg["max_text_length"])
            for other_name, other in qtoks[1:]:
                assert qformer_encode(other, qtext, qcfg["max_text_length"]) == qids, (other_name, qtext)
            qids_t = torch.tensor([qids], dtype=torch.long)
            x = pm.ln(pm.projector(f)[:, 1:])  # official code drops visual token 0 for the Q-Former input
            q_out = pm.qformer(input_ids=qids_t, attention_mask=torch.ones_like(qids_t),
                               query_embeds=pm.query, encoder_hidden_states=x).last_hidden_state
            q_out = q_out[:, :qcfg["num_query"]]
            k = pm.deprojector(q_out)
            p = pm.cross(f, k)
            f = f + qcfg["prompt_scale"] * p
            inter["qformer_input_ids"] = qids_t[0].clone()
            inter["qformer_output"] = q_out.contiguous()
            inter["fused_features"] = f.contiguous()
            inter["_qtext"] = qtext
            expected["qformer_image_input"] = x.contiguous()
        return inter, connector(f)

    results = {}
    with torch.no_grad():
        for pname, question, is_score in [("ask", ASK_Q, False), ("score", SCORE_Q, True)]:
            ptext = prompt_text(question, is_score)
            ids = tokenizer_image_token(ptext, tok)
            assert ids.count(IMAGE_TOKEN_INDEX) == 1
            inter, image_features = image_features_for(question)
            embeds = splice_embeds(llm, ids, image_features)
            logits = llm(inputs_embeds=embeds).logits[0, -1]
            expected[f"{pname}.input_ids"] = torch.tensor(ids, dtype=torch.long)
            for k in ("qformer_input_ids", "qformer_output", "fused_features"):
                if k in inter:
                    expected[f"{pname}.{k}"] = inter[k]
            expected[f"{pname}.image_features"] = image_features.contiguous()
            expected[f"{pname}.logits"] = logits.contiguous()
            info_prompts[pname] = dict(question=question, prompt=ptext, qformer_text=inter.get("_qtext"),
                                       num_input_ids=len(ids), sequence_length=int(embeds.shape[1]))
            results[pname] = dict(embeds=embeds, logits=logits)

        # ---------------- greedy generation for "ask" (optionally tune the eos row so that it stops early)
        if case["want_eos"]:
            tune_eos_row(llm, results["ask"]["embeds"], eos_id, dtype)
            # eos row changed: recompute the prefill logits of both prompts
            for pname in ("ask", "score"):
                lg = llm(inputs_embeds=results[pname]["embeds"]).logits[0, -1]
                expected[f"{pname}.logits"] = lg.contiguous()
                results[pname]["logits"] = lg
        seq, stopped, margins, step_logits = greedy(llm, results["ask"]["embeds"], eos_id)
        assert torch.allclose(step_logits[0], results["ask"]["logits"], atol=1e-4, rtol=1e-4)
        assert all(t < tok_len for t in seq), seq
        assert min(margins) > 5e-2, margins
        if case["want_eos"]:
            assert stopped and 2 <= len(seq) < MAX_NEW_TOKENS, (stopped, seq)
        expected["ask.greedy_ids"] = torch.tensor(seq, dtype=torch.long)

        sl = results["score"]["logits"]
        lvl = torch.stack([sl[level_ids[lv]] for lv in LEVELS])
        probs = torch.softmax(lvl.double(), dim=0)
        score = float(sum(p * w for p, w in zip(probs.tolist(), LEVEL_WEIGHTS)))
        expected["score.level_logits"] = lvl.to(torch.float32).contiguous()

    # ---------------- checkpoint (Bunny / Q-Adapt key names, in the case dtype)
    tensors = {}
    vsd = vision.state_dict()
    for k, v in vsd.items():
        if k.startswith("head.") and not case["siglip_head"]:
            continue
        if k.startswith("post_layernorm.") and not case["post_layernorm"]:
            continue
        if k.startswith("encoder.layers."):
            li = int(k.split(".")[2])
            if li >= case["vision_layers_saved"]:
                continue
        tensors["model.vision_tower.vision_tower.vision_model." + k] = v
    for k, v in connector.state_dict().items():
        tensors["model.mm_projector." + k] = v
    for k, v in llm.state_dict().items():
        if k == "lm_head.bias":
            continue
        tensors[k] = v
    if pm is not None:
        mapped = 0
        for k, v in pm.qformer.state_dict().items():
            tensors["model.vlm_att_encoder.bert." + hf_qformer_to_lavis(k)] = v
            mapped += 1
        assert mapped == len(list(pm.qformer.parameters())), "every HF Q-Former parameter must be mapped"
        # LAVIS BertEmbeddings registers position_ids as a persistent buffer: shape [1, max_pos], int64
        tensors["model.vlm_att_encoder.bert.embeddings.position_ids"] = \
            torch.arange(qcfg["max_position_embeddings"], dtype=torch.long).unsqueeze(0)
        tensors["model.vlm_att_query"] = pm.query.detach()
        for k, v in pm.projector.state_dict().items():
            tensors["model.vlm_att_projector." + k] = v
        for k, v in pm.ln.state_dict().items():
            tensors["model.vlm_att_ln." + k] = v
        for k, v in pm.deprojector.state_dict().items():
            tensors["model.vlm_att_deprojector." + k] = v
        for k, v in pm.cross.state_dict().items():
            tensors["model.vlm_cross_attn." + k] = v
        check_lavis_names(tensors, qcfg)
    tensors = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
               for k, v in tensors.items()}
    weight_files = save_checkpoint(mdir, tensors, case["shards"], extra_meta=(case["name"] == "bunny_bf16_sharded"))

    save_file({k: v.contiguous() for k, v in sorted(expected.items())}, str(cdir / "expected.safetensors"),
              metadata={"format": "pt"})

    answer = tok.decode(seq, skip_special_tokens=True)
    exp_json = {
        "case": name,
        "model_type": case["model_type"],
        "dtype": case["dtype"],
        "sharded": case["shards"] > 1,
        "num_shards": case["shards"],
        "weight_files": weight_files,
        "tokenizer_kind": case["tok_kind"],
        "tokenizer_has_whitespace_added_tokens": with_ws,
        "qformer_tokenizer_kind": case.get("qformer_tok"),
        "tokenizer_len": tok_len,
        "vocab_size": vocab_size,
        "eos_token_id": eos_id,
        "image": {"file": "image.png", "width": img.size[0], "height": img.size[1], "mode": img.mode,
                  "square_size": max(img.size), "paste_offset": paste_offset(img.size),
                  "fill": [int(x * 255) for x in VISION["image_mean"]]},
        "vision": {"layers_in_checkpoint": case["vision_layers_saved"], "layers_used":
                   VISION["num_hidden_layers"] - 1, "post_layernorm_in_checkpoint": case["post_layernorm"],
                   "head_in_checkpoint": case["siglip_head"], "num_patches":
                   (VISION["image_size"] // VISION["patch_size"]) ** 2},
        "qformer": None if qcfg is None else {"num_hidden_layers": qcfg["num_hidden_layers"],
                                              "cross_attention_layers": [i for i in range(qcfg["num_hidden_layers"])
                                                                         if i % qcfg["cross_attention_freq"] == 0],
                                              "max_text_length": qcfg["max_text_length"],
                                              "dec_token_id": qcfg["dec_token_id"]},
        "image_token_index": IMAGE_TOKEN_INDEX,
        "questions": {"ask": ASK_Q, "score": SCORE_Q},
        "prompts": info_prompts,
        "max_new_tokens": MAX_NEW_TOKENS,
        "greedy_ids": seq,
        "stopped_at_eos": stopped,
        "greedy_min_margin": min(margins),
        "answer": answer,
        "level_token_ids": level_ids,
        "level_logits": [float(x) for x in lvl.tolist()],
        "level_probs": [float(x) for x in probs.tolist()],
        "score": score,
        "versions": versions,
    }
    write_json(cdir / "expected.json", exp_json)
    return exp_json, tok, qtoks


def paste_offset(size):
    w, h = size
    if w == h:
        return [0, 0]
    if w > h:
        return [0, (w - h) // 2]
    return [(h - w) // 2, 0]


def check_lavis_names(tensors, qcfg):
    """Assert the Q-Former keys are exactly the LAVIS/official names."""
    pre = "model.vlm_att_encoder.bert."
    want = {pre + "embeddings.word_embeddings.weight", pre + "embeddings.position_embeddings.weight",
            pre + "embeddings.LayerNorm.weight", pre + "embeddings.LayerNorm.bias",
            pre + "embeddings.position_ids"}
    for i in range(qcfg["num_hidden_layers"]):
        lp = f"{pre}encoder.layer.{i}."
        mods = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm",
                "intermediate_query.dense", "output_query.dense", "output_query.LayerNorm"]
        if i % qcfg["cross_attention_freq"] == 0:
            mods += ["crossattention.self.query", "crossattention.self.key", "crossattention.self.value",
                     "crossattention.output.dense", "crossattention.output.LayerNorm"]
        for m in mods:
            want |= {lp + m + ".weight", lp + m + ".bias"}
    have = {k for k in tensors if k.startswith(pre)}
    assert have == want, (sorted(have - want), sorted(want - have))


def tune_eos_row(llm, embeds, eos_id, dtype):
    """Replace the eos row of lm_head so that greedy decoding emits eos at some step k (tests the stop
    path). The row is set to beta * h_k / |h_k| where h_k is the final hidden state after k new tokens."""
    seq, stopped, _, _ = greedy(llm, embeds, eos_id)
    w = llm.lm_head.weight
    orig = w[eos_id].clone()
    with torch.no_grad():
        for k in (5, 6, 4, 7, 3, 8):
            full = torch.cat([embeds, llm.get_input_embeddings()(torch.tensor([seq[:k]]))], dim=1)
            h = llm.model(inputs_embeds=full).last_hidden_state[0, -1]
            for beta in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0):
                w[eos_id] = (beta * h / h.norm()).to(dtype).to(torch.float32)
                s2, st2, m2, _ = greedy(llm, embeds, eos_id)
                if st2 and len(s2) == k and s2 == seq[:k] and min(m2) > 5e-2:
                    return
            w[eos_id] = orig
    raise RuntimeError("could not tune the eos row")


# ==================================================================================================
# 6. tokenizer cases
# ==================================================================================================
TOKENIZER_STRINGS = [
    "Describe the quality of this photo.",
    "How would you rate the quality of this image?",
    "Café Über naïve résumé",
    "图像质量很好，图像",
    "emoji 😀👍 test",
    "multiple   spaces    here  and     five",
    "tabs\tand\t\ttabs\t\t\tend",
    "new\nlines\n\nend\n",
    "digits 1234567890 and 3.14",
    "text with <|endoftext|> inside<|endoftext|>",
    " leading and trailing spaces ",
    "UPPER lower MiXeD don't stop-me now!!!",
    "The quality of the image is excellent, good, fair, poor, bad.",
    "",
    "Leading words get dropped. " + "Describe the quality of this photo. Is the sky over-exposed? " * 4
    + "Final check: rate it excellent, good, fair, poor or bad.",
]


def tokenizer_cases(case, tok, qtoks, qcfg_max):
    out = {"bunny": {"dir": f"{case['name']}/model", "kind": case["tok_kind"], "len": len(tok),
                     "add_special_tokens": "HF default (no BOS/EOS added)", "cases": []}}
    raw = None
    if case["tok_kind"] == "tokenizer_json":
        raw = Tokenizer.from_file(str(FIX / case["name"] / "model" / "tokenizer.json"))
    for s in TOKENIZER_STRINGS:
        ids = tok(s).input_ids
        if raw is not None:
            assert raw.encode(s).ids == ids, (s, raw.encode(s).ids, ids)
        out["bunny"]["cases"].append({
            "text": s, "ids": ids,
            "tokens": tok.convert_ids_to_tokens(ids),
            "decoded": tok.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
        })
    if qtoks is not None:
        ref_name, ref = qtoks[0]
        q = {"dir": f"{case['name']}/model/qformer", "kind": case["qformer_tok"], "reference": ref_name,
             "cross_checked_with": [n for n, _ in qtoks[1:]], "max_length": qcfg_max, "truncation_side": "left",
             "dec_token_id": ref.convert_tokens_to_ids("[DEC]"), "cases": []}
        for s in TOKENIZER_STRINGS + [qformer_text(ASK_Q), qformer_text(SCORE_Q)]:
            ids = qformer_encode(ref, s, qcfg_max)
            for on, o in qtoks[1:]:
                assert qformer_encode(o, s, qcfg_max) == ids, (on, s)
            q["cases"].append({"text": s, "ids": ids, "tokens": ref.convert_ids_to_tokens(ids)})
        out["qformer"] = q
    return out


# ==================================================================================================
# 7. preprocessing cases
# ==================================================================================================
PRE_SIZE = 384


def preprocess_cases():
    pdir = FIX / "preprocess"
    pdir.mkdir(parents=True, exist_ok=True)
    mean = std = [0.5, 0.5, 0.5]
    items = []
    seen = {}

    def photo(name, box, size):
        arr = skimage_photo(name)
        return Image.fromarray(arr).crop(box).resize(size, Image.Resampling.LANCZOS)

    astro = photo("astronaut", (0, 60, 512, 401), (300, 200))      # wide
    chelsea = photo("chelsea", (100, 0, 400, 300), (200, 300))     # tall (rescaled non-square)
    coffee = photo("coffee", (0, 0, 600, 400), (288, 192))

    def add(fname, img_saver, exif=False, note=""):
        path = pdir / fname
        img_saver(path)
        img = Image.open(path)
        img.load()
        pv = preprocess(img, PRE_SIZE, mean, std, exif=exif)[0]
        u = (pv.double() * torch.tensor(std, dtype=torch.float64)[:, None, None]
             + torch.tensor(mean, dtype=torch.float64)[:, None, None]) * 255.0
        r = torch.round(u)
        err = float((u - r).abs().max())
        assert err < 1e-4, (fname, err)
        assert r.min() >= 0 and r.max() <= 255
        arr = np.ascontiguousarray(r.to(torch.uint8).permute(1, 2, 0).numpy())
        key = arr.tobytes()
        if key in seen:  # identical output (e.g. RGBA whose alpha is dropped): share the expected file
            exp_name = seen[key]
        else:
            exp_name = fname + ".expected.png"
            assert not (pdir / exp_name).exists(), exp_name
            Image.fromarray(arr, "RGB").save(pdir / exp_name, format="PNG", compress_level=9)
            seen[key] = exp_name
        oriented = ImageOps.exif_transpose(img) if exif else img
        decoded = None
        if img.format == "JPEG":
            # the decoder's output (after EXIF orientation, before padding): lets a test separate JPEG-decoder
            # differences from resize differences (preprocessing this PNG gives exactly `expected`)
            decoded = fname + ".decoded.png"
            oriented.convert("RGB").save(pdir / decoded, format="PNG", compress_level=9)
            pv2 = preprocess(Image.open(pdir / decoded), PRE_SIZE, mean, std)[0]
            assert torch.equal(pv2, pv), fname
        items.append({"input": fname, "expected": exp_name, "decoded": decoded, "size": PRE_SIZE, "mode": img.mode,
                      "format": img.format, "width": oriented.size[0], "height": oriented.size[1],
                      "stored_width": img.size[0], "stored_height": img.size[1],
                      "exif_transpose": exif, "fill": [127, 127, 127], "max_recovery_error": err, "note": note})

    add("astronaut.jpg", lambda p: astro.save(p, format="JPEG", quality=90))
    add("astronaut.png", lambda p: astro.save(p, format="PNG"))
    add("chelsea.jpg", lambda p: chelsea.save(p, format="JPEG", quality=90))
    add("chelsea.png", lambda p: chelsea.save(p, format="PNG"))
    add("gray.png", lambda p: coffee.convert("L").save(p, format="PNG"), note="mode L, replicated to RGB")

    def rgba_saver(p):
        w, h = coffee.size
        yy, xx = np.mgrid[0:h, 0:w]
        alpha = ((yy * 255) // (h - 1)).astype(np.uint8)
        alpha[(xx // 16) % 4 == 0] = 0
        Image.fromarray(np.dstack([np.asarray(coffee), alpha]), "RGBA").save(p, format="PNG")

    add("rgba.png", rgba_saver, note="alpha is dropped by convert('RGB') (no compositing)")
    add("coffee_lossless.webp", lambda p: coffee.save(p, format="WEBP", lossless=True, quality=100, method=4))

    def exif_saver(p):
        upright = astro.crop((40, 0, 250, 200)).resize((150, 210), Image.Resampling.LANCZOS)
        stored = upright.transpose(Image.Transpose.ROTATE_90)  # inverse of what Orientation=6 asks for
        exif = Image.Exif()
        exif[0x0112] = 6
        stored.save(p, format="JPEG", quality=90, exif=exif.tobytes())

    add("exif_orientation6.jpg", exif_saver, exif=True,
        note="EXIF Orientation 6 applied with PIL.ImageOps.exif_transpose before expand2square "
             "(official Bunny does not do this; we honour EXIF)")

    def gradient_saver(p):
        w, h = 900, 600
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
        r = (xx / (w - 1)) * 255
        g = (yy / (h - 1)) * 255
        b = 127.5 + 127.5 * np.sin(xx / 1.7) * (yy > h / 2)  # high frequency -> antialiasing matters
        b = np.where(yy <= h / 2, ((xx // 3 + yy // 3) % 2) * 255.0, b)  # 3px checkerboard top half
        arr = np.clip(np.round(np.dstack([r, g, b])), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(p, format="PNG")

    add("gradient_900x600.png", gradient_saver, note="strong downscale: PIL bicubic is antialiased (support * scale)")

    def tiny_saver(p):
        rng = np.random.default_rng(7)
        arr = rng.integers(0, 256, size=(13, 20, 3), dtype=np.uint8)
        Image.fromarray(arr, "RGB").save(p, format="PNG")

    add("tiny_20x13.png", tiny_saver, note="upscale 20x20 -> 384 (after padding)")

    write_json(pdir / "cases.json", {
        "processor": "transformers SiglipImageProcessorPil(size=384x384, resample=BICUBIC, rescale 1/255, "
                     "normalize mean=std=0.5) after .convert('RGB') and expand2square(fill=127)",
        "expected_format": "PNG uint8 RGB = round((pixel_values*std+mean)*255)",
        "cases": items,
    })


# ==================================================================================================
def clean_outputs():
    for c in CASES:
        shutil.rmtree(FIX / c["name"], ignore_errors=True)
    shutil.rmtree(FIX / "preprocess", ignore_errors=True)
    (FIX / "tokenizers.json").unlink(missing_ok=True)


def main():
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "pillow": PIL.__version__, "numpy": np.__version__,
                "python": sys.version.split()[0]}
    try:
        import skimage
        versions["scikit-image"] = skimage.__version__
    except ImportError:
        pass
    FIX.mkdir(parents=True, exist_ok=True)
    clean_outputs()

    bpe_vocab, bpe_merges = train_bpe()
    qvocab = qformer_vocab()

    tok_cases = {}
    summary = {}
    for case in CASES:
        exp, tok, qtoks = run_case(case, bpe_vocab, bpe_merges, qvocab, versions)
        tok_cases[case["name"]] = tokenizer_cases(case, tok, qtoks, QFORMER["max_text_length"])
        summary[case["name"]] = (exp["greedy_ids"], exp["stopped_at_eos"], round(exp["score"], 4),
                                 round(exp["greedy_min_margin"], 4))
    write_json(FIX / "tokenizers.json", tok_cases)
    preprocess_cases()

    for k, v in summary.items():
        print(k, v)


if __name__ == "__main__":
    main()
