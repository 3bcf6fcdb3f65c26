"""docs/reference/ is what scripts/config_reference.py writes from the code: a field added, removed or with new help
text fails here until the reference is written again, and every field of every verb is on its verb's page."""

import dataclasses
import importlib.util

from helpers import REPO
from sftlab import cli


def load_script():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_reference_is_what_the_code_writes():
    assert load_script().differences() == []


def test_every_field_every_verb_accepts_is_on_its_page():
    script = load_script()
    for name, verb in cli.VERBS.items():
        text = (REPO / "docs" / "reference" / script.file_name(name)).read_text(encoding="utf-8")
        fields = {f.name for klass in script.verb_classes(verb) for f in dataclasses.fields(klass) if f.init}
        missing = sorted(f for f in fields if f"| `{f}` |" not in text)
        assert not missing, (name, missing)
        assert all(f"Positional: `{p}`" in text for p, _ in verb.positional), name
