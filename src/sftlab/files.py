"""Writing files so that a crash never leaves a half-written one that looks complete (write_atomic for a file,
staged_folder for a folder, move_in for files joining a folder), and the one lock sftlab takes (exclusive_lock)."""

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A staging folder beside `target` (hidden, named for its process, so remove_stale_staging clears a killed
    one's) that becomes `target` by one rename when the block ends without an error, and is removed otherwise: a
    half-written folder is never seen under its name. `target` may exist if it is empty."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target.parent, target.name)
    staging = Path(tempfile.mkdtemp(prefix=staging_name(target.name), dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private; what is written here is shared like any folder
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        staging.rename(target)  # atomic on one filesystem
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def move_in(staging: Path, folder: Path, last: str | None = None) -> None:
    """Moves every file of `staging` into `folder` (each by one rename), `last` after all others, then removes
    `staging`: for outputs that join a folder holding other files, where the file that marks them complete
    must come in last."""
    for item in sorted(Path(staging).iterdir(), key=lambda p: p.name == last):
        os.replace(item, Path(folder) / item.name)
    Path(staging).rmdir()


def exclusive_lock(path: Path, wait: bool = True) -> int | None:
    """An exclusive flock(2) on `path` (created if missing): the open descriptor that holds it, or None when
    another process holds it and `wait` is false. The kernel releases it when the process ends, however it ends,
    so a lock is never stale. (Not the filelock package: its Unix lock truncates the file on every attempt, which
    would erase the holder's PID that a refused `sftlab train` names.)"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
