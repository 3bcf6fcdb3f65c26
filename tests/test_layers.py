"""The subpackages follow one layer order: each imports only from the layers before it (and from itself), lazy
imports inside functions included. The contributor guide's layout section states the same order."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "sftlab"
GUIDE = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"

LAYERS = [
    ["__init__", "environment"],
    ["errors", "files", "internals"],
    ["config", "run_dir", "chat_tools"],
    ["chat_format"],
    ["model"],
    ["data"],
    ["infer"],
    ["eval"],
    ["export"],
    ["train"],
    ["cli"],
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """sftlab.train.sft -> train; sftlab.errors -> errors; sftlab -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every sftlab import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sftlab":
            if node.module == "sftlab":  # from sftlab import chat_format
                found += [(node.lineno, f"sftlab.{alias.name}") for alias in node.names if alias.name != "__version__"]
            else:
                found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "sftlab"]
    return found


def test_every_module_belongs_to_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.rglob("*.py")}
    assert sorted(units - set(LEVEL)) == []


def test_no_import_goes_against_the_layer_order():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = unit_of("sftlab." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts))
        for line, module in imports(path):
            there = unit_of(module)
            if there != here and LEVEL[there] >= LEVEL[here]:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line} imports {module} ({here} may not import {there})")
    assert wrong == []


def test_the_contributor_guide_states_the_same_order():
    stated = " -> ".join(", ".join(f"`{u}`" for u in units if u != "__init__") for units in LAYERS)
    assert stated in GUIDE.read_text(encoding="utf-8")


def test_only_train_imports_trl_and_internals_names_its_internal_apis():
    importers = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(name.split(".")[0] == "trl" for name in names):
                importers.add(str(path.relative_to(PACKAGE)))
    assert {p for p in importers if not p.startswith("train/")} == {"internals.py"}
    assert "train/sft.py" in importers
