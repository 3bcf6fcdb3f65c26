"""The embedded models: a tiny GLM-4 (the default) and tiny models of the other families sftlab supports.

`sftlab:tiny-glm4` has the architecture of glm-4-9b-hf at toy size (grouped-query attention, partial rotary,
q/k/v bias, fused gate_up_proj, untied embeddings) and a byte-level BPE tokenizer, trained on the demo data,
that carries GLM-4's ten special tokens in GLM-4's order after the ordinary vocabulary, GLM-4's chat template,
and GLM-4's post-processor that prefixes `[gMASK]<sop>`. The other families are built the same way, each
with its own architecture class, special tokens, chat template (the published one, byte for byte), eos,
padding and generation config:

- `sftlab:tiny-glm4-0414`: `Glm4ForCausalLM`, GLM-4-0414's template (tools passed to the template);
- `sftlab:tiny-qwen3`: `Qwen3ForCausalLM`, Qwen3's ChatML template (`<|im_start|>`, `<|im_end|>`, think blocks);
- `sftlab:tiny-llama3`: `LlamaForCausalLM`, Llama-3.1-Instruct's template (`<|start_header_id|>`, `<|eot_id|>`).

Each is built on first use, offline, and is the same bytes every time (fixed seed, fixed corpus), so its name
resolves on any machine.
"""

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

from sftlab.environment import cache_root
from sftlab.errors import UserError
from sftlab.files import exclusive_lock, release_lock, staged_folder
from sftlab.model.saving import save_tokenizer

# GLM-4's pre-tokenizer (its tokenizer.json's Split pattern, then byte-level without GPT-2's own pattern): the
# tiny GLM-4 models split text as GLM-4-9B does, so that llama.cpp's converter and runtime treat them as GLM-4
GLM4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")

GLM4_SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
]
ORDINARY_VOCAB_SIZE = 2048
TINY_ARCH = dict(
    hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, rms_norm_eps=1.5625e-07, rope_theta=10000.0, max_position_embeddings=4096,
    tie_word_embeddings=False,
)
GLM_ARCH = dict(partial_rotary_factor=0.5, attention_bias=True)  # GLM-4 and GLM-4-0414 rotate half of each head


@dataclass(frozen=True)
class Family:
    """What makes a tiny model look like its family to sftlab and transformers: the same tokens, template and
    stop ids as the real checkpoints, at toy size."""

    folder: str
    config_class: str  # a transformers config class; the model class is the matching *ForCausalLM
    template: str  # file under sftlab/model/templates: the family's published chat template
    special_tokens: list[str]  # in the family's order, after the ordinary vocabulary
    eos: str
    pad: str | None  # None: the real tokenizer has no pad token (load_tokenizer then uses eos)
    generation_eos: list[str]  # the real generation_config.json's eos_token_id, as tokens
    prefix: list[str] = field(default_factory=list)  # what add_special_tokens=True puts first
    bos: str | None = None
    plain_tokens: list[str] = field(default_factory=list)  # added tokens that are not special (Qwen's <think>)
    arch: dict = field(default_factory=dict)
    split: str | None = None  # the family's pre-tokenizer pattern; None: GPT-2's byte-level one
    version: str = "v1"  # bumped when the build changes, so that old caches are not reused (old runs still load:
    # they carry their own tokenizer, and the weights depend only on the seed and the shapes)


QWEN3_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN3_PLAIN = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
               "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
# Llama 3.1's first eleven special tokens; the real tokenizer also has 245 reserved ones, left out at toy size
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]

FAMILIES = {
    "sftlab:tiny-glm4": Family(
        "tiny-glm4", "GlmConfig", "glm4.jinja", GLM4_SPECIAL_TOKENS, eos="<|endoftext|>", pad="<|endoftext|>",
        generation_eos=["<|endoftext|>", "<|user|>", "<|observation|>"], prefix=["[gMASK]", "<sop>"], arch=GLM_ARCH,
        split=GLM4_SPLIT, version="v2"),
    "sftlab:tiny-glm4-0414": Family(
        "tiny-glm4-0414", "Glm4Config", "glm4_0414.jinja", GLM4_SPECIAL_TOKENS, eos="<|endoftext|>",
        pad="<|endoftext|>", generation_eos=["<|endoftext|>", "<|user|>", "<|observation|>"],
        prefix=["[gMASK]", "<sop>"], arch=GLM_ARCH, split=GLM4_SPLIT, version="v2"),
    "sftlab:tiny-qwen3": Family(
        "tiny-qwen3", "Qwen3Config", "qwen3.jinja", QWEN3_SPECIAL, eos="<|im_end|>", pad="<|endoftext|>",
        generation_eos=["<|im_end|>", "<|endoftext|>"], plain_tokens=QWEN3_PLAIN),
    "sftlab:tiny-llama3": Family(
        "tiny-llama3", "LlamaConfig", "llama3.jinja", LLAMA3_SPECIAL, eos="<|eot_id|>", pad=None,
        generation_eos=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"], prefix=["<|begin_of_text|>"],
        bos="<|begin_of_text|>"),
}


# earlier builds, for the runs trained on them: a run records its base by name, and its adapter and tokenizer were
# trained on that build's weights (v1 of the GLM-4 ones split text with GPT-2's pattern, so their ids, their pad
# row and their weights differ from v2's)
EARLIER_BUILDS = {(name, "v1"): replace(FAMILIES[name], split=None, version="v1")
                  for name in ("sftlab:tiny-glm4", "sftlab:tiny-glm4-0414")}


def build_of_run(name: str, run_tokenizer: Path) -> str:
    """The embedded model a run trained on `name` was built on: `name`, or `name@v1` when the run's own tokenizer
    (tokenizer.json) splits text as the earlier build did."""
    family = FAMILIES.get(name)
    if family is None or not run_tokenizer.is_file():
        return name
    pre = json.loads(run_tokenizer.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    earlier = next((version for (old, version), build in EARLIER_BUILDS.items()
                    if old == name and build.split is None and pre.get("type") == "ByteLevel"), None)
    return f"{name}@{earlier}" if earlier and family.split is not None else name


def chat_template(file_name: str) -> str:
    return resources.files("sftlab.model").joinpath("templates", file_name).read_text(encoding="utf-8")


def glm4_chat_template() -> str:
    return chat_template("glm4.jinja")


def ensure_tiny_model(name: str = "sftlab:tiny-glm4") -> Path:
    """Returns the folder of the tiny model `name` (`name@v1`: an earlier build, for the runs trained on it),
    building it there first if needed."""
    name, _, version = name.partition("@")
    known = name in FAMILIES and (not version or version == FAMILIES[name].version or (name, version) in EARLIER_BUILDS)
    if not known:
        raise UserError(f"model {name}{'@' + version if version else ''}: there is no such embedded model; the "
                        f"embedded ones are {', '.join(FAMILIES)}")
    family = EARLIER_BUILDS.get((name, version), FAMILIES[name])
    target = cache_root() / "models" / f"{family.folder}-{family.version}"
    return build_once(target, lambda staging: build_tiny_model(staging, family))


def build_once(target: Path, build) -> Path:
    """`target`, built by `build(folder)` first if it holds no weights yet: by one process at a time (the
    processes of a multi-process run all ask for it at once; the others wait, then find it built), into a
    staging folder renamed into place, so a half-built model is never seen under its name."""
    if (target / "model.safetensors").exists():
        return target
    if _other_rank():
        return _wait_for(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = exclusive_lock(target.parent / f".{target.name}.lock")
    try:
        if (target / "model.safetensors").exists():
            return target
        shutil.rmtree(target, ignore_errors=True)  # a folder left without its weights is not a model
        with staged_folder(target) as staging:
            build(staging)
    finally:
        release_lock(lock)
    return target


def _other_rank() -> bool:
    """A process other than the first of a torch.distributed group: transformers' save_pretrained writes the
    weights on rank 0 only, so only rank 0 can build the model."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_rank() != 0


def _wait_for(target: Path, timeout_s: float = 600) -> Path:
    deadline = time.monotonic() + timeout_s
    while not (target / "model.safetensors").exists():
        if time.monotonic() > deadline:
            raise UserError(f"{target}: the first process did not build the model within {timeout_s:.0f} s")
        time.sleep(0.2)
    return target


def _tokenizer_corpus() -> list[str]:
    rows = json.loads(resources.files("sftlab.data.demo").joinpath("alpaca_demo.json").read_text("utf-8"))
    texts = [" ".join((r["instruction"], r["input"], r["output"])) for r in rows]
    # a little general text so that common words outside the demo data are not all single bytes
    texts.append(
        "The quick brown fox jumps over the lazy dog. Please answer the question, explain why, and give "
        "an example. 请回答下面的问题，并解释原因，给出一个例子。我们今天学习人工智能和语言模型。"
    )
    return texts


def build_tiny_tokenizer(out_dir: Path, family: Family = FAMILIES["sftlab:tiny-glm4"]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False) if family.split is None else \
        pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(family.split), behavior="isolated"),
                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ORDINARY_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(family.special_tokens)  # appended after the ordinary vocabulary, as in the family
    if family.plain_tokens:  # whole tokens that decoding keeps (Qwen's <think>, <tool_call>)
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.plain_tokens])
    if family.prefix:
        # GLM-4's tokenizer prefixes [gMASK]<sop> when add_special_tokens=True (the tutorial's defect 4 comes
        # from it), Llama-3's <|begin_of_text|>
        prefix = " ".join(family.prefix)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A", pair=f"{prefix} $A $B",
            special_tokens=[(t, tok.token_to_id(t)) for t in family.prefix],
        )
    named = {"eos_token": family.eos, "pad_token": family.pad, "bos_token": family.bos}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, padding_side="left", clean_up_tokenization_spaces=False, model_max_length=8192,
        **{key: token for key, token in named.items() if token is not None},
    )
    tokenizer.chat_template = chat_template(family.template)
    save_tokenizer(tokenizer, out_dir)
    return tokenizer


def build_tiny_model(out_dir: Path, family: Family = FAMILIES["sftlab:tiny-glm4"]) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    tokenizer = build_tiny_tokenizer(out_dir, family)
    stop_ids = tokenizer.convert_tokens_to_ids(family.generation_eos)
    pad_id = tokenizer.convert_tokens_to_ids(family.pad) if family.pad else None
    vocab_size = (len(tokenizer) + 63) // 64 * 64  # padded like GLM-4's 151552
    config_class = getattr(transformers, family.config_class)
    config = config_class(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=stop_ids, **TINY_ARCH,
                          **family.arch)
    if family.bos:
        config.bos_token_id = tokenizer.convert_tokens_to_ids(family.bos)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=pad_id,
                                               bos_token_id=config.bos_token_id if family.bos else None)
    model.save_pretrained(out_dir)
