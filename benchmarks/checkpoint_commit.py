"""What committing a checkpoint costs at save time: the commit marker hashes every file the Trainer wrote.

    .venv/bin/python benchmarks/checkpoint_commit.py [--gb 2.2] [--repeats 3]

Writes a checkpoint-like folder of --gb gigabytes (an optimizer.pt of 2/3 of it, an adapter or model file of 1/3,
random bytes: nothing compresses or dedups), then times, interleaved and each a median of --repeats:
  write   the files written and fsynced (what the Trainer's save plus sftlab's fsync cost without hashing);
  sha256  hashing them with SHA-256 (sftlab's marker before);
  xxh3    hashing them with xxHash's XXH3-128 (the marker now);
and prints each and the hashing overhead as a share of the write. The files are read back from the page cache,
as they are right after a save (the commit runs just after the Trainer wrote them).
"""

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path

import xxhash

BLOCK = 1 << 20


def write(folder: Path, gigabytes: float) -> None:
    sizes = {"optimizer.pt": int(gigabytes * 2 / 3 * 2**30), "model.safetensors": int(gigabytes / 3 * 2**30)}
    chunk = os.urandom(64 * BLOCK)
    for name, size in sizes.items():
        with open(folder / name, "wb") as f:
            left = size
            while left > 0:
                f.write(chunk[:min(left, len(chunk))])
                left -= len(chunk)
            f.flush()
            os.fsync(f.fileno())


def hash_all(folder: Path, make) -> None:
    for path in sorted(folder.iterdir()):
        digest = make()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(BLOCK), b""):
                digest.update(block)
        digest.hexdigest()


def timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    times = {"write": [], "sha256": [], "xxh3": []}
    print(f"{args.gb:g} GB checkpoint; {os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        folder = Path(tmp)
        for repeat in range(args.repeats):  # interleaved: write, sha256, xxh3, write, ...
            times["write"].append(timed(lambda: write(folder, args.gb)))
            times["sha256"].append(timed(lambda: hash_all(folder, hashlib.sha256)))
            times["xxh3"].append(timed(lambda: hash_all(folder, xxhash.xxh3_128)))
            print(f"  round {repeat + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    write_s = statistics.median(times["write"])
    print(f"\nmedian of {args.repeats} (load average after: {os.getloadavg()[0]:.2f})")
    print("| step | seconds | GB/s | vs the write |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in times.items():
        seconds = statistics.median(values)
        print(f"| {name} | {seconds:.2f} | {args.gb / seconds:.2f} | {seconds / write_s:.0%} |")


if __name__ == "__main__":
    main()
