"""The one error type a user sees as a single line (exit code 2) instead of a traceback."""

import sys


class UserError(Exception):
    """Bad input from the user: a path, a config key, a data file. The message says what to do."""


def report(verb: str, error: UserError) -> None:
    """Prints the error's line, once: a process that must say it before others act (the main process of a
    multi-process run, before it releases the others) reports it early, and the CLI then prints nothing more."""
    if not getattr(error, "reported", False):
        print(f"sftlab {verb}: error: {error}", file=sys.stderr, flush=True)
        error.reported = True
