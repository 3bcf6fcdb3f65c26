"""The one error type a user sees as a single line (exit code 2) instead of a traceback, and the line for a
failure of the machine rather than the input (a full disk, a read-only or unwritable folder: exit code 1)."""

import errno
import sys
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
