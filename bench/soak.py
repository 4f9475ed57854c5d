#!/usr/bin/env python3
"""Soak test of `qadapt-run serve`: well-behaved clients under adversarial load, server RSS and liveness.

Standard library only. For SECONDS, CLIENTS threads loop over well-behaved requests (chat, streamed chat,
score; images picked from --images), while adversarial threads run beside them:
  slow-header  ~8 sockets sending `POST /v1/chat/completions HTTP/1.1` then one header byte every 2 s,
               never finishing; reopened when the server closes them (closes and time to close counted)
  disconnect   a streamed chat (max_tokens 200) closed after its first event (FIN and RST alternately)
  bomb         the image files of --bombs (decompression bombs, corrupt images; not those its README.md
               marks `accept`) as data URLs to /v1/score and /v1/chat/completions; a 4xx is expected
  oversize     Content-Length: 1 GB with a few KB sent; a 413 or a closed connection is expected
Every second the server's VmRSS and liveness (/proc/PID) are sampled and GET /ready is probed.

A well-behaved request fails on a status other than 200, a stream that ends without `data: [DONE]`, a
connection error or a timeout (120 s per request, whole request). All threads are stopped at the latest
at SECONDS + 60. Prints a Markdown summary and writes the numbers as JSON (--out). Exit status 0 when the
verdict passes: 0 failed well-behaved requests, RSS within ±10% of its value after warm-up, the same server
process alive from start to end.

  python3 bench/soak.py --url http://127.0.0.1:8080 --pid 1234 --duration 600 --clients 64 \
      --images tests/fixtures/*/image.png --bombs tests/bad-inputs --out bench/soak-result.json

When --bombs is missing or empty, a few bombs are generated into a temporary folder (PNG 100000×1, PNG
20000×20000 1-bit, a JPEG header claiming 60000×60000, a truncated PNG).
"""

import argparse
import base64
import glob
import http.client
import json
import os
import random
import select
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
import urllib.parse
import zlib

QUESTIONS = [
    "Is it blurry?",
    "Describe the quality of this image.",
    "How is the exposure of this image?",
    "Is there noise in this image?",
    "Rate the quality of the image.",
]
CLIENT_TIMEOUT = 120.0
HARD_STOP_GRACE = 60.0


# ---------------------------------------------------------------- shared state


class Stats:
    """Counters and samples written by every thread, under one lock."""

    def __init__(self):
        self.lock = threading.Lock()
        self.latency = {"chat": [], "stream": [], "score": []}  # seconds, successful requests
        self.ttft = []  # streamed chats: seconds to the first content event
        self.failed = {}  # (kind, class) -> count
        self.failure_samples = {}  # class -> a few messages
        self.inflight = {}  # client thread -> kind of its running request
        self.adv = {}  # (attack, outcome) -> count
        self.adv_samples = {}  # attack -> a few notes
        self.slow_close_s = []  # slow-header: seconds from open to the server's close
        self.bomb_latency = []  # seconds to the answer of a bomb
        self.bomb_by_file = {}  # (file, endpoint, outcome) -> count
        self.oversize_latency = []

    def ok(self, kind, seconds, ttft=None):
        with self.lock:
            self.latency[kind].append(seconds)
            if ttft is not None:
                self.ttft.append(ttft)

    def fail(self, kind, cls, note):
        with self.lock:
            self.failed[(kind, cls)] = self.failed.get((kind, cls), 0) + 1
            s = self.failure_samples.setdefault(cls, [])
            if len(s) < 5:
                s.append(f"{kind}: {note}"[:300])

    def adversarial(self, attack, outcome, note=None):
        with self.lock:
            self.adv[(attack, outcome)] = self.adv.get((attack, outcome), 0) + 1
            if note:
                s = self.adv_samples.setdefault(attack, [])
                if len(s) < 5:
                    s.append(f"{outcome}: {note}"[:300])


def pct(xs, p):
    """Nearest-rank percentile of xs (0 < p <= 100); None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def ms(x):
    return None if x is None else round(x * 1000.0, 1)


# ---------------------------------------------------------------- inputs


def data_url(path, raw=None):
    raw = open(path, "rb").read() if raw is None else raw
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    mime = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp", "gif": "gif", "bmp": "bmp"}.get(ext, "png")
    return f"data:image/{mime};base64," + base64.b64encode(raw).decode("ascii")


def find_images(args):
    out = []
    for a in args:
        if os.path.isdir(a):
            out += sorted(glob.glob(os.path.join(a, "**", "*.png"), recursive=True))
        elif os.path.isfile(a):
            out.append(a)
        else:
            out += sorted(glob.glob(a))
    return sorted(set(out))


def _png(width, height, bit_depth, color_type, raw_rows):
    def chunk(kind, data):
        c = kind + data
        return struct.pack(">I", len(data)) + c + struct.pack(">I", zlib.crc32(c) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw_rows) + chunk(b"IEND", b"")


def make_bombs(folder):
    """A fallback set of bombs when --bombs has none (stdlib only)."""
    os.makedirs(folder, exist_ok=True)
    # 100000×1 RGB: a legal PNG whose aspect ratio / width is the problem.
    row = b"\x00" + b"\x80" * (3 * 100000)
    open(os.path.join(folder, "png-100000x1.png"), "wb").write(_png(100000, 1, 8, 2, zlib.compress(row, 9)))
    # 20000×20000 1-bit gray: ~50 KB on disk, 400 Mpixel (1.2 GB as RGB) decoded.
    z = zlib.compressobj(9)
    line = b"\x00" + b"\x00" * (20000 // 8)
    parts = [z.compress(line * 1000) for _ in range(20)]
    parts.append(z.flush())
    open(os.path.join(folder, "png-20000x20000-1bit.png"), "wb").write(_png(20000, 20000, 1, 0, b"".join(parts)))
    # A JPEG header (SOI, DQT, SOF0 60000×60000 3 components, EOI) without any scan: decoders that check
    # the size first reject it by size, others as corrupt.
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 17, 8, 60000, 60000, 3) + b"\x01\x11\x00\x02\x11\x00\x03\x11\x00"
    open(os.path.join(folder, "jpeg-60000x60000.jpg"), "wb").write(b"\xff\xd8" + dqt + sof + b"\xff\xd9")
    # A valid 64×64 PNG cut in the middle of its IDAT.
    small = _png(64, 64, 8, 2, zlib.compress((b"\x00" + bytes(range(64)) * 3) * 64, 1))
    open(os.path.join(folder, "png-truncated.png"), "wb").write(small[: len(small) // 2])


IMAGE_EXT = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def readme_accepted(folder):
    """Names that the folder's README.md table (`| `file` | bytes | what is wrong | must |`) says to accept."""
    out = set()
    try:
        lines = open(os.path.join(folder, "README.md"), encoding="utf-8").read().splitlines()
    except OSError:
        return None
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and cells[0].startswith("`") and cells[-1].lower().startswith("accept"):
            out.add(cells[0].strip("`"))
    return out


def load_bombs(folder, max_bytes):
    """(name, data URL) of the image files of folder that must be refused; the names left out, and why.

    Files that the folder's README marks `accept` (controls, big-but-legal images) are left out: every bomb
    here expects a 4xx. Without a README, `ok-*` and `*cmyk*` files are taken as the accepted ones."""
    if not os.path.isdir(folder):
        return [], []
    accepted = readme_accepted(folder)
    bombs, left_out = [], []
    for f in sorted(glob.glob(os.path.join(folder, "*"))):
        name = os.path.basename(f)
        if not os.path.isfile(f) or not name.lower().endswith(IMAGE_EXT):
            continue
        if (name in accepted) if accepted is not None else (name.startswith("ok-") or "cmyk" in name):
            left_out.append(f"{name} (accepted input)")
            continue
        size = os.path.getsize(f)
        if size > max_bytes:
            left_out.append(f"{name} ({size} bytes, over --bomb-max-bytes)")
            continue
        bombs.append((name, data_url(f)))
    return bombs, left_out


# ---------------------------------------------------------------- HTTP helpers


class Target:
    def __init__(self, url):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "http":
            raise SystemExit(f"--url {url}: only http:// is supported")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 80
        self.prefix = u.path.rstrip("/")

    def conn(self, timeout=CLIENT_TIMEOUT):
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def path(self, p):
        return self.prefix + p

    def raw_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout=timeout)


def error_message(body):
    try:
        e = json.loads(body).get("error", {})
        return str(e.get("message", ""))[:200]
    except Exception:
        return body[:200].decode("utf-8", "replace") if isinstance(body, bytes) else str(body)[:200]


def chat_body(image_url, question, max_tokens, stream):
    return {
        "model": "qadapt",
        "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": question}]}],
        "max_tokens": max_tokens,
        "stream": stream,
    }


# ---------------------------------------------------------------- well-behaved clients


def one_request(t, kind, image_url, rng, st):
    """One well-behaved request; records its latency or its failure class."""
    if kind == "score":
        path, body = "/v1/score", {"image": image_url}
    else:
        path, body = "/v1/chat/completions", chat_body(image_url, rng.choice(QUESTIONS), rng.randint(8, 32), kind == "stream")
    payload = json.dumps(body).encode()
    t0 = time.monotonic()
    deadline = t0 + CLIENT_TIMEOUT
    conn = t.conn()
    try:
        conn.request("POST", t.path(path), body=payload, headers={"Content-Type": "application/json", "Accept": "text/event-stream" if kind == "stream" else "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            data = resp.read()
            ra = resp.getheader("Retry-After")
            st.fail(kind, f"status_{resp.status}", error_message(data) + (f" (Retry-After: {ra})" if ra else ""))
            return
        if kind != "stream":
            data = resp.read()
            try:
                v = json.loads(data)
                good = isinstance(v.get("score"), (int, float)) if kind == "score" else isinstance(v["choices"][0]["message"]["content"], str)
            except Exception:
                good = False
            if not good:
                st.fail(kind, "bad_body", data[:200].decode("utf-8", "replace"))
                return
            st.ok(kind, time.monotonic() - t0)
            return
        ttft = None
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("stream ran past the client timeout")
            line = resp.readline()
            if not line:
                st.fail(kind, "stream_without_done", "the stream ended before data: [DONE]")
                return
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                st.ok(kind, time.monotonic() - t0, ttft)
                return
            try:
                ev = json.loads(data)
            except ValueError:
                st.fail(kind, "stream_bad_event", data[:200].decode("utf-8", "replace"))
                return
            if "error" in ev:
                st.fail(kind, "stream_error_event", str(ev["error"])[:200])
                return
            if ttft is None:
                for c in ev.get("choices", []):
                    if (c.get("delta") or {}).get("content"):
                        ttft = time.monotonic() - t0
    except (socket.timeout, TimeoutError) as e:
        st.fail(kind, "timeout", repr(e))
    except (OSError, http.client.HTTPException) as e:
        st.fail(kind, "connection_error", repr(e))
    finally:
        conn.close()


def client_loop(t, images, stop, st, seed):
    rng = random.Random(seed)
    while not stop.is_set():
        kind = rng.choice(("chat", "stream", "score"))
        me = threading.current_thread().name
        with st.lock:
            st.inflight[me] = kind
        try:
            one_request(t, kind, rng.choice(images), rng, st)
        except Exception as e:  # a bug here must not end the client silently
            st.fail(kind, "client_exception", repr(e))
        finally:
            with st.lock:
                st.inflight.pop(me, None)


# ---------------------------------------------------------------- adversarial threads


def slow_header_loop(t, stop, st, interval):
    """Keeps one slow-header socket open; reopens it when the server closes it."""
    while not stop.is_set():
        try:
            s = t.raw_socket(timeout=10)
        except OSError as e:
            st.adversarial("slow_header", "connect_failed", repr(e))
            stop.wait(1.0)
            continue
        opened = time.monotonic()
        header = b"Host: %s:%d\r\nX-Slow: " % (t.host.encode(), t.port) + b"a" * 100000
        sent = 0
        outcome = None
        try:
            s.sendall(b"POST " + t.path("/v1/chat/completions").encode() + b" HTTP/1.1\r\n")
            s.setblocking(False)
            while not stop.is_set():
                # Wait up to `interval` for the server to answer or close; then send one more byte.
                r, _, _ = select.select([s], [], [], interval)
                if r:
                    try:
                        data = s.recv(4096)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        outcome = ("closed_by_server", f"reset: {e!r}")
                        break
                    if not data:
                        outcome = ("closed_by_server", None)
                    else:
                        first = data.split(b"\r\n", 1)[0].decode("latin-1", "replace")
                        parts = first.split()
                        code = parts[1] if len(parts) > 1 and parts[0].startswith("HTTP/") else "?"
                        outcome = (f"answered_{code}_then_closed", first)
                    break
                try:
                    s.send(header[sent : sent + 1])
                    sent += 1
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError as e:
                    outcome = ("closed_by_server", f"send failed: {e!r}")
                    break
        except OSError as e:
            outcome = ("closed_by_server", f"{e!r}")
        finally:
            s.close()
        if outcome is None:
            st.adversarial("slow_header", "still_open_at_end", f"open {time.monotonic() - opened:.1f} s, {sent} header bytes sent")
        else:
            took = time.monotonic() - opened
            with st.lock:
                st.slow_close_s.append(took)
            st.adversarial("slow_header", outcome[0], outcome[1] and f"{outcome[1]} after {took:.1f} s")


def disconnect_loop(t, images, stop, st, max_tokens, pause):
    n = 0
    while not stop.is_set():
        n += 1
        body = json.dumps(chat_body(random.choice(images), "Describe the quality of this image.", max_tokens, True)).encode()
        req = (
            b"POST " + t.path("/v1/chat/completions").encode() + b" HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Accept: text/event-stream\r\nContent-Length: %d\r\n\r\n" % (t.host.encode(), t.port, len(body))
        ) + body
        try:
            s = t.raw_socket(timeout=CLIENT_TIMEOUT)
        except OSError as e:
            st.adversarial("disconnect", "connect_failed", repr(e))
            stop.wait(1.0)
            continue
        rst = n % 2 == 0
        try:
            s.sendall(req)
            buf, code = b"", None
            while True:
                head, sep, rest = buf.partition(b"\r\n\r\n")
                if sep and code is None:
                    parts = head.split(b"\r\n", 1)[0].split()
                    code = parts[1].decode("latin-1") if len(parts) > 1 else "?"
                if code == "200" and b"data:" in rest:
                    break
                if code not in (None, "200") and (b"}" in rest or len(rest) > 4096):
                    break
                chunk = s.recv(4096)
                if not chunk:
                    break
                buf += chunk
            if code is None:
                st.adversarial("disconnect", "closed_without_answer")
            elif code != "200":  # a 4xx means the attack did not run (e.g. max_tokens over the server's limit)
                st.adversarial("disconnect", f"status_{code}" if code.startswith("5") else f"UNEXPECTED_status_{code}", error_message(rest))
            elif b"data:" in rest:
                st.adversarial("disconnect", "closed_after_first_event_rst" if rst else "closed_after_first_event_fin")
            else:
                st.adversarial("disconnect", "stream_ended_before_first_event")
        except (socket.timeout, TimeoutError) as e:
            st.adversarial("disconnect", "timeout", repr(e))
        except OSError as e:
            st.adversarial("disconnect", "connection_error", repr(e))
        finally:
            if rst:  # abortive close: the server sees a reset, not a FIN
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
            s.close()
        stop.wait(pause)


def bomb_loop(t, bombs, stop, st, pause):
    i = 0
    while not stop.is_set() and bombs:
        name, url = bombs[i % len(bombs)]
        endpoint = "score" if (i // len(bombs)) % 2 == 0 else "chat"
        i += 1
        if endpoint == "score":
            path, body = "/v1/score", {"image": url}
        else:
            path, body = "/v1/chat/completions", chat_body(url, "Is it blurry?", 8, False)
        t0 = time.monotonic()
        conn = t.conn()
        try:
            try:
                conn.request("POST", t.path(path), body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            except OSError as e:  # a server may answer 413 and close before reading a large body
                note = repr(e)
            else:
                note = None
            try:
                resp = conn.getresponse()
                data = resp.read()
                outcome = f"status_{resp.status}"
                note = f"{name} → {endpoint}: {error_message(data)}"
            except Exception:  # after a failed send, http.client may fail in any way here
                if note is None:
                    raise
                outcome = "closed_while_sending" if "refused" not in note.lower() else "connect_failed"
                note = f"{name} → {endpoint}: {note}"
        except (socket.timeout, TimeoutError) as e:
            outcome, note = "timeout", f"{name} → {endpoint}: {e!r}"
        except (OSError, http.client.HTTPException) as e:
            outcome, note = "connection_error", f"{name} → {endpoint}: {e!r}"
        finally:
            conn.close()
        took = time.monotonic() - t0
        expected = outcome == "closed_while_sending" or (outcome.startswith("status_4") and outcome != "status_408")
        with st.lock:
            st.bomb_latency.append(took)
            k = (name, endpoint, outcome)
            st.bomb_by_file[k] = st.bomb_by_file.get(k, 0) + 1
        st.adversarial("bomb", outcome if expected else f"UNEXPECTED_{outcome}", None if expected else note)
        stop.wait(pause)


def oversize_loop(t, stop, st, pause):
    n = 0
    while not stop.is_set():
        n += 1
        path = "/v1/score" if n % 2 else "/v1/chat/completions"
        head = (
            b"POST " + t.path(path).encode() + b" HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n" % (t.host.encode(), t.port)
        )
        t0 = time.monotonic()
        try:
            s = t.raw_socket(timeout=30)
        except OSError as e:
            st.adversarial("oversize", "connect_failed", repr(e))
            stop.wait(1.0)
            continue
        outcome, note = None, None
        try:
            try:
                s.sendall(head + b'{"image": "data:image/png;base64,' + b"A" * 4096)
            except OSError as e:  # the server may answer and close before reading the body
                note = f"send: {e!r}"
            buf = b""
            try:
                while b"\r\n\r\n" not in buf:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    buf += chunk
            except (socket.timeout, TimeoutError):
                outcome = "no_answer_30s"
            except OSError as e:
                note = f"recv: {e!r}"
            if outcome is None:
                if buf.startswith(b"HTTP/"):
                    parts = buf.split(b"\r\n", 1)[0].split()
                    outcome = f"status_{parts[1].decode() if len(parts) > 1 else '?'}"
                else:
                    outcome = "closed_without_answer"
        finally:
            s.close()
        took = time.monotonic() - t0
        with st.lock:
            st.oversize_latency.append(took)
        expected = outcome in ("status_413", "closed_without_answer")
        st.adversarial("oversize", outcome if expected else f"UNEXPECTED_{outcome}", None if expected else f"{path}: {note or ''} after {took:.1f} s")
        stop.wait(pause)


# ---------------------------------------------------------------- server sampling


def proc_status(pid):
    """(alive, rss_kb, threads, fds, start_ticks) of pid; alive False when gone or a zombie."""
    try:
        with open(f"/proc/{pid}/status") as f:
            txt = f.read()
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False, None, None, None, None
    fields = dict(line.split(":", 1) for line in txt.splitlines() if ":" in line)
    state = fields.get("State", "").strip()[:1]
    rss = int(fields["VmRSS"].split()[0]) if "VmRSS" in fields else None
    threads = int(fields["Threads"].strip()) if "Threads" in fields else None
    start = int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime
    try:
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        fds = None
    return state not in ("Z", "X"), rss, threads, fds, start


def sampler_loop(pid, t0, stop, samples, lock, dead_stop, on_dead):
    dead_since = None
    while not stop.is_set():
        tick = time.monotonic()
        alive, rss, threads, fds, start = proc_status(pid)
        with lock:
            samples.append({"t": round(tick - t0, 2), "alive": alive, "rss_kb": rss, "threads": threads, "fds": fds, "start": start})
        if not alive:
            dead_since = dead_since or tick
            if tick - dead_since >= dead_stop:
                on_dead()
        else:
            dead_since = None
        stop.wait(max(0.0, 1.0 - (time.monotonic() - tick)))


def ready_loop(t, t0, stop, probes, lock):
    while not stop.is_set():
        tick = time.monotonic()
        conn = t.conn(timeout=2.0)
        try:
            conn.request("GET", t.path("/ready"))
            r = conn.getresponse()
            r.read()
            code = r.status
        except (socket.timeout, TimeoutError):
            code = "timeout"
        except (OSError, http.client.HTTPException):
            code = "error"
        finally:
            conn.close()
        with lock:
            probes.append((round(tick - t0, 2), code))
        stop.wait(max(0.0, 1.0 - (time.monotonic() - tick)))


def get_text(t, path, timeout=5.0):
    conn = t.conn(timeout=timeout)
    try:
        conn.request("GET", t.path(path))
        r = conn.getresponse()
        return r.status, r.read().decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)
    finally:
        conn.close()


# ---------------------------------------------------------------- report


def rss_report(samples, warmup):
    pts = [s for s in samples if s["alive"] and s["rss_kb"] is not None]
    if not pts:
        return None
    duration = pts[-1]["t"]
    eff = warmup if duration > warmup else duration / 2
    after = [s for s in pts if s["t"] >= eff] or pts[-1:]
    warm = after[0]["rss_kb"]
    dev = max(abs(s["rss_kb"] - warm) for s in after) / warm * 100.0 if warm else None
    return {
        "warmup_s": eff,
        "warmup_note": None if eff == warmup else f"run shorter than the {warmup:.0f} s warm-up: the value at {eff:.0f} s is the reference",
        "at_warmup_mb": round(warm / 1024, 1),
        "start_mb": round(pts[0]["rss_kb"] / 1024, 1),
        "max_mb": round(max(s["rss_kb"] for s in pts) / 1024, 1),
        "max_after_warmup_mb": round(max(s["rss_kb"] for s in after) / 1024, 1),
        "last_mb": round(pts[-1]["rss_kb"] / 1024, 1),
        "max_deviation_pct": None if dev is None else round(dev, 2),
        "last_deviation_pct": round((pts[-1]["rss_kb"] - warm) / warm * 100.0, 2) if warm else None,
        "threads_max": max((s["threads"] or 0) for s in pts),
        "threads_last": pts[-1]["threads"],
        "fds_at_warmup": after[0]["fds"],
        "fds_max": max((s["fds"] or 0) for s in pts),
        "fds_last": pts[-1]["fds"],
    }


def build_report(a, st, samples, probes, info):
    by_kind = {}
    for kind in ("chat", "stream", "score"):
        lat = st.latency[kind]
        fails = sum(n for (k, _), n in st.failed.items() if k == kind)
        by_kind[kind] = {
            "served": len(lat),
            "failed": fails,
            "p50_ms": ms(pct(lat, 50)),
            "p99_ms": ms(pct(lat, 99)),
            "max_ms": ms(max(lat) if lat else None),
            "mean_ms": ms(statistics.fmean(lat) if lat else None),
        }
    by_kind["stream"]["ttft_p50_ms"] = ms(pct(st.ttft, 50))
    by_kind["stream"]["ttft_p99_ms"] = ms(pct(st.ttft, 99))
    classes = {}
    for (_, cls), n in st.failed.items():
        classes[cls] = classes.get(cls, 0) + n
    served = sum(v["served"] for v in by_kind.values())
    failed = sum(classes.values())
    adv = {}
    for (attack, outcome), n in sorted(st.adv.items()):
        adv.setdefault(attack, {})[outcome] = n
    sc = st.slow_close_s
    slow = {"closed_by_server": len(sc), "close_after_s": {"min": round(min(sc), 2), "median": round(statistics.median(sc), 2), "max": round(max(sc), 2)} if sc else None}
    ready = {}
    for _, c in probes:
        ready[str(c)] = ready.get(str(c), 0) + 1
    rss = rss_report(samples, a.warmup) if a.pid else None
    alive_samples = [s for s in samples if s["alive"]]
    first_start = samples[0]["start"] if samples else None
    final = proc_status(a.pid) if a.pid else None
    same = bool(final and final[0] and final[4] == first_start and all(s["alive"] and s["start"] == first_start for s in samples))
    server = {
        "pid": a.pid,
        "alive_at_end": bool(final and final[0]),
        "same_process_throughout": same,
        "samples": len(samples),
        "dead_samples": len(samples) - len(alive_samples),
        "died_at_s": next((s["t"] for s in samples if not s["alive"]), None),
    }
    checks = {
        "no_failed_requests": failed == 0 and served > 0,
        "rss_flat": bool(rss and rss["max_deviation_pct"] is not None and rss["max_deviation_pct"] <= a.rss_tolerance),
        "no_restart": same,
    }
    verdict = "PASS" if all(checks.values()) else "FAIL"
    return {
        "config": {"url": a.url, "pid": a.pid, "duration_s": a.duration, "clients": a.clients, "slow_header_sockets": a.slow_sockets, "warmup_s": a.warmup, "rss_tolerance_pct": a.rss_tolerance, **info},
        "well_behaved": {"served": served, "failed": failed, "failed_by_class": classes, "failure_samples": st.failure_samples, "by_kind": by_kind},
        "adversarial": {
            "counts": adv,
            "samples": st.adv_samples,
            "slow_header": slow,
            "bomb_by_file": [{"file": f, "endpoint": e, "outcome": o, "count": n} for (f, e, o), n in sorted(st.bomb_by_file.items())],
            "bomb_latency_max_ms": ms(max(st.bomb_latency) if st.bomb_latency else None),
            "oversize_latency_max_ms": ms(max(st.oversize_latency) if st.oversize_latency else None),
        },
        "ready": ready,
        "rss": rss,
        "server": server,
        "checks": checks,
        "verdict": verdict,
        "goal": f"0 failed well-behaved requests, RSS flat (±{a.rss_tolerance:g}%) after warm-up, no restart",
        "samples": samples,
        "ready_probes": probes,
    }


def fmt(x, unit=""):
    return "–" if x is None else f"{x}{unit}"


def markdown(r):
    c, w, rss, srv = r["config"], r["well_behaved"], r["rss"], r["server"]
    out = [f"## Soak: {c['duration_s']:g} s, {c['clients']} clients, {c['url']}", ""]
    out += ["| kind | served | failed | p50 ms | p99 ms | max ms |", "|---|---:|---:|---:|---:|---:|"]
    for k, v in w["by_kind"].items():
        out.append(f"| {k} | {v['served']} | {v['failed']} | {fmt(v['p50_ms'])} | {fmt(v['p99_ms'])} | {fmt(v['max_ms'])} |")
    s = w["by_kind"]["stream"]
    out.append(f"| **all** | **{w['served']}** | **{w['failed']}** | | | |")
    out += ["", f"Stream time to first token: p50 {fmt(s['ttft_p50_ms'])} ms, p99 {fmt(s['ttft_p99_ms'])} ms."]
    if w["failed_by_class"]:
        out.append("Failures by class: " + ", ".join(f"{k} {n}" for k, n in sorted(w["failed_by_class"].items())) + ".")
        for cls, notes in w["failure_samples"].items():
            for n in notes[:2]:
                out.append(f"- {cls}: `{n}`")
    out += ["", "| attack | outcome | count |", "|---|---|---:|"]
    for attack, outcomes in r["adversarial"]["counts"].items():
        for o, n in outcomes.items():
            out.append(f"| {attack} | {o} | {n} |")
    sh = r["adversarial"]["slow_header"]
    if sh["close_after_s"]:
        cs = sh["close_after_s"]
        out.append(f"\nSlow-header sockets closed by the server: {sh['closed_by_server']}, after {cs['min']}–{cs['max']} s (median {cs['median']} s).")
    else:
        out.append("\nSlow-header sockets closed by the server: none.")
    out.append(f"Slowest bomb answer {fmt(r['adversarial']['bomb_latency_max_ms'])} ms; slowest oversize answer {fmt(r['adversarial']['oversize_latency_max_ms'])} ms.")
    for attack, notes in r["adversarial"]["samples"].items():
        for n in notes[:2]:
            out.append(f"- {attack}: `{n}`")
    out.append("/ready: " + (", ".join(f"{k} ×{n}" for k, n in sorted(r["ready"].items())) or "not probed") + ".")
    if rss:
        out.append("")
        out.append(
            f"RSS: start {rss['start_mb']} MB, at {rss['warmup_s']:.0f} s (after warm-up) {rss['at_warmup_mb']} MB, max {rss['max_mb']} MB, last {rss['last_mb']} MB; "
            f"max deviation from the warm-up value {rss['max_deviation_pct']}% (last {rss['last_deviation_pct']:+}%). "
            f"Threads max {rss['threads_max']} (last {rss['threads_last']}), open fds at warm-up {rss['fds_at_warmup']}, max {rss['fds_max']}, last {rss['fds_last']}."
        )
        if rss["warmup_note"]:
            out.append(f"({rss['warmup_note']})")
    else:
        out.append("\nRSS: not measured (no --pid, or the process was never seen).")
    if srv["pid"]:
        out.append(
            f"Server pid {srv['pid']}: {'alive' if srv['alive_at_end'] else 'NOT alive'} at end, "
            f"{'the same process throughout' if srv['same_process_throughout'] else 'NOT the same process throughout'}"
            + (f" (first seen dead at {srv['died_at_s']} s)" if srv["died_at_s"] is not None else "")
            + "."
        )
    ch = r["checks"]
    unexpected = sum(n for outcomes in r["adversarial"]["counts"].values() for o, n in outcomes.items() if o.startswith("UNEXPECTED"))
    out += [
        "",
        f"**Verdict: {r['verdict']}** against \"{r['goal']}\": "
        f"failed requests {w['failed']} ({'ok' if ch['no_failed_requests'] else 'FAIL'}), "
        f"RSS {fmt(rss and rss['max_deviation_pct'], '%')} ({'ok' if ch['rss_flat'] else 'FAIL'}), "
        f"restart {'none' if ch['no_restart'] else 'yes or unknown'} ({'ok' if ch['no_restart'] else 'FAIL'})."
        + (f" (Not in the goal: {unexpected} adversarial requests had an unexpected outcome.)" if unexpected else "")
        + (" (Not in the goal: the server closed no slow-header socket.)" if "slow_header" in r["adversarial"]["counts"] and not sh["closed_by_server"] else ""),
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- main


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="http://HOST:PORT of the server")
    p.add_argument("--pid", type=int, help="server process id (RSS and liveness from /proc; the server must run on this machine)")
    p.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    p.add_argument("--clients", type=int, default=64, help="well-behaved client threads (default 64)")
    p.add_argument("--images", nargs="+", required=True, help="PNG files, folders (searched for *.png) or glob patterns")
    p.add_argument("--bombs", default="tests/bad-inputs", help="folder of bomb / corrupt images (generated when missing or empty)")
    p.add_argument("--bomb-max-bytes", type=int, default=64 << 20, help="bomb files above this size are skipped")
    p.add_argument("--out", default="bench/soak-result.json", help="JSON result")
    p.add_argument("--warmup", type=float, default=60, help="seconds of warm-up before the RSS reference (default 60)")
    p.add_argument("--rss-tolerance", type=float, default=10.0, help="RSS band after warm-up, in %% (default 10)")
    p.add_argument("--slow-sockets", type=int, default=8, help="slow-header sockets kept open (default 8)")
    p.add_argument("--slow-interval", type=float, default=2.0, help="seconds between header bytes (default 2)")
    p.add_argument("--disconnect-max-tokens", type=int, default=200, help="max_tokens of the streams closed after one event (default 200)")
    p.add_argument("--disconnect-pause", type=float, default=0.2, help="seconds between mid-stream disconnects")
    p.add_argument("--bomb-pause", type=float, default=0.5, help="seconds between bomb uploads")
    p.add_argument("--oversize-pause", type=float, default=1.0, help="seconds between oversized bodies")
    p.add_argument("--no-adversarial", action="store_true", help="well-behaved clients only")
    p.add_argument("--grace", type=float, default=HARD_STOP_GRACE, help="seconds after the end before the hard stop (default 60)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    t = Target(a.url)
    paths = find_images(a.images)
    if not paths:
        raise SystemExit(f"no PNG images in {a.images}")
    images = [data_url(f) for f in paths]
    bomb_dir, generated = a.bombs, False
    bombs, skipped = load_bombs(bomb_dir, a.bomb_max_bytes)
    if not bombs:
        bomb_dir = tempfile.mkdtemp(prefix="soak-bombs-")
        make_bombs(bomb_dir)
        bombs, skipped = load_bombs(bomb_dir, a.bomb_max_bytes)
        generated = True
        print(f"soak: no bombs in {a.bombs}; generated {len(bombs)} into {bomb_dir}", file=sys.stderr)
    if a.pid and not proc_status(a.pid)[0]:
        raise SystemExit(f"--pid {a.pid}: no such live process")
    code, _ = get_text(t, "/health")
    if code != 200:
        raise SystemExit(f"GET /health on {a.url}: {code}")
    def sysctl(name):
        try:
            return open(f"/proc/sys/net/ipv4/{name}").read().split()
        except OSError:
            return None

    tw_reuse, ports = sysctl("tcp_tw_reuse"), sysctl("ip_local_port_range")
    if tw_reuse == ["0"]:
        print("soak: net.ipv4.tcp_tw_reuse is 0: one connection per request may run out of local ports (TIME_WAIT)", file=sys.stderr)
    info = {"tcp_tw_reuse": tw_reuse and tw_reuse[0], "ip_local_port_range": ports, "images": paths, "bombs": [b[0] for b in bombs], "bombs_dir": bomb_dir, "bombs_generated": generated, "bombs_left_out": skipped}
    print(f"soak: {a.duration:g} s, {a.clients} clients, {len(paths)} images, bombs: {', '.join(info['bombs'])}", file=sys.stderr)

    st = Stats()
    stop = threading.Event()  # end of the load
    samp_stop = threading.Event()  # end of sampling (after the load's threads are done)
    samples, probes, slock = [], [], threading.Lock()
    t0 = time.monotonic()

    def on_dead():
        if not stop.is_set():
            print("soak: the server process is gone; stopping early", file=sys.stderr)
            stop.set()

    threads = []

    def guarded(name, fn, *args):
        # A bug or an unforeseen exception in one loop is counted and the loop restarted, not lost.
        while not stop.is_set():
            try:
                fn(*args)
                return
            except Exception as e:
                st.adversarial(name.split("-")[0], "THREAD_EXCEPTION", repr(e))
                stop.wait(1.0)

    def spawn(name, fn, *args):
        th = threading.Thread(target=guarded, args=(name, fn, *args), name=name, daemon=True)
        th.start()
        threads.append(th)

    aux = []
    if a.pid:
        th = threading.Thread(target=sampler_loop, args=(a.pid, t0, samp_stop, samples, slock, 5.0, on_dead), daemon=True)
        th.start()
        aux.append(th)
    th = threading.Thread(target=ready_loop, args=(t, t0, samp_stop, probes, slock), daemon=True)
    th.start()
    aux.append(th)
    for i in range(a.clients):
        spawn(f"client-{i}", client_loop, t, images, stop, st, a.seed * 1000 + i)
    if not a.no_adversarial:
        for i in range(a.slow_sockets):
            spawn(f"slow-{i}", slow_header_loop, t, stop, st, a.slow_interval)
        spawn("disconnect", disconnect_loop, t, images, stop, st, a.disconnect_max_tokens, a.disconnect_pause)
        spawn("bomb", bomb_loop, t, bombs, stop, st, a.bomb_pause)
        spawn("oversize", oversize_loop, t, stop, st, a.oversize_pause)

    end = t0 + a.duration
    hard = end + a.grace
    try:
        next_note = t0 + 60
        while not stop.is_set() and time.monotonic() < end:
            stop.wait(min(1.0, max(0.0, end - time.monotonic())))
            if time.monotonic() >= next_note:
                next_note += 60
                with st.lock:
                    done = sum(len(v) for v in st.latency.values())
                    bad = sum(st.failed.values())
                with slock:
                    rss = samples[-1]["rss_kb"] if samples else None
                print(f"soak: {time.monotonic() - t0:.0f} s: {done} served, {bad} failed" + (f", RSS {rss / 1024:.0f} MB" if rss else ""), file=sys.stderr)
    except KeyboardInterrupt:
        print("soak: interrupted; stopping", file=sys.stderr)
    stop.set()
    for th in threads:
        th.join(timeout=max(0.0, hard - time.monotonic()))
    stuck = [th.name for th in threads if th.is_alive()]
    with st.lock:
        unfinished = list(st.inflight.values())
    if stuck:
        print(f"soak: hard stop at +{a.grace:g} s: {len(stuck)} threads still running ({', '.join(stuck[:8])})", file=sys.stderr)
        for kind in unfinished:
            st.fail(kind, "unfinished_at_hard_stop", f"a request still running {a.grace:g} s after the end")
    samp_stop.set()
    for th in aux:
        th.join(timeout=5)
    _, metrics = get_text(t, "/metrics")

    with st.lock, slock:
        r = build_report(a, st, list(samples), list(probes), info)
    r["config"]["load_s"] = round(min(time.monotonic(), end) - t0, 1)
    r["config"]["stuck_threads"] = stuck
    r["metrics_at_end"] = metrics
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(r, f, indent=1)
    print(markdown(r))
    print(f"\n(JSON: {a.out})")
    sys.stdout.flush()
    # Threads stuck in socket calls must not hold the process.
    os._exit(0 if r["verdict"] == "PASS" else 1)


if __name__ == "__main__":
    main()
