"""The round trip of an exported GGUF: llama.cpp (through llama-cpp-python) answers the run's probe and held-out
prompts with the same greedy tokens as the model in transformers, and ends on the same stop token. Part of
`sftlab export` and of `sftlab doctor --gguf FILE`.

Both are given the prompt as token ids rendered by sftlab's one renderer, so the check is of the weights, the
vocabulary and the stop ids the file carries (the Modelfile's template is checked against the chat template on
its own). A quantized file (q8_0, k-quants) cannot give every token of a float model: it must give the same
first QUANTIZED_PREFIX tokens and end the same way (the same stop token, or both at the length limit).
"""

import ctypes
from dataclasses import asdict, dataclass
from pathlib import Path

from sftlab.errors import UserError

QUANTIZED_PREFIX = 8
HELDOUT_PROMPTS = 5  # held-out conversations the round trip asks, after the probe prompts
FOLDER_PROMPTS = ["What is the capital of France?", "用一句话介绍一下长城。"]  # with the doctor's, for a model folder
INSTALL = ("pip install llama-cpp-python (it builds llama.cpp from source: about 3.5 minutes on 2 cores with "
           "CMAKE_ARGS='-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAVA_BUILD=OFF')")


@dataclass
class Answer:
    prompt: str
    transformers: list[int]  # the greedy reply's ids, its stop token included
    llama_cpp: list[int]
    transformers_text: str
    llama_cpp_text: str
    matched: bool
    detail: str


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError as exc:
        raise UserError(f"the GGUF round trip runs the file in llama.cpp, through llama-cpp-python: {INSTALL}") from exc
    return llama_cpp


def piece(llama_cpp, vocab, token: int, size: int = 64) -> bytes:
    """A token's bytes, with a buffer as large as the token needs (llama-cpp-python's detokenize uses 32 bytes
    and drops a longer token's): llama.cpp says the size it needs when the buffer is too small."""
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, False)
        if n >= 0:
            return buffer.raw[:n]
        size = -n


def gguf_replies(path: Path, prompts: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[str]]:
    """llama.cpp's greedy reply to each prompt (token ids, ending on the first end-of-generation token)."""
    llama_cpp = llama_cpp_module()
    needed = max(len(p) for p in prompts) + max_new_tokens + 1
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=needed, n_batch=min(needed, 512), verbose=False, seed=0)
    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    replies, texts = [], []
    for prompt in prompts:
        reply = []
        for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            reply.append(int(token))
            if llama_cpp.llama_vocab_is_eog(vocab, token) or len(reply) >= max_new_tokens:
                break
        replies.append(reply)
        texts.append(b"".join(piece(llama_cpp, vocab, t) for t in reply
                              if not llama_cpp.llama_vocab_is_eog(vocab, t)).decode("utf-8", errors="replace"))
    llm.close()
    return replies, texts


def transformers_replies(model, prompts: list[list[int]], stop_ids: list[int], max_new_tokens: int, pad_id: int
                         ) -> list[list[int]]:
    """The model's greedy reply ids, its stop token included (infer.generate_replies gives text and a count, not
    the ids this compares); one prompt at a time, unpadded, as llama.cpp is given them."""
    import torch

    replies = []
    for prompt in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device=model.device), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=stop_ids, pad_token_id=pad_id)
        reply = out[0, len(prompt):].tolist()
        end = next((n for n, t in enumerate(reply) if t in stop_ids), None)
        replies.append(reply[:end + 1] if end is not None else reply)
    return replies


def compare(expected: list[int], got: list[int], stop_ids: list[int], exact: bool) -> tuple[bool, str]:
    if expected == got:
        return True, f"same {len(got)} tokens" + (", same stop" if got and got[-1] in stop_ids else ", to the limit")
    first = next((n for n, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    ends = (expected[-1] if expected and expected[-1] in stop_ids else None,
            got[-1] if got and got[-1] in stop_ids else None)
    if not exact and first >= min(QUANTIZED_PREFIX, len(expected), len(got)) and ends[0] == ends[1]:
        return True, f"first {first} tokens the same, the same end ({'stop' if ends[0] is not None else 'limit'})"
    return False, f"differs from token {first}" + ("" if ends[0] == ends[1] else
                                                   f"; ends on {ends[1]} where transformers ends on {ends[0]}")


def round_trip(gguf: Path, model, tokenizer, conversations: list[list[dict]], max_new_tokens: int, exact: bool
               ) -> list[Answer]:
    """Each conversation's greedy reply from the GGUF in llama.cpp against the model in transformers."""
    from sftlab.chat_format import ChatRenderer
    from sftlab.infer.generate import reply_text

    renderer = ChatRenderer(tokenizer, generation_eos=model.generation_config.eos_token_id)
    prompts = [renderer.prompt_ids(c) for c in conversations]
    expected = transformers_replies(model, prompts, renderer.stop_ids, max_new_tokens, tokenizer.pad_token_id)
    got, texts = gguf_replies(gguf, prompts, max_new_tokens)
    answers = []
    for conversation, ours, theirs, text in zip(conversations, expected, got, texts):
        matched, detail = compare(ours, theirs, renderer.stop_ids, exact)
        ours_text = tokenizer.decode([t for t in ours if t not in renderer.stop_ids], skip_special_tokens=True)
        answers.append(Answer(conversation[-1]["content"], ours, theirs, reply_text(ours_text, renderer.reply_opening),
                              reply_text(text, renderer.reply_opening), matched, detail))
    return answers


def exact_file(path: Path) -> bool:
    """Whether the file holds float weights (f32, f16, bf16), whose greedy tokens must all be the model's."""
    from sftlab.eval.gguf_check import read_metadata

    return read_metadata(path).get("general.file_type") in (0, 1, 32)


def check_conversations(folder: Path, plain_prompts: list[str]) -> list[list[dict]]:
    """The round trip's prompts: the run's probe prompts (with the system prompt it was trained with) and the first
    held-out conversations up to their last reply; a folder without a run record gets `plain_prompts` (the
    doctor's) and two more, in English and Chinese."""
    from sftlab.model.load import with_system_prompt
    from sftlab.run_dir import read_heldout, recorded_system_prompt, run_folder, run_record

    record = run_record(folder) or {}
    probes = (record.get("train") or {}).get("probe_prompts") or [*plain_prompts, *FOLDER_PROMPTS]
    conversations = [[{"role": "user", "content": p}] for p in probes]
    run = run_folder(folder)
    for row in read_heldout(run)[:HELDOUT_PROMPTS] if run else []:
        messages = row["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if not any(m.get("tool_calls") or m["role"] == "tool" for m in messages[:last]):
            conversations.append(messages[:last])
    system = recorded_system_prompt(folder)
    return [with_system_prompt(c, system) for c in conversations]


def summary(answers: list[Answer]) -> str:
    return f"{sum(a.matched for a in answers)}/{len(answers)} prompts matched"


def records(answers: list[Answer]) -> list[dict]:
    return [asdict(a) for a in answers]


def read_metadata(path: Path) -> dict:
    """The GGUF's metadata (not the token lists), for the export's record and the tests."""
    import gguf

    reader = gguf.GGUFReader(path, "r")
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith(("GGUF.", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                                    "tokenizer.ggml.token_type", "tokenizer.ggml.scores"))}


def check_gguf_file(path: Path) -> None:
    """A GGUF file whole before llama.cpp opens it: the magic, a header gguf's reader parses, and every tensor's
    bytes inside the file. llama.cpp reports a damaged file as "Failed to load model" (or, for some truncations,
    reads past the end), which names nothing."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file ({'empty' if size == 0 else f'it starts with {magic!r}'}): give "
                        "the .gguf that `sftlab export` wrote")
    try:
        reader = gguf.GGUFReader(path, "r")
        short = next((t.name for t in reader.tensors if t.data_offset + t.n_bytes > size), None)
    except Exception as exc:  # the reader's errors are ValueError, IndexError, struct errors: all say "damaged"
        raise UserError(f"{path} is a damaged GGUF ({type(exc).__name__}: {str(exc)[:200]}): export it again") from None
    if short is not None or not reader.tensors:
        what = f"tensor {short} ends past the end of the file" if short else "it holds no tensors"
        raise UserError(f"{path} is a damaged GGUF ({what}: cut short?): export it again")
