#!/usr/bin/env python3
"""Lists import cycles between the modules of each crate of the workspace.

A module is a file or directory directly under a crate's `src/` (`src/shard/` and `src/shard/*.rs` are
the module `shard`). An edge A -> B is any `crate::B` path in A's code (its `use` lines and paths in
code), and `super::B` in a file directly under `src/`. Test code (items marked `#[cfg(test)]` and files under a
`tests` directory) is left out. Exits 1 when a cycle exists, printing each strongly connected group.
"""

import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CRATES = ["src", "crates/turnpike-proto/src", "crates/turnpike-client/src"]


def module_of(src, path):
    rel = os.path.relpath(path, src)
    head = rel.split(os.sep)[0]
    return head[:-3] if head.endswith(".rs") else head


def code_lines(path):
    """The file's lines without comments and without the items marked #[cfg(test)] (the attribute,
    further attributes, and the item up to its `;` or the brace that closes its block)."""
    out = []
    skipping = False
    depth = 0
    opened = False
    with open(path) as f:
        for line in f:
            stripped = line.strip()
            if not skipping and re.match(r"#\[cfg\(test\)\]", stripped):
                skipping, depth, opened = True, 0, False
                continue
            if stripped.startswith("//"):
                continue
            if skipping:
                if not opened and stripped.startswith("#["):
                    continue
                depth += line.count("{") - line.count("}")
                opened = opened or "{" in line
                if (opened and depth <= 0) or (not opened and stripped.endswith(";")):
                    skipping = False
                continue
            out.append(line)
    return out


def graph(src):
    edges = {}
    for dirpath, _, files in os.walk(src):
        if "tests" in os.path.relpath(dirpath, src).split(os.sep):
            continue
        for name in files:
            if not name.endswith(".rs"):
                continue
            path = os.path.join(dirpath, name)
            me = module_of(src, path)
            if me in ("lib", "main"):
                continue
            text = "".join(code_lines(path))
            targets = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", text))
            if os.path.dirname(path) == src:
                targets |= set(re.findall(r"\bsuper::([a-z_][a-z0-9_]*)", text))
            for t in targets:
                if t != me and (os.path.exists(os.path.join(src, t + ".rs")) or os.path.isdir(os.path.join(src, t))):
                    edges.setdefault(me, set()).add(t)
    return edges


def cycles(edges):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return out


def main():
    found = False
    for crate in CRATES:
        src = os.path.join(ROOT, crate)
        if not os.path.isdir(src):
            continue
        edges = graph(src)
        for comp in cycles(edges):
            found = True
            detail = "; ".join("%s -> %s" % (a, ", ".join(sorted(edges[a] & set(comp)))) for a in comp)
            print("%s: import cycle between %s (%s)" % (crate, ", ".join(comp), detail))
    if not found:
        print("no import cycles between modules")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
