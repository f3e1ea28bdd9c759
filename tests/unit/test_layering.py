"""The package's import layering (docs/layers.toml) as a test: every import in heygen_ray/, including
function-local ones, must go to the importer's own unit or a lower layer; the import graph between
modules must have no cycles."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "heygen_ray"


def load_layers(path: Path = REPO / "docs" / "layers.toml"):
    """unit -> layer index, and the allowed exception edges."""
    doc = tomllib.loads(path.read_text())
    rank = {}
    for i, units in enumerate(doc["layers"]):
        for u in units:
            assert u not in rank, f"{path.name}: {u!r} is listed twice"
            rank[u] = i
    return rank, dict(doc.get("exceptions", {}))


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE):
    """(line, imported module) for every heygen_ray import in the file, resolving relative imports and
    ``from heygen_ray import x`` (x is a submodule when one exists)."""
    mod = module_name(path, root)
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:  # `from pkg import submodule` imports the submodule
                sub = f"{target}.{a.name}"
                rel = Path(*sub.split("."))
                exists = (root.parent / rel).is_dir() or (root.parent / rel.with_suffix(".py")).is_file()
                out.append((node.lineno, sub if exists else target))
    return [(line, name) for line, name in out if name == root.name or name.startswith(root.name + ".")]


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def violations(root: Path = PACKAGE, layers_path: Path = REPO / "docs" / "layers.toml"):
    rank, exceptions = load_layers(layers_path)
    found = []
    for path in sorted(root.rglob("*.py")):
        src = unit_of(module_name(path, root))
        if src == "":
            continue  # the package's own __init__ (its version) imports nothing
        if src not in rank:
            found.append(f"{path.relative_to(root.parent)}: unit {src!r} is not in {layers_path.name}")
            continue
        for line, target in imports_of(path, root):
            dst = unit_of(target)
            if dst in (src, ""):
                continue  # its own unit, or the package root (which holds only the version)
            where = f"{path.relative_to(root.parent)}:{line}"
            if dst not in rank:
                found.append(f"{where}: imports {target} (unit {dst!r} is not in {layers_path.name})")
            elif rank[dst] >= rank[src] and f"{src} -> {dst}" not in exceptions:
                kind = "a higher layer" if rank[dst] > rank[src] else "a unit of the same layer"
                found.append(f"{where}: {src} imports {target}, {kind} ({dst})")
    return found


def module_graph(root: Path = PACKAGE):
    graph = {}
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        graph.setdefault(mod, set())
        for _, target in imports_of(path, root):
            if target != mod:
                graph[mod].add(target)
    return graph


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_every_import_follows_the_layering():
    found = violations()
    assert not found, "forbidden imports (see docs/layers.toml):\n" + "\n".join(found)


def test_no_import_cycles_between_modules():
    # A submodule importing its own package's __init__ (which imports the submodule) counts too.
    found = cycles(module_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def package(tmp_path: Path, files: dict) -> Path:
    """A throwaway package named heygen_ray under tmp_path: {relative path: source}."""
    root = tmp_path / "heygen_ray"
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


def test_the_checker_names_a_forbidden_import_with_its_file_and_line(tmp_path):
    """A throwaway package shaped like heygen_ray: a function-local upward import is caught."""
    root = package(tmp_path, {
        "models/__init__.py": "import torch\n",
        "models/net.py": "def build():\n    from heygen_ray.train.loop import run  # upward\n    return run\n",
        "train/__init__.py": "",
        "train/loop.py": "from heygen_ray.models import net\nfrom ..models.net import build\n",
    })
    layers = tmp_path / "layers.toml"
    layers.write_text('layers = [["models"], ["train"]]\n')
    found = violations(root, layers)
    assert found == ["heygen_ray/models/net.py:2: models imports heygen_ray.train.loop, a higher layer (train)"]
    # same-layer neighbours may not import each other either, unless the exception is written down
    layers.write_text('layers = [["models", "train"]]\n')
    assert len(violations(root, layers)) == 3
    layers.write_text('layers = [["models", "train"]]\n[exceptions]\n"models -> train" = "x"\n"train -> models" = "y"\n')
    assert violations(root, layers) == []


def test_cycle_detection_finds_a_function_local_cycle(tmp_path):
    root = package(tmp_path, {
        "tune/__init__.py": "",
        "tune/a.py": "from heygen_ray.tune import b\n",
        "tune/b.py": "def f():\n    from heygen_ray.tune.a import x\n",
        "tune/c.py": "from heygen_ray.tune import a\n",
    })
    assert cycles(module_graph(root)) == [["heygen_ray.tune.a", "heygen_ray.tune.b"]]


def test_every_third_party_import_is_a_declared_dependency():
    """`pip install heygen-ray` must bring everything the package imports: each top-level third-party
    module imported anywhere in heygen_ray/ maps to a distribution listed in pyproject's dependencies."""
    import re
    from importlib.metadata import packages_distributions

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {re.split(r"[\[<>=!~ ;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in project["dependencies"]}
    dists = packages_distributions()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top == PACKAGE.name:
                    continue
                owners = {d.lower().replace("_", "-") for d in dists.get(top, [top])}
                if not owners & declared:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno}: {top} (from {sorted(owners)})")
    assert not missing, "imported but not in pyproject.toml's dependencies:\n" + "\n".join(missing)
