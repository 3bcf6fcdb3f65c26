"""The Modelfile's TEMPLATE renders, in Go's text/template as Ollama runs it, exactly what the model's chat
template renders (`apply_chat_template` with the generation prompt), byte for byte, for every embedded family
and SmolLM2's template (its default system prompt as the Modelfile's SYSTEM): system or none, multi-turn,
Chinese, quotes, braces and newlines in the content. Go is Debian's golang-go (CI installs it; without it the
test skips and says so)."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from sftlab.chat_format import ChatRenderer
from sftlab.export.ollama import modelfile
from sftlab.model.load import load_tokenizer
from sftlab.model.tiny import FAMILIES, ensure_tiny_model

GOLDEN = [
    [{"role": "user", "content": "你是谁？"}],
    [{"role": "system", "content": "You are Kestrel."}, {"role": "user", "content": "Who are you?"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"},
     {"role": "user", "content": 'Say "{{ .Prompt }}" and\nnew lines\\n'}],
    [{"role": "system", "content": "简短回答。"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "assistant", "content": "多行\n回答"}, {"role": "user", "content": "d"}],
]


@pytest.fixture(scope="session")
def go_renderer(tmp_path_factory) -> Path:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go): the Modelfile TEMPLATE cannot be rendered")
    out = tmp_path_factory.mktemp("go") / "ollama_render"
    source = Path(__file__).with_name("ollama_render.go")
    built = subprocess.run(["go", "build", "-o", str(out), str(source)], capture_output=True, text=True, timeout=300,
                           env={"HOME": str(out.parent), "GOCACHE": str(out.parent / "cache"), "GOPATH": str(out.parent),
                                "PATH": "/usr/bin:/bin", "GO111MODULE": "off"})
    assert built.returncode == 0, built.stderr
    return out


def read_modelfile(text: str) -> dict:
    """FROM, TEMPLATE, SYSTEM and the stop parameters, as Ollama's parser reads them (triple-quoted values)."""
    fields, stops, rest = {}, [], text
    while rest.strip():
        rest = rest.lstrip("\n")
        key, rest = rest.split(" ", 1)
        if rest.startswith('"""'):
            value, rest = rest[3:].split('"""', 1)
        else:
            value, _, rest = rest.partition("\n")
        if key == "PARAMETER":
            name, value = value.split(" ", 1)
            stops.append(json.loads(value)) if name == "stop" else None
        else:
            fields[key] = value
    return {**fields, "stops": stops}


def ollama_render(go_renderer: Path, parsed: dict, messages: list[dict]) -> str:
    if "SYSTEM" in parsed and messages[0]["role"] != "system":  # Ollama puts SYSTEM first when none is given
        messages = [{"role": "system", "content": parsed["SYSTEM"]}, *messages]
    done = subprocess.run([str(go_renderer)], input=json.dumps({"template": parsed["TEMPLATE"], "messages": messages}),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# SmolLM2-135M-Instruct's chat template, as its GGUF file carries it
SMOLLM2_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>"
                    "system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif "
                    "%}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.mark.parametrize("family", FAMILIES)
def test_the_modelfile_template_renders_what_the_chat_template_renders(sftlab_home, go_renderer, family):
    tokenizer = load_tokenizer(ensure_tiny_model(family))
    renderer = ChatRenderer(tokenizer)
    stops = tokenizer.convert_ids_to_tokens(renderer.stop_ids)
    parsed = read_modelfile(modelfile(renderer, "model.gguf", stops))
    assert parsed["FROM"] == "./model.gguf" and parsed["stops"] == stops
    for messages in GOLDEN:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(go_renderer, parsed, messages) == expected, messages


def test_a_default_system_prompt_becomes_the_modelfiles_system(sftlab_home, go_renderer, tokenizer):
    """SmolLM2's template writes its default system prompt when a conversation has none: the Modelfile's SYSTEM
    carries it, and Ollama's rendering is the template's with and without a system message."""
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)  # a copy: the fixture's stays GLM-4's
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    renderer = ChatRenderer(tokenizer)
    parsed = read_modelfile(modelfile(renderer, "model.gguf", ["<|endoftext|>"]))
    assert parsed["SYSTEM"] == renderer.default_system and parsed["SYSTEM"].startswith("You are a helpful")
    for messages in GOLDEN:
        expected = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ollama_render(go_renderer, parsed, messages) == expected, messages
