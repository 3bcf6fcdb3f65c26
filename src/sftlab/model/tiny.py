"""The embedded default model: a tiny GLM-4 (`GlmForCausalLM`) with a GLM-4-style tokenizer.

It has the architecture of glm-4-9b-hf at toy size (grouped-query attention, partial rotary, q/k/v bias,
fused gate_up_proj, untied embeddings) and a byte-level BPE tokenizer, trained on the demo data, that
carries GLM-4's ten special tokens in GLM-4's order after the ordinary vocabulary, GLM-4's chat template,
and GLM-4's post-processor that prefixes `[gMASK]<sop>`. It is built on first use, offline, and is the same
bytes every time (fixed seed, fixed corpus), so the name `sftlab:tiny-glm4` resolves on any machine.
"""

import json
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from sftlab.environment import cache_root

TINY_VERSION = "v1"  # bump when the build below changes, so old caches are not reused

GLM4_SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
]
ORDINARY_VOCAB_SIZE = 2048
TINY_ARCH = dict(
    hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.5, attention_bias=True,
    rms_norm_eps=1.5625e-07, rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
)


def glm4_chat_template() -> str:
    return resources.files("sftlab.model").joinpath("glm4_chat_template.jinja").read_text(encoding="utf-8")


def ensure_tiny_model() -> Path:
    """Returns the folder of the tiny model, building it there first if needed."""
    target = cache_root() / "models" / f"tiny-glm4-{TINY_VERSION}"
    if (target / "model.safetensors").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-glm4-", dir=target.parent))
    try:
        build_tiny_model(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any model folder
        try:
            staging.rename(target)  # atomic: a half-built model is never seen under the final name
        except OSError:
            if not (target / "model.safetensors").exists():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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


def build_tiny_tokenizer(out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=ORDINARY_VOCAB_SIZE, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    tok.add_special_tokens(GLM4_SPECIAL_TOKENS)  # appended after the ordinary vocabulary, as in GLM-4
    # GLM-4's tokenizer prefixes [gMASK]<sop> when add_special_tokens=True (the tutorial's defect 4 comes from it)
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", pair="[gMASK] <sop> $A $B",
        special_tokens=[("[gMASK]", tok.token_to_id("[gMASK]")), ("<sop>", tok.token_to_id("<sop>"))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        padding_side="left", clean_up_tokenization_spaces=False, model_max_length=8192,
    )
    tokenizer.chat_template = glm4_chat_template()
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)  # template inside tokenizer_config.json
    return tokenizer


def build_tiny_model(out_dir: Path) -> None:
    import torch
    from transformers import GenerationConfig, GlmConfig, GlmForCausalLM

    tokenizer = build_tiny_tokenizer(out_dir)
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    vocab_size = (len(tokenizer) + 63) // 64 * 64  # padded like GLM-4's 151552
    config = GlmConfig(vocab_size=vocab_size, pad_token_id=stop_ids[0], eos_token_id=stop_ids, **TINY_ARCH)
    torch.manual_seed(0)
    model = GlmForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=stop_ids, pad_token_id=stop_ids[0])
    model.save_pretrained(out_dir)
