"""GGUF files for llama.cpp and Ollama: converted by llama.cpp's own converter, then the metadata it gets wrong for
a model fixed through the `gguf` package, so that the file carries the model's context, norm epsilon, chat
template and every stop id.

The converter is llama.cpp's `convert_hf_to_gguf.py` with its `conversion/` package and `gguf-py`, the version
vendored in llama-cpp-python's source package (LLAMA_CPP_PYTHON): a llama.cpp checkout given with --llama_cpp, or
those files taken once from that package (pip downloads it; about 75 MB) into sftlab's cache.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from sftlab.environment import cache_root
from sftlab.errors import UserError
from sftlab.files import die_with_parent, exclusive_lock, release_lock

LLAMA_CPP_PYTHON = "0.3.36"  # the llama.cpp whose converter and runtime sftlab's exports are checked with
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
OUTTYPES = ("f16", "bf16", "q8_0")  # written by the converter itself
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")  # written by llama-quantize from the f16 file, when it is installed


def llama_cpp_source(given: str | None = None) -> Path:
    """A folder holding llama.cpp's converter: `given` (a llama.cpp checkout), else sftlab's cached copy, taken
    from llama-cpp-python's source package the first time."""
    if given:
        folder = Path(given).expanduser()
        folder = folder.parent if folder.name == "convert_hf_to_gguf.py" else folder
        if not (folder / "convert_hf_to_gguf.py").is_file():
            raise UserError(f"--llama_cpp {given}: no convert_hf_to_gguf.py there (give a llama.cpp checkout)")
        return folder
    cached = cache_root() / "llama.cpp" / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (cached / "convert_hf_to_gguf.py").is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    lock = exclusive_lock(cached.parent / ".lock")
    try:
        if not (cached / "convert_hf_to_gguf.py").is_file():
            fetch_converter(cached)
    finally:
        release_lock(lock)
    return cached


def fetch_converter(target: Path) -> None:
    """llama.cpp's converter files out of llama-cpp-python's source package, downloaded by pip."""
    with tempfile.TemporaryDirectory(prefix="sftlab-llama-cpp-") as tmp:
        print(f"fetching llama.cpp's converter: pip download llama-cpp-python=={LLAMA_CPP_PYTHON} (source, ~75 MB)",
              file=sys.stderr)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               "--quiet", "-d", tmp, f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
                              capture_output=True, text=True)
        archives = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no source package downloaded"])[-1]
            raise UserError(f"GGUF export needs llama.cpp's converter and pip could not download it ({last}): "
                            "pass --llama_cpp DIR (a llama.cpp checkout), or run where pip reaches PyPI once")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
        try:
            with tarfile.open(archives[0]) as archive:
                root = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
                members = [m for m in archive.getmembers() if m.name.startswith(root)
                           and m.name[len(root):].startswith(CONVERTER_FILES) and (m.isfile() or m.isdir())]
                for member in members:
                    member.name = member.name[len(root):]
                archive.extractall(staging, members=members, filter="data")
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def convert(model_dir: Path, out_file: Path, outtype: str, llama_cpp: Path) -> None:
    """Runs llama.cpp's converter on a transformers model folder (sftlab.export.llama_cpp_convert: the converter
    itself, with a pre-tokenizer named by its pattern where its hash is unknown)."""
    done = subprocess.run([sys.executable, "-m", "sftlab.export.llama_cpp_convert", str(llama_cpp), str(model_dir),
                           "--outfile", str(out_file), "--outtype", outtype],
                          capture_output=True, text=True, env={**os.environ, "NO_LOCAL_GGUF": ""},
                          preexec_fn=die_with_parent)  # the converter ends with export, however export ends
    if done.returncode != 0 or not out_file.is_file():
        tail = "\n".join(done.stderr.strip().splitlines()[-8:])
        raise UserError(f"llama.cpp's converter failed on {model_dir}:\n{tail}")


def quantizer(kind: str) -> str:
    """llama.cpp's llama-quantize, which writes the k-quants (not a Python package: on PATH or nowhere)."""
    binary = shutil.which("llama-quantize")
    if binary is None:
        raise UserError(f"--outtype {kind} needs llama.cpp's llama-quantize on PATH (build llama.cpp, or use one of "
                        f"{', '.join(OUTTYPES)}, which the converter writes itself)")
    return binary


def quantize(f16_file: Path, out_file: Path, kind: str) -> None:
    """A k-quant from the f16 file."""
    done = subprocess.run([quantizer(kind), str(f16_file), str(out_file), kind.upper()], capture_output=True,
                          text=True, preexec_fn=die_with_parent)
    if done.returncode != 0:
        raise UserError(f"llama-quantize failed: {done.stderr.strip().splitlines()[-1:]}")


def metadata_fixes(reader, model_dir: Path, tokenizer, stop_ids: list[int]) -> dict:
    """What the converter wrote wrong for this model, as {key: (gguf value type, value, why)}: the context
    length and RMS-norm epsilon of the model's config.json (llama.cpp's chatglm converter takes them from keys
    GlmForCausalLM does not have: the context from hidden_size, the epsilon a default 1e-5), no BOS added where
    the chat template writes the prefix itself (GLM-4's [gMASK]<sop>, which would be doubled), and the stop ids
    that llama.cpp would not end a reply on (GLM-4's <|observation|>), as the end-of-message id."""
    from gguf import GGUFValueType, Keys

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    arch = reader.get_field(Keys.General.ARCHITECTURE).contents()
    fixes = {}

    def want(key: str, kind, value, why: str) -> None:
        field = reader.get_field(key)
        if field is None or field.contents() != value:
            fixes[key] = (kind, value, why)

    context = config.get("max_position_embeddings") or config.get("seq_length")
    if context:
        want(Keys.LLM.CONTEXT_LENGTH.format(arch=arch), GGUFValueType.UINT32, int(context),
             "the model's max_position_embeddings")
    epsilon = config.get("rms_norm_eps")
    field = reader.get_field(Keys.Attention.LAYERNORM_RMS_EPS.format(arch=arch))
    if epsilon is not None and field is not None and abs(field.contents() - epsilon) > 1e-3 * epsilon:
        fixes[field.name] = (GGUFValueType.FLOAT32, float(epsilon), "the model's rms_norm_eps")
    bos = tokenizer.bos_token or (tokenizer.convert_ids_to_tokens(reader.get_field(Keys.Tokenizer.BOS_ID).contents())
                                  if reader.get_field(Keys.Tokenizer.BOS_ID) else None)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    if bos and rendered.startswith(bos):
        want(Keys.Tokenizer.ADD_BOS, GGUFValueType.BOOL, False, "the chat template writes the prefix itself")
    ends = {reader.get_field(k).contents() for k in (Keys.Tokenizer.EOS_ID, Keys.Tokenizer.EOT_ID,
                                                       Keys.Tokenizer.EOM_ID) if reader.get_field(k)}
    unended = [i for i in stop_ids if i not in ends and tokenizer.convert_ids_to_tokens(i) not in EOG_BY_NAME]
    if unended and reader.get_field(Keys.Tokenizer.EOM_ID) is None:
        fixes[Keys.Tokenizer.EOM_ID] = (GGUFValueType.UINT32, unended[0], "a stop id llama.cpp would not stop on")
    return fixes


# tokens llama.cpp ends a reply on by their text (llama-vocab.cpp), whatever the metadata says
EOG_BY_NAME = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>",
               "<|end_of_text|>", "<eos>"}


def fix_metadata(converted: Path, out_file: Path, model_dir: Path, tokenizer, stop_ids: list[int]) -> dict:
    """Writes `converted` with its metadata fixed to `out_file` (the gguf package's own copy: every tensor as it
    is); returns the fixes made, {key: why}."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(converted, "r")
    fixes = metadata_fixes(reader, model_dir, tokenizer, stop_ids)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(out_file, arch=arch, endianess=reader.endianess)
    changes = {key: MetadataDetails(kind, value) for key, (kind, value, _) in fixes.items()}
    copy_with_new_metadata(reader, writer, changes, [])
    return {key: f"{value!r} ({why})" for key, (_, value, why) in fixes.items()}


