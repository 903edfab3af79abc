"""The shape of diablo_cli's imports, measured from the code itself: files, floors, arrows, arrows running up,
circles, and files over the size limit.

An arrow is one file importing another inside the package (an import inside a function counts: it still ties
the two files together). Floors are the levels of the import graph once each circle is squeezed to one node (a
file with no arrows out is on floor 0; every other file sits one floor above the highest file it imports).
An arrow runs up when it goes from a lower to a higher floor of the `layers` contract in pyproject.toml's
``[tool.importlinter]`` (the floors the code promises), and sideways when it joins two siblings of one floor;
a circle is a set of files that reach each other.

    python benchmarks/import_graph.py                  # this checkout
    python benchmarks/import_graph.py --root ../main   # another checkout, measured against this one's floors
    python benchmarks/import_graph.py --arrows         # also list every arrow that runs up and every circle
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grimp

try:
    import tomllib
except ImportError:  # Python 3.10: import-linter brings tomli
    import tomli as tomllib

PACKAGE = "diablo_cli"
LINE_LIMIT = 600


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1], help="checkout to measure")
    parser.add_argument("--arrows", action="store_true", help="list the arrows that run up and the circles")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root.resolve()))
    graph = grimp.build_graph(PACKAGE, cache_dir=None)
    files = sorted(graph.modules)
    arrows = {(a, b) for a in files for b in graph.find_modules_directly_imported_by(a) if a != b}
    circles = [group for group in _strongly_connected(files, arrows) if len(group) > 1]
    floors = _floors(files, arrows)
    layers = _contract_layers(Path(__file__).resolve().parents[1] / "pyproject.toml")
    up = sorted((a, b) for a, b in arrows if _floor_of(a, layers) < _floor_of(b, layers))
    sideways = sorted(
        (a, b)
        for a, b in arrows
        if _floor_of(a, layers) == _floor_of(b, layers) >= 0 and _entry_of(a, layers) != _entry_of(b, layers)
    )
    big = sorted((n, m) for m in files if (n := _lines(args.root, m)) > LINE_LIMIT)

    print(f"files {len(files)}  floors {max(floors.values()) + 1}  arrows {len(arrows)}  ", end="")
    print(f"running up {len(up)}  sideways {len(sideways)}  circles {len(circles)}  ", end="")
    print(f"files over {LINE_LIMIT} lines {len(big)}")
    if args.arrows:
        for a, b in up:
            print(f"  up: {a} -> {b}")
        for a, b in sideways:
            print(f"  sideways: {a} -> {b}")
        for group in circles:
            print("  circle: " + ", ".join(sorted(group)))
        for n, m in big:
            print(f"  {n} lines: {m}")


def _contract_layers(pyproject: Path) -> list[list[str]]:
    """The layers of the contract named "floors", top floor first, each a list of module names."""
    config = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("tool", {}).get("importlinter", {})
    for contract in config.get("contracts", []):
        if contract.get("type") == "layers" and contract.get("id") == "floors":
            return [[name.strip(" ()") for name in layer.replace(":", "|").split("|")] for layer in contract["layers"]]
    return []


def _floor_of(module: str, layers: list[list[str]]) -> int:
    """The floor of the contract's layer that holds the module (0 is the bottom); -1 when no layer names it."""
    for index, layer in enumerate(layers):
        if any(module == name or module.startswith(name + ".") for name in layer):
            return len(layers) - 1 - index
    return -1 if not layers else len(layers)  # an unlisted module counts as above every floor


def _entry_of(module: str, layers: list[list[str]]) -> str | None:
    """The contract's entry (a module or package of some floor) that holds the module."""
    names = [name for layer in layers for name in layer if module == name or module.startswith(name + ".")]
    return max(names, key=len, default=None)


def _lines(root: Path, module: str) -> int:
    path = root.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return len(path.read_text(encoding="utf-8").splitlines())


def _strongly_connected(nodes: list[str], arrows: set[tuple[str, str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative: the groups of files that reach each other."""
    out: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in arrows:
        out[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(out[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(out[child])))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def _floors(nodes: list[str], arrows: set[tuple[str, str]]) -> dict[str, int]:
    """Each file's floor in the graph with every circle squeezed to one node."""
    group_of = {member: i for i, group in enumerate(_strongly_connected(nodes, arrows)) for member in group}
    below: dict[int, set[int]] = {}
    for a, b in arrows:
        if group_of[a] != group_of[b]:
            below.setdefault(group_of[a], set()).add(group_of[b])
    floor: dict[int, int] = {}

    def floor_of(group: int) -> int:
        if group not in floor:
            floor[group] = 1 + max((floor_of(g) for g in below.get(group, ())), default=-1)
        return floor[group]

    sys.setrecursionlimit(10_000)
    return {n: floor_of(group_of[n]) for n in nodes}


if __name__ == "__main__":
    main()
