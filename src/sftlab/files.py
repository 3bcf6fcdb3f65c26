"""Writing files so that a crash never leaves a half-written one that looks complete (write_atomic for a file,
staged_folder for a folder, move_in for files joining a folder), and the one lock sftlab takes (exclusive_lock)."""

import fcntl
import hashlib
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import xxhash

HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # xxh3: checked on every read, so the fast one


def file_digests(path: Path, *algorithms: str) -> dict[str, str]:
    """The file's hashes by each algorithm, in one read."""
    digests = {name: HASHES[name]() for name in algorithms}
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            for digest in digests.values():
                digest.update(block)
    return {name: digest.hexdigest() for name, digest in digests.items()}


def file_digest(path: Path, algorithm: str = "xxh3_128") -> str:
    return file_digests(path, algorithm)[algorithm]


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
        if path.is_dir() and path.name.startswith(prefix) and match and not pid_alive(int(match.group(1))):
            print(f"removing {path}: left by an interrupted run (PID {match.group(1)} has ended)")
            shutil.rmtree(path, ignore_errors=True)


STAGING = re.compile(r"^\..+-staging-(\d+)-[^-]+$")


def staging_name(name: str) -> str:
    """The prefix of a staging folder for `name` (for tempfile.mkdtemp): hidden, and naming its process."""
    return f".{name}-staging-{os.getpid()}-"


def pid_alive(pid: int) -> bool:
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
    try:
        staging = Path(tempfile.mkdtemp(prefix=staging_name(target.name), dir=target.parent))
    except OSError as exc:  # name the folder asked for, not the hidden staging name
        raise OSError(exc.errno, exc.strerror, str(target)) from None
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


def exclusive_lock(path: Path, wait: bool = True, waiting_for: str | None = None) -> int | None:
    """An exclusive flock(2) on `path` (created if missing): the open descriptor that holds it, or None when
    another process holds it and `wait` is false. The kernel releases it when the process ends, however it ends,
    so a lock is never stale; a forked child closes its copy of the descriptor at once (release_inherited_locks),
    so a worker that outlives its parent cannot keep it either. `waiting_for`: said before waiting on a holder.
    (Not the filelock package: its Unix lock truncates the file on every attempt, which would erase the holder's
    PID that a refused `sftlab train` names.)"""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec (PEP 446)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            return None
        if waiting_for:
            print(f"waiting for {waiting_for} (another process holds {path})", flush=True)
        fcntl.flock(fd, fcntl.LOCK_EX)
    _held_locks.add(fd)
    return fd


def release_lock(fd: int) -> None:
    _held_locks.discard(fd)
    os.close(fd)


_held_locks: set[int] = set()


def release_inherited_locks() -> None:
    """In a forked child: close the descriptors of the parent's locks. flock belongs to the open file, which a fork
    shares: a pool worker left running after its parent was killed would otherwise hold the run's or the
    preparation's lock for ever, and the next command would wait on a process that is not sftlab's."""
    for fd in list(_held_locks):
        try:
            os.close(fd)
        except OSError:
            pass
    _held_locks.clear()


def _prctl():
    """libc's prctl, resolved once in the parent: a forked child must not load libraries (the loader's lock may be
    held by a thread that the fork did not copy)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()
PR_SET_PDEATHSIG, SIGKILL = 1, 9


def die_with_parent(parent: int | None = None) -> None:
    """Linux: this process gets SIGKILL when the one that started it ends, however it ends (SIGKILL included), so
    no worker outlives its run (prctl PR_SET_PDEATHSIG). Elsewhere a no-op. `parent`: the PID it should have; if
    that process already ended before the setting took effect, this one exits now."""
    if _PRCTL is None:
        return
    _PRCTL(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:
        os._exit(1)


_forking = [0]  # the PID that forks, recorded just before: the child checks its parent is still that one


def _in_forked_child() -> None:
    release_inherited_locks()
    die_with_parent(_forking[0])
    # the verb's SIGTERM handler (cli.py) turns it into an exception in the parent; a worker must simply end when
    # its pool terminates it, not raise where it may be writing a result nobody reads any more
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# Every process sftlab forks (its cleaning pool's workers, datatrove's, DataLoader's) drops the parent's locks and
# dies with its parent: one mechanism for all of them, not a line in each pool's initializer.
os.register_at_fork(before=lambda: _forking.__setitem__(0, os.getpid()), after_in_child=_in_forked_child)


def load_yaml(path: Path):
    """A YAML file sftlab reads (a config, a run's sftlab_config.yaml), as PyYAML's safe_load reads it, except that a
    key given twice in one mapping is an error naming the key and both lines: PyYAML keeps the last value without a
    word, and a run once trained at the second of two learning rates that way. Raises yaml.YAMLError."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, str | int | float | bool):
                    continue
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} is given twice (lines {seen[key]} and {line}): keep one",
                        key_node.start_mark)
                seen[key] = line
            return super().construct_mapping(node, deep)

    return yaml.load(Path(path).read_text(encoding="utf-8"), Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def yaml_key_lines(path: Path) -> dict[str, int]:
    """The line of each top-level key of a YAML mapping file (for errors that name a value's line)."""
    import yaml

    try:
        node = yaml.compose(Path(path).read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, OSError, UnicodeDecodeError):
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {str(k.value): k.start_mark.line + 1 for k, _ in node.value}

