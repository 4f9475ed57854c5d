#!/usr/bin/env python3
"""Checks `qadapt-run serve` against the official `openai` Python client (pip install openai).

  python3 tools/openai_check.py http://127.0.0.1:8080 tests/fixtures/bunny_f32_bpe/image.png

One line per check (PASS/FAIL, number, name, detail), then a JSON line {"passed": k, "failed": m}; the exit
status is 1 when any check fails. Checks: models.list; a non-stream chat with the image as a data URL
(content, usage, finish_reason); the same request streamed gives the same text (temperature 0, greedy);
a multi-turn conversation; logprobs with top_logprobs=2; n=2, tools and a string max_tokens each answered
with a 400 (openai.BadRequestError) that names the field. Every request asks for max_tokens=8.
"""

import base64
import json
import math
import os
import re
import sys

try:
    import openai
    from openai import OpenAI
except ImportError:
    sys.exit("openai_check: needs the openai package (python3 -m venv /tmp/oai && /tmp/oai/bin/pip install openai)")

MAX_TOKENS = 8
QUESTION = "Describe the image quality."

results = []


def report(ok, name, detail):
    results.append(ok)
    print(f"{'PASS' if ok else 'FAIL'} {len(results)} {name}: {detail}", flush=True)


def check(name):
    """Runs the decorated function at once as one check: it returns (ok, detail); an exception fails it."""

    def run(fn):
        try:
            ok, detail = fn()
        except openai.APIStatusError as e:
            ok, detail = False, f"HTTP {e.status_code}: {err_text(e)}"
        except Exception as e:
            ok, detail = False, f"{type(e).__name__}: {e}"
        report(bool(ok), name, detail)
        return fn

    return run


def err_text(e):
    body = getattr(e, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(getattr(e, "message", e))


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def data_url(path):
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    mime = {"jpg": "jpeg", "jpeg": "jpeg", "webp": "webp"}.get(ext, "png")
    with open(path, "rb") as f:
        return f"data:image/{mime};base64," + base64.b64encode(f.read()).decode("ascii")


def expect_bad_request(call, field):
    """(ok, detail) for a call that must fail with a 400 naming `field` (in the message or as `param`)."""
    try:
        r = call()
    except openai.BadRequestError as e:
        msg = err_text(e)
        named = re.search(rf"(?<![A-Za-z0-9_]){re.escape(field)}(?![A-Za-z0-9_])", msg) is not None
        param = getattr(e, "param", None)
        ok = named or param == field
        return ok, f"400 {msg!r}" + (f" (param {param!r})" if param else "") + ("" if ok else f": does not name {field!r}")
    except openai.APIStatusError as e:
        return False, f"HTTP {e.status_code} instead of 400: {err_text(e)}"
    content = r.choices[0].message.content if getattr(r, "choices", None) else r
    return False, f"accepted (200, content {content!r}) instead of a 400 naming {field!r}"


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: openai_check.py URL IMAGE.png")
    url, image = sys.argv[1].rstrip("/"), sys.argv[2]
    client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    img = {"type": "image_url", "image_url": {"url": data_url(image)}}
    first = [{"role": "user", "content": [img, {"type": "text", "text": QUESTION}]}]
    state = {"model": "qadapt", "content": None}

    @check("models.list")
    def _():
        ids = [m.id for m in client.models.list()]
        if ids and all(isinstance(i, str) and i for i in ids):
            state["model"] = ids[0]
            return True, f"ids {ids}"
        return False, f"no model ids: {ids}"

    model = state["model"]

    @check("chat (non-stream)")
    def _():
        r = client.chat.completions.create(model=model, messages=first, max_tokens=MAX_TOKENS, temperature=0)
        c = r.choices[0]
        content, u, fr = c.message.content, r.usage, c.finish_reason
        problems = []
        if not isinstance(content, str) or not content:
            problems.append(f"content {content!r} is not a non-empty string")
        else:
            state["content"] = content
        if u is None:
            problems.append("no usage")
        else:
            p, k, t = u.prompt_tokens, u.completion_tokens, u.total_tokens
            if not (is_int(p) and is_int(k) and is_int(t)):
                problems.append(f"usage not all ints: prompt {p!r}, completion {k!r}, total {t!r}")
            elif t != p + k:
                problems.append(f"usage total {t} != prompt {p} + completion {k}")
            elif k > MAX_TOKENS:
                problems.append(f"completion_tokens {k} over max_tokens {MAX_TOKENS}")
        if fr not in ("stop", "length"):
            problems.append(f"finish_reason {fr!r} not stop/length")
        usage = u and f"usage {u.prompt_tokens}+{u.completion_tokens}={u.total_tokens}"
        return not problems, "; ".join(problems) or f"{content!r}, {usage}, finish_reason {fr}"

    @check("chat (stream) = non-stream, greedy")
    def _():
        parts, finish, chunks = [], None, 0
        for ch in client.chat.completions.create(model=model, messages=first, max_tokens=MAX_TOKENS, temperature=0, stream=True):
            chunks += 1
            for c in ch.choices or []:
                if c.delta is not None and c.delta.content:
                    parts.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
        text = "".join(parts)
        if state["content"] is None:
            return False, f"streamed {text!r} ({chunks} chunks), but no non-stream answer to compare"
        if text != state["content"]:
            return False, f"streamed {text!r} != non-stream {state['content']!r}"
        if finish not in ("stop", "length"):
            return False, f"same text {text!r}, but the last finish_reason is {finish!r}"
        return True, f"{text!r} in {chunks} chunks, finish_reason {finish}"

    @check("multi-turn")
    def _():
        answer = state["content"] or "The quality of the image is fair."
        msgs = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Is it blurry?"}]
        r = client.chat.completions.create(model=model, messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
        content = r.choices[0].message.content
        ok = isinstance(content, str) and content != ""
        return ok, f"{content!r}, finish_reason {r.choices[0].finish_reason}" + ("" if ok else ": not a non-empty string")

    @check("logprobs, top_logprobs=2")
    def _():
        r = client.chat.completions.create(model=model, messages=first, max_tokens=MAX_TOKENS, temperature=0, logprobs=True, top_logprobs=2)
        c = r.choices[0]
        lp = c.logprobs.content if c.logprobs is not None else None
        if not isinstance(lp, list):
            return False, f"choices[0].logprobs.content is {lp!r}"
        n = r.usage.completion_tokens if r.usage is not None else None
        problems = []
        if n != len(lp):
            problems.append(f"{len(lp)} entries for {n} completion tokens")
        for i, e in enumerate(lp):
            top = e.top_logprobs
            where = f"entry {i}"
            if not isinstance(e.token, str):
                problems.append(f"{where}: token {e.token!r} not a string")
            if not is_num(e.logprob) or e.logprob > 0:
                problems.append(f"{where}: logprob {e.logprob!r} not a number <= 0")
                continue
            if not isinstance(top, list) or len(top) != 2:
                problems.append(f"{where}: top_logprobs {top!r} not of length 2")
                continue
            vals = [t.logprob for t in top]
            if not all(is_num(v) and v <= 0 for v in vals) or not all(isinstance(t.token, str) for t in top):
                problems.append(f"{where}: top_logprobs {[(t.token, t.logprob) for t in top]} not (string, number <= 0)")
            elif vals[0] < vals[1]:
                problems.append(f"{where}: top_logprobs {vals} not sorted descending")
            elif vals[0] < e.logprob - 1e-4:
                problems.append(f"{where}: best top_logprob {vals[0]} below the chosen token's {e.logprob}")
            if len(problems) >= 4:
                break
        if problems:
            return False, "; ".join(problems)
        joined = "".join(e.token for e in lp)
        note = "tokens join to the content" if joined == c.message.content else f"tokens join to {joined!r}, content {c.message.content!r}"
        return True, f"{len(lp)} entries, logprobs {[round(e.logprob, 3) for e in lp]}; {note}"

    @check("n=2 refused")
    def _():
        return expect_bad_request(lambda: client.chat.completions.create(model=model, messages=first, max_tokens=MAX_TOKENS, n=2), "n")

    @check("tools refused")
    def _():
        tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
        return expect_bad_request(lambda: client.chat.completions.create(model=model, messages=first, max_tokens=MAX_TOKENS, tools=tools), "tools")

    @check('max_tokens="10" refused')
    def _():
        # extra_body puts the string in the JSON as it is (the client does not check types).
        return expect_bad_request(lambda: client.chat.completions.create(model=model, messages=first, extra_body={"max_tokens": "10"}), "max_tokens")

    passed = sum(results)
    print(json.dumps({"passed": passed, "failed": len(results) - passed}))
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
