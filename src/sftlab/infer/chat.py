"""`sftlab chat`: streaming multi-turn chat in the terminal, or one-shot replies (`--prompt`, `--json`)."""

import json
import sys
from dataclasses import dataclass, field
from threading import Thread
from typing import ClassVar

import torch

from sftlab.chat_format import ChatRenderer
from sftlab.config import Range, check_fields
from sftlab.errors import UserError
from sftlab.infer.generate import Reply, SamplingArgs, generate_replies, without_opening
from sftlab.model.load import (
    inference_paths,
    inference_tokenizer,
    load_for_inference,
    model_context,
    with_system_prompt,
)
from sftlab.run_dir import recorded_system_prompt

HELP = "commands: /clear (forget the history), /system TEXT (set the system prompt), /exit (also exit, quit)"


@dataclass
class ChatArguments:
    model: str | None = field(default=None, metadata={
        "help": "Base model: local folder, Hub id, or sftlab:tiny-glm4. Optional with --adapter, whose recorded base "
                "is used."})
    adapter: str | None = field(default=None, metadata={
        "help": "A LoRA adapter folder (e.g. a run directory of `sftlab train`)."})
    prompt: str | None = field(default=None, metadata={"help": "One-shot: print the reply to this prompt and exit."})
    json: bool = field(default=False, metadata={"help": "One-shot: print {reply, finish_reason, new_tokens}."})
    system: str | None = field(default=None, metadata={
        "help": "System prompt (default: the run's system_prompt, if it set one; \"\": an empty one, which keeps a "
                "chat template's default out)."})
    temperature: float = field(default=SamplingArgs.temperature, metadata={"help": "0 is greedy."})
    top_p: float = field(default=SamplingArgs.top_p, metadata={"help": "Nucleus sampling's probability mass."})
    repetition_penalty: float | None = field(default=None, metadata={
        "help": "Default: none when greedy (--temperature 0), the tutorial's 1.2 when sampling."})
    max_new_tokens: int = field(default=SamplingArgs.max_new_tokens, metadata={"help": "Reply limit."})
    device: str | None = field(default=None, metadata={
        "help": "cuda or cpu (default: cuda when available, in bf16 where supported)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the checkpoint."})

    RANGES: ClassVar[dict] = {"max_new_tokens": Range(1, integer=True),
                              "temperature": Range(0, note="(0 is greedy)"),
                              "top_p": Range(0, above=True, high=1),
                              "repetition_penalty": Range(0, above=True, nullable=True)}

    def __post_init__(self):
        """Every bad flag is one line naming it and its range, before any model is loaded."""
        check_fields(self)
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("--prompt is empty")
        if self.device is not None and self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: this machine has no CUDA GPU (use --device cpu, or leave it "
                             "out)")


ARGUMENTS = (ChatArguments,)  # `sftlab chat`'s (cli.py parses them)


def check_prompt_fits(tokenizer, base_path, conversation: list[dict], max_new_tokens: int) -> None:
    """A prompt plus the reply must fit the model's context (else the model would generate garbage)."""
    context = model_context(base_path)
    length = len(ChatRenderer(tokenizer).prompt_ids(conversation))
    if context is not None and length + max_new_tokens > context:
        raise UserError(f"the prompt is {length} tokens; with --max_new_tokens {max_new_tokens} it exceeds the model's "
                        f"context of {context} tokens")


def run(args: ChatArguments) -> int:
    if args.system is None:  # as the run was trained: its system_prompt, if it set one
        args.system = recorded_system_prompt(args.adapter or args.model)
    system = with_system_prompt([], args.system)
    tokenizer = inference_tokenizer(args.model, args.adapter, args.trust_remote_code)
    if args.prompt is not None:
        base_path, _ = inference_paths(args.model, args.adapter)
        check_prompt_fits(tokenizer, base_path, system + [{"role": "user", "content": args.prompt}],
                          args.max_new_tokens)
    model, tokenizer = load_for_inference(args.model, args.adapter, args.device,
                                          trust_remote_code=args.trust_remote_code, tokenizer=tokenizer)
    sampling = SamplingArgs(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    if args.prompt is not None:
        reply = generate_replies(model, tokenizer, [system + [{"role": "user", "content": args.prompt}]], sampling)[0]
        if args.json:
            print(json.dumps({"reply": reply.text, "finish_reason": reply.finish_reason,
                              "new_tokens": reply.new_tokens}, ensure_ascii=False))
        else:
            print(reply.text)
        return 0
    interactive(model, tokenizer, sampling, args.system)
    return 0


def stream_reply(model, tokenizer, conversation, sampling) -> Reply:
    """Prints the reply token by token while a thread generates it (the tutorial's TextIteratorStreamer)."""
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    result = []
    worker = Thread(target=lambda: result.extend(
        generate_replies(model, tokenizer, [conversation], sampling, streamer=streamer)))
    worker.start()
    opening, text, shown = ChatRenderer(tokenizer).reply_opening, "", 0
    for piece in streamer:  # the template's opening (Qwen3's empty think block) is held back, then left out
        text += piece
        visible = without_opening(text, opening)
        print(visible[shown:], end="", flush=True)
        shown = len(visible)
    worker.join()
    print()
    return result[0]


def interactive(model, tokenizer, sampling, system_prompt):
    print(f"sftlab chat. {HELP}")
    history = []
    while True:
        try:
            text = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if text in ("/exit", "exit", "quit"):
            return
        if text == "/clear":
            history = []
            print("(history cleared)")
            continue
        if text.startswith("/system"):
            system_prompt = text[len("/system"):].strip() or None
            history = []
            print(f"(system prompt {'set' if system_prompt else 'removed'}; history cleared)")
            continue
        if not text or text.startswith("/"):
            print(HELP)
            continue
        history.append({"role": "user", "content": text})
        system = with_system_prompt([], system_prompt)
        print("Assistant: ", end="", flush=True)
        reply = stream_reply(model, tokenizer, system + history, sampling)
        if reply.finish_reason == "length":
            print(f"(stopped at max_new_tokens={sampling.max_new_tokens})", file=sys.stderr)
        history.append({"role": "assistant", "content": reply.text})
