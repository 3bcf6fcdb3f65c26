"""Writing files so that a crash never leaves a half-written one that looks complete."""

import os
import re
import shutil
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Writes to a temporary name beside `path`, then renames it over `path` (atomic on one filesystem)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def remove_stale_staging(folder: Path, name: str | None = None) -> None:
    """Removes the staging folders in `folder` (of `name` only, if given; see staging_name) whose process has
    ended, with a line: what a killed preparation or merge left behind. One that a live process is still writing
    is left alone."""
    if not Path(folder).is_dir():
        return
    prefix = f".{name}-staging-" if name else "."
    for path in Path(folder).iterdir():
        match = STAGING.match(path.name)
        if path.is_dir() and path.name.startswith(prefix) and match and not _alive(int(match.group(1))):
            print(f"removing {path}: left by an interrupted run (PID {match.group(1)} has ended)")
            shutil.rmtree(path, ignore_errors=True)


STAGING = re.compile(r"^\..+-staging-(\d+)-[^-]+$")


def staging_name(name: str) -> str:
    """The prefix of a staging folder for `name` (for tempfile.mkdtemp): hidden, and naming its process."""
    return f".{name}-staging-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
