"""The kinds of failure a probe of the newest verbs found, each held by a mechanism rather than a case: the error
boundary in cli.py (one line, a log file with the traceback), the YAML reader that refuses duplicate keys, the
output-folder check every writing verb calls, the GGUF check before llama.cpp, hashes checked on reading prepared
shards, training rows checked by `data prepare` as by `train`. (The fault matrix in test_fault_matrix.py runs every
verb against damaged inputs; the process-lifetime tests are in data/test_clean_pool.py, the server's in
infer/test_serve.py.)"""

import json
import os
from pathlib import Path

import pytest

from helpers import REPO, TRAINED
from sftlab import cli

DEMO = str(REPO / "configs" / "demo.yaml")


def run(argv: list[str], capsys) -> tuple[int, list[str], str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    text = out.out + out.err
    return code, [line for line in text.splitlines() if line.startswith("sftlab ")], text


def test_a_key_given_twice_in_a_yaml_is_an_error_naming_the_key_and_both_lines(tmp_path, capsys):
    config = tmp_path / "twice.yaml"
    config.write_text(Path(DEMO).read_text() + "\nlearning_rate: 0.5\n")
    first = next(n for n, line in enumerate(Path(DEMO).read_text().splitlines(), 1) if line.startswith("learning_rate"))
    last = len(config.read_text().splitlines())
    code, lines, text = run(["estimate", "--config", str(config)], capsys)
    assert code == 2 and len(lines) == 1 and "Traceback" not in text
    assert f"key 'learning_rate' is given twice (lines {first} and {last})" in lines[0] and str(config) in lines[0]


@pytest.mark.parametrize("argv, expected", [
    (["estimate", "--config", DEMO, "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["estimate", "--config", "{tmp}/bad.yaml"], "config file {tmp}/bad.yaml:2: seed: 'abc' is not a valid int"),
    (["estimate", "--config", "{tmp}/empty.yaml"], "config file {tmp}/empty.yaml is empty"),
    (["serve", "--model", "sftlab:tiny-glm4", "--port", "99999"], "port: must be in [1, 65535], got 99999"),
])
def test_a_value_of_the_wrong_type_is_one_line_not_a_usage_dump(argv, expected, tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("model_name_or_path: sftlab:tiny-glm4\nseed: abc\n")
    (tmp_path / "empty.yaml").write_text("")
    code, lines, text = run([a.replace("{tmp}", str(tmp_path)) for a in argv], capsys)
    assert code == 2 and len(text.strip().splitlines()) == 1, text[-2000:]
    assert expected.replace("{tmp}", str(tmp_path)) in lines[0]


def test_an_unexpected_error_is_one_line_with_its_traceback_in_a_log(monkeypatch, capsys, sftlab_home):
    import sftlab.data.commands as commands

    def bug(*args, **kwargs):
        raise ZeroDivisionError("planted")

    monkeypatch.setattr(commands, "inspect_data", bug)
    code, lines, text = run(["data", "inspect", str(REPO / "src/sftlab/data/demo/identity.jsonl")], capsys)
    assert code == 1 and len(lines) == 1 and "Traceback" not in text
    assert "internal error (ZeroDivisionError: planted)" in lines[0]
    log = Path(lines[0].split("(traceback: ")[1].split(";")[0])
    assert log.is_relative_to(sftlab_home) and "ZeroDivisionError: planted" in log.read_text()
    monkeypatch.setenv("SFTLAB_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        cli.main(["data", "inspect", str(REPO / "src/sftlab/data/demo/identity.jsonl")])


def test_data_clean_never_overwrites_what_it_was_not_handed(trained_run, tmp_path, capsys):
    data = tmp_path / "in"
    data.mkdir()
    (data / "clean.jsonl").write_text((REPO / "src/sftlab/data/demo/identity.jsonl").read_text())
    before = (data / "clean.jsonl").read_bytes()
    code, lines, _ = run(["data", "clean", str(data / "clean.jsonl"), "--output", str(data)], capsys)
    assert code == 2 and f"--output {data} holds an input of this command ({data / 'clean.jsonl'})" in lines[0]
    assert (data / "clean.jsonl").read_bytes() == before

    run_dir = trained_run(*TRAINED)
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    code, lines, _ = run(["data", "clean", str(data / "clean.jsonl"), "--output", str(run_dir)], capsys)
    assert code == 2 and "already holds files `sftlab data clean` did not write (" in lines[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files

    out = tmp_path / "out"  # its own previous output is replaced
    for _ in range(2):
        code, _, text = run(["data", "clean", str(data / "clean.jsonl"), "--output", str(out)], capsys)
        assert code == 0, text[-2000:]


@pytest.mark.parametrize("verb", ["export", "merge", "eval"])
def test_an_output_that_is_a_file_or_holds_other_files_is_refused_before_any_work(verb, trained_run, tmp_path,
                                                                                  capsys):
    run_dir = trained_run(*TRAINED)
    (tmp_path / "a_file").write_text("mine")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for output, expected in ((tmp_path / "a_file", "is a file, not a folder"),
                             (tmp_path / "taken", "did not write (notes.txt)")):
        code, lines, text = run([verb, "--adapter", str(run_dir), "--output", str(output)], capsys)
        assert code == 2 and "Traceback" not in text and f"--output {output}" in lines[0] and expected in lines[0]
    assert (tmp_path / "a_file").read_text() == "mine" and os.listdir(tmp_path / "taken") == ["notes.txt"]


def test_data_prepare_that_keeps_no_training_rows_is_an_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"instruction": f"q{i}", "output": ""}) + "\n" for i in range(5)))
    code, lines, _ = run(["data", "prepare", "--config", DEMO, "--data_files", str(bad)], capsys)
    assert code == 2 and "no training samples left from " + str(bad) in lines[0]


def test_a_damaged_gguf_is_one_line_naming_it_before_llama_cpp_reads_it(tmp_path, capsys):
    import gguf
    import numpy as np

    good = tmp_path / "good.gguf"
    writer = gguf.GGUFWriter(str(good), "llama")
    writer.add_tensor("w", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = good.read_bytes()
    cases = {"truncated.gguf": (data[:len(data) - 4096], "is a damaged GGUF"),
             "empty.gguf": (b"", "is not a GGUF file (empty)"),
             "text.gguf": (b"hello, not a model", "is not a GGUF file (it starts with b'hell')"),
             "header.gguf": (data[:40], "is a damaged GGUF")}
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        code, lines, text = run(["doctor", "--model", "sftlab:tiny-glm4", "--gguf", str(tmp_path / name)], capsys)
        assert code == 2 and "Traceback" not in text and len(lines) == 1, text[-2000:]
        assert str(tmp_path / name) in lines[0] and expected in lines[0], lines[0]


@pytest.mark.slow
def test_a_same_size_bit_flip_in_a_prepared_shard_is_found_and_rebuilt(tmp_path, capsys):
    argv = ["data", "prepare", "--config", DEMO]
    code, _, text = run(argv, capsys)
    assert code == 0, text[-2000:]
    folder = Path(text.split("prepared data: ")[1].split(" (")[0])
    shard = sorted((folder / "shards").iterdir())[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, _, text = run(argv, capsys)
    assert code == 0 and "its bytes do not match the hash in manifest.json" in text and \
        "preparing the data again" in text
    assert shard.read_bytes() != bytes(data)  # rebuilt


def test_serve_on_a_busy_port_or_an_unknown_host_is_one_line_before_the_model_loads(capsys):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, lines, text = run(["serve", "--model", "sftlab:tiny-glm4", "--port", str(port)], capsys)
        assert code == 2 and lines == [f"sftlab serve: error: cannot listen on 127.0.0.1:{port}: Address already in "
                                       "use (another server there? choose another --port)"], text[-2000:]
    code, lines, _ = run(["serve", "--model", "sftlab:tiny-glm4", "--host", "999.1.1.1"], capsys)
    assert code == 2 and lines[0].startswith("sftlab serve: error: --host 999.1.1.1: not an address of this machine")


def test_weights_that_are_a_folder_are_named(trained_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(trained_run(*TRAINED), copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    (copy / "adapter_model.safetensors").unlink()
    (copy / "adapter_model.safetensors").mkdir()
    code, lines, text = run(["chat", "--adapter", str(copy), "--prompt", "hi"], capsys)
    assert code == 2 and "Traceback" not in text
    assert lines == [f"sftlab chat: error: {copy / 'adapter_model.safetensors'} is a folder, not a safetensors file: "
                     "copy or save the weights again"]
