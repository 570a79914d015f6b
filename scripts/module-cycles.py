#!/usr/bin/env python3
"""Fails when the agent's modules import each other in a cycle.

Reads every file under agent/, resolves each `crate::`, `super::` and `self::` path (in `use`
trees and in code; the binary's `edgeship::` paths too) to the module file that defines it, and
checks two graphs for cycles:

- modules: one node per file (`spool/store.rs` is `spool::store`);
- stages: one node per top-level module (`spool`, `ship`, `sink`, `config`, ...), so a folder
  that uses another folder which uses it back is a cycle even when no two files are.

Unit tests (a trailing `#[cfg(test)] mod tests`) and comments are not imports. With `--order`
it prints the stages lowest first (what each may use), for the README.
Usage: scripts/module-cycles.py [--order] [ROOT]
"""

import re
import sys
from pathlib import Path

IDENT = r"[A-Za-z_][A-Za-z0-9_]*"


def module_of(root: Path, file: Path):
    rel = file.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "mod":
        parts.pop()
    if parts in (["lib"],):
        return ()
    return tuple(parts)


def strip(text: str) -> str:
    """Drops comments, string literals and a trailing unit-test module."""
    m = re.search(r"#\[cfg\(test\)\]\s*mod tests\b", text)
    if m:
        text = text[: m.start()]
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r'r#*"(?:.|\n)*?"#*', '""', text)
    text = re.sub(r'"(?:\\.|[^"\\])*"', '""', text)
    return text


def expand_use(tree: str):
    """`a::{b, c::{d, e}}` -> [a::b, a::c::d, a::c::e]."""
    tree = re.sub(r"\s*(::|\{|\}|,)\s*", r"\1", re.sub(r"\s+", " ", tree)).strip()
    out = []

    def walk(prefix: str, s: str):
        depth, start, items = 0, 0, []
        for i, ch in enumerate(s):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth == 0:
                items.append(s[start:i])
                start = i + 1
        items.append(s[start:])
        for item in filter(None, items):
            brace = item.find("{")
            if brace >= 0 and item.endswith("}"):
                walk(prefix + item[:brace], item[brace + 1 : -1])
            else:
                out.append(prefix + item.split(" as ")[0].strip())

    walk("", tree)
    return out


def paths_in(text: str, children=()):
    found = []
    for child in children:
        for m in re.finditer(r"(?<!::)\b" + child + r"(?:::" + IDENT + r")+", text):
            found.append(m.group(0))
    for m in re.finditer(r"\buse\s+([^;]+);", text):
        found.extend(expand_use(m.group(1)))
    for m in re.finditer(r"(?<!::)\b(?:crate|super|self|edgeship)(?:::" + IDENT + r")+", text):
        found.append(m.group(0))
    return found


def resolve(path: str, here, modules, is_bin: bool):
    segs = [s for s in path.split("::") if s]
    if not segs:
        return None
    head, rest = segs[0], segs[1:]
    if head == "crate" or (is_bin and head == "edgeship"):
        base = []
    elif head == "super":
        base = list(here[:-1])
        while rest and rest[0] == "super":
            base = base[:-1]
            rest = rest[1:]
    elif head == "self":
        base = list(here)
    elif tuple(here) + (head,) in modules:
        # A path that starts with a child module's name (`use store::Store;` in spool).
        base, rest = list(here), segs
    else:
        return None
    full = base + rest
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in modules:
            return tuple(full[:n])
    return None


def find_cycle(graph):
    """One cycle as a list of nodes, or None."""
    color, stack = {}, []

    def visit(n):
        color[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if color.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if color.get(m) is None:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        color[n] = 2
        return None

    for n in sorted(graph):
        if color.get(n) is None:
            c = visit(n)
            if c:
                return c
    return None


def tangles(graph):
    """Strongly connected groups of more than one node (Tarjan), each sorted."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def name(mod):
    return "::".join(mod) if mod else "lib"


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    root = Path(args[0] if args else Path(__file__).resolve().parent.parent / "agent")
    files = sorted(root.rglob("*.rs"))
    modules = {module_of(root, f): f for f in files if f.name != "main.rs"}
    modules[()] = root / "lib.rs"
    graph, stages = {}, {}
    for f in files:
        is_bin = f.name == "main.rs" and f.parent == root
        here = ("main",) if is_bin else module_of(root, f)
        text = strip(f.read_text())
        children = [m[-1] for m in modules if len(m) == len(here) + 1 and m[:-1] == here]
        for p in paths_in(text, children):
            target = resolve(p, here, modules, is_bin)
            if target is None or target == here or target == ():
                continue
            # A parent naming its own child module in `pub mod` is not a use.
            graph.setdefault(here, set()).add(target)
            a, b = here[:1], target[:1]
            if a != b and a and b:
                stages.setdefault(a, set()).add(b)
        graph.setdefault(here, set())
    failed = False
    for label, g in (("modules", graph), ("stages", stages)):
        cycle = find_cycle(g)
        if cycle:
            failed = True
            print(f"import cycle among {label}: " + " -> ".join(name(m) for m in cycle))
            for group in tangles(g):
                print(f"  tangled {label}: " + ", ".join(name(m) for m in group))
    if "--order" in sys.argv and not failed:
        done, order = set(), []
        nodes = set(stages) | {m for v in stages.values() for m in v}
        while len(done) < len(nodes):
            layer = sorted(n for n in nodes - done if stages.get(n, set()) <= done)
            order.append(layer)
            done |= set(layer)
        for i, layer in enumerate(order):
            print(f"{i}: " + ", ".join(name(n) for n in layer))
    if failed:
        sys.exit(1)
    print(f"no import cycles among {len(graph)} modules and {len(set(stages) | {m for v in stages.values() for m in v})} stages")


if __name__ == "__main__":
    main()
