#!/usr/bin/env python3
"""Fails when a crate's modules import each other in a circle (a `crate::` path, a `use crate::{…}`
group or a crate-root re-export of another module's item, followed to the module that defines it).

    python3 tools/check_module_cycles.py crates/*/src
"""
import re
import sys
from pathlib import Path


def modules(src: Path):
    """module name → source text, for the top-level modules of one crate (`a.rs` or `a/mod.rs`,
    a directory module's files counted as the module)."""
    out = {}
    for f in sorted(src.glob("*.rs")):
        if f.stem not in ("lib", "main"):
            out[f.stem] = f.read_text()
    for d in sorted(p for p in src.iterdir() if p.is_dir()):
        out[d.name] = "\n".join(f.read_text() for f in sorted(d.rglob("*.rs")))
    return out


def root_exports(src: Path, mods):
    """name re-exported at the crate root → the module it comes from (`pub use m::{A, B}`)."""
    lib = src / "lib.rs"
    out = {}
    if not lib.exists():
        return out
    text = lib.read_text()
    for m, names in re.findall(r"pub use (\w+)::\{([^}]*)\}", text):
        for n in re.findall(r"\w+", names):
            out[n] = m
    for m, n in re.findall(r"pub use (\w+)::(\w+);", text):
        out[n] = m
    return {n: m for n, m in out.items() if m in mods}


def uses(text, mods, exports):
    text = re.sub(r"//[^\n]*", "", text)
    found = set()
    # `use crate::{a, b::C, d::{e, f}}`: the first segment of each top-level path of the group.
    for group in re.findall(r"crate::\{((?:[^{}]|\{[^{}]*\})*)\}", text):
        depth, seg, firsts = 0, "", []
        for ch in group + ",":
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            if ch == "," and depth == 0:
                firsts.append(seg.strip().split("::")[0])
                seg = ""
            else:
                seg += ch
        found.update(firsts)
    found.update(re.findall(r"crate::(\w+)", text))
    out = set()
    for n in found:
        if n in mods:
            out.add(n)
        elif n in exports:
            out.add(exports[n])
    return out


def cycle(graph):
    state = {}
    stack = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            c = visit(n)
            if c:
                return c
    return None


def main(dirs):
    bad = 0
    for d in map(Path, dirs):
        mods = modules(d)
        exports = root_exports(d, mods)
        graph = {m: uses(t, mods, exports) - {m} for m, t in mods.items()}
        c = cycle(graph)
        if c:
            print(f"{d}: modules import each other in a circle: {' -> '.join(c)}")
            bad = 1
    return bad


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(p) for p in Path("crates").glob("*/src")]))
