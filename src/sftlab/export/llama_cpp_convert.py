"""Runs llama.cpp's own converter (convert_hf_to_gguf.py, with its own gguf-py) on a model folder, with one
addition: a pre-tokenizer it does not know by hash is named by its pattern.

The converter names a tokenizer's pre-tokenizer (the GGUF's `tokenizer.ggml.pre`, which picks llama.cpp's
splitting regex) by hashing the token ids of a test text, so it knows only the vocabularies it has seen: any
model with a vocabulary of its own (sftlab's tiny models, a tokenizer retrained on a new language) is refused
even when it splits text exactly as a known family does. Where the hash is unknown, this reads the pattern from
tokenizer.json and gives the name whose regex llama.cpp implements for it; nothing else of the conversion is
touched. Run as `python -m sftlab.export.llama_cpp_convert LLAMA_CPP_DIR CONVERTER_ARGS...`.
"""

import json
import logging
import runpy
import sys
from pathlib import Path

# tokenizer.json's Split patterns -> the pre-tokenizer name llama.cpp splits that way (llama-vocab.cpp)
PRE_BY_SPLIT = {
    # GLM-4 (and Llama-3's, as llama.cpp implements both the same way)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "glm4",
    # Qwen2 and Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+": "qwen2",
}

logger = logging.getLogger("sftlab.gguf")


def pre_tokenizer_name(model_dir: Path) -> str | None:
    """llama.cpp's name for the way `model_dir`'s tokenizer splits text, or None when it splits otherwise."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"  # byte-level BPE with GPT-2's own pattern
    parts = pre.get("pretokenizers") or []
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return PRE_BY_SPLIT.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def main(llama_cpp: Path, arguments: list[str]) -> None:
    sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
    from conversion import base

    by_hash = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return by_hash(self, tokenizer)
        except NotImplementedError:
            name = pre_tokenizer_name(self.dir_model)
            if name is None:
                raise
            logger.warning("pre-tokenizer not known by its hash; its pattern is llama.cpp's %r", name)
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    script = llama_cpp / "convert_hf_to_gguf.py"
    sys.argv = [str(script), *arguments]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
