"""The one error type a user sees as a single line (exit code 2) instead of a traceback, and the line for a
failure of the machine rather than the input (a full disk, a read-only or unwritable folder: exit code 1)."""

import errno
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from sftlab.environment import cache_root


class UserError(Exception):
    """Bad input from the user: a path, a config key, a data file. The message says what to do."""


def report(verb: str, error: UserError) -> None:
    """Prints the error's line, once: a process that must say it before others act (the main process of a
    multi-process run, before it releases the others) reports it early, and the CLI then prints nothing more."""
    if not getattr(error, "reported", False):
        print(f"sftlab {verb}: error: {error}", file=sys.stderr, flush=True)
        error.reported = True


# what the OS says when a write fails for want of space or permission
WRITE_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "the operation is not permitted"}
# torch's zip writer and safetensors report a failed write without an errno
NO_SPACE_SIGNS = ("PytorchStreamWriter failed writing", "inline_container.cc", "StorageFull", "No space left")


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, when it is the machine's doing (full disk, read-only or unwritable folder); else None."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRORS:
        return WRITE_ERRORS[exc.errno]
    if isinstance(exc, RuntimeError) or type(exc).__name__ == "SafetensorError":
        text = str(exc)
        if any(sign in text for sign in NO_SPACE_SIGNS):
            return "the write failed (no space left on the device, or the disk failed)"
    return None


def os_failure_line(exc: BaseException) -> str | None:
    """One line naming the path and what to do, for a write_failure; else None."""
    why = write_failure(exc)
    if why is None:
        return None
    path = getattr(exc, "filename", None)
    where = f" writing {path}" if path else ""
    advice = ("free space and run it again" if "space" in why or "quota" in why
              else "choose a writable folder (or fix its permissions) and run it again")
    if path and Path(path).resolve().is_relative_to(cache_root().resolve()):
        advice += "; the prepared-data cache is under SFTLAB_HOME, which can point elsewhere"
    return f"{why}{where}: {advice}"


class MessageError(ValueError):
    """A conversation that cannot be rendered for training (wrong roles, order or types)."""


# Errors that mean "this file is not what it should be" (a truncated, emptied or foreign file), matched by class
# and module name so that this module need not import the libraries that raise them.
PARSE_ERRORS = {"JSONDecodeError", "YAMLError", "UnicodeDecodeError", "SafetensorError", "BadZipFile", "EOFError",
                "UnpicklingError"}
PARSER_MODULES = ("yaml", "safetensors", "tokenizers", "gguf", "json", "struct", "zipfile")
# the data and model files a local variable may name (not source files: an import's frames hold those)
PATH_HINTS = (".json", ".jsonl", ".yaml", ".yml", ".safetensors", ".gguf", ".txt", ".parquet", ".csv", ".model",
              ".bin")


def _is_parse_error(exc: BaseException) -> bool:
    return bool({klass.__name__ for klass in type(exc).__mro__} & PARSE_ERRORS) or \
        type(exc).__module__.split(".")[0] in PARSER_MODULES


# what a reader raises on a file that is not what it expects (a missing key, a wrong type, a short read)
READ_ERRORS = (ValueError, KeyError, IndexError, TypeError, AttributeError, EOFError, AssertionError)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def file_being_read(exc: BaseException) -> str | None:
    """The file sftlab (or a library it called) was reading when `exc` was raised: an OSError's own filename,
    else the innermost frame holding a local variable that names an existing file. Found by looking, not by
    each reader saying so, so that a reader written tomorrow is covered too."""
    for link in _chain(exc):
        name = getattr(link, "filename", None)
        if isinstance(name, (str, os.PathLike)) and str(name):
            return str(name)
    if not isinstance(exc, (*READ_ERRORS, OSError)) and not _is_parse_error(exc):
        return None  # an import, memory or interrupt error says nothing about a file
    for link in _chain(exc):
        for frame, _ in reversed(list(traceback.walk_tb(link.__traceback__))):
            for value in list(frame.f_locals.values()):
                if isinstance(value, os.PathLike) or (isinstance(value, str) and 0 < len(value) < 4096
                                                      and value.endswith(PATH_HINTS)):
                    path = os.fspath(value)
                    try:
                        if os.path.isfile(path):
                            return path
                    except (OSError, ValueError):
                        continue
    return None


NOT_FOUND = {errno.ENOENT: "does not exist", errno.ENOTDIR: "is a file where a folder is expected (or a path "
             "through a file)", errno.EISDIR: "is a folder where a file is expected",
             errno.ENAMETOOLONG: "is too long a name", errno.ELOOP: "loops through symbolic links"}


def failure_line(exc: BaseException) -> tuple[str, int, bool]:
    """One line for an error sftlab did not turn into a UserError, its exit code (1 for the machine's faults: a full
    disk, an unwritable folder, sftlab's own bug; 2 for the user's input: a missing path, a damaged file in a folder
    the user named), and whether its traceback is worth a log (not for a full disk or a missing path: the line
    says all)."""
    line = os_failure_line(exc)
    if line is not None:
        return line, 1, False
    path = file_being_read(exc)
    if isinstance(exc, OSError) and exc.errno in NOT_FOUND:
        return f"{path or exc.strerror}: {NOT_FOUND[exc.errno]}: check the path and run it again", 2, False
    if isinstance(exc, OSError):
        return f"{path or 'a file'}: {exc.strerror or exc}", 1, True
    what = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else 'no message'}"
    if path is not None:
        return (f"{path} could not be read ({what}): it may be damaged, truncated or not the file sftlab expects "
                f"there (restore it, or recreate it with the verb that wrote it); if it is whole, this is sftlab's "
                f"fault: please report it with the traceback"), 2, True
    if _is_parse_error(exc):
        return f"a file could not be read ({what}): check the files named in the command", 2, True
    return f"internal error ({what}): this is sftlab's fault; please report it with its traceback", 1, True


def save_traceback(verb: str, exc: BaseException) -> Path | None:
    """The full traceback into a log under the cache (or the temporary folder, where the cache is unwritable);
    its path, or None where no log could be written."""
    text = "".join(traceback.format_exception(exc))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (cache_root() / "logs", Path(tempfile.gettempdir()) / "sftlab-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{stamp}-{verb.replace(' ', '-')}-{os.getpid()}.log"
            path.write_text(f"sftlab {verb}\n{text}", encoding="utf-8")
            return path
        except OSError:
            continue
    return None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the verb is (as Ctrl-C raises KeyboardInterrupt), so that its `finally` blocks and the
    error boundary run: a process killed by SIGTERM otherwise ends with no line and whatever it had open."""

    signal_name = "SIGTERM"


def raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextmanager
def interrupt_note(note):
    """While the block runs, an interrupt (Ctrl-C, SIGTERM) ends the verb with `note()`'s line: what was committed
    and how to resume. The error boundary in cli.py prints it."""
    try:
        yield
    except KeyboardInterrupt as exc:
        if not hasattr(exc, "note"):  # the innermost stage says it, as it stood when the interrupt came
            try:
                exc.note = note()
            except Exception:  # the note reads files; an interrupt must still end with its one line
                exc.note = "run it again"
        raise


def interrupted_line(exc: KeyboardInterrupt) -> str:
    name = getattr(exc, "signal_name", "SIGINT")
    return f"interrupted ({name}): {getattr(exc, 'note', 'nothing is left half-written; run it again')}"
