#!/usr/bin/env python3
"""Lists the module dependency graph of each crate in the workspace and fails on a cycle.

Usage: python3 scripts/modcycles.py [--graph]

A module is a top-level module of its crate (`cache`, `index`, ...) or, inside a directory module,
one of its children (`cache::disk`, `snapshotter::mounts`). An edge A -> B is any `crate::B` path in
A's source (in `use` lines and in code), and, inside a directory module `m`, any `super::B` in a
child `m::x` that names a sibling `m::B`. Test code (`#[cfg(test)]` modules in their own files:
`tests.rs`, `*/tests/*`) is left out: tests may use anything. Exits 1 and prints each cycle found.
"""
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRATES = ["clip-core", "clip-fuse", "clip-snapshotter"]


def modules(src):
    """Maps module path ("cache", "cache::disk") -> list of files."""
    out = {}
    for dirpath, _, files in os.walk(src):
        for f in files:
            if not f.endswith(".rs"):
                continue
            full = os.path.join(dirpath, f)
            rel = os.path.relpath(full, src)[:-3].split(os.sep)
            if rel in (["lib"], ["main"]):
                continue
            if rel[-1] == "tests" or "tests" in rel[:-1]:
                continue
            if rel[-1] == "mod":
                rel = rel[:-1]
            out.setdefault("::".join(rel), []).append(full)
    return out


def strip_tests(text):
    # Drop inline `#[cfg(test)] mod tests { ... }` blocks (brace-matched) so test-only uses
    # do not count as edges.
    out, i = [], 0
    for m in re.finditer(r"#\[cfg\(test\)\]\s*mod\s+\w+\s*\{", text):
        if m.start() < i:
            continue
        out.append(text[i:m.start()])
        depth, j = 1, m.end()
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        i = j
    out.append(text[i:])
    return "".join(out)


def comment_free(text):
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def graph(src):
    mods = modules(src)
    tops = {m.split("::")[0] for m in mods}
    edges = {}
    for mod, files in mods.items():
        parts = mod.split("::")
        deps = set()
        for f in files:
            text = comment_free(strip_tests(open(f, encoding="utf-8").read()))
            # crate::a::b and `use crate::{a, b::c}` groups.
            for m in re.finditer(r"crate::(\{[^}]*\}|\w+)(::\w+)?", text):
                names = re.findall(r"(\w+)(?:::(\w+))?", m.group(1).strip("{}")) if m.group(1).startswith("{") \
                    else [(m.group(1), (m.group(2) or "").lstrip(":"))]
                for top, sub in names:
                    if top not in tops or top == parts[0]:
                        # A path inside the same top-level module is a sibling edge (below).
                        if top == parts[0] and len(parts) > 1 and sub and f"{top}::{sub}" in mods:
                            deps.add(f"{top}::{sub}")
                        continue
                    deps.add(top)
            if len(parts) > 1:
                for m in re.finditer(r"super::(\{[^}]*\}|\w+)", text):
                    names = re.findall(r"\w+", m.group(1))
                    for n in names:
                        sib = "::".join(parts[:-1] + [n])
                        if sib in mods and sib != mod:
                            deps.add(sib)
        # A child's edge to another top-level module is its parent's too (the parent owns it).
        edges[mod] = deps
    # Two levels: top-level graph, and each directory module's children.
    top_edges = {t: set() for t in tops}
    for mod, deps in edges.items():
        t = mod.split("::")[0]
        for d in deps:
            if "::" not in d and d != t:
                top_edges[t].add(d)
    child_edges = {}
    for mod, deps in edges.items():
        if "::" in mod:
            parent = mod.split("::")[0]
            child_edges.setdefault(parent, {})
            child_edges[parent].setdefault(mod, set())
            for d in deps:
                if "::" in d and d.split("::")[0] == parent and d != mod:
                    child_edges[parent][mod].add(d)
    return top_edges, child_edges


def cycles(g):
    """Strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g.get(v, ())):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def order(g):
    """Modules in dependency order, leaves first (only meaningful without cycles)."""
    done, out = set(), []

    def visit(v):
        if v in done:
            return
        done.add(v)
        for w in sorted(g.get(v, ())):
            if w in g:
                visit(w)
        out.append(v)

    for v in sorted(g):
        visit(v)
    return out


def main():
    show = "--graph" in sys.argv
    bad = 0
    for crate in CRATES:
        top, children = graph(os.path.join(ROOT, crate, "src"))
        graphs = [(crate, top)] + [(f"{crate} {p}/", c) for p, c in sorted(children.items())]
        for name, g in graphs:
            for comp in cycles(g):
                bad += 1
                print(f"cycle in {name}: {' <-> '.join(comp)}")
                for v in comp:
                    print(f"    {v} -> {', '.join(sorted(d for d in g[v] if d in comp))}")
            if show and name == crate:
                print(f"{crate} (leaves first):")
                for v in order(g):
                    deps = sorted(g[v])
                    print(f"    {v}" + (f" -> {', '.join(deps)}" if deps else ""))
    if bad:
        print(f"{bad} module cycle(s)")
        return 1
    print("no module cycles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
