"""The one renderer: chat messages -> token ids and the loss mask.

Training, evaluation, the doctor and chat all call this module, so what the model is trained on and what it
is prompted with cannot drift apart.

The text always comes from the tokenizer's own chat template (the one saved with the model), rendered one
message prefix at a time; the loss mask follows GLM-4's own fine-tuning demo:

- for each assistant message, the supervised tokens are everything after the generation prompt
  (for GLM-4: after `<|assistant|>`, i.e. the newline, any metadata and the content);
- plus the token that ends the turn, by one rule for every template: where the template writes its own
  end-of-turn token after the reply (ChatML's `<|im_end|>`, Llama-3's `<|eot_id|>`), that token, and nothing
  after it; where it writes none (GLM-4), the first token of the next message (`<|user|>` or
  `<|observation|>`), or the end-of-text token appended after the last message;
- every other token (system, user, tool results, role tokens, `[gMASK]<sop>`) has label -100.

Without the supervised terminator the model never learns to stop (the tutorial's first defect).

Conversations are in OpenAI's form: `tools` beside the messages, a call as an assistant message's `tool_calls`
(the arguments an object; parallel calls in one message, one turn), a result as a `tool` message. Each template
is probed once for the dialect it wants (chat_tools.py): OpenAI's form with `tools=` (Qwen, Llama-3 and most
others), or GLM-4's, each call an assistant message whose `metadata` is the function's name and whose content is
the JSON arguments, each result an `observation`, the tools passed to the template (GLM-4-0414) or on the system
message (GLM-4). A template that renders tools in none of these (SmolLM2's ChatML) gets the fallback form
(`to_fallback_form`): the tool definitions as JSON in the system message, each call as a JSON object
`{"name": ..., "arguments": {...}}` as the assistant's reply, each result as a user message `Result of NAME: ...`.
It is plain text in roles every template has, so training, chat and the server render it the same way, and
`fallback_call` reads a call back from a reply.

A template that renders an earlier assistant turn differently once more messages follow (Qwen3 drops the
empty think block from history) gets every assistant turn in the form the model generates it, as TRL's
prefix-preserving Qwen3 training template does: what is supervised is what the model will be asked to write.
"""

from dataclasses import dataclass
from functools import cached_property

from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

from sftlab.chat_tools import (
    PROBE_TOOL_CONVERSATION,
    PROBE_TOOLS,
    TOOL_DIALECTS,
    CallFormat,
    has_tool_parts,
    to_fallback_form,
    to_template_form,
    validate_messages,
)
from sftlab.errors import MessageError
from sftlab.internals import compiled_template, rust_tokenizer

IGNORE_INDEX = -100


class TemplateRefused(MessageError):
    """The chat template raised on a conversation (Llama-3.1's refuses parallel tool calls, for one)."""


class SampleTooLong(ValueError):
    """A rendered sample over max_length that cannot keep any supervised token; the caller counts it."""

    def __init__(self, length: int, max_length: int):
        super().__init__(f"{length} tokens > max_length {max_length}")
        self.length, self.max_length = length, max_length

    def __reduce__(self):  # pickled with its own arguments (the default would call it with the message alone)
        return type(self), (self.length, self.max_length)


@dataclass
class RenderedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


END_PROBE = "sftlab-end-of-turn-probe"
SYSTEM_PROBE = "sftlab-system-probe"


def special_ids(tokenizer) -> set[int]:
    """The named special tokens and every added special token (GLM-4's role tokens, ChatML's markers)."""
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return set(tokenizer.all_special_ids) | {i for i, token in added.items() if getattr(token, "special", True)}


def stop_token_ids(tokenizer, generation_eos=None) -> list[int]:
    """The ids generation must stop on (see ChatRenderer.stop_ids)."""
    return ChatRenderer(tokenizer, generation_eos=generation_eos).stop_ids


class ChatRenderer:
    """Renders conversations with `tokenizer`'s chat template into ids, labels and prompts.

    `generation_eos`: the model's generation_config eos ids, which stop generation too."""

    def __init__(self, tokenizer, max_length: int | None = None, overflow: str = "drop", generation_eos=None):
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template (sftlab.model.load sets GLM-4's when missing)")
        if overflow not in ("drop", "truncate"):
            raise ValueError(f"overflow: {overflow!r} is not one of drop, truncate")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overflow = overflow
        self.eos_id = tokenizer.eos_token_id
        self._template_kwargs = dict(tokenizer.special_tokens_map)
        self._backend = rust_tokenizer(tokenizer)
        self._compiled = compiled_template(tokenizer.chat_template)
        self.tool_dialect = self._probe_tool_dialect()
        # one terminator rule for every template: where the template ends a turn with its own token, that token
        # is supervised and nothing after it, and nothing is appended; where it writes none (GLM-4), the first
        # token after the turn (the next role token) is supervised, and eos is appended after the last turn
        self.end_of_turn, self.reply_opening = self._probe_reply()
        self._end_text = None if self.end_of_turn is None else tokenizer.convert_ids_to_tokens(self.end_of_turn)
        self.terminator_id = self.end_of_turn if self.end_of_turn is not None else self.eos_id
        self.stop_ids = self._stop_ids(generation_eos)
        self.default_system = self._probe_default_system()

    def _probe_default_system(self) -> str | None:
        """The system prompt the template writes into a conversation that has none (SmolLM2's "You are a
        helpful AI assistant named SmolLM, ..."), or None. Found by rendering with a marker as the system
        message and with none: the default is what stands where the marker stood. A header the template writes
        either way (Llama-3.1's dates) is no default: it is there with any system prompt."""
        user = [{"role": "user", "content": "hi"}]
        try:
            without = self.render_text(user)
            marked = self.render_text([{"role": "system", "content": SYSTEM_PROBE}, *user])
        except Exception:  # a template that cannot render these: it has no default to find
            return None
        if SYSTEM_PROBE not in marked:
            return None
        before, after = marked.split(SYSTEM_PROBE, 1)
        if len(without) < len(before) + len(after) or not (without.startswith(before) and without.endswith(after)):
            return None
        return without[len(before):len(without) - len(after)] or None

    def _probe_tool_dialect(self) -> tuple[bool, bool] | None:
        """The first form in TOOL_DIALECTS in which the template writes a tool's definition, a call's name
        and arguments and the result; None if it writes tools in none of them."""
        for dialect in TOOL_DIALECTS:
            try:
                text = self._render(*to_template_form(PROBE_TOOL_CONVERSATION, PROBE_TOOLS, *dialect), False)
            except Exception:  # the template refuses this form
                continue
            if ("sftlab_probe_description" in text and text.count("sftlab_probe_fn") >= 2
                    and "sftlab_probe_value" in text and "sftlab_probe_result" in text):
                return dialect
        return None

    def _probe_reply(self) -> tuple[int | None, str]:
        """From one rendering of a reply: the special token the template writes right after an assistant's
        content (ChatML's `<|im_end|>`, Llama-3's `<|eot_id|>`; None for GLM-4, whose next role token ends the
        turn), and what it writes between the generation prompt and the content (GLM-4: a newline; Qwen3: an
        empty think block), which chat, evaluation and the server leave out of the reply text."""
        user = [{"role": "user", "content": "hi"}]
        try:
            prompt = self.render_text(user, add_generation_prompt=True)
            full = self.render_text([*user, {"role": "assistant", "content": END_PROBE}])
        except Exception:  # a template that cannot render this plain conversation: nothing to learn from it
            return None, ""
        if END_PROBE not in full:
            return None, ""
        at = full.find(END_PROBE)
        rest = full[at + len(END_PROBE):]
        after = self.encode(rest) if rest else []
        end = after[0] if after and after[0] in special_ids(self.tokenizer) else None
        return end, (full[len(prompt):at] if full.startswith(prompt) else "")

    def _after_turn(self, messages: list[dict], tools: list | None = None) -> int | None:
        """The first token the template writes after the assistant turn that ends `messages[:-1]`, if special."""
        before, after = self.render_text(messages[:-1], tools), self.render_text(messages, tools)
        if not after.startswith(before) or after == before:
            return None
        token = self.encode(after[len(before):])[0]
        return token if token in special_ids(self.tokenizer) else None

    def _stop_ids(self, generation_eos) -> list[int]:
        """eos, the model's generation_config eos ids, and the template's end of a turn: its end-of-turn token,
        or where it writes none, the tokens that can follow a turn (GLM-4's `<|user|>` and `<|observation|>`)."""
        extra = generation_eos if isinstance(generation_eos, list) else [generation_eos]
        ids = [i for i in [self.eos_id, *extra] if i is not None]
        if self.end_of_turn is not None:
            ids.append(self.end_of_turn)
        else:
            reply = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": END_PROBE}]
            ids.append(self._after_turn([*reply, {"role": "user", "content": "hi"}]))
            if self.tool_dialect is not None:
                ids.append(self._after_turn(PROBE_TOOL_CONVERSATION, PROBE_TOOLS))
        return list(dict.fromkeys(i for i in ids if i is not None))

    @cached_property
    def call_format(self) -> CallFormat | None:
        """How this model writes a function call in a reply (chat_tools.CallFormat), learned from the template's
        rendering of one call, decoded as a reply is (special tokens left out, the opening removed); None when
        the template writes no call this can read back."""
        try:
            completion = self.pieces(PROBE_TOOL_CONVERSATION[:2], PROBE_TOOLS)[-1][0]
        except MessageError:
            return None
        text = self.tokenizer.decode(self.encode(completion), skip_special_tokens=True).lstrip()
        opening = self.reply_opening.strip()
        return CallFormat.learn(text[len(opening):] if opening and text.startswith(opening) else text)

    def template_form(self, messages: list[dict], tools: list | None = None) -> tuple[list[dict], list]:
        """(messages, tools) as this template wants them: what apply_chat_template is to be given."""
        if self.tool_dialect is None:
            return (to_fallback_form(messages, tools) if has_tool_parts(messages, tools) else messages), []
        return to_template_form(messages, tools, *self.tool_dialect)

    def render_text(self, messages: list[dict], tools: list | None = None, add_generation_prompt: bool = False
                    ) -> str:
        return self._render(*self.template_form(messages, tools), add_generation_prompt)

    def _render(self, messages: list[dict], tools: list, add_generation_prompt: bool) -> str:
        try:
            return self._render_template(messages, tools, add_generation_prompt)
        except TemplateError as exc:  # the template's own raise_exception: it refuses this conversation
            raise TemplateRefused(f"the chat template refuses this conversation: {exc}") from None

    def _render_template(self, messages: list[dict], tools: list, add_generation_prompt: bool) -> str:
        extra = {"tools": tools} if tools else {}
        if self._compiled is not None:
            # transformers' compiled template, called directly: render_jinja_template would deep-copy every
            # message first, a third of the rendering time when cleaning a large dataset
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._template_kwargs, **extra)
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=self.tokenizer.chat_template,
            add_generation_prompt=add_generation_prompt, tools=tools or None, **self._template_kwargs,
        )
        return rendered[0]

    def encode(self, text: str) -> list[int]:
        if self._backend is not None:  # same ids as tokenizer.encode, without the Python wrapper's overhead
            return self._backend.encode(text, add_special_tokens=False).ids
        return self.tokenizer.encode(text, add_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:  # the Rust tokenizer encodes a batch on all cores
            encode = getattr(self._backend, "encode_batch_fast", self._backend.encode_batch)  # fast: no offsets
            return [e.ids for e in encode(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def prompt_ids(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """The generation prompt: equal to apply_chat_template(messages, tools=tools, add_generation_prompt=True)."""
        validate_messages(messages, for_training=False)
        return self.encode(self.render_text(messages, tools, add_generation_prompt=True))

    def render(self, messages: list[dict], tools: list | None = None) -> RenderedSample:
        """Ids and labels for a training conversation, fitted to max_length; raises MessageError, or
        SampleTooLong for a sample over max_length that cannot be kept."""
        pieces = self.pieces(messages, tools)
        return self.fit(self.assemble(pieces, [self.encode(text) for text, _ in pieces]))

    def render_batch(self, conversations: list[list[dict]], tools: list | None = None) -> list:
        """Each conversation's whole sample (before max_length, for length statistics; the caller fits it),
        tokenized in one batch; a MessageError in place of a conversation that cannot be rendered. `tools`: per
        conversation, its tools or None."""
        all_pieces = []
        for messages, its_tools in zip(conversations, tools or [None] * len(conversations)):
            try:
                all_pieces.append(self.pieces(messages, its_tools))
            except MessageError as exc:
                all_pieces.append(exc)
        texts = [text for pieces in all_pieces if isinstance(pieces, list) for text, _ in pieces]
        ids = iter(self.encode_batch(texts))
        return [pieces if isinstance(pieces, MessageError) else self.assemble(pieces, [next(ids) for _ in pieces])
                for pieces in all_pieces]

    def pieces(self, messages: list[dict], tools: list | None = None) -> list[tuple[str, str]]:
        """The rendered text cut where the mask changes: (text, "prompt" | "completion") pieces.

        A "prompt" piece runs from the end of the last assistant turn to the generation prompt of the next;
        its first token is the previous turn's terminator (supervised), unless it is the first piece. Each
        assistant turn is in the form the template gives a final turn, the form the model generates."""
        validate_messages(messages)
        pieces, last_prompt, last_turn = [], None, ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render_text(messages[:i], tools, add_generation_prompt=True)
            turn = self._extend(prompt, self.render_text(messages[: i + 1], tools), i)
            if not pieces:
                between = prompt
            elif prompt.startswith(last_turn):  # the template renders earlier turns the same whatever follows
                between = prompt[len(last_turn):]
            else:
                between = self._after_history_turn(prompt, last_prompt, i)
                text, kind = pieces[-1]  # the previous turn ends at its end token; the rest follows the prompt's
                pieces[-1] = (text[:text.index(self._end_text) + len(self._end_text)], kind)
            pieces.append((between, "prompt"))
            pieces.append((turn[len(prompt):], "completion"))
            last_prompt, last_turn = prompt, turn
        return pieces

    def _after_history_turn(self, prompt: str, last_prompt: str | None, index: int) -> str:
        """The text of `prompt` after the previous assistant turn, which the template re-rendered in its history
        form (Qwen3: without the think block); only where a turn ends with the template's own end token."""
        end = -1
        if last_prompt is not None and self._end_text is not None and prompt.startswith(last_prompt):
            end = prompt.find(self._end_text, len(last_prompt))
        if end < 0:
            raise MessageError(
                f"messages[{index}]: the chat template does not render this conversation prefix-by-prefix, "
                "so the loss mask cannot be placed exactly"
            )
        return prompt[end + len(self._end_text):]

    def assemble(self, pieces: list[tuple[str, str]], piece_ids: list[list[int]]) -> RenderedSample:
        input_ids, labels = [], []
        for n, ((_, kind), ids) in enumerate(zip(pieces, piece_ids)):
            input_ids.extend(ids)
            if kind == "completion" and self.end_of_turn in ids:  # through the template's end token, not after
                end = ids.index(self.end_of_turn) + 1
                labels.extend(ids[:end] + [IGNORE_INDEX] * (len(ids) - end))
            elif kind == "completion":
                labels.extend(ids)
            elif n > 0 and ids and self.end_of_turn is None:  # the first token after the turn ends it (GLM-4)
                labels.extend([ids[0]] + [IGNORE_INDEX] * (len(ids) - 1))
            else:
                labels.extend([IGNORE_INDEX] * len(ids))
        if self.end_of_turn is None:  # the template writes no end token: the conversation ends here
            input_ids.append(self.eos_id)
            labels.append(self.eos_id)
        return RenderedSample(input_ids, labels)

    def _extend(self, prefix: str, text: str, index: int) -> str:
        """`text`, which must start with `prefix` (a turn must start with its own generation prompt)."""
        if not text.startswith(prefix):
            raise MessageError(
                f"messages[{index}]: the chat template does not render this conversation prefix-by-prefix, "
                "so the loss mask cannot be placed exactly"
            )
        return text

    def fit(self, sample: RenderedSample) -> RenderedSample:
        """Applies max_length: the sample itself, a truncated copy (overflow=truncate), or SampleTooLong."""
        if self.max_length is None or len(sample.input_ids) <= self.max_length:
            return sample
        if self.overflow == "drop":
            raise SampleTooLong(len(sample.input_ids), self.max_length)
        # truncate: keep the longest head that ends on a supervised token, then close it with the terminator
        cut = self.max_length - 1
        while cut > 0 and sample.labels[cut - 1] == IGNORE_INDEX:
            cut -= 1
        if cut == 0:
            raise SampleTooLong(len(sample.input_ids), self.max_length)
        ids, labels = sample.input_ids[:cut], sample.labels[:cut]
        if ids[-1] not in self.stop_ids:
            ids, labels = ids + [self.terminator_id], labels + [self.terminator_id]
        return RenderedSample(ids, labels)


def mark_supervised(tokenizer, sample: RenderedSample, open_mark: str = "«", close_mark: str = "»") -> str:
    """The sample as text with each run of supervised tokens wrapped in « »: the view that golden tests and
    `sftlab data inspect` show. Runs are decoded whole, so multi-byte characters stay readable."""
    pieces, run, run_supervised = [], [], None
    for token_id, label in zip(sample.input_ids + [None], sample.labels + [None]):
        supervised = label is not None and label != IGNORE_INDEX
        if token_id is None or (run and supervised != run_supervised):
            text = tokenizer.decode(run, skip_special_tokens=False)
            pieces.append(f"{open_mark}{text}{close_mark}" if run_supervised else text)
            run = []
        if token_id is not None:
            run.append(token_id)
            run_supervised = supervised
    return "".join(pieces)
