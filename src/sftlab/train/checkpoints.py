"""Checkpoints that count only when complete, and the run lock.

The Trainer writes `checkpoint-N/` file by file; a kill in between leaves a folder that looks like a
checkpoint (transformers' get_last_checkpoint takes the highest number, complete or not). Here a checkpoint is
committed by a marker written last, after every file is flushed to disk: `sftlab_commit.json` with each file's
size and SHA-256. `--resume` takes the newest folder whose marker is there and whose files still match it, and
says which newer ones it skipped and why; old checkpoints are deleted only after a newer one is committed.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

from sftlab.errors import UserError
from sftlab.files import write_atomic

MARKER = "sftlab_commit.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
        record[str(path.relative_to(folder))] = {"size": path.stat().st_size, "sha256": sha256(path)}
    write_atomic(folder / MARKER, json.dumps({"files": record}, indent=1) + "\n")
    fsync_path(folder / MARKER)
    fsync_path(folder)


def why_not_committed(folder: Path) -> str | None:
    """None for a complete checkpoint; else what is wrong with it."""
    marker = Path(folder) / MARKER
    if not marker.exists():
        return "no commit marker (its writing was interrupted)"
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
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
        if sha256(path) != expected["sha256"]:
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


def rotate(out: Path, keep: int | None, newest: Path) -> None:
    """After `newest` is committed: keeps it and the `keep` - 1 newest other committed checkpoints, and drops
    older ones and uncommitted leftovers older than `newest`."""
    step = int(CHECKPOINT.match(Path(newest).name).group(1))
    kept = 0
    for folder in checkpoints(out):
        if int(CHECKPOINT.match(folder.name).group(1)) > step:
            continue  # newer than the one just committed: not ours to judge
        # the marker is this run's own commit: re-hashing every kept checkpoint at every save would read
        # gigabytes for nothing (--resume is where the hashes are checked)
        committed = (folder / MARKER).exists()
        if committed and (keep is None or kept < keep):
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)


class RunLock:
    """One `sftlab train` per output_dir: `.sftlab.lock` holds the owner's PID. A lock whose process is gone
    (a killed run) is taken over with a line saying so."""

    def __init__(self, out: Path):
        self.path = Path(out) / ".sftlab.lock"
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and _alive(holder):
                    raise UserError(f"output_dir {self.path.parent} is in use by another sftlab train (PID {holder}); "
                                    f"wait for it, stop it, or choose another output_dir") from None
                print(f"output_dir {self.path.parent}: taking over a stale lock of PID {holder} (no such process)")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.held = True
            return

    def release(self) -> None:
        if self.held and self._holder() == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def _holder(self) -> int | None:
        try:
            return int(self.path.read_text().strip())
        except (OSError, ValueError):
            return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
