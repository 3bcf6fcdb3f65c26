"""The server's generation engine: a queue of requests, generated in left-padded batches by one worker thread.

Why not transformers' continuous batching (`ContinuousBatchingManager`, `generate_batch`)? It runs on this CPU
and gives the same greedy tokens, but on the tiny model it took 6.5 s for 8 requests where 8 plain `generate`
calls one after another took 0.7 s (transformers 5.24, paged attention on the CPU): the opposite of the point.

So requests that wait together (or, after several arrived at once, within 50 ms of each other) are generated
in one batch: greedy requests together, sampled ones with the same temperature and top_p together, a request
with a seed alone (its sampling is then reproducible). Each row ends on its own (stop id, max_tokens, a stop
string, or its client gone) through a per-row stopping criterion; the batch ends when every row has. New
requests wait for the next batch (no joining mid-batch: that is what a paged KV cache is for, and vLLM is the
engine for that scale).
"""

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from tokenizers.decoders import DecodeStream
from transformers import StoppingCriteria, StoppingCriteriaList

from sftlab.chat_format import ChatRenderer
from sftlab.infer.generate import SamplingArgs, decode_complete, left_pad, without_opening
from sftlab.internals import rust_tokenizer


class QueueFull(Exception):
    """More requests waiting or running than the server's cap."""


@dataclass(eq=False)  # a job is itself: two requests with the same prompt and settings are two jobs
class Job:
    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # the reply so far, without the template's opening
    raw: str = ""  # the reply so far as decoded, opening included
    decoder: object = None  # the tokenizers library's streaming decoder: each token decoded once, not the reply
    sent: int = 0  # characters of `text` already handed to the client
    finish_reason: str | None = None
    cancelled: bool = False
    stream: bool = False  # wake the handler on every token (else only at the end)
    loop: asyncio.AbstractEventLoop | None = None
    updates: asyncio.Event | None = None  # set when there is new text or an end
    pending: bool = False  # a wake-up is already on its way: one is enough, however many tokens came
    plain: bool = False  # a completion, not a chat reply: its text as generated, no opening or whitespace removed
    held: bool = False  # submitted and not yet released: counted in the engine's in_flight

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.cancelled

    @property
    def batch_key(self):
        if self.seed is not None:
            return ("seed", id(self))  # alone: reproducible
        return ("greedy",) if self.temperature <= 0 else ("sample", self.temperature, self.top_p)

    def ready_text(self) -> str:
        """Text that can be sent: held back while it might still become a stop string or an unfinished character."""
        hold = 0 if self.done else max([len(s) - 1 for s in self.stop] + [0])
        text = self.text if self.done else self.text.rstrip("\ufffd")
        return text[:max(self.sent, len(text) - hold)]

    def notify(self) -> None:
        """Wakes the request's handler (from the engine thread); coalesced: per-token wake-ups of eight streams
        were most of the server's time on two cores."""
        if self.loop is not None and self.updates is not None and not self.pending:
            self.pending = True
            try:
                self.loop.call_soon_threadsafe(self.updates.set)
            except RuntimeError:  # its event loop is closed: nobody is waiting any more
                self.cancelled = True

    async def wait(self) -> None:
        """Until notified (in the handler's event loop); then reads of the job see every token so far."""
        await self.updates.wait()
        self.updates.clear()
        self.pending = False


class RowsDone(StoppingCriteria):
    """Per-row end: a row is finished when its job is (generate then pads it), the batch when all are."""

    def __init__(self, jobs: list[Job]):
        self.jobs = jobs

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([job.done for job in self.jobs], device=input_ids.device)


class RowStreamer:
    """A generate() streamer for a whole batch: each step's new tokens go to their jobs."""

    def __init__(self, engine: "Engine", jobs: list[Job]):
        self.engine, self.jobs, self.prompt_seen = engine, jobs, False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompts
            self.prompt_seen = True
            return
        for job, token in zip(self.jobs, value.reshape(-1).tolist()):
            if not job.done:
                self.engine.add_token(job, token)

    def end(self):
        for job in self.jobs:
            if job.finish_reason is None:
                self.engine.cut_at_length(job)
            job.notify()


class Engine:
    def __init__(self, model, tokenizer, max_batch: int = 8, max_queue: int = 64,
                 repetition_penalty: float | None = None, batch_window_s: float = 0.05):
        self.model, self.tokenizer = model, tokenizer
        self.backend = rust_tokenizer(tokenizer)
        self.repetition_penalty = repetition_penalty or 1.0  # none unless the server was told (OpenAI's API has none)
        self.renderer = ChatRenderer(tokenizer, generation_eos=model.generation_config.eos_token_id)
        self.stop_ids = set(self.renderer.stop_ids)
        self.opening = self.renderer.reply_opening
        self.max_batch, self.max_queue, self.batch_window_s = max_batch, max_queue, batch_window_s
        self.waiting: deque[Job] = deque()
        self.running = 0
        self.in_flight = 0  # submitted and not yet released by their handler (a response may still be sending)
        self.peaks: deque[tuple[float, int]] = deque()  # (time, in_flight) at each submission
        self.stats = {"batches": 0, "rows": 0, "generate_s": 0.0}  # shown by /health
        self.lock = threading.Condition()
        self.worker = threading.Thread(target=self._loop, name="sftlab-engine", daemon=True)
        self.closed = False
        self.worker.start()

    @property
    def load(self) -> int:
        return len(self.waiting) + self.running

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.load >= self.max_queue:
                raise QueueFull(f"{self.load} requests are waiting or running (the cap is {self.max_queue})")
            self.waiting.append(job)
            self.in_flight += 1
            job.held = True
            self.peaks.append((time.monotonic(), self.in_flight))
            self.lock.notify()

    def release(self, job: Job) -> None:
        """The request's handler is done with `job` (its response is sent, or its client gone); a job never
        submitted, or already released, changes nothing."""
        with self.lock:
            if not job.held:
                return
            job.held = False
            self.in_flight -= 1
            job.cancelled = job.cancelled or not job.done

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for job in self.waiting:
                job.cancelled = True
                job.notify()
            self.waiting.clear()
            self.lock.notify()

    def add_token(self, job: Job, token: int) -> None:
        if token in self.stop_ids:
            job.tokens.append(token)
            job.finish_reason = "stop"
        else:
            job.tokens.append(token)
            before = len(job.text)
            job.raw += self.decode_step(job, token)
            job.text = self.reply_text(job, job.raw)
            for stop in job.stop:  # only where the new text can have completed it
                at = job.text.find(stop, max(0, before - len(stop) + 1))
                if at >= 0:
                    job.text, job.finish_reason = job.text[:at], "stop"
            if job.finish_reason is None and len(job.tokens) >= job.max_tokens:
                self.cut_at_length(job)
        if job.stream or job.done:
            job.notify()

    def decode_step(self, job: Job, token: int) -> str:
        """The text `token` adds to its reply: "" while it ends inside a character (the next token completes it)."""
        if self.backend is None:  # a tokenizer without a Rust backend: decode the whole reply again
            text = self.tokenizer.decode([t for t in job.tokens if t not in self.stop_ids], skip_special_tokens=True)
            return text.rstrip("\ufffd")[len(job.raw):]
        if job.decoder is None:
            job.decoder = DecodeStream(skip_special_tokens=True)
        return job.decoder.step(self.backend, token) or ""

    def cut_at_length(self, job: Job) -> None:
        """Ends a reply at its token limit, without a character the cut split (as `sftlab chat` does)."""
        job.text = self.reply_text(job, decode_complete(self.tokenizer, job.tokens))
        job.finish_reason = "length"

    def reply_text(self, job: Job, decoded: str) -> str:
        return decoded if job.plain else without_opening(decoded, self.opening)

    def _next_batch(self) -> list[Job]:
        with self.lock:
            while not self.waiting and not self.closed:
                self.lock.wait()
            # a short window for the requests that arrive together: the clients the last batch answered send their
            # next ones milliseconds apart, and without it the next batches are ragged and small. It waits for as
            # many requests as were in flight at once in the last second, so a lone client never waits
            now = time.monotonic()
            while self.peaks and self.peaks[0][0] < now - 1.0:
                self.peaks.popleft()
            expected = min(self.max_batch, max([n for _, n in self.peaks] + [1]))
            deadline = time.monotonic() + self.batch_window_s
            while len(self.waiting) < expected and not self.closed and time.monotonic() < deadline:
                self.lock.wait(deadline - time.monotonic())
            if self.closed:
                return []
            live = [job for job in self.waiting if not job.cancelled]
            batch = [job for job in live if job.batch_key == live[0].batch_key][:self.max_batch] if live else []
            self.waiting = deque(job for job in live if job not in batch)
            self.running = len(batch)
            return batch

    def _loop(self) -> None:
        while not self.closed:
            batch = self._next_batch()
            if batch:
                started = time.perf_counter()
                try:
                    self._generate(batch)
                except Exception as exc:  # a failed batch ends its requests, never the server
                    for job in batch:
                        job.finish_reason = job.finish_reason or "error"
                        job.text = job.text or f"generation failed: {type(exc).__name__}: {exc}"
                        job.notify()
                self.stats["batches"] += 1
                self.stats["rows"] += len(batch)
                self.stats["generate_s"] += time.perf_counter() - started
            with self.lock:
                self.running = 0

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> None:
        first = jobs[0]
        sampling = SamplingArgs(max_new_tokens=max(j.max_tokens for j in jobs), temperature=first.temperature,
                                top_p=first.top_p, repetition_penalty=self.repetition_penalty)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        ids, mask = left_pad([j.prompt for j in jobs], self.tokenizer.pad_token_id, self.model.device)
        self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
            eos_token_id=sorted(self.stop_ids), pad_token_id=self.tokenizer.pad_token_id,
            streamer=RowStreamer(self, jobs), stopping_criteria=StoppingCriteriaList([RowsDone(jobs)]),
            **sampling.generate_kwargs(),
        )

    @torch.no_grad()
    def logprobs(self, ids: list[int], top: int) -> list[tuple[float, list[tuple[int, float]]]]:
        """For each token after the first: its log-probability given the ones before, and the `top` most likely
        tokens there with theirs; one forward pass, the model's raw distribution (no temperature or penalty), as
        vLLM reports by default. Called from a worker thread beside the generation thread: a forward pass
        without a cache changes no state of the model."""
        logits = self.model(torch.tensor([ids], device=self.model.device)).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, torch.tensor(ids[1:], device=logprobs.device)[:, None])[:, 0].tolist()
        best = logprobs.topk(top, dim=-1) if top else None
        return [(chosen[n], list(zip(best.indices[n].tolist(), best.values[n].tolist())) if best is not None else [])
                for n in range(len(chosen))]
