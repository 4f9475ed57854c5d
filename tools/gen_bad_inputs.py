#!/usr/bin/env python3
"""Generate the hostile-input corpus under tests/bad-inputs/ (plus its README.md).

Run from anywhere:  python3 tools/gen_bad_inputs.py
Needs Pillow (tools/requirements.txt pins pillow==13.0.0), e.g.
  python3 -m venv /tmp/genvenv && /tmp/genvenv/bin/pip install pillow==13.0.0
  /tmp/genvenv/bin/python tools/gen_bad_inputs.py

Python is only the generator: the files are committed and the Rust tests read them as bytes.
Everything is deterministic (fixed seeds, no timestamps); re-running with the same Pillow / zlib
gives the same bytes. The 16383×16383 WebP is really encoded by libwebp (through Pillow), which
takes ~15 s and ~2.6 GB of RAM; every other file takes well under a second.

Each file is checked after writing: the dimensions claimed by its header are parsed back by hand
(SOF0, IHDR, VP8L / VP8), files meant to be refused as corrupt are checked to fail in Pillow, and
files meant to be accepted are checked to decode in Pillow.
"""

from __future__ import annotations

import io
import json
import random
import struct
import sys
import zlib
from pathlib import Path

try:
    from PIL import Image
except ImportError:
    sys.exit("gen_bad_inputs.py needs Pillow: pip install pillow==13.0.0 (see the docstring)")

Image.MAX_IMAGE_PIXELS = None  # we build bombs on purpose; Pillow's own bomb guard would only warn/raise

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "bad-inputs"

MAX_FILE = 64 * 1024
MAX_TOTAL = 300 * 1024

# Default ImageLimits in crates/core/src/image.rs (mirrored here for the README only).
LIMIT_PIXELS = 1 << 26
LIMIT_SIDE = 16384

# name -> (what is wrong, what a correct program must do); filled in by the generators, in order.
ENTRIES: list[tuple[str, str, str]] = []


def put(name: str, data: bytes, wrong: str, must: str) -> bytes:
    assert len(data) < MAX_FILE, f"{name}: {len(data)} bytes is over {MAX_FILE}"
    (OUT / name).write_bytes(data)
    ENTRIES.append((name, wrong, must))
    return data


REFUSE_HEADER = "refuse before decoding"
REFUSE_CORRUPT = "refuse as corrupt"
ACCEPT = "accept"


# --------------------------------------------------------------------------------------------- helpers


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def photo_like(w: int, h: int, seed: int) -> Image.Image:
    """Gradient + seeded noise: compresses like a photo, not like a flat colour."""
    rng = random.Random(seed)
    px = bytearray()
    for y in range(h):
        for x in range(w):
            n = rng.randint(-24, 24)
            r = 40 + 3 * x + n
            g = 30 + 4 * y + rng.randint(-24, 24)
            b = 128 + 2 * (x - y) + rng.randint(-24, 24)
            px += bytes(max(0, min(255, v)) for v in (r, g, b))
    return Image.frombytes("RGB", (w, h), bytes(px))


def png_chunk(typ: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + typ + data + struct.pack(">I", zlib.crc32(typ + data))


def png_1bit(w: int, h: int, row) -> bytes:
    """A 1-bit greyscale PNG (Pillow mode "1"); `row(y)` gives the packed row bytes, MSB first.
    Filter type 0 on every row, one zlib stream at level 9, one IDAT."""
    stride = (w + 7) // 8
    z = zlib.compressobj(9)
    parts = []
    for y in range(h):
        r = row(y)
        assert len(r) == stride
        parts.append(z.compress(b"\x00" + r))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)  # bit depth 1, greyscale, deflate, filter 0, no interlace
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", b"".join(parts)) + png_chunk(b"IEND", b"")


def png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, data start, data length) of each chunk; stops at the end of the bytes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos + 8 <= len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        out.append((data[pos + 4 : pos + 8], pos + 8, n))
        pos += 12 + n
    return out


def png_dims(data: bytes) -> tuple[int, int, int, int]:
    typ, s, _ = png_chunks(data)[0]
    assert typ == b"IHDR"
    w, h, depth, colour = struct.unpack(">IIBB", data[s : s + 10])
    return w, h, depth, colour


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, segment start (the 0xFF), payload start) up to and including SOS."""
    assert data[:2] == b"\xff\xd8"
    out, pos = [], 2
    while pos + 4 <= len(data):
        assert data[pos] == 0xFF, f"no marker at {pos}"
        marker = data[pos + 1]
        (n,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        out.append((marker, pos, pos + 4))
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        pos += 2 + n
    return out


def jpeg_sof(data: bytes) -> tuple[int, int, int, int]:
    """(SOF marker, payload offset, width, height)."""
    for marker, _, p in jpeg_segments(data):
        if marker in (0xC0, 0xC1, 0xC2):
            h, w = struct.unpack(">HH", data[p + 1 : p + 5])  # payload: precision, height, width, ncomp
            return marker, p, w, h
    raise AssertionError("no SOF")


def jpeg_scan_start(data: bytes) -> int:
    marker, seg, p = jpeg_segments(data)[-1]
    assert marker == 0xDA
    (n,) = struct.unpack(">H", data[p - 2 : p])
    return seg + 2 + n


def webp_header(data: bytes) -> tuple[bytes, int, int, int]:
    """(chunk fourcc, chunk payload offset, width, height) of a simple (non-VP8X) WebP."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    fourcc = data[12:16]
    p = 20
    if fourcc == b"VP8L":
        assert data[p] == 0x2F
        (bits,) = struct.unpack("<I", data[p + 1 : p + 5])
        return fourcc, p, (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8 ":
        assert data[p + 3 : p + 6] == b"\x9d\x01\x2a"
        w, h = struct.unpack("<HH", data[p + 6 : p + 10])
        return fourcc, p, w & 0x3FFF, h & 0x3FFF
    raise AssertionError(f"unexpected WebP chunk {fourcc!r}")


def pil_size(data: bytes) -> tuple[str, tuple[int, int], str]:
    """Format, size and mode from the header only (nothing decoded)."""
    with Image.open(io.BytesIO(data)) as im:
        return im.format, im.size, im.mode


def pil_decodes(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.copy()


def pil_fails(data: bytes) -> None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:  # noqa: BLE001 - any refusal will do
        return
    raise AssertionError("Pillow decoded a file that should be corrupt")


# ---------------------------------------------------------------------------------------- generators


def bombs() -> None:
    # 1. 100000×1 RGB: tiny pixels, but Bunny's expand2square would make it 100000×100000 (30 GB).
    d = pil_bytes(Image.new("RGB", (100000, 1), (200, 40, 40)), "PNG", compress_level=9)
    assert png_dims(d) == (100000, 1, 8, 2) and pil_size(d) == ("PNG", (100000, 1), "RGB")
    put("png-100000x1.png", d,
        f"valid RGB PNG 100000×1 (0.1 Mpx) but a side over {LIMIT_SIDE}; padding it to a square would allocate 30 GB",
        REFUSE_HEADER)

    # 2. A real 16×16 baseline JPEG whose SOF0 claims 60000×60000.
    small = photo_like(16, 16, seed=2)
    d = bytearray(pil_bytes(small, "JPEG", quality=90))
    marker, p, w, h = jpeg_sof(bytes(d))
    assert (marker, w, h) == (0xC0, 16, 16), (marker, w, h)
    d[p + 1 : p + 5] = struct.pack(">HH", 60000, 60000)
    d = bytes(d)
    assert jpeg_sof(d)[1:] == (p, 60000, 60000)
    assert pil_size(d) == ("JPEG", (60000, 60000), "RGB")
    put("jpeg-60000x60000.jpg", d,
        "16×16 baseline JPEG whose SOF0 header is patched to claim 60000×60000 (3.6 Gpx, 10.8 GB as RGB)",
        REFUSE_HEADER)

    # 3. 20000×20000 1-bit, all black: 50 MB of zero rows deflate to ~48 KB.
    stride = 20000 // 8
    zero = bytes(stride)
    d = png_1bit(20000, 20000, lambda y: zero)
    assert png_dims(d) == (20000, 20000, 1, 0) and pil_size(d) == ("PNG", (20000, 20000), "1")
    im = pil_decodes(d)
    assert im.getextrema() == (0, 0)
    del im
    put("png-20000x20000-1bit.png", d,
        "valid 1-bit greyscale PNG 20000×20000, all black: 400 Mpx (1.2 GB as RGB) from a small file; side and pixel count over the limits",
        REFUSE_HEADER)

    # 4./4b. 1-bit diagonal staircase stripes: 8×8-pixel steps, 128-pixel period; within the limits.
    def stripes(side: int) -> bytes:
        def row(y: int) -> bytes:
            return bytes(0xFF if (xb + y // 8) % 16 < 8 else 0x00 for xb in range(side // 8))

        d = png_1bit(side, side, row)
        assert png_dims(d) == (side, side, 1, 0) and pil_size(d) == ("PNG", (side, side), "1")
        im = pil_decodes(d)
        for x, y in [(0, 0), (64, 0), (0, 8), (127, 7), (side - 1, side - 1), (1234, 4321)]:
            want = 255 if (x // 8 + y // 8) % 16 < 8 else 0
            assert im.getpixel((x, y)) == want, (side, x, y)
        del im
        return d

    assert 8000 * 8000 <= LIMIT_PIXELS
    put("png-8000x8000-1bit.png", stripes(8000),
        f"none: valid 1-bit PNG 8000×8000 = 64,000,000 px with diagonal stripes (under the {LIMIT_PIXELS:,} px default limit; a large legitimate image)",
        ACCEPT)
    assert 8192 * 8192 == LIMIT_PIXELS and 8192 <= LIMIT_SIDE
    put("png-8192x8192-1bit.png", stripes(8192),
        f"none: valid 1-bit PNG 8192×8192 = {LIMIT_PIXELS:,} px = 1<<26, exactly the default pixel limit (boundary: must pass)",
        ACCEPT)

    # 5. 20000×100 RGB: only 2 Mpx, but a side over 16384.
    d = pil_bytes(Image.new("RGB", (20000, 100), (30, 120, 60)), "PNG", compress_level=9)
    assert png_dims(d) == (20000, 100, 8, 2) and pil_size(d) == ("PNG", (20000, 100), "RGB")
    put("png-20000x100.png", d,
        f"valid RGB PNG 20000×100: only 2 Mpx but its width is over the {LIMIT_SIDE}-per-side limit",
        REFUSE_HEADER)

    # 6. Lossless WebP 16383×16383 (the largest WebP allows) of one colour, really encoded by libwebp.
    big = Image.new("RGB", (16383, 16383), (40, 90, 160))
    d = pil_bytes(big, "WEBP", lossless=True, quality=100, method=0)
    del big
    assert webp_header(d)[0] == b"VP8L" and webp_header(d)[2:] == (16383, 16383)
    assert pil_size(d)[:2] == ("WEBP", (16383, 16383))
    put("webp-16383x16383.webp", d,
        f"valid lossless WebP 16383×16383 of one colour: 268 Mpx (805 MB as RGB) in {len(d)} bytes; sides within {LIMIT_SIDE} but pixel count over the limit",
        REFUSE_HEADER)


def damaged() -> None:
    # 7. Photo-like JPEG cut to 60 %: the cut lands in the entropy-coded scan.
    full = pil_bytes(photo_like(64, 48, seed=7), "JPEG", quality=90)
    assert jpeg_sof(full)[2:] == (64, 48)
    d = full[: len(full) * 6 // 10]
    assert jpeg_scan_start(full) < len(d), "cut is not inside the scan data"
    pil_fails(d)
    put("jpeg-truncated.jpg", d,
        f"64×48 baseline JPEG cut to 60 % ({len(d)} of {len(full)} bytes): header intact, scan data ends early, no EOI",
        REFUSE_CORRUPT)

    # 8. PNG cut to 60 %: the cut lands inside IDAT.
    full = pil_bytes(photo_like(64, 48, seed=8), "PNG", compress_level=9)
    d = full[: len(full) * 6 // 10]
    idat = [(s, n) for t, s, n in png_chunks(full) if t == b"IDAT"]
    assert idat[0][0] < len(d) < idat[-1][0] + idat[-1][1], "cut is not inside IDAT"
    pil_fails(d)
    put("png-truncated.png", d,
        f"64×48 RGB PNG cut to 60 % ({len(d)} of {len(full)} bytes): IHDR intact, IDAT ends early, no IEND",
        REFUSE_CORRUPT)

    # 9. Lossy WebP cut to 60 %.
    full = pil_bytes(photo_like(64, 48, seed=9), "WEBP", quality=80, method=4)
    fourcc, p, w, h = webp_header(full)
    assert (fourcc, w, h) == (b"VP8 ", 64, 48)
    d = full[: len(full) * 6 // 10]
    assert p + 10 < len(d)
    pil_fails(d)
    put("webp-truncated.webp", d,
        f"64×48 lossy (VP8) WebP cut to 60 % ({len(d)} of {len(full)} bytes): RIFF/VP8 sizes claim more than is there",
        REFUSE_CORRUPT)

    # 10. PNG with one IDAT byte flipped: the chunk CRC no longer matches, and the zlib stream breaks
    # (picked so that inflate itself errors, not only the Adler-32 check, which some decoders skip,
    # as do decoders that skip CRCs).
    # A smooth pattern, not noise: it deflates to back-references, so a flip mid-stream can give a
    # distance that points before the start (noise deflates to literals, where a flip only changes
    # pixels and the Adler-32).
    pattern = bytes(v for y in range(48) for x in range(64) for v in ((4 * x) & 255, (5 * y) & 255, (8 * (x ^ y)) & 255))
    full = pil_bytes(Image.frombytes("RGB", (64, 48), pattern), "PNG", compress_level=9)
    (t, s, n) = next(c for c in png_chunks(full) if c[0] == b"IDAT")
    # The first byte from the middle of the stream whose flip makes inflate itself fail.
    for off in [*range(n // 2, n), *range(2, n // 2)]:
        z = bytearray(full[s : s + n])
        z[off] ^= 0xFF
        try:
            zlib.decompressobj().decompress(bytes(z))
        except zlib.error as e:
            if "incorrect data check" not in str(e):
                break
    else:
        raise AssertionError("no byte breaks inflate")
    d = bytearray(full)
    d[s + off] ^= 0xFF
    d = bytes(d)
    assert struct.unpack(">I", d[s + n : s + n + 4])[0] != zlib.crc32(d[s - 4 : s + n])
    try:
        zlib.decompress(d[s : s + n])
    except zlib.error as e:
        why = str(e).split(": ", 1)[-1]
    pil_fails(d)
    put("png-bad-crc.png", d,
        f"valid 64×48 RGB PNG with IDAT data byte {off} of {n} (file offset {s + off}) XOR 0xFF: IDAT CRC mismatch, and inflate fails ({why})",
        REFUSE_CORRUPT)


def not_images() -> None:
    # 11./12. Nothing / text.
    put("empty.jpg", b"", "zero bytes (named .jpg)", REFUSE_CORRUPT)
    put("text.png", "this is not an image\n".encode("utf-8"),
        'UTF-8 text "this is not an image\\n" named .png: no image signature', REFUSE_CORRUPT)

    # 13. GIF: a real image in a format the tool does not support.
    d = pil_bytes(Image.new("RGB", (1, 1), (255, 0, 0)), "GIF")
    assert d[:6] in (b"GIF87a", b"GIF89a") and pil_size(d)[:2] == ("GIF", (1, 1))
    pil_decodes(d)
    put("gif-1x1.gif", d, "valid 1×1 GIF: an unsupported format (only JPEG, PNG and WebP are)",
        f"{REFUSE_HEADER} (unsupported format)")

    # 14. CMYK JPEG (Pillow writes the Adobe APP14 marker, inverted CMYK as Photoshop does).
    rng = random.Random(14)
    cmyk = Image.frombytes("CMYK", (32, 32), bytes(
        max(0, min(255, v)) for y in range(32) for x in range(32)
        for v in (8 * x + rng.randint(-8, 8), 8 * y, 4 * (x + y), 40 + rng.randint(0, 30))))
    d = pil_bytes(cmyk, "JPEG", quality=90)
    assert jpeg_sof(d)[2:] == (32, 32) and pil_size(d) == ("JPEG", (32, 32), "CMYK")
    pil_decodes(d).convert("RGB")
    put("jpeg-cmyk.jpg", d,
        "valid 32×32 four-component CMYK JPEG with an Adobe marker (libjpeg-turbo has no CMYK→RGB conversion, so a decoder needs another path)",
        f"{ACCEPT} (converted to RGB, as Bunny's PIL .convert('RGB') does); must not panic")

    # 15. Control.
    d = pil_bytes(photo_like(64, 48, seed=15), "JPEG", quality=90)
    assert jpeg_sof(d)[0] == 0xC0 and jpeg_sof(d)[2:] == (64, 48)
    assert pil_decodes(d).size == (64, 48)
    put("ok-64x48.jpg", d, "nothing: valid 64×48 baseline RGB JPEG (control)", ACCEPT)


def non_images() -> None:
    # 16. Chat request whose text is not UTF-8.
    d = b'{"messages":[{"role":"user","content":"\xff\xfe bad"}]}'
    try:
        d.decode("utf-8")
    except UnicodeDecodeError:
        pass
    else:
        raise AssertionError("body is valid UTF-8")
    put("non-utf8-body.json", d,
        "HTTP JSON chat request body whose content string holds the bytes FF FE (invalid UTF-8)",
        f"{REFUSE_CORRUPT} (HTTP 400 with a message; no panic, no lossy decode)")

    # 17. safetensors: u64 LE header length N, N bytes of JSON header (space-padded to 8), data.
    def st(header: dict, data: bytes) -> bytes:
        h = json.dumps(header, separators=(",", ":")).encode()
        h += b" " * (-len(h) % 8)
        return struct.pack("<Q", len(h)) + h + data

    junk = b'{"junk":"xxxxxxxxx"}'
    assert len(junk) == 20
    put("st-huge-header-len.safetensors", struct.pack("<Q", 2**60) + junk,
        "header length field is 2^60 with 20 bytes after it",
        f"{REFUSE_HEADER} (length over the file size; allocate nothing)")

    h = b"not json at all"
    h += b" " * (-len(h) % 8)
    put("st-header-not-json.safetensors", struct.pack("<Q", len(h)) + h,
        f"header length {len(h)} is right, but the header is `not json at all` padded with spaces",
        REFUSE_CORRUPT)

    d = st({"lm_head.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}},
           struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    put("st-offsets-past-end.safetensors", d,
        'valid header: "lm_head.weight" F32 [4,4] data_offsets [0,64], but only 16 data bytes follow',
        REFUSE_CORRUPT)

    put("st-short.safetensors", b"\x10\x00\x00\x00\x00",
        "5 bytes: shorter than the 8-byte header length field", REFUSE_CORRUPT)

    d = st({"w": {"dtype": "F99", "shape": [2, 2], "data_offsets": [0, 16]}},
           struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
    put("st-bad-dtype.safetensors", d,
        'well-formed header and 16 data bytes for tensor "w" shape [2,2], but dtype "F99" does not exist',
        REFUSE_CORRUPT)


def readme() -> None:
    total = sum((OUT / n).stat().st_size for n, _, _ in ENTRIES)
    assert total < MAX_TOTAL, total
    lines = [
        "# Hostile and edge-case inputs",
        "",
        "Generated by `tools/gen_bad_inputs.py` (deterministic; Pillow is used only to write them).",
        "Regenerate: python3 tools/gen_bad_inputs.py",
        "",
        f"Image limits assumed (the default `ImageLimits` in `crates/core/src/image.rs`): at most {LIMIT_PIXELS:,} "
        f"pixels (1<<26) and {LIMIT_SIDE} per side.",
        "",
        "Expected handling: **refuse before decoding** = refused from the header alone, without allocating",
        "or decoding pixels (or, for safetensors, without allocating the claimed size); **refuse as corrupt** =",
        "a clear error (HTTP 400 from the server), never a panic, hang or partial image; **accept** = decodes.",
        "",
        f"{len(ENTRIES)} files, {total:,} bytes in all.",
        "",
        "| file | bytes | what is wrong | a correct program must |",
        "|---|---:|---|---|",
    ]
    for name, wrong, must in ENTRIES:
        size = (OUT / name).stat().st_size
        lines.append(f"| `{name}` | {size} | {wrong} | {must} |")
    lines.append("")
    (OUT / "README.md").write_text("\n".join(lines), encoding="utf-8")


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    bombs()
    damaged()
    not_images()
    non_images()
    readme()
    for name, _, _ in ENTRIES:
        print(f"{(OUT / name).stat().st_size:8d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
