"""The configuration reference, generated from the code: for every verb of `sftlab` (cli.VERBS), every field its
argument dataclasses accept (as a flag, or a key of its --config YAML), with its type, default, range and help
text, grouped by the class that declares it (sftlab's own first, then TRL's and transformers' that sftlab passes
on). Writes docs/reference/ (one page per verb, and an index):

    .venv/bin/python scripts/config_reference.py [--check]

--check writes nothing and exits 1 naming the pages that differ from what it would write
(tests/test_config_reference.py runs it). The inherited fields depend on the installed transformers and TRL: each
page names the versions it was written with, and a check under other versions compares sftlab's own fields only.
"""

import argparse
import dataclasses
import enum
import importlib
import json
import sys
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "reference"
LIBRARIES = ("transformers", "trl", "peft")
INHERITED = "\n## Inherited"  # the line where a page's fields from other libraries begin


def verb_classes(verb) -> list[type]:
    return list(getattr(importlib.import_module(verb.module), verb.arguments))


def declaring_class(klass: type, name: str) -> type:
    """The class in `klass`'s MRO whose own annotations declare the field `name` (the most derived one)."""
    return next(c for c in klass.__mro__ if name in vars(c).get("__annotations__", {}))


def type_text(kind) -> str:
    if isinstance(kind, str):
        return kind
    if isinstance(kind, type) and not typing.get_args(kind):
        return kind.__name__
    return str(kind).replace("typing.", "").replace("NoneType", "None")


def default_text(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    return json.dumps(value, ensure_ascii=False, default=str)


def cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def declared_types(klass: type) -> dict:
    """The fields' types as the classes declare them: transformers' argument parser rewrites a dataclass field's
    `type` in place once it has built a parser from it (`str | None` becomes `str`)."""
    try:
        return typing.get_type_hints(klass)
    except Exception:  # an annotation that does not resolve here: the field's own record
        return {}


def rows(klass: type, fields: list[dataclasses.Field]) -> list[str]:
    ranges, types = getattr(klass, "RANGES", {}), declared_types(klass)
    lines = ["| field | type | default | range | help |", "| --- | --- | --- | --- | --- |"]
    for f in fields:
        rule = ranges[f.name].text() if f.name in ranges else ""
        kind = type_text(types.get(f.name, f.type))
        lines.append(f"| `{f.name}` | `{cell(kind)}` | `{cell(default_text(f))}` | {cell(rule)} | "
                     f"{cell(f.metadata.get('help', ''))} |")
    return lines


def page(name: str, verb) -> str:
    """One verb's page: its fields by declaring class, sftlab's first."""
    own, inherited, seen = {}, {}, set()
    for klass in verb_classes(verb):
        for f in dataclasses.fields(klass):
            if f.name in seen or not f.init:
                continue
            seen.add(f.name)
            origin = declaring_class(klass, f.name)
            group = own if origin.__module__.startswith("sftlab") else inherited
            group.setdefault((klass, origin), []).append(f)
    lines = [f"# `sftlab {name}`", "", verb.summary[0].upper() + verb.summary[1:] + ".", "",
             f"    {verb.example}", "",
             "Every field is a flag (`--name value`, dashes or underscores) and a key of the `--config FILE` YAML "
             "(flags win). Generated from the code by `scripts/config_reference.py`; do not edit.", ""]
    for positional, kwargs in verb.positional:
        lines += [f"Positional: `{positional}`: {cell(kwargs.get('help', ''))}", ""]
    for (klass, origin), fields in own.items():
        lines += [f"## {origin.__name__}", "", *rows(klass, fields), ""]
    if inherited:
        versions = ", ".join(f"{lib} {importlib.import_module(lib).__version__}" for lib in LIBRARIES)
        lines += [INHERITED.strip(), "", f"Fields sftlab passes on to the libraries it trains with ({versions}).", ""]
        for (klass, origin), fields in inherited.items():
            lines += [f"### {origin.__module__.split('.')[0]}: {origin.__name__}", "", *rows(klass, fields), ""]
    return "\n".join(lines).rstrip() + "\n"


def file_name(verb_name: str) -> str:
    return verb_name.replace(" ", "-") + ".md"


def pages() -> dict[str, str]:
    from sftlab import cli

    written = {file_name(name): page(name, verb) for name, verb in cli.VERBS.items()}
    index = ["# Configuration reference", "",
             "Every field of every verb, generated from the code (`scripts/config_reference.py`).", "",
             "| verb | what it does |", "| --- | --- |"]
    index += [f"| [`sftlab {name}`]({file_name(name)}) | {cell(verb.summary)} |" for name, verb in cli.VERBS.items()]
    written["index.md"] = "\n".join(index) + "\n"
    return written


def own_part(text: str) -> str:
    return text.split(INHERITED)[0]


def same_libraries(text: str) -> bool:
    return all(f"{lib} {importlib.import_module(lib).__version__}" in text for lib in LIBRARIES) \
        if INHERITED in text else True


def differences() -> list[str]:
    """The pages that differ from the committed ones (under other library versions, in sftlab's fields only)."""
    wanted, differ = pages(), []
    for name, text in wanted.items():
        path = OUT / name
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        exact = same_libraries(committed)
        if (committed if exact else own_part(committed)) != (text if exact else own_part(text)):
            differ.append(str(path.relative_to(REPO)))
    extra = sorted(p.name for p in OUT.glob("*.md") if p.name not in wanted) if OUT.exists() else []
    return differ + [f"docs/reference/{name} (no such verb)" for name in extra]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a page differs")
    if parser.parse_args().check:
        differ = differences()
        if differ:
            print("out of date (run scripts/config_reference.py): " + ", ".join(differ))
            return 1
        return 0
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (OUT / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(pages())} pages to {OUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
