"""The package layering: weight_port <- parity <- commands; example models import neither;
parity reads weight_port through its public surface only (weight_port's exports, and
weight_port.layout, the one layout module); no import cycles between modules."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("weight_port", "parity", "torch_ref", "flax_impl", "model_configs")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, tuple[str, ...], int]]:
    """(imported module, names taken from it, line) for every import in the module, at any depth
    (an import inside a function is still a dependency)."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, (), node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names = tuple(a.name for a in node.names)
            # ``from pkg import submodule`` depends on the submodule
            subs = [f"{base}.{n}" for n in names if f"{base}.{n}" in MODULES]
            out += [(s, (), node.lineno) for s in subs]
            rest = tuple(n for n in names if f"{base}.{n}" not in MODULES)
            if rest or not subs:
                out.append((base, rest, node.lineno))
    return out


def _internal(target: str) -> str | None:
    """The project module an import names (its longest known prefix), or None (a library)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        cand = ".".join(parts[:i])
        if cand in MODULES:
            return cand
    return None


GRAPH = {m: {(t, names, line) for t, names, line in _imports(m, p)} for m, p in MODULES.items()}


def _pkg(module: str) -> str:
    return module.split(".")[0]


def test_example_models_import_neither_tool_package():
    bad = [f"{m}:{line} imports {t}" for m in MODULES if _pkg(m) in ("torch_ref", "flax_impl", "model_configs")
           for t, _, line in GRAPH[m] if _pkg(t) in ("parity", "weight_port")]
    assert not bad, bad


def test_weight_port_does_not_import_parity():
    bad = [f"{m}:{line} imports {t}" for m in MODULES if _pkg(m) == "weight_port"
           for t, _, line in GRAPH[m] if _pkg(t) == "parity"]
    assert not bad, bad


def test_tool_code_does_not_import_the_commands():
    bad = [f"{m}:{line} imports {t}" for m in MODULES if _pkg(m) == "parity" and not m.startswith(
        ("parity.commands", "parity.cli", "parity.pytest_plugin"))
           for t, _, line in GRAPH[m] if t.startswith(("parity.commands", "parity.cli"))]
    assert not bad, bad


def test_parity_reads_weight_port_through_its_public_surface():
    import weight_port

    public = set(weight_port.__all__)
    bad = []
    for m in MODULES:
        if _pkg(m) != "parity":
            continue
        for t, names, line in GRAPH[m]:
            if _pkg(t) != "weight_port":
                continue
            if t == "weight_port.layout":  # the one layout module is public by design
                bad += [f"{m}:{line} imports {t}.{n}" for n in names if n.startswith("_")]
                continue
            if t != "weight_port":
                bad.append(f"{m}:{line} imports the submodule {t} (import from weight_port)")
            bad += [f"{m}:{line} imports weight_port.{n}, which weight_port does not export"
                    for n in names if n not in public]
    assert not bad, "\n".join(bad)


def test_no_module_imports_another_packages_underscore_names():
    bad = []
    for m in MODULES:
        for t, names, line in GRAPH[m]:
            if _pkg(t) in PACKAGES and _pkg(t) != _pkg(m):
                bad += [f"{m}:{line} imports {t}.{n}" for n in names if n.startswith("_")]
                if any(part.startswith("_") and part != "__init__" for part in t.split(".")):
                    bad.append(f"{m}:{line} imports the private module {t}")
    assert not bad, "\n".join(bad)


def _with_parents(module: str) -> list[str]:
    """``module`` and every package above it: importing a.b.c runs a/__init__ and a/b/__init__."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in MODULES]


def _cycles() -> list[list[str]]:
    # A module importing its own package (or a package importing its own modules) is how a
    # package __init__ re-exports, not a cycle; every other package on the way counts.
    edges = {m: sorted({i for t, _, _ in GRAPH[m] if (d := _internal(t))
                        for i in _with_parents(d) if i != m and not m.startswith(i + ".")}) for m in MODULES}
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                strong(w)
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

    for v in MODULES:
        if v not in index:
            strong(v)
    return out


def test_no_import_cycles():
    cycles = _cycles()
    assert not cycles, "import cycles (strongly connected modules):\n" + "\n".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("package", ["parity", "weight_port"])
def test_public_surface_names_resolve(package):
    import importlib

    mod = importlib.import_module(package)
    missing = [n for n in mod.__all__ if not hasattr(mod, n)]
    assert not missing, missing
