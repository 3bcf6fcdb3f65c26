"""Replay of what the base model knew, without outside data: before training, the base answers a set of general
prompts greedily, and its own answers (those that stop) become extra training rows, mixed in at `replay_ratio`
rows per task training row. Training on them holds the model near what it said before on general questions while
it learns the task: the loss on them is the loss rise the retention check measures.

- The prompts: a built-in set (sftlab:replay-prompts, 150 short general prompts, English and Chinese: facts,
  arithmetic, translation, short instructions), which shares no prompt, and no fact asked in another language, with
  the retention probes (eval/retention_probes.jsonl), so the retention check stays a held-out measure; and/or the
  user's own files.
- The replies are generated once per (base weights, prompts, system prompt, reply limit, template) and cached under
  a content hash (SFTLAB_HOME/replay/); the rows are then prepared by the same preparation as the task's data (the
  one renderer, the run's system prompt choice, the cleaning checks), with no held-out split: the held-out split is
  the task's alone.
- The data report counts them apart (report["replay"]): prompts, stopped, used, and why any were left out.
"""

import hashlib
import json
import random
from dataclasses import replace
from pathlib import Path

from datasets import concatenate_datasets

from sftlab import __version__
from sftlab.data.load import SHIPPED_DATA, demo_data_path
from sftlab.data.prepare import PreparedData, prepare_data
from sftlab.environment import cache_root
from sftlab.errors import UserError
from sftlab.files import exclusive_lock, release_lock, write_atomic
from sftlab.infer.generate import SamplingArgs, generate_replies
from sftlab.model.load import load_model, weights_digest, with_system_prompt

BUILTIN = "sftlab:replay-prompts"
GENERATION_BATCH = 32  # on CPU a step of 32 rows costs little more than one of 16


def read_prompts(files: list[str]) -> list[str]:
    """The replay prompts of `files` in order, without repeats: sftlab:replay-prompts, a .txt file (a prompt a
    line) or a JSON-lines file of {"prompt"} (or {"instruction", "input"}) rows. A file that is missing or a row
    without a prompt is an error naming the file and line."""
    prompts = []
    for name in files:
        path = demo_data_path(name) if name in SHIPPED_DATA else Path(name)
        if not path.is_file():
            raise UserError(f"replay_prompts: {name} does not exist (a .txt file with a prompt a line, a .jsonl file "
                            f"of {{\"prompt\": ...}} rows, or {BUILTIN})")
        lines = path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            prompt = line.strip() if path.suffix == ".txt" else _json_prompt(line, f"{name}:{number}")
            if prompt not in prompts:
                prompts.append(prompt)
    if not prompts:
        raise UserError(f"replay_prompts: {', '.join(files) or '(none given)'} hold no prompt")
    return prompts


def _json_prompt(line: str, where: str) -> str:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
    prompt = row.get("prompt") if isinstance(row, dict) else None
    if prompt is None and isinstance(row, dict) and isinstance(row.get("instruction"), str):
        prompt = "\n".join(p for p in (row["instruction"], row.get("input") or "") if p)
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError(f"{where}: field prompt: expected a non-empty string (or instruction/input)")
    return prompt.strip()


def replies_key(model_path: Path, tokenizer, prompts: list[str], system_prompt: str | None,
                max_new_tokens: int) -> str:
    settings = dict(weights=weights_digest(model_path), template=tokenizer.chat_template, prompts=prompts,
                    system_prompt=system_prompt, max_new_tokens=max_new_tokens, version=__version__,
                    generation="greedy")
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]


def base_replies(model_path: Path, tokenizer, prompts: list[str], system_prompt: str | None, max_new_tokens: int,
                 dtype: str, trust_remote_code: bool, cached_only: bool = False) -> tuple[list[dict], Path]:
    """The base's greedy reply to each prompt ({"prompt", "reply", "finish_reason", "new_tokens"}), generated
    once and cached (written whole, then renamed); the path of the cached file."""
    key = replies_key(model_path, tokenizer, prompts, system_prompt, max_new_tokens)
    path = cache_root() / "replay" / f"{key}.jsonl"
    if not path.is_file():
        if cached_only:
            raise UserError(f"the replay replies are not generated for this run, and a multi-process run does not "
                            f"generate them: run `sftlab data prepare` with the same config first (no {path})")
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = exclusive_lock(path.with_suffix(".lock"))
        try:
            if not path.is_file():
                print(f"replay: the base answers {len(prompts)} general prompts (greedy, up to {max_new_tokens} new "
                      f"tokens; once: cached in {path})", flush=True)
                model = load_model(model_path, dtype, trust_remote_code)
                _generate_into(path, model, tokenizer, prompts, system_prompt, max_new_tokens)
                del model
        finally:
            release_lock(lock)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    return rows, path


def _generate_into(path: Path, model, tokenizer, prompts: list[str], system_prompt: str | None,
                   max_new_tokens: int) -> None:
    import torch

    if torch.cuda.is_available():
        model.to("cuda")
    conversations = [with_system_prompt([{"role": "user", "content": p}], system_prompt) for p in prompts]
    replies = generate_replies(model, tokenizer, conversations, SamplingArgs(max_new_tokens, temperature=0),
                               batch_size=GENERATION_BATCH, progress="replay")
    write_atomic(path, "".join(json.dumps({"prompt": p, "reply": r.text, "finish_reason": r.finish_reason,
                                           "new_tokens": r.new_tokens}, ensure_ascii=False) + "\n"
                               for p, r in zip(prompts, replies)))


def chosen_rows(replies: list[dict], wanted: int, seed: int) -> tuple[list[dict], dict]:
    """Up to `wanted` of the replies that stopped (a seeded sample, in prompt order), and the counts. A reply in
    another language than its prompt's is kept: a small base often answers a Chinese question in English
    (SmolLM2-135M does so for most of the built-in Chinese prompts), and those answers are what it knew; leaving
    them out taught the model to answer Chinese questions in its weaker Chinese, and it lost them (measured:
    docs/evaluation.md, "The real-model recipe, cross-validated")."""
    stopped = [r for r in replies if r["finish_reason"] == "stop" and r["reply"].strip()]
    picked = sorted(random.Random(f"{seed}:replay").sample(range(len(stopped)), min(wanted, len(stopped))))
    counts = {"prompts": len(replies), "stopped": len(stopped), "not_stopped": len(replies) - len(stopped),
              "wanted": wanted, "used": len(picked)}
    return [stopped[i] for i in picked], counts


def with_replay(data: PreparedData, model_path: Path, renderer, data_args, clean_args, train_args,
                dtype: str, cached_only: bool = False) -> PreparedData:
    """The task's prepared data with the replay rows added to its training split (never to the held-out one)."""
    prompts = read_prompts(train_args.replay_prompts)
    replies, cached = base_replies(model_path, renderer.tokenizer, prompts, data_args.system_prompt,
                                   train_args.replay_max_new_tokens, dtype, train_args.trust_remote_code,
                                   cached_only)
    wanted = round(train_args.replay_ratio * len(data.train))
    rows, counts = chosen_rows(replies, wanted, train_args.seed)
    if not rows:
        raise UserError(f"replay: none of the base's {len(replies)} replies to the replay prompts stopped within "
                        f"{train_args.replay_max_new_tokens} new tokens: raise replay_max_new_tokens or give "
                        "prompts with shorter answers (replay_prompts)")
    text = "".join(json.dumps({"instruction": r["prompt"], "input": "", "output": r["reply"]}, ensure_ascii=False)
                   + "\n" for r in rows)
    file = cached.with_name(f"{cached.stem}-{hashlib.sha256(text.encode()).hexdigest()[:12]}.jsonl")  # by content
    if not file.is_file():
        write_atomic(file, text)
    replay_args = replace(data_args, data_files=[str(file)], test_size=0.0)
    replay = prepare_data(replay_args, clean_args, renderer, cached_only=cached_only)
    counts.update(kept=len(replay.train), rejected=counts["used"] - len(replay.train), ratio=train_args.replay_ratio,
                  task_train_rows=len(data.train), replies=str(cached))
    if counts["used"] < wanted:
        counts["short_by"] = f"{wanted - counts['used']} (only {counts['stopped']} replies stopped)"
    report = {**data.report, "replay": counts}
    fingerprint = hashlib.sha256(f"{data.fingerprint}+{replay.fingerprint}".encode()).hexdigest()[:24]
    return replace(data, train=concatenate_datasets([data.train, replay.train]), report=report,
                   fingerprint=fingerprint, sources={**data.sources, **replay.sources})
