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


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """{module: the sftlab modules it imports, at any depth}; `from sftlab.data import clean` names the module."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sftlab":
                named = [f"{node.module}.{alias.name}" for alias in node.names]
                targets |= {m for m in [node.module, *named] if m in modules}
            elif isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names if alias.name in modules}
        graph[name] = targets - {name, "sftlab"}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    """No file-level import circles, lazy imports included: each is a sign that a name lives in the wrong file."""
    graph, circles = import_graph(), []
    state = {}  # 1: on the current path, 2: done

    def visit(module, path):
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_no_source_file_over_400_lines_and_no_function_over_60():
    long_files, long_functions = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text(encoding="utf-8")
        name = path.relative_to(PACKAGE)
        if len(text.splitlines()) > 400:
            long_files.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - min([node.lineno] + [d.lineno for d in node.decorator_list]) + 1
                if lines > 60:
                    long_functions.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert long_files == [] and long_functions == []
