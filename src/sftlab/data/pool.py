"""The worker pool behind `clean_rows` for large inputs: forked processes check batches of rows (sharing the
tokenizer), results come back in order, and a worker that dies or fails ends the run with one line naming what
happened and the rows it was checking."""

import multiprocessing as mp
import os
import signal
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager

from sftlab.data.load import SourceRow
from sftlab.errors import UserError
from sftlab.internals import pool_processes

CHECKING, CHECKED = 1, 2  # a batch's state in the pool's shared array (0: not started)


def checked_in_pool(checker, batches: Iterator[list[SourceRow]], workers: int, window: int | None = None):
    """(batch, its check results) for each batch, in order, from `workers` forked processes; at most `window`
    batches (4 per worker) are read ahead, so memory does not grow with the input. A worker that dies (killed,
    out of memory) or fails (a bug) ends the run with one line naming what happened and the rows it was checking,
    never a BrokenProcessPool traceback; the pool is shut down either way."""
    window = window or 4 * workers
    states = mp.get_context("fork").RawArray("b", window)  # shared: which batches the workers are on, by slot
    batches = enumerate(batches)
    with one_tokenizer_thread():
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_start_worker,
                                   initargs=(checker, states))
        in_flight = deque()  # (index, batch, future), oldest first

        def submit_next() -> None:
            index, batch = next(batches, (None, None))
            if batch is not None:
                states[index % window] = 0
                in_flight.append((index, batch, pool.submit(_check_in_worker, index % window, batch)))

        try:
            submit_next()
            processes = pool_processes(pool)  # with fork every worker is started at the first submit
            for _ in range(window - 1):
                submit_next()
            while in_flight:
                index, batch, future = in_flight[0]
                try:
                    outcome = future.result()
                except Exception as exc:
                    # the pool's thread joins every worker first: read before that, a dead worker's exit code can
                    # still be missing (its thread and this one both wait on it, and only one gets it)
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise UserError(pool_failure(exc, processes, in_flight, states, window)) from exc
                in_flight.popleft()  # a future holds its result: dropped once used, as pool.map does
                del future
                submit_next()
                yield batch, outcome
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def pool_failure(exc: Exception, processes: list, in_flight, states, window: int) -> str:
    """The one line for a worker that died or failed: what happened, and the rows it was checking."""
    busy = [batch for index, batch, _ in in_flight if states[index % window] == CHECKING] or [in_flight[0][1]]
    rows = " or ".join(row_span(batch) for batch in busy)
    if not isinstance(exc, BrokenProcessPool):
        what = f"a worker process failed with {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    elif exc.__cause__ is not None:  # the pool broke reading a result back, not because a worker ended
        cause = [line for line in str(exc.__cause__).splitlines() if line.strip(" '")]
        what = f"a worker's result could not be read back ({cause[-1].strip() if cause else 'no detail'})"
    else:
        what = worker_ending(processes)
    return (f"cleaning stopped: {what}, while checking rows {rows}; nothing was written. Run again with "
            "--num_proc 1 to clean in one process, or sftlab --debug for the traceback")


def worker_ending(processes: list) -> str:
    """How the worker that broke the pool ended. The pool terminates the others with SIGTERM after one dies,
    so an exit other than that is the one that broke it."""
    codes = [p.exitcode for p in processes if p.exitcode not in (None, 0, -signal.SIGTERM)]
    if not codes:
        return "a worker process ended abruptly"
    if codes[0] == -signal.SIGKILL:
        return "a worker process was killed by SIGKILL (the kernel's out-of-memory killer sends it: check memory)"
    if codes[0] < 0:
        return f"a worker process was killed by {signal.Signals(-codes[0]).name}"
    return f"a worker process exited with code {codes[0]}"


def row_span(batch: list[SourceRow]) -> str:
    first, last = batch[0], batch[-1]
    if first.source == last.source:
        return f"{first.source}:{first.line}-{last.line}"
    return f"{first.source}:{first.line} to {last.source}:{last.line}"


@contextmanager
def one_tokenizer_thread():
    """One encoding thread per worker process while the pool runs (the Rust tokenizer would otherwise start
    a thread per core in every worker, or warn about the fork); the caller's setting is restored after."""
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


# The worker's checker and the shared batch states. They exist in worker processes only: the pool's initializer
# sets them there, and fork hands them over without pickling (the tokenizer and index would be costly to send
# per task; the shared array cannot be sent at all).
_worker_checker = None  # a RowChecker
_worker_states = None


def _start_worker(checker, states) -> None:
    global _worker_checker, _worker_states
    _worker_checker, _worker_states = checker, states


def _check_in_worker(index: int, rows: list[SourceRow]):
    _worker_states[index] = CHECKING
    outcome = _worker_checker.check_batch(rows)
    _worker_states[index] = CHECKED
    return outcome
