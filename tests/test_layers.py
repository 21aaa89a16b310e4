"""The package's folders are its layers: a module imports only from its own folder or from folders below it."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "clt_explorer"
LAYERS = [{"storage", "cli", "progress", "data"}, {"model"}, {"evaluation"}, {"training"}, {"retrieval"}, {"assets"},
          {"app"}]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def imported_parts(path: Path) -> set[str]:
    """The top-level parts of clt_explorer that a module imports (relative or absolute imports)."""
    depth = len(path.relative_to(PACKAGE).parts) - 1  # 0 for clt_explorer/x.py, 1 for clt_explorer/pkg/x.py
    own = path.relative_to(PACKAGE).parts[0] if depth else None
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and (node.module or "").startswith("clt_explorer."):
                parts.add(node.module.split(".")[1])
            elif node.level == depth + 1:  # from the package root: ..x (or .x at the root)
                parts.add((node.module or "").split(".")[0])
            elif node.level == 1 and own:  # a sibling in the same folder
                parts.add(own)
    return parts - {""}


def test_no_module_imports_from_a_higher_layer():
    offences = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1 and parts[0] == "__init__.py":
            continue  # the package's front door re-exports the public API
        own = parts[0].removesuffix(".py")
        for imported in imported_parts(path):
            assert imported in RANK, f"{path}: {imported} is not placed in a layer"
            if RANK[imported] > RANK[own]:
                offences.append(f"{path.relative_to(PACKAGE)} imports {imported}")
    assert not offences, offences


def test_every_folder_has_a_layer():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")}
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert folders | modules == set(RANK)
