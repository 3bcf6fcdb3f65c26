"""The one model loader: name -> local folder -> tokenizer (with chat template) and model.

Safe by default: safetensors only, no remote code unless asked for. A Hub id is fetched only where there is
network; offline, the error says in one line what to do instead.
"""

import hashlib
import json
import os
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path

from sftlab.environment import cache_root, hub_offline
from sftlab.errors import UserError
from sftlab.files import file_digest, write_atomic
from sftlab.internals import set_recorded_name
from sftlab.model import attention  # noqa: F401  registers sdpa_varlen with transformers
from sftlab.model.real import REAL_MODELS, ensure_real_model
from sftlab.model.tiny import FAMILIES, build_of_run, ensure_tiny_model, glm4_chat_template
from sftlab.run_dir import ADAPTER_CONFIG, is_adapter_folder, read_json, run_folder, run_record

# TRL's name for the frozen copy of an adapter that a run goes on training (DPO over an SFT run's adapter): the
# reference, the model as the stage started it
REFERENCE_ADAPTER = "ref"


EMBEDDED = [*FAMILIES, *REAL_MODELS]  # every sftlab: name


def resolve_model_path(name_or_path: str) -> Path:
    """A local folder for `name_or_path`: an embedded model, a local checkpoint, or a Hub snapshot."""
    if name_or_path in REAL_MODELS:
        return ensure_real_model(name_or_path)
    if name_or_path.startswith("sftlab:"):
        if name_or_path.partition("@")[0] not in FAMILIES:  # name@v1: an earlier build, for the runs made on it
            raise UserError(f"model {name_or_path}: there is no such embedded model; the embedded ones are "
                            f"{', '.join(EMBEDDED)}")
        return ensure_tiny_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if is_adapter_folder(path):
            return path  # a LoRA run as a base (a second stage's start): load_model merges it into its own base
        if not (path / "config.json").exists():
            raise UserError(f"model path {name_or_path}: no config.json there (is it a model folder?)")
        return path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1 or path.exists():
        raise UserError(
            f"model path {name_or_path} does not exist. Pass a local model folder, a Hub id like "
            f"THUDM/glm-4-9b-hf, or an embedded model ({', '.join(EMBEDDED)})"
        )
    return download_from_hub(name_or_path)


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]  # safetensors only, never pickles
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not cached yet
    hint = (f"download it where there is network (`hf download {repo_id} --local-dir ./weights/"
            f"{repo_id.split('/')[-1]}`) and pass that folder")
    if hub_offline():
        raise UserError(f"{repo_id} is a Hub id, and the Hub is offline (HF_HUB_OFFLINE=1): {hint}")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise UserError(f"could not download {repo_id} from the Hugging Face Hub ({type(exc).__name__}): "
                        f"{hint}") from exc


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(model_path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if Path(model_path).is_dir():
        check_json_files(Path(model_path))
    if Path(model_path).is_dir() and not any((Path(model_path) / name).exists() for name in TOKENIZER_FILES):
        raise UserError(f"model folder {model_path} has no tokenizer ({', '.join(TOKENIZER_FILES)}): copy the "
                        "tokenizer files of its base model into it")
    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    if tokenizer.chat_template is None and "[gMASK]" in tokenizer.get_vocab():
        tokenizer.chat_template = glm4_chat_template()  # glm-4-9b-hf (base) ships without one
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str):
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


def quantization_config(load_in_4bit: bool):
    """QLoRA's 4-bit setting (NF4, double quantization, bf16 compute), or None; a clear error where it
    cannot run."""
    if not load_in_4bit:
        return None
    import torch

    if not torch.cuda.is_available():
        raise UserError("load_in_4bit: QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels); this machine has none. "
                        "Set load_in_4bit: false to train LoRA on unquantized weights")
    if find_spec("bitsandbytes") is None:
        raise UserError("load_in_4bit: needs `pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_model(model_path: Path, dtype: str = "auto", trust_remote_code: bool = False,
               attn_implementation: str | None = None, record_name: str | None = None, device: str | None = None,
               load_in_4bit: bool = False):
    """Loads a causal LM. `record_name` is what adapters trained on it record as their base; `device`
    loads the weights straight onto it (a 9B model never passes through CPU memory on the way to a GPU). A LoRA
    run folder is loaded as its base with the adapter merged in (load_merged_adapter: a full fine-tune that starts
    from it; a LoRA stage goes on training the adapter instead, load_adapter_to_train)."""
    from transformers import AutoModelForCausalLM

    if is_adapter_folder(model_path):
        return load_merged_adapter(Path(model_path), dtype, trust_remote_code, attn_implementation, record_name,
                                   device, load_in_4bit)
    quantization = quantization_config(load_in_4bit)
    check_json_files(Path(model_path))
    check_weights(Path(model_path), "model.safetensors")  # here, not on resolving: tokenizer-only uses need none
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
        attn_implementation=attn_implementation,
        device_map=device if quantization is None else {"": int(os.environ.get("LOCAL_RANK", 0))},  # this rank's GPU
        quantization_config=quantization,
    )
    if record_name is not None:
        set_recorded_name(model, record_name)
    return model


def load_merged_adapter(adapter_dir: Path, dtype: str, trust_remote_code: bool, attn_implementation: str | None,
                        record_name: str | None, device: str | None, load_in_4bit: bool):
    """A LoRA run used as the start of a full fine-tune (DPO in full after SFT with LoRA): its base with the
    adapter merged in, in memory: the model then is an ordinary one, all of whose weights train."""
    if load_in_4bit:
        raise UserError(f"load_in_4bit with the LoRA run {adapter_dir} as the base: a 4-bit base cannot take the "
                        "run's adapter merged in; merge it first (sftlab merge --adapter "
                        f"{adapter_dir}) and start from the merged folder")
    model = adapter_on_its_base(adapter_dir, dtype, trust_remote_code, attn_implementation, device).merge_and_unload()
    if record_name is not None:
        set_recorded_name(model, record_name)
    return model


def load_adapter_to_train(adapter_dir: Path, dtype: str, trust_remote_code: bool, attn_implementation: str | None):
    """A LoRA run's adapter on its own base, trainable: a LoRA stage after it (DPO after SFT) goes on training the
    same adapter, so what it saves is again one adapter over the original base, which PEFT, vLLM and lm-eval load
    in one step (a new adapter over the SFT model merged in memory would need that merge redone first)."""
    return adapter_on_its_base(adapter_dir, dtype, trust_remote_code, attn_implementation, is_trainable=True)


def adapter_on_its_base(adapter_dir: Path, dtype: str, trust_remote_code: bool, attn_implementation: str | None,
                        device: str | None = None, is_trainable: bool = False):
    """A LoRA run's adapter loaded over the base it names, its files checked first (a damaged one is named)."""
    from peft import PeftModel

    base = load_model(resolve_model_path(adapter_base(adapter_dir)), dtype, trust_remote_code, attn_implementation,
                      device=device)
    check_json_files(adapter_dir)
    check_weights(adapter_dir, "adapter_model.safetensors")
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=is_trainable)


@contextmanager
def as_started(model):
    """The PEFT model as its stage started it, for the span of the block: with the frozen copy of the adapter it
    went on training (REFERENCE_ADAPTER), else with its adapter disabled (its base). Which parameters train is
    restored after: PEFT's set_adapter marks the adapter it activates as trainable."""
    if REFERENCE_ADAPTER not in getattr(model, "peft_config", {}):
        with model.disable_adapter():
            yield model
        return
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    active = model.active_adapter
    model.set_adapter(REFERENCE_ADAPTER)
    try:
        yield model
    finally:
        model.set_adapter(active)
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])


def continued_adapter(run_dir: Path) -> Path | None:
    """The LoRA run whose adapter the run `run_dir` went on training (a DPO run started from an SFT LoRA run,
    load_adapter_to_train), or None."""
    start = ((run_record(run_dir) or {}).get("model") or {}).get("model_name_or_path")
    if not start or not (run_dir / ADAPTER_CONFIG).exists() or not is_adapter_folder(start):
        return None
    base = read_json(run_dir / ADAPTER_CONFIG).get("base_model_name_or_path")
    return None if base and Path(base).resolve() == Path(start).resolve() else Path(start)  # else: stacked on it


def config_folder(model_path: Path) -> Path:
    """The folder holding the model's config.json: itself, or for a LoRA run the base it was trained on."""
    while is_adapter_folder(model_path):
        model_path = resolve_model_path(adapter_base(Path(model_path)))
    return Path(model_path)


def meta_model(model_path: Path):
    """The model's modules and shapes on the meta device: nothing is loaded or allocated."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_folder(model_path)))


def model_context(model_path: Path) -> int | None:
    """The model's context in tokens (max_position_embeddings), or None where its config gives none."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(config_folder(model_path)).get_text_config(), "max_position_embeddings",
                   None)


MODEL_JSON_FILES = ("config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.json", "adapter_config.json")


def check_json_files(folder: Path) -> None:
    """The JSON files transformers and PEFT read from a model or run folder are whole JSON objects: transformers
    skips a damaged generation_config.json with a log line and generates without its stop tokens, and a damaged
    tokenizer.json is a Rust error that names no file."""
    for name in MODEL_JSON_FILES:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{path} is damaged (not JSON: {exc}): it was cut short or overwritten; copy it again "
                            "from where it came from") from None
        if not isinstance(value, dict):
            raise UserError(f"{path} is damaged (a JSON {type(value).__name__}, not an object)")


def check_weights(folder: Path, name: str) -> None:
    """A folder's safetensors weights are there and whole (each file's header read: a truncated or zero-byte file
    is one line here, not a deserializing error later); a pickle in their place is refused: sftlab loads
    safetensors only, since unpickling can run code. Sharded weights are checked shard by shard."""
    from safetensors import SafetensorError, safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p for p in (name.replace(".safetensors", ".bin"), "pytorch_model.bin") if (folder / p).exists()]
        if pickles:
            found = pickles[0]
            raise UserError(f"{folder} holds {found}, a pickle: sftlab loads safetensors only (unpickling can run "
                            "code). Convert it where you trust it: load it and save_pretrained(..., "
                            "safe_serialization=True)")
        raise UserError(f"{folder}: no {name} there (its weights are missing)")
    for file in files:
        if not file.is_file():
            raise UserError(f"{file} is a folder, not a safetensors file: copy or save the weights again")
        try:
            with safe_open(file, "pt"):
                pass
        except SafetensorError as exc:
            raise UserError(f"{file} is damaged ({exc}): it was cut short or is not a safetensors file; copy "
                            "or save it again") from None


def recorded_base_name(name_or_path: str) -> str:
    """How an adapter names its base (adapter_config.json's base_model_name_or_path) so that it resolves again,
    in sftlab and in tools that know nothing of it (PEFT's AutoPeftModel, lm-eval, vLLM): names as given, local
    folders and embedded models as absolute paths (the run's sftlab_config.yaml keeps the `sftlab:` name)."""
    if name_or_path.startswith("sftlab:"):
        return str(resolve_model_path(name_or_path).resolve())
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else name_or_path


def adapter_base(adapter_dir: Path) -> str:
    """The base model of an adapter: the embedded model its run was trained on (by name: its folder under
    another SFTLAB_HOME, or on another machine, is built again), else adapter_config.json's record."""
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_file.exists():
        raise UserError(f"adapter path {adapter_dir}: no {ADAPTER_CONFIG} there (is it a PEFT adapter folder?)")
    check_json_files(Path(adapter_dir))
    trained_on = ((run_record(adapter_dir) or {}).get("model") or {}).get("model_name_or_path") or ""
    if trained_on.startswith("sftlab:"):
        return build_of_run(trained_on, run_folder(adapter_dir) / "tokenizer.json")
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_file}: base_model_name_or_path is empty; pass --model with the base model")
    return base


def with_system_prompt(messages: list[dict], system_prompt: str | None) -> list[dict]:
    """`messages` with `system_prompt` first when it is set and they have no system message of their own."""
    if system_prompt is None or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def best_device_and_dtype():
    """GPU in bf16 where supported, else fp16 on GPU, else CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return "cpu", "float32"


def inference_paths(model: str | None = None, adapter: str | None = None) -> tuple[Path, Path]:
    """(base model folder, tokenizer folder) for chat and evaluation: the base from `model` or from the
    adapter's record; the tokenizer saved with a training run, which carries the template it was trained with."""
    if model is None and adapter is None:
        raise UserError("pass --model PATH, or --adapter DIR (its base model is read from it)")
    if adapter is not None and not Path(adapter).is_dir():
        raise UserError(f"adapter path {adapter} does not exist")
    if adapter is not None:
        adapter_base(Path(adapter))  # a folder without adapter_config.json: said first
        check_weights(Path(adapter), "adapter_model.safetensors")
    base_path = resolve_model_path(model or adapter_base(Path(adapter)))
    tokenizer_dir = Path(adapter) if adapter and (Path(adapter) / "tokenizer_config.json").exists() else base_path
    return base_path, tokenizer_dir


def inference_tokenizer(model: str | None = None, adapter: str | None = None, trust_remote_code: bool = False):
    return load_tokenizer(inference_paths(model, adapter)[1], trust_remote_code)


def load_for_inference(model: str | None = None, adapter: str | None = None, device: str | None = None,
                       dtype: str | None = None, trust_remote_code: bool = False, tokenizer=None):
    """(model, tokenizer) for chat and evaluation: the base from `model` or from the adapter's record
    (`tokenizer`: one the caller already loaded with inference_tokenizer)."""
    base_path, tokenizer_dir = inference_paths(model, adapter)
    auto_device, auto_dtype = best_device_and_dtype()
    tokenizer = tokenizer or load_tokenizer(tokenizer_dir, trust_remote_code)
    net = load_model(base_path, dtype or auto_dtype, trust_remote_code, device=device or auto_device)
    if adapter is not None:
        from peft import PeftModel

        try:
            net = PeftModel.from_pretrained(net, adapter)
        except RuntimeError as exc:
            if "size mismatch" not in str(exc):
                raise
            first = next(line.strip() for line in str(exc).splitlines() if "size mismatch" in line)
            raise UserError(f"adapter {adapter} does not fit the base model {base_path} (trained on another base?): "
                            f"{first.rstrip('.')}; pass --model with the base it was trained on") from exc
    net.eval()
    return net, tokenizer


def weights_digest(model_path: Path) -> str:
    """XXH3-128 of the model folder's weight files and config, remembered per (file, size, mtime) in the cache:
    a 9B model's 18 GB are read once, not at every run."""
    memo_path = cache_root() / "replay" / "weights_digests.json"
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8")) if memo_path.is_file() else {}
    except (OSError, ValueError):
        memo = {}  # a damaged memo only costs hashing again
    digest, changed = hashlib.sha256(), False
    for path in sorted(Path(model_path).iterdir()):
        if not (path.suffix == ".safetensors" or path.name == "config.json"):
            continue
        stat = path.stat()
        key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if key not in memo:
            memo[key], changed = file_digest(path), True
        digest.update(f"{path.name}:{memo[key]}".encode())
    if changed:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo_path, json.dumps(memo, indent=1))
    return digest.hexdigest()
