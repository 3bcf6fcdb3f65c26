"""`sftlab chat`: streaming multi-turn chat in the terminal, or one-shot replies (`--prompt`, `--json`)."""

import argparse
import json
import math
import sys
from threading import Thread

import torch

from sftlab.chat_format import ChatRenderer
from sftlab.errors import UserError
from sftlab.infer.generate import Reply, SamplingArgs, generate_replies, without_opening
from sftlab.model.load import (
    inference_paths,
    inference_tokenizer,
    load_for_inference,
    recorded_system_prompt,
    with_system_prompt,
)

HELP = "commands: /clear (forget the history), /system TEXT (set the system prompt), /exit (also exit, quit)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sftlab chat", description="Chat with a base model or a fine-tuned run.")
    p.add_argument("--model", help="Base model: local folder, Hub id, or sftlab:tiny-glm4. "
                   "Optional with --adapter, whose recorded base is used.")
    p.add_argument("--adapter", help="A LoRA adapter folder (e.g. a run directory of `sftlab train`).")
    p.add_argument("--prompt", help="One-shot: print the reply to this prompt and exit.")
    p.add_argument("--json", action="store_true", help="One-shot: print {reply, finish_reason, new_tokens}.")
    p.add_argument("--system", help="System prompt (default: the run's system_prompt, if it set one; \"\": an "
                   "empty one, which keeps a chat template's default out).")
    defaults = SamplingArgs()
    p.add_argument("--temperature", type=float, default=defaults.temperature, help="0 is greedy.")
    p.add_argument("--top_p", type=float, default=defaults.top_p)
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help="Default: none when greedy (--temperature 0), the tutorial's 1.2 when sampling.")
    p.add_argument("--max_new_tokens", type=int, default=defaults.max_new_tokens)
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, in bf16 where supported).")
    p.add_argument("--trust_remote_code", action="store_true", help="Allow model code from the checkpoint.")
    return p


def check_args(args) -> None:
    """Every bad flag is one line naming it and its range, before any model is loaded."""
    if args.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens: must be an integer >= 1, got {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise UserError(f"--temperature: must be >= 0 (0 is greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise UserError(f"--top_p: must be in (0, 1], got {args.top_p}")
    if args.repetition_penalty is not None and not args.repetition_penalty > 0:
        raise UserError(f"--repetition_penalty: must be > 0, got {args.repetition_penalty}")
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("--prompt is empty")
    if args.device is not None and args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: this machine has no CUDA GPU (use --device cpu, or leave it out)")


def check_prompt_fits(tokenizer, base_path, conversation: list[dict], max_new_tokens: int) -> None:
    """A prompt plus the reply must fit the model's context (else the model would generate garbage)."""
    from transformers import AutoConfig

    from sftlab.chat_format import ChatRenderer

    context = getattr(AutoConfig.from_pretrained(base_path).get_text_config(), "max_position_embeddings", None)
    length = len(ChatRenderer(tokenizer).prompt_ids(conversation))
    if context is not None and length + max_new_tokens > context:
        raise UserError(f"the prompt is {length} tokens; with --max_new_tokens {max_new_tokens} it exceeds the model's "
                        f"context of {context} tokens")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
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
