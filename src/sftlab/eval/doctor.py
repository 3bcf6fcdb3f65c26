"""`sftlab doctor`: checks a run (or a model folder) for the faults behind "the model won't stop" and
"training and serving templates drift". Each check prints pass or fail; a failure says why and how to fix it."""

import json
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import ClassVar

from sftlab.chat_format import IGNORE_INDEX, ChatRenderer, MessageError, stop_token_ids
from sftlab.config import Range, check_fields
from sftlab.data.convert import openai_to_messages
from sftlab.errors import UserError
from sftlab.eval.gguf_check import check_conversations, check_gguf_file, exact_file, round_trip, summary
from sftlab.run_dir import EVAL_DIR, RENDER_CHECK, RESULTS, TRAINER_LOG, read_json, read_jsonl

FALLBACK_EXAMPLE = [{"role": "user", "content": "你好，告诉我你的名字。"}, {"role": "assistant", "content": "你好！"}]
PLAIN_PROMPTS = {"zh": "你好，告诉我你的名字。", "en": "Hello! What is your name?"}  # a model folder without a run
CHINESE_SAMPLE = "你好，请用中文简单介绍一下你自己和你能做的事情。"
DEFAULT_BUDGET = 64


def main_language(tokenizer) -> str:
    """"zh" when the tokenizer writes Chinese at under 1.5 tokens a character (GLM-4 and Qwen: under 1), else "en"
    (SmolLM2 and Llama-3 spend 2 to 3): a model folder is asked in the language its tokenizer was made for."""
    tokens = len(tokenizer.encode(CHINESE_SAMPLE, add_special_tokens=False))
    return "zh" if tokens / len(CHINESE_SAMPLE) < 1.5 else "en"


def generation_budget(folder: Path, asked: int | None) -> tuple[int, str]:
    """The new-token budget of the generation check and where it comes from: --max_new_tokens; else the run's
    reply limit (twice the p99 of its training replies, as its final evaluation used); else 64."""
    from sftlab.run_dir import recorded_reply_limit

    if asked is not None:
        return asked, "--max_new_tokens"
    limit = recorded_reply_limit(folder)
    if limit:
        return limit, "the run's reply limit, from its data"
    return DEFAULT_BUDGET, "the default for a model folder"


@dataclass
class Check:
    name: str
    status: str  # "pass", "FAIL", or "skip" for a check that could not run here (detail says why)
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def training_examples(run_dir: Path) -> list[dict]:
    """One training sample of each kind present (plain, system, multi-turn, tool call) as training rendered it
    (render_check.json), when the folder is a run; [] otherwise."""
    saved = read_json(run_dir / RENDER_CHECK)
    if not saved:
        return []
    return saved["samples"] if "samples" in saved else [{"kind": "plain", **saved}]  # older runs saved one


def saved_template(folder: Path) -> str | None:
    """The template a serving stack (vLLM, transformers) finds in the folder, before sftlab's own fallback."""
    config = folder / "tokenizer_config.json"
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return json.loads(config.read_text(encoding="utf-8")).get("chat_template") if config.exists() else None


def check_template(folder: Path, tokenizer, examples: list[dict]) -> Check:
    name = "chat template renders training samples as training did"
    if saved_template(folder) is None:
        return Check(name, "FAIL", f"no chat template saved in {folder} (tokenizer_config.json or "
                                  "chat_template.jinja): a server would format prompts its own way",
                     "save the tokenizer with its template (sftlab writes it into tokenizer_config.json), or copy "
                     "chat_template from the training run's tokenizer_config.json")
    for example in examples or [{"kind": "built-in", "messages": FALLBACK_EXAMPLE}]:
        problem = template_problem(tokenizer, example)
        if problem is not None:
            return Check(name, "FAIL", f"{example['kind']} sample: {problem[0]}", problem[1])
    if not examples:
        return Check(name, "pass", "a built-in sample renders prefix-by-prefix (no render_check.json to compare with)")
    kinds = ", ".join(e["kind"] for e in examples)
    return Check(name, "pass", f"{len(examples)} training sample(s) ({kinds}) identical to training "
                               "(render_check.json); apply_chat_template's prompt is each one's prefix")


def template_problem(tokenizer, example: dict) -> tuple[str, str] | None:
    """(what is wrong, the fix) when the saved template does not render `example` as training did."""
    messages, tools = openai_to_messages(example)  # a run's render_check.json, of GLM-4's form in older runs
    try:
        # as training rendered it: a sample cut by overflow=truncate is cut again the same way
        renderer = ChatRenderer(tokenizer, example.get("max_length"), example.get("overflow", "drop"))
        sample = renderer.render(messages, tools)
    except MessageError as exc:
        return f"the saved template cannot render it: {exc}", "restore the template the model was trained with"
    if "input_ids" in example and sample.input_ids != example["input_ids"]:  # the mask: the terminator check
        first = next(i for i, (a, b) in enumerate(zip(sample.input_ids + [None], example["input_ids"] + [None]))
                     if a != b)
        return (f"tokens differ from training at position {first}",
                "serve with the tokenizer saved in the run directory, not the base model's")
    # what a server sends (apply_chat_template) for the first reply must start the sample; later prompts may
    # re-render history (Qwen3 drops think blocks), so for the last reply sftlab's prompt must equal the server's
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    for end, exact in ((first, False), (len(messages) - 1, True)):
        conversation, template_tools = renderer.template_form(messages[:end], tools)
        served = list(tokenizer.apply_chat_template(conversation, tools=template_tools or None,
                                                    add_generation_prompt=True, return_dict=True)["input_ids"])
        if exact and served != renderer.prompt_ids(messages[:end], tools):
            return ("apply_chat_template's prompt differs from sftlab's for the last reply",
                    "the template must render the conversation prefix-by-prefix")
        if not exact and sample.input_ids[:len(served)] != served:
            return ("apply_chat_template's prompt is not a prefix of the training sample",
                    "the template must render the conversation prefix-by-prefix")
    return None


def check_terminator(tokenizer, examples: list[dict]) -> Check:
    name = "terminator tokens are supervised"
    if not examples:
        return Check(name, "skip", "no render_check.json here (not a sftlab run), so no training labels to read; "
                                   "the generation check below still tests stopping")
    stops, total = stop_token_ids(tokenizer), 0
    for example in examples:
        labels, ids = example["labels"], example["input_ids"]
        ends = [i for i in range(1, len(labels)) if labels[i - 1] != IGNORE_INDEX and ids[i] in stops]
        masked = [i for i in ends if labels[i] == IGNORE_INDEX]
        supervised = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
        last_unended = bool(supervised) and ids[supervised[-1]] not in stops  # the last reply has no end token
        if last_unended or masked:
            where = masked[0] if masked else min(supervised[-1] + 1, len(labels) - 1)
            return Check(name, "FAIL", f"{example['kind']} sample: the turn's end token "
                                      f"{tokenizer.decode([ids[where]])!r} at position {where} has label -100: the "
                                      "model never learned to stop",
                         "retrain with sftlab's renderer (it supervises <|endoftext|> / the next role token)")
        total += len(ends)
    return Check(name, "pass", f"every assistant turn ends on a supervised stop token ({total} in "
                               f"{len(examples)} sample(s))")


def check_pad_eos(tokenizer, examples: list[dict]) -> Check:
    name = "pad and eos do not mask the terminator"
    example = examples[0] if examples else None
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
        return Check(name, "FAIL", f"eos={tokenizer.eos_token_id}, pad={tokenizer.pad_token_id}",
                     "set both in tokenizer_config.json (GLM-4: <|endoftext|> for both)")
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        if example is None:
            return Check(name, "skip", f"pad == eos ({tokenizer.eos_token_id}) and no render_check.json here, so no "
                                       "training labels to see whether a collator masked the final eos")
        ids, eos = example["input_ids"], tokenizer.eos_token_id
        if eos not in ids:
            return Check(name, "pass", "pad == eos, but turns end on the template's own end token, not on eos")
        # the sample's last eos, not its last token: ChatML templates write a newline after <|im_end|>
        if example["labels"][len(ids) - 1 - ids[::-1].index(eos)] == eos:
            return Check(name, "pass", "pad == eos, but labels are built by position, not by id: eos stays supervised")
        return Check(name, "FAIL", "pad == eos and the final eos label is masked: a collator masked it as padding",
                     "build labels from the renderer's mask (pad only by position), or use a distinct pad token")
    return Check(name, "pass", f"eos={tokenizer.eos_token_id}, pad={tokenizer.pad_token_id}")


def check_generation_config(folder: Path, tokenizer) -> Check:
    name = "generation config stops on all stop tokens"
    path = folder / "generation_config.json"
    wanted = stop_token_ids(tokenizer)
    if not path.exists():
        return Check(name, "FAIL", "no generation_config.json", f"write one with eos_token_id {wanted}")
    eos = json.loads(path.read_text()).get("eos_token_id")
    eos = eos if isinstance(eos, list) else [eos]
    missing = [i for i in wanted if i not in eos]
    if missing:
        names = ", ".join(tokenizer.convert_ids_to_tokens(missing))
        return Check(name, "FAIL", f"eos_token_id {eos} lacks {missing} ({names}): generation runs on past the turn",
                     f"set eos_token_id to {wanted} in {path}")
    return Check(name, "pass", f"eos_token_id {eos}")


def check_generation(model, tokenizer, examples: list[dict], max_new_tokens: int, terminators_ok: bool,
                     folder: Path) -> Check:
    from sftlab.infer.generate import SamplingArgs, generate_replies

    name = "greedy generation stops"
    example = next((e for e in examples if e["kind"] == "plain"), examples[0] if examples else None)
    # a training prompt of the run; for a model folder, a prompt in its tokenizer's language
    if example:
        messages, tools = openai_to_messages(example)
        messages = messages[:-1]  # the prompt, without its reply
    else:
        messages, tools = [{"role": "user", "content": PLAIN_PROMPTS[main_language(tokenizer)]}], None
    budget, source = generation_budget(folder, max_new_tokens)
    greedy = SamplingArgs(max_new_tokens=budget, temperature=0)
    reply = generate_replies(model, tokenizer, [messages], greedy, progress="doctor: greedy generation",
                             tools=[tools])[0]
    if reply.finish_reason == "stop":
        return Check(name, "pass", f"stopped after {reply.new_tokens} tokens (of {budget}: {source}): "
                                   f"{reply.text[:60]!r}")
    detail = (f"no stop token in {budget} new tokens ({source}) after {messages[-1]['content'][:40]!r}: "
              f"{reply.text[:80]!r}...")
    if terminators_ok:  # the model was taught to stop: it has not learned it yet
        loss = final_loss(folder)
        return Check(name, "FAIL", detail, "the terminators were supervised, so the model may be undertrained"
                     + (f" (final training loss {loss:.3f})" if loss is not None else "") + ": train longer or check "
                     "the learning rate")
    return Check(name, "FAIL", detail, "train with the terminator supervised and check the stop ids above")


def check_system_prompt(folder: Path, tokenizer) -> Check:
    """Whether the chat template writes a default system prompt, and what the run did with it: trained with it
    (system_prompt unset), or kept it out or replaced it. Chat and serve then apply the run's choice, so the
    check passes either way and says which; it fails only for a template that cannot be rendered."""
    from sftlab.chat_format import ChatRenderer
    from sftlab.run_dir import recorded_system_prompt, run_folder

    name = "system prompt"
    try:
        default = ChatRenderer(tokenizer).default_system
    except ValueError as exc:
        return Check(name, "FAIL", str(exc), "save the chat template with the tokenizer")
    if default is None:
        return Check(name, "pass", "the chat template adds no default system prompt")
    chosen = recorded_system_prompt(folder)
    if run_folder(folder) is None:
        return Check(name, "pass", f"the chat template adds its default {default!r} to conversations without a "
                                   "system message: a run that leaves system_prompt unset trains it in "
                                   "(system_prompt: \"\" keeps it out)")
    if chosen is None:
        return Check(name, "pass", f"the chat template adds its default {default!r} to conversations without a "
                                   "system message, and this model was trained and is served with it "
                                   "(system_prompt: \"\" keeps it out)")
    return Check(name, "pass", f"the chat template's default {default!r} is replaced by the run's system_prompt "
                               f"{chosen!r}, in training and in chat and serve")


def check_retention(folder: Path) -> Check:
    """The retention verdict of the run's evaluation (eval/results.json): did tuning keep what the base knew?"""
    from sftlab.run_dir import run_folder

    name = "tuning kept what the base knew"
    if run_folder(folder) is None:
        return Check(name, "skip", "not a training run: nothing was tuned")
    record = read_json(folder / EVAL_DIR / RESULTS).get("retention")
    if record is None:
        return Check(name, "skip", "no retention record in eval/results.json: sftlab eval --adapter RUN --compare_base")
    if record["verdict"] == "n/a":
        return Check(name, "skip", record["why"])
    if record["verdict"] == "kept":
        return Check(name, "pass", record["why"])
    worst = "; ".join(f"{w['prompt']!r}: {w['base'][:40]!r} -> {w['tuned'][:40]!r}" for w in record["worst"])
    return Check(name, "FAIL", f"{record['verdict']}: {record['why']}; e.g. {worst}",
                 "train gentler: a lower learning rate, fewer steps, a smaller LoRA rank, no trainable lm_head or "
                 "embeddings, or general data mixed into the training set")


def final_loss(folder: Path) -> float | None:
    records = read_jsonl(folder / TRAINER_LOG)
    losses = [r["loss"] for r in records if "loss" in r] or [r["train_loss"] for r in records if "train_loss" in r]
    return losses[-1] if losses else None


def check_gguf(gguf: Path, model, tokenizer, folder: Path) -> Check:
    """The round trip of an exported GGUF (eval/gguf_check.py) against the model as transformers runs it."""
    name = "the GGUF answers as the model does"
    try:
        conversations = check_conversations(folder, list(PLAIN_PROMPTS.values()))
        answers = round_trip(gguf, model, tokenizer, conversations, 32, exact_file(gguf))
    except UserError as exc:  # llama-cpp-python is not installed: said, not a crash
        return Check(name, "skip", str(exc))
    failed = [a for a in answers if not a.matched]
    if not failed:
        return Check(name, "pass", f"{summary(answers)}: llama.cpp gives transformers' greedy tokens and stop")
    worst = "; ".join(f"{a.prompt[:30]!r}: {a.detail} (llama.cpp: {a.llama_cpp_text[:40]!r}, transformers: "
                      f"{a.transformers_text[:40]!r})" for a in failed)
    return Check(name, "FAIL", f"{summary(answers)}; {worst}",
                 "export again with sftlab export (it fixes the metadata llama.cpp's converter gets wrong); for a "
                 "quantized file, compare with an f16 export first")


def run_checks(model: str | None, adapter: str | None, max_new_tokens: int | None = None,
               gguf: str | None = None) -> list[Check]:
    from sftlab.model.load import load_for_inference

    folder = Path(adapter or model)
    if not folder.is_dir():
        raise UserError(f"{'adapter' if adapter else 'model'} path {folder} does not exist")
    net, tokenizer = load_for_inference(model, adapter)
    examples = training_examples(folder)
    checks = [check_template(folder, tokenizer, examples), check_terminator(tokenizer, examples),
              check_pad_eos(tokenizer, examples), check_generation_config(folder, tokenizer),
              check_system_prompt(folder, tokenizer), check_retention(folder)]
    if checks[0].passed:
        checks.append(check_generation(net, tokenizer, examples, max_new_tokens, checks[1].passed, folder))
    else:
        checks.append(Check("greedy generation stops", "skip", "the chat template check failed, so a prompt would not "
                            "be rendered as in training"))
    if gguf:
        checks.append(check_gguf(Path(gguf), net, tokenizer, folder))
    return checks


@dataclass
class DoctorArguments:
    adapter: str | None = field(default=None, metadata={"help": "A LoRA run directory."})
    model: str | None = field(default=None, metadata={
        "help": "A model folder (a full fine-tuning run), or the base for --adapter."})
    max_new_tokens: int | None = field(default=None, metadata={
        "help": "Budget of the generation test (default: the run's reply limit, twice the p99 of its training "
                "replies; 64 for a model folder)."})
    gguf: str | None = field(default=None, metadata={
        "help": "An exported GGUF file: run it in llama.cpp (llama-cpp-python) on the run's probe and held-out "
                "prompts and compare its greedy tokens and stop with the model's."})

    RANGES: ClassVar[dict] = {"max_new_tokens": Range(1, integer=True, nullable=True)}

    def __post_init__(self):
        check_fields(self)
        if not (self.adapter or self.model):
            raise ValueError("pass --adapter DIR or --model PATH")
        if self.gguf and not Path(self.gguf).is_file():
            raise ValueError(f"--gguf {self.gguf}: no such file")
        if self.gguf and find_spec("gguf") is not None:  # without it the round trip is skipped, said so
            check_gguf_file(Path(self.gguf))  # a damaged file: one line naming it, before any model loads


ARGUMENTS = (DoctorArguments,)  # `sftlab doctor`'s (cli.py parses them)


def run(args: DoctorArguments) -> int:
    checks = run_checks(args.model, args.adapter, args.max_new_tokens, args.gguf)
    for check in checks:
        print(f"[{check.status}] {check.name}: {check.detail}")
        if check.status == "FAIL":
            print(f"       fix: {check.fix}")
    counts = {status: sum(c.status == status for c in checks) for status in ("pass", "FAIL", "skip")}
    print(f"\n{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped")
    return 1 if counts["FAIL"] else 0
