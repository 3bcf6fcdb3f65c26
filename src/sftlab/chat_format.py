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
- every other token (system, user, observation, role tokens, `[gMASK]<sop>`) has label -100.

Without the supervised terminator the model never learns to stop (the tutorial's first defect).
"""

from dataclasses import dataclass

from transformers.utils.chat_template_utils import render_jinja_template

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "observation")
# GLM-4 stops on any of these three; its maintainers say all three are needed.
GLM4_STOP_TOKENS = ("<|endoftext|>", "<|user|>", "<|observation|>")


class MessageError(ValueError):
    """A conversation that cannot be rendered for training (wrong roles, order or types)."""


class SampleTooLong(ValueError):
    """A rendered sample over max_length that cannot keep any supervised token; the caller counts it."""

    def __init__(self, length: int, max_length: int):
        super().__init__(f"{length} tokens > max_length {max_length}")
        self.length = length


@dataclass
class RenderedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_supervised(self) -> int:
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


END_PROBE = "sftlab-end-of-turn-probe"


def end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant's content (ChatML's `<|im_end|>`,
    Llama-3's `<|eot_id|>`), or None where it writes none (GLM-4: the next role token ends the turn)."""
    if tokenizer.chat_template is None:
        return None
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": END_PROBE}]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # a template that cannot render this plain conversation: no end token to learn from it
        return None
    after = text[text.find(END_PROBE) + len(END_PROBE):] if END_PROBE in text else ""
    ids = tokenizer.encode(after, add_special_tokens=False) if after else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return ids[0] if ids and ids[0] in special else None


_UNKNOWN = object()


def stop_token_ids(tokenizer, end_of_turn=_UNKNOWN) -> list[int]:
    """The ids generation must stop on: eos, the template's end-of-turn token where it writes one (found by
    rendering, unless the caller already knows it), and GLM-4's `<|user|>` and `<|observation|>` when present."""
    ids = [tokenizer.eos_token_id]
    end = end_of_turn_id(tokenizer) if end_of_turn is _UNKNOWN else end_of_turn
    if end is not None and end not in ids:
        ids.append(end)
    for token in GLM4_STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and token_id != tokenizer.unk_token_id and token_id not in ids:
            ids.append(token_id)
    return ids


def validate_messages(messages: list[dict], for_training: bool = True) -> None:
    """Raises MessageError naming the message index and field when the conversation is malformed."""
    if not isinstance(messages, list) or not messages:
        raise MessageError("messages: expected a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise MessageError(f"messages[{i}]: expected an object, got {type(message).__name__}")
        if message.get("role") not in ROLES:
            raise MessageError(f"messages[{i}].role: {message.get('role')!r} is not one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise MessageError(f"messages[{i}].content: expected a string")
        # GLM-4's template skips a message whose content is empty; a tools-only system message is the exception
        if not message["content"].strip() and not (message["role"] == "system" and message.get("tools")):
            raise MessageError(f"messages[{i}].content: empty {message['role']} message")
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None or messages[first]["role"] != "user":
        raise MessageError("messages: the first non-system message must be a user message")
    if any(m["role"] == "system" for m in messages[first:]):
        raise MessageError("messages: system messages must come before the conversation")
    for i in range(first + 1, len(messages)):
        if messages[i]["role"] == messages[i - 1]["role"] and messages[i]["role"] == "user":
            raise MessageError(f"messages[{i}].role: two user messages in a row")
        if messages[i]["role"] == "observation" and messages[i - 1]["role"] != "assistant":
            raise MessageError(f"messages[{i}].role: an observation must follow an assistant tool call")
    if for_training and messages[-1]["role"] != "assistant":
        raise MessageError(f"messages[{len(messages) - 1}].role: a training conversation must end with the assistant")


def _compiled_template(template: str):
    """transformers' own compiled Jinja template (same environment and filters), or None if its private
    compile function moved, in which case the public render_jinja_template is used."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        return _compile_jinja_template(template)
    except ImportError:
        return None


class ChatRenderer:
    """Renders conversations with `tokenizer`'s chat template into ids, labels and prompts."""

    def __init__(self, tokenizer, max_length: int | None = None, overflow: str = "drop"):
        if tokenizer.chat_template is None:
            raise ValueError("the tokenizer has no chat template (sftlab.model.load sets GLM-4's when missing)")
        if overflow not in ("drop", "truncate"):
            raise ValueError(f"overflow: {overflow!r} is not one of drop, truncate")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.overflow = overflow
        self.eos_id = tokenizer.eos_token_id
        # one terminator rule for every template: where the template ends a turn with its own token, that token
        # is supervised and nothing after it, and nothing is appended; where it writes none (GLM-4), the first
        # token after the turn (the next role token) is supervised, and eos is appended after the last turn
        self.end_of_turn = end_of_turn_id(tokenizer)
        self.terminator_id = self.end_of_turn if self.end_of_turn is not None else self.eos_id
        self.stop_ids = stop_token_ids(tokenizer, self.end_of_turn)
        self._template_kwargs = dict(tokenizer.special_tokens_map)
        self._backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer, when there is one
        self._empty = None  # the template's rendering of no messages, computed once
        self._compiled = _compiled_template(tokenizer.chat_template)

    def render_text(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        if self._compiled is not None:
            # transformers' compiled template, called directly: render_jinja_template would deep-copy every
            # message first, a third of the rendering time when cleaning a large dataset
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self._template_kwargs)
        rendered, _ = render_jinja_template(
            conversations=[messages], chat_template=self.tokenizer.chat_template,
            add_generation_prompt=add_generation_prompt, **self._template_kwargs,
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

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The generation prompt: equal to apply_chat_template(messages, add_generation_prompt=True)."""
        validate_messages(messages, for_training=False)
        return self.encode(self.render_text(messages, add_generation_prompt=True))

    def render(self, messages: list[dict]) -> RenderedSample:
        """Ids and labels for a training conversation, fitted to max_length; raises MessageError, or
        SampleTooLong for a sample over max_length that cannot be kept."""
        pieces = self.pieces(messages)
        return self.fit(self.assemble(pieces, [self.encode(text) for text, _ in pieces]))

    def render_batch(self, conversations: list[list[dict]]) -> list:
        """Each conversation's whole sample (before max_length, for length statistics; the caller fits it),
        tokenized in one batch; a MessageError in place of a conversation that cannot be rendered."""
        all_pieces = []
        for messages in conversations:
            try:
                all_pieces.append(self.pieces(messages))
            except MessageError as exc:
                all_pieces.append(exc)
        texts = [text for pieces in all_pieces if isinstance(pieces, list) for text, _ in pieces]
        ids = iter(self.encode_batch(texts))
        return [pieces if isinstance(pieces, MessageError) else self.assemble(pieces, [next(ids) for _ in pieces])
                for pieces in all_pieces]

    def pieces(self, messages: list[dict]) -> list[tuple[str, str]]:
        """The rendered text cut where the mask changes: (text, "prompt" | "completion") pieces.

        A "prompt" piece runs from the end of the last assistant turn to the generation prompt of the next;
        its first token is the previous turn's terminator (supervised), unless it is the first piece."""
        validate_messages(messages)
        if self._empty is None:
            self._empty = self.render_text([])  # e.g. "[gMASK]<sop>": written once, by the template
        pieces, done = [], self._empty
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._extend(done, self.render_text(messages[:i], add_generation_prompt=True), i)
            full = self._extend(prompt, self.render_text(messages[: i + 1]), i)
            pieces.append((prompt[len(done):] if pieces else prompt, "prompt"))
            pieces.append((full[len(prompt):], "completion"))
            done = full
        return pieces

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
