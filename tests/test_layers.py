"""Imports point down the layers (docs/architecture.md): no module imports one on its own floor or
above, no module of a subpackage imports that subpackage's face, and no import cycle."""

import ast
import pathlib

from _helpers import ROOT

PACKAGE = pathlib.Path(ROOT) / "lightning_op"

#: the floors, lowest first; a module may import modules of lower floors only (a subpackage's
#: modules import each other freely, without cycles; a face imports what it re-exports)
FLOORS = [
    {"_gates", "support", "_layout"},
    {"reference"},
    {"kernels"},
    {"backends"},
    {"ops"},
    {"functional", "_export", "distributed"},
    {"nn", "rewrite", "deploy", "integrations"},
]


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _imports() -> set[tuple[str, str]]:
    """(importer, imported) pairs of lightning_op modules, lazy (function-level) imports included."""
    edges = set()
    for path in PACKAGE.rglob("*.py"):
        module = _module_name(path)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lightning_op"):
                target = node.module
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("lightning_op"):
                        edges.add((module, alias.name))
                continue
            else:
                continue
            for alias in node.names:
                full = f"{target}.{alias.name}"
                edges.add((module, full if _is_module(full) else target))
    return edges


def _floor(module: str) -> int:
    top = module.split(".")[1] if "." in module else None
    for index, names in enumerate(FLOORS):
        if top in names:
            return index
    raise AssertionError(f"{module} is on no floor: add it to FLOORS in {__file__} (and to docs/architecture.md)")


def test_every_import_points_down():
    upward = []
    for importer, imported in sorted(_imports()):
        if importer == "lightning_op":
            continue  # the face imports what it re-exports
        same_package = importer.split(".")[:2] == imported.split(".")[:2]
        if same_package:
            if imported.count(".") == 1 and importer != imported:  # a module importing its subpackage's face
                upward.append(f"{importer} -> {imported} (its own package's face)")
            continue
        if imported == "lightning_op" or _floor(imported) >= _floor(importer):
            upward.append(f"{importer} -> {imported}")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph: dict[str, set[str]] = {}
    for importer, imported in _imports():
        graph.setdefault(importer, set()).add(imported)
    visiting, done, cycles = set(), set(), []

    def visit(module, trail):
        if module in visiting:
            cycles.append(" -> ".join(trail[trail.index(module):] + [module]))
            return
        if module in done:
            return
        visiting.add(module)
        for imported in sorted(graph.get(module, ())):
            visit(imported, trail + [module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_a_planted_upward_import(tmp_path, monkeypatch):
    """The walker finds relative, absolute and lazy imports: an upward one planted in a copy fails."""
    import shutil

    copy = tmp_path / "lightning_op"
    shutil.copytree(PACKAGE, copy)
    with open(copy / "reference.py", "a") as file:
        file.write("\n\ndef _planted():\n    from .ops import attn  # noqa\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", copy)
    assert ("lightning_op.reference", "lightning_op.ops") in _imports()
    try:
        test_every_import_points_down()
    except AssertionError as error:
        assert "lightning_op.reference -> lightning_op.ops" in str(error)
    else:
        raise AssertionError("the planted upward import was not reported")
