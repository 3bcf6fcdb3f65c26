"""Checkpoints that count only when complete, and the run lock.

The Trainer writes `checkpoint-N/` file by file; a kill in between leaves a folder that looks like a
checkpoint (transformers' get_last_checkpoint takes the highest number, complete or not). Here a checkpoint is
committed by a marker written last, after every file is flushed to disk: `sftlab_commit.json` with each file's
size and XXH3-128 hash. `--resume` takes the newest folder whose marker is there and whose files still match it, and
says which newer ones it skipped and why; old checkpoints are deleted only after a newer one is committed.
"""

import os
import re
import shutil
from pathlib import Path

from sftlab.errors import UserError
from sftlab.files import HASHES, exclusive_lock, file_digest, pid_alive, release_lock
from sftlab.run_dir import COMMIT_MARKER, LOCK, read_json, write_json

MARKER = COMMIT_MARKER
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


# XXH3-128: 11 GB/s here against SHA-256's 1.45 (benchmarks/checkpoint_commit.py: a 2.2 GB checkpoint's hashing
# went from 56% of its write time to 7%; a full GLM-4-9B checkpoint is over 100 GB). It detects torn and damaged
# files as well; it is not a defence against someone forging one. Markers written with SHA-256 still verify.


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(folder: Path) -> None:
    """Flushes every file of a written checkpoint to disk, then writes the marker that makes it count."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    record = {}
    for path in files:
        fsync_path(path)
        record[str(path.relative_to(folder))] = {"size": path.stat().st_size, "xxh3_128": file_digest(path)}
    write_json(folder / MARKER, {"files": record}, indent=1)
    fsync_path(folder / MARKER)
    fsync_path(folder)


def why_not_committed(folder: Path) -> str | None:
    """None for a complete checkpoint; else what is wrong with it."""
    marker = Path(folder) / MARKER
    if not marker.exists():
        return "no commit marker (its writing was interrupted)"
    try:
        files = read_json(marker)["files"]
    except (ValueError, KeyError):
        return f"{MARKER} is unreadable"
    if not files:
        return "the commit marker lists no files"
    for name, expected in files.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != expected["size"]:
            return f"{name} has {path.stat().st_size} bytes, {expected['size']} were committed"
        algorithm = next(name for name in HASHES if name in expected)
        if file_digest(path, algorithm) != expected[algorithm]:
            return f"{name} differs from what was committed (damaged)"
    return None


def checkpoints(out: Path) -> list[Path]:
    """checkpoint-N folders in `out`, highest N first."""
    if not Path(out).is_dir():
        return []
    found = [p for p in Path(out).iterdir() if p.is_dir() and CHECKPOINT.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT.match(p.name).group(1)), reverse=True)


def newest_committed(out: Path) -> tuple[Path | None, list[str]]:
    """The newest committed checkpoint (or None), and a line for each newer one skipped."""
    skipped = []
    for folder in checkpoints(out):
        reason = why_not_committed(folder)
        if reason is None:
            return folder, skipped
        skipped.append(f"{folder.name}: {reason}")
    return None, skipped


def rotate(out: Path, keep: int | None, newest: Path, protect: str | None = None) -> None:
    """After `newest` is committed: keeps it and the `keep` - 1 newest other committed checkpoints, and drops
    older ones and uncommitted leftovers older than `newest`. `protect`: a checkpoint's name (the best one so far)
    kept besides them."""
    step = int(CHECKPOINT.match(Path(newest).name).group(1))
    kept = 0
    for folder in checkpoints(out):
        if int(CHECKPOINT.match(folder.name).group(1)) > step or folder.name == protect:
            continue  # newer than the one just committed: not ours to judge; or the best one
        # the marker is this run's own commit: re-hashing every kept checkpoint at every save would read
        # gigabytes for nothing (--resume is where the hashes are checked)
        committed = (folder / MARKER).exists()
        if committed and (keep is None or kept < keep):
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)


class RunLock:
    """One `sftlab train` per output_dir: an exclusive flock(2) on `.sftlab.lock`, which holds the owner's PID.
    The kernel takes the lock and releases it when its process ends, however it ends: two simultaneous starts
    never both get it, and a killed run's lock is never stale. (An O_EXCL file with the PID written after it was
    not atomic: a second start reading in between saw no PID, removed the lock, and both ran.)"""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = exclusive_lock(self.path, wait=False)
            if fd is None:
                holder = self._holder() or "unknown"
                if holder.isdigit() and not pid_alive(int(holder)):
                    raise UserError(f"output_dir {self.path.parent} is locked by a process that PID {holder} (now "
                                    f"ended) started: `fuser {self.path}` names it; stop it, or choose another "
                                    "output_dir")
                raise UserError(f"output_dir {self.path.parent} is in use by another sftlab train (PID {holder}); "
                                f"wait for it, stop it, or choose another output_dir")
            if not self._still_the_file(fd):  # its holder released and removed it while we waited: again
                release_lock(fd)
                continue
            previous = os.pread(fd, 32, 0).decode(errors="replace").strip()
            if previous:
                print(f"output_dir {self.path.parent}: taking over the lock of PID {previous}, which ended without "
                      "releasing it")
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            self.fd = fd
            return

    def _holder(self) -> str:
        try:
            return self.path.read_text(errors="replace").strip()
        except FileNotFoundError:
            return ""

    def _still_the_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # unlinked while still locked: a waiter then sees a new file
            release_lock(self.fd)
        self.fd = None
