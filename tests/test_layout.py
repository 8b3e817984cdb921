"""The package's layers: math imports no torch, dependencies run one way
(base <- math <- data <- networks <- bounds <- encoders, smoothing <- pipeline <- hybrid, compare,
inputs <- cli), no module imports itself through others (no circle), and card registration and
the bound code load none of each other."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gmcert"
TORCH = ("torch", "torchvision", "timm")

#: module (or package prefix) -> layer; a module may import only its own layer and lower ones
LAYERS = {
    "gmcert": 0, "gmcert.errors": 0, "gmcert.results": 0, "gmcert.atomic": 0,
    "gmcert.latent": 1, "gmcert.mismatch": 1, "gmcert.smoothing": 1, "gmcert.smoothing.stats": 1,
    "gmcert.smoothing.sequential": 1, "gmcert.smoothing.serialized": 1, "gmcert.smoothing.verified": 1,
    "gmcert.data": 2, "gmcert.networks": 2.1, "gmcert.bounds": 2.2, "gmcert.encoders": 2.3, "gmcert.head": 2.3,
    "gmcert.smoothing.smoother": 2.4, "gmcert.smoothing.srs": 2.4,
    "gmcert.distributed": 2, "gmcert.distributed.rows": 3,
    "gmcert.pipeline": 3, "gmcert.closed_form": 3, "gmcert.modeldir": 3, "gmcert.report": 3,
    "gmcert.hybrid": 4, "gmcert.compare": 4, "gmcert.inputs": 4, "gmcert.train": 4, "gmcert.train.command": 5,
    "gmcert.cli": 5, "gmcert.__main__": 5,
}
MATH = 1  # the layer that must run without torch


def layer(module: str) -> int:
    """The layer of the longest matching prefix."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in LAYERS:
            return LAYERS[".".join(parts[:end])]
    raise KeyError(f"{module} has no layer: add it to LAYERS (and to docs/ARCHITECTURE.md)")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> set:
    """Every module the file imports, at the top or inside functions (lazy imports count too), except
    a package's ``__getattr__`` re-exports, which load only when their names are used (how
    ``gmcert.smoothing`` keeps ``import gmcert.smoothing.stats`` free of torch)."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            tree.body.remove(node)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names
                      if (PACKAGE.parent / f"{node.module}.{alias.name}".replace(".", "/")).with_suffix(".py").is_file()}
    return found


def violations(module: str, imported: set) -> list:
    own = layer(module)
    out = [f"{module} (layer {own}) imports {name} (layer {layer(name)})"
           for name in sorted(imported) if name.startswith("gmcert") and layer(name) > own]
    if own <= MATH:
        out += [f"{module} is math but imports {name}" for name in sorted(imported) if name.split(".")[0] in TORCH]
    return out


FILES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[module_name(p) for p in FILES])
def test_dependencies_run_one_way(path):
    assert violations(module_name(path), imports(path)) == []


def test_the_check_catches_a_lower_layer_importing_a_higher_one():
    assert violations("gmcert.latent.mixture", {"gmcert.pipeline"})
    assert violations("gmcert.smoothing.stats", {"torch"})
    assert violations("gmcert.encoders.cards", {"gmcert.hybrid"})
    assert not violations("gmcert.cli", {"gmcert.pipeline", "torch"})
    with pytest.raises(KeyError):
        layer("gmcert_other.module")


def test_one_concept_per_folder():
    folders = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert folders == ["bounds", "cli", "data", "distributed", "encoders", "latent", "mismatch", "networks",
                       "smoothing", "train"]
    top = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert len(top) <= 13, top  # new work goes in a folder of its own


def test_math_runs_without_torch():
    """Not only the source: importing the math layer in a fresh interpreter loads no torch."""
    import subprocess
    import sys

    code = ("import sys, gmcert.latent, gmcert.latent.modelio, gmcert.smoothing.stats, gmcert.smoothing.sequential, "
            "gmcert.mismatch; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _graph() -> dict:
    """module -> the gmcert modules it imports (lazy imports too), for every file of the package,
    with the packages above each (importing ``gmcert.cli.common`` runs ``gmcert/cli/__init__.py``
    first), the root ``gmcert`` aside. A module's own packages are left out: Python runs them first
    whatever the module imports (``from gmcert.latent import certificates`` inside the package
    depends on ``certificates``)."""
    names = {module_name(p) for p in FILES}

    def own_package(module, name):
        return module.startswith(name + ".")

    def with_parents(found):
        return found | {".".join(n.split(".")[:end]) for n in found for end in range(2, n.count(".") + 1)}

    return {module_name(p): {n for n in with_parents(imports(p)) if n in names and n != module_name(p)
                             and not own_package(module_name(p), n)} for p in FILES}


def circles(graph: dict) -> list:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert circles(_graph()) == []


def test_the_circle_check_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("code, banned", [
    ("import gmcert.encoders.cards, gmcert.networks", "gmcert.bounds"),
    ("import gmcert.bounds.lipschitz, gmcert.bounds.rounding, gmcert.bounds.ball_rounding, gmcert.bounds.clever",
     "gmcert.encoders.cards"),
])
def test_card_registration_and_the_bounds_load_none_of_each_other(code, banned):
    import subprocess
    import sys

    probe = f"import sys; {code}; print(sorted(m for m in sys.modules if m.startswith({banned!r})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_old_module_paths_are_the_moved_modules():
    import gmcert.bounds.rounding
    import gmcert.encoders.rounding
    import gmcert.encoders.small
    import gmcert.networks.small

    assert gmcert.encoders.rounding is gmcert.bounds.rounding and gmcert.encoders.small is gmcert.networks.small
