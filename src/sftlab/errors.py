"""The one error type a user sees as a single line (exit code 2) instead of a traceback."""


class UserError(Exception):
    """Bad input from the user: a path, a config key, a data file. The message says what to do."""
