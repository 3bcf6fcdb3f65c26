"""The state of duplicate detection, on disk: exact-duplicate digests, the near-duplicate index's LSH buckets and
the texts of the rows in it live in one SQLite file, so cleaning holds only the current batch's share of them
however many rows came before (in memory they took about 1 KB a row: the texts, kept to verify candidates).

A batch is looked up with a few queries (its digests, its buckets), decided in order with what earlier rows of the
same batch added, and written with one insert per table; `commit` makes the state durable together with the
caller's progress record, so a resumed preparation continues from exactly the rows its shards hold. SQLite from
the standard library: a B-tree on disk with a bounded page cache is what this needs, and nothing else is."""

import json
import sqlite3
from pathlib import Path

from sftlab.data.near_dedup import MinHash

SCHEMA = """
CREATE TABLE IF NOT EXISTS exact (digest BLOB PRIMARY KEY, first TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS near_rows (id INTEGER PRIMARY KEY, name TEXT NOT NULL, text TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS buckets (bucket INTEGER NOT NULL, id INTEGER NOT NULL, PRIMARY KEY (bucket, id))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS progress (only INTEGER PRIMARY KEY CHECK (only = 0), state TEXT NOT NULL);
"""
FILE = "dedup.sqlite"  # in the folder that holds it, with SQLite's -wal and -shm files beside it while open
CACHE_KIB = 16 * 1024  # SQLite's page cache: the store's memory, whatever its size on disk
# Representatives per LSH bucket: a row is compared with at most bands x BUCKET_CAP earlier rows, so the cost per
# row stays flat however many rows share a bucket (templated data put thousands in one, and cleaning slowed with the
# row count). A near duplicate whose twin is not among a full bucket's representatives is still found through any
# other band they share (they share most at a Jaccard of 0.9); benchmarks/data_scale.py --shape near_duplicates
# measures how many decisions differ from comparing every pair.
BUCKET_CAP = 16
QUERY_KEYS = 900  # keys per IN (...) query: under SQLite's oldest limit on bound parameters (999)


class DedupStore:
    """Exact and near duplicates of earlier rows, the first occurrence winning, as the rows come in order."""

    def __init__(self, path: Path, minhash: MinHash | None):
        self.minhash = minhash
        self.db = sqlite3.connect(str(path), isolation_level=None)
        self.db.executescript(SCHEMA)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"cache_size=-{CACHE_KIB}", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.next_id = self.db.execute("SELECT coalesce(max(id), -1) + 1 FROM near_rows").fetchone()[0]
        self.db.execute("BEGIN")
        self._clear_batch()

    def _clear_batch(self) -> None:
        self.known_exact, self.known_buckets, self.batch_rows = {}, {}, {}
        self.new_exact, self.new_buckets = [], []

    def start_batch(self, digests: list[bytes], buckets: list[int]) -> None:
        """Reads what earlier batches stored under this batch's digests and buckets."""
        self._clear_batch()
        for keys in _chunks(sorted(set(digests))):
            self.known_exact.update(self.db.execute(
                f"SELECT digest, first FROM exact WHERE digest IN ({','.join('?' * len(keys))})", keys))
        for keys in _chunks(sorted(set(buckets))):
            for bucket, row_id in self.db.execute(
                    f"SELECT bucket, id FROM buckets WHERE bucket IN ({','.join('?' * len(keys))}) ORDER BY bucket, id",
                    keys):
                self.known_buckets.setdefault(bucket, []).append(row_id)

    def first_copy(self, digest: bytes, name: str) -> str | None:
        """The name of the earlier row with this digest; None, and this row is recorded under it."""
        first = self.known_exact.get(digest)
        if first is None:
            self.known_exact[digest] = name
            self.new_exact.append((digest, name))
        return first

    def near_twin(self, name: str, text: str, buckets: list[int]) -> str | None:
        """The name of an earlier row in the index whose text's 5-gram Jaccard similarity with `text` is at least
        the threshold, candidates taken band by band in the order they were added; None, and this row joins the
        index. LSH only proposes candidates: the exact similarity decides, so the signature's noise never rejects
        a row."""
        checked, mine = set(), None
        for bucket in buckets:
            for other in self.known_buckets.get(bucket, ()):
                if other in checked:
                    continue
                other_name, other_text = self._row(other)
                mine = mine if mine is not None else self.minhash.shingles(text)
                if self.minhash.jaccard_of(mine, self.minhash.shingles(other_text)) >= self.minhash.threshold:
                    return other_name
                checked.add(other)
        row_id, self.next_id = self.next_id, self.next_id + 1
        self.batch_rows[row_id] = (name, text)
        for bucket in buckets:
            members = self.known_buckets.setdefault(bucket, [])
            if len(members) < BUCKET_CAP:  # a full bucket keeps its first rows as its representatives
                members.append(row_id)
                self.new_buckets.append((bucket, row_id))
        return None

    def _row(self, row_id: int) -> tuple[str, str]:
        if row_id in self.batch_rows:
            return self.batch_rows[row_id]
        return self.db.execute("SELECT name, text FROM near_rows WHERE id = ?", (row_id,)).fetchone()

    def end_batch(self) -> None:
        """Writes what the batch added (inside the open transaction: durable at the next commit)."""
        self.db.executemany("INSERT INTO exact VALUES (?, ?)", self.new_exact)
        self.db.executemany("INSERT INTO near_rows VALUES (?, ?, ?)",
                            ((row_id, name, text) for row_id, (name, text) in self.batch_rows.items()))
        self.db.executemany("INSERT INTO buckets VALUES (?, ?)", self.new_buckets)
        self._clear_batch()

    def commit(self, progress: dict | None = None) -> None:
        """Makes everything so far durable, with `progress` (the caller's record of the rows it covers) in the
        same transaction: after a crash, the state and the record agree."""
        if progress is not None:
            self.db.execute("INSERT OR REPLACE INTO progress VALUES (0, ?)", (json.dumps(progress),))
        self.db.execute("COMMIT")
        self.db.execute("BEGIN")

    def progress(self) -> dict | None:
        row = self.db.execute("SELECT state FROM progress WHERE only = 0").fetchone()
        return None if row is None else json.loads(row[0])

    def close(self) -> None:
        self.db.execute("ROLLBACK")  # what was not committed is not part of any record
        self.db.close()


def _chunks(keys: list) -> list[list]:
    return [keys[i:i + QUERY_KEYS] for i in range(0, len(keys), QUERY_KEYS)]


def remove_store(folder: Path) -> None:
    """Removes a closed store's file and SQLite's journal files from `folder`: the state is done with."""
    for path in Path(folder).glob(f"{FILE}*"):
        path.unlink()
