"""Python onnxruntime running the graphs of a qadapt-export directory the way a Python server would:
numpy in, numpy out, the KV cache fed back as the previous step's `present` arrays, greedy argmax.
Reads the exact inputs `bench_run` used (QADAPT_BENCH_DUMP) so both sides compute the same tokens.
Prints one JSON line: TTFT (image → first token) and decode ms/token, medians over --reps."""
import argparse, json, os, time

import numpy as np
import onnxruntime as ort
from PIL import Image

ap = argparse.ArgumentParser()
ap.add_argument("--export", required=True)
ap.add_argument("--inputs", required=True, help="the JSON bench_run wrote (QADAPT_BENCH_DUMP)")
ap.add_argument("--image", required=True)
ap.add_argument("--new", type=int, default=32)
ap.add_argument("--reps", type=int, default=5)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--provider", default="CPUExecutionProvider")
a = ap.parse_args()

d = json.load(open(a.inputs))
ft = np.float16 if d["f16"] else np.float32
B, S = a.batch, d["image_size"]
sess = {g: ort.InferenceSession(os.path.join(a.export, f"{g}.onnx"), providers=[a.provider]) for g in ("vision", "embed", "decoder")}
out_names = [o.name for o in sess["decoder"].get_outputs()]
# Exports since 2026-11-26 take the number of logit rows to compute; a generation loop wants one.
keep = {"num_logits_to_keep": np.array(1, np.int64)} if any(i.name == "num_logits_to_keep" for i in sess["decoder"].get_inputs()) else {}
img = Image.open(a.image).convert("RGB")
vis_in = {}
if d["qformer_ids"] is not None:
    q = np.asarray(d["qformer_ids"], dtype=np.int64)[None].repeat(B, 0)
    vis_in.update(qformer_input_ids=q, qformer_attention_mask=np.ones_like(q))


def pixels(im):
    """Bunny's preprocessing as a Python server does it: pad to a square with the mean colour
    (image_aspect_ratio "pad"), PIL bicubic resize, normalise with mean = std = 0.5."""
    w, h = im.size
    side = max(w, h)
    sq = Image.new("RGB", (side, side), (127, 127, 127))
    sq.paste(im, ((side - w) // 2, (side - h) // 2))
    x = np.asarray(sq.resize((S, S), Image.BICUBIC), dtype=np.float32) / 255.0
    return ((x - 0.5) / 0.5).transpose(2, 0, 1)


# The PIL pixels must be the ones qadapt-run computed (its preprocessing is PIL-exact).
ref = np.asarray(d["pixel_values"], dtype=np.float32).reshape(3, S, S)
assert np.abs(pixels(img) - ref).max() < 1e-2, "PIL pixels differ from qadapt-run's"
ids, pos = d["prompt_ids"], d["image_pos"]


def embed(tok):
    return sess["embed"].run(None, {"input_ids": np.asarray(tok, dtype=np.int64)})[0]


def generate(n):
    px = np.stack([pixels(img) for _ in range(B)]).astype(ft)
    feats = sess["vision"].run(None, {"pixel_values": px, **vis_in})[0]
    pre = embed([ids[:pos]] * B)
    post = embed([ids[pos:]] * B)
    x = np.concatenate([pre, feats, post], axis=1)
    L = x.shape[1]
    past = {}
    for i in range(d["layers"]):
        for kv in ("key", "value"):
            past[f"past_key_values.{i}.{kv}"] = np.zeros((B, d["heads"], 0, d["head_dim"]), dtype=ft)
    feed = {"inputs_embeds": x, "attention_mask": np.ones((B, L), np.int64), "position_ids": np.arange(L, dtype=np.int64)[None].repeat(B, 0), **past, **keep}
    toks = []
    while True:
        outs = dict(zip(out_names, sess["decoder"].run(None, feed)))
        nxt = outs["logits"][:, -1].argmax(-1)
        if nxt[0] == d["eos"] or len(toks) + 1 >= n:
            if nxt[0] != d["eos"]:
                toks.append(int(nxt[0]))
            return toks
        toks.append(int(nxt[0]))
        L += 1
        feed = {"inputs_embeds": embed(nxt[:, None]), "attention_mask": np.ones((B, L), np.int64), "position_ids": np.full((B, 1), L - 1, np.int64), **keep}
        for i in range(d["layers"]):
            for kv in ("key", "value"):
                feed[f"past_key_values.{i}.{kv}"] = outs[f"present.{i}.{kv}"]


def timed(n):
    t = time.perf_counter()
    toks = generate(n)
    return (time.perf_counter() - t) * 1e3, toks


timed(2)
t1s, tns = [], []
for _ in range(a.reps):
    t1s.append(timed(1)[0])
    ms, toks = timed(a.new)
    tns.append(ms)
t1, tn = float(np.median(t1s)), float(np.median(tns))
print(json.dumps({"batch": B, "ttft_ms": t1, "decode_ms_per_token": (tn - t1) / max(len(toks) - 1, 1), "tokens": len(toks), "ids": toks, "onnxruntime": ort.__version__}))
