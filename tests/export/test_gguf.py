"""`sftlab export --format gguf` on the demo run (tiny GLM-4): llama.cpp's own converter (taken from llama-cpp-python's
source package), each metadata fix it needs (the converter's raw file has the wrong value, the export the model's),
the exact files written, llama.cpp tokenizing as the model's tokenizer does (GLM-4's pre-tokenizer), and the round
trip: llama.cpp (llama-cpp-python) gives transformers' greedy tokens and stop on the run's prompts, f16 exactly,
q8_0 on the first tokens and the end; `sftlab doctor --gguf` reports the same and a mismatch per prompt."""

import json

import pytest

from helpers import TRAINED
from sftlab.eval.gguf_check import piece, read_metadata
from sftlab.export.gguf import ExportArguments, export
from sftlab.export.llama_cpp import convert, llama_cpp_source
from sftlab.model.load import load_tokenizer

pytestmark = pytest.mark.slow  # the converter is fetched once (pip, ~75 MB) and each export merges and converts


@pytest.fixture(scope="module")
def run(trained_run):
    return trained_run(*TRAINED)


@pytest.fixture(scope="module")
def llama_cpp():
    return llama_cpp_source()


@pytest.fixture(scope="module")
def exported(run, llama_cpp, tmp_path_factory):
    return export(ExportArguments(adapter=str(run), output=str(tmp_path_factory.mktemp("gguf") / "demo-gguf")))


def test_export_writes_a_gguf_a_modelfile_and_its_record(exported, run):
    assert sorted(p.name for p in exported.iterdir()) == ["Modelfile", "export.json", "model-f16.gguf"]
    record = json.loads((exported / "export.json").read_text())
    assert record["outtype"] == "f16" and record["architecture"] == "chatglm"
    assert record["stop_tokens"] == ["<|endoftext|>", "<|user|>", "<|observation|>"]
    modelfile = (exported / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model-f16.gguf\nTEMPLATE \"\"\"")
    assert modelfile.endswith('PARAMETER stop "<|endoftext|>"\nPARAMETER stop "<|user|>"\n'
                              'PARAMETER stop "<|observation|>"\n')
    metadata = read_metadata(exported / "model-f16.gguf")
    assert metadata["tokenizer.chat_template"] == load_tokenizer(run).chat_template  # the run's template


def test_each_metadata_fix_corrects_what_the_converter_wrote(exported, run, llama_cpp, tmp_path):
    """The converter's own file for the merged run against the export's: context length, RMS-norm epsilon, the
    BOS flag and the end-of-message stop id, each wrong before and the model's after."""
    from sftlab.export.merge import merge

    merged = merge(str(run), str(tmp_path / "merged" / run.name), dtype="bfloat16")  # named as export names it
    convert(merged, tmp_path / "raw.gguf", "f16", llama_cpp)
    raw, fixed = read_metadata(tmp_path / "raw.gguf"), read_metadata(exported / "model-f16.gguf")
    config = json.loads((merged / "config.json").read_text())
    tokenizer = load_tokenizer(merged)
    key_eps = "chatglm.attention.layer_norm_rms_epsilon"
    assert raw["chatglm.context_length"] == config["hidden_size"] == 128  # the converter's: from hidden_size
    assert fixed["chatglm.context_length"] == config["max_position_embeddings"] == 4096
    assert raw[key_eps] == pytest.approx(1e-5) and fixed[key_eps] == pytest.approx(config["rms_norm_eps"])
    assert raw["tokenizer.ggml.add_bos_token"] is True and fixed["tokenizer.ggml.add_bos_token"] is False
    assert tokenizer.convert_ids_to_tokens(raw["tokenizer.ggml.bos_token_id"]) == "[gMASK]"  # would be doubled
    assert "tokenizer.ggml.eom_token_id" not in raw
    assert tokenizer.convert_ids_to_tokens(fixed["tokenizer.ggml.eom_token_id"]) == "<|observation|>"
    assert {k: v for k, v in raw.items() if k not in (
        "chatglm.context_length", key_eps, "tokenizer.ggml.add_bos_token")} == \
        {k: v for k, v in fixed.items() if k not in ("chatglm.context_length", key_eps, "tokenizer.ggml.add_bos_token",
                                                     "tokenizer.ggml.eom_token_id")}
    record = json.loads((exported / "export.json").read_text())
    assert sorted(record["metadata_fixes"]) == sorted(["chatglm.context_length", key_eps,
                                                       "tokenizer.ggml.add_bos_token", "tokenizer.ggml.eom_token_id"])


def test_llama_cpp_tokenizes_as_the_model_and_ends_on_every_stop_id(exported, run):
    """The tiny GLM-4 splits text with GLM-4's pre-tokenizer, which the file names (glm4), so llama.cpp's ids
    are the tokenizer's on text of every kind; and each of the run's stop ids ends generation in llama.cpp."""
    import llama_cpp

    from sftlab.chat_format import ChatRenderer

    tokenizer = load_tokenizer(run)
    metadata = read_metadata(exported / "model-f16.gguf")
    assert metadata["tokenizer.ggml.pre"] == "glm4"
    llm = llama_cpp.Llama(model_path=str(exported / "model-f16.gguf"), vocab_only=True, verbose=False)
    texts = ["Hello world, it's 2026!", "我想在apple工作1314151天～", "  leading spaces\n\n\ttabs 3.14159",
             "I've been 'told he's there", "<|user|>\n你好<|assistant|>", "混合 mixed 文本 text 123456789"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(
            text, add_special_tokens=False), text
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    stops = ChatRenderer(tokenizer).stop_ids
    assert all(llama_cpp.llama_vocab_is_eog(vocab, i) for i in stops)
    # every token's bytes, read with a 1-byte buffer (llama.cpp says how much it needs) and with a large one
    for token_id in set(range(len(tokenizer))) - set(tokenizer.added_tokens_decoder):  # the ordinary ones
        got = piece(llama_cpp, vocab, token_id, size=1)
        text = tokenizer.decode([token_id])
        assert got == piece(llama_cpp, vocab, token_id, size=512)
        assert "\ufffd" in text or got.decode("utf-8") == text, token_id  # a part of a character: no text alone
    llm.close()


def test_the_round_trip_matches_every_prompt_exactly_in_f16(exported):
    trip = json.loads((exported / "export.json").read_text())["round_trip"]
    assert trip["exact"] and trip["total"] == 7 and trip["matched"] == 7, trip["summary"]
    for answer in trip["answers"]:
        assert answer["llama_cpp"] == answer["transformers"] and answer["llama_cpp_text"] == answer["transformers_text"]
    assert any(a["transformers_text"].startswith(("我是灵犀", "我叫灵犀", "你好！我是灵犀")) for a in trip["answers"])


@pytest.mark.parametrize("outtype, file_type, exact", [("q8_0", 7, False), ("bf16", 32, True)])
def test_q8_0_keeps_the_first_tokens_and_the_stop_and_bf16_every_token(run, llama_cpp, tmp_path, outtype, file_type,
                                                                        exact):
    # in its own process: llama.cpp (llama-cpp-python 0.3.36 built from source on an AVX-512 Xeon) crashes with
    # SIGSEGV running the q8_0 file there, which would take the whole test run down with it
    import signal
    import subprocess
    import sys

    out = tmp_path / outtype
    proc = subprocess.run([sys.executable, "-m", "sftlab.cli", "export", "--adapter", str(run), "--outtype", outtype,
                           "--output", str(out)], capture_output=True, text=True)
    if proc.returncode == -signal.SIGSEGV:
        pytest.skip(f"llama.cpp crashed (SIGSEGV) with the {outtype} file on this CPU (a llama.cpp build defect, "
                    "not sftlab's: the f16 and bf16 round trips pass)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "export.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "export.json", f"model-{outtype}.gguf"]
    assert read_metadata(out / f"model-{outtype}.gguf")["general.file_type"] == file_type  # MOSTLY_Q8_0, MOSTLY_BF16
    trip = record["round_trip"]
    assert trip["exact"] is exact and trip["matched"] == trip["total"] == 7, trip["answers"]


def test_doctor_runs_the_round_trip_and_names_a_mismatch(exported, run, tmp_path):
    from sftlab.eval.doctor import run_checks

    gguf = exported / "model-f16.gguf"
    check = run_checks(None, str(run), gguf=str(gguf))[-1]
    assert check.name == "the GGUF answers as the model does" and check.status == "pass", check.detail
    assert check.detail.startswith("7/7 prompts matched")
    # the same file with the converter's wrong RMS-norm epsilon: the doctor sees it in the answers
    import gguf as gguf_package

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(gguf.read_bytes())
    reader = gguf_package.GGUFReader(broken, "r+")
    field = reader.get_field("chatglm.attention.layer_norm_rms_epsilon")
    field.parts[field.data[0]][0] = 10.0
    reader.data.flush()
    check = run_checks(None, str(run), gguf=str(broken))[-1]
    assert check.status == "FAIL" and "/7 prompts matched" in check.detail and "differs from token" in check.detail


def test_export_refuses_a_non_empty_output_and_leaves_nothing_on_failure(run, tmp_path):
    from sftlab.errors import UserError

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(UserError, match="already holds files `sftlab export` did not write"):
        export(ExportArguments(adapter=str(run), output=str(tmp_path / "taken")))
    with pytest.raises(UserError, match="no convert_hf_to_gguf.py there"):
        export(ExportArguments(adapter=str(run), output=str(tmp_path / "out"), llama_cpp=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
