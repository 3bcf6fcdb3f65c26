"""Why sftlab keeps its own MinHash rather than datatrove's MinhashDedupSignature: signatures per second on the
same normalized conversations (data_pipeline.py's generated rows, as cleaning normalizes them), interleaved,
median of 3. datatrove's needs spaCy for its word tokenizer (`pip install spacy`; not a dependency of sftlab).

    .venv/bin/python benchmarks/minhash_choice.py [--rows 10000]

sftlab's: character 5-grams (no word segmenter: Chinese text works as it is), 64 permutations, multiply-shift
hashing in numpy, 32 texts per numpy call. datatrove's: word 5-grams from its English tokenizer (spaCy), SHA-1
shingles (its xxhash option fails on str with xxhash 3), 5 buckets x 12 hashes (the same 64-ish permutations
as sftlab's 5 bands of 12). Its later stages (buckets, cluster by union-find, filter) keep one row per cluster of
transitively similar rows, not sftlab's first occurrence of each near pair, so its results would differ too.
"""

import argparse
import statistics
import tempfile
import time

from data_pipeline import make_rows
from sftlab.data.clean import dedup_text
from sftlab.data.convert import to_messages
from sftlab.data.near_dedup import MinHash


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=10_000)
    args = parser.parse_args()
    texts = [dedup_text(to_messages(row, "alpaca", None)[0]) for row in make_rows(args.rows)]
    ours = MinHash(0.9)
    try:
        from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
        from datatrove.utils.hashing import HashConfig

        theirs = MinhashDedupSignature(output_folder=tempfile.mkdtemp(), config=MinhashConfig(
            n_grams=5, num_buckets=5, hashes_per_bucket=12, hash_config=HashConfig(hash_fc="sha1")))
    except ImportError as exc:
        raise SystemExit(f"datatrove's MinHash cannot run here: {exc}") from None

    def datatrove_signatures():
        for text in texts:
            shingles = theirs.get_shingles(text)
            if shingles.size:  # under 5 words: no shingle (datatrove's own run() skips such rows)
                theirs.get_signature(shingles)

    runs = {"sftlab": [], "datatrove": []}
    for _ in range(3):
        for name, work in (("sftlab", lambda: ours.signatures_of(texts)), ("datatrove", datatrove_signatures)):
            started = time.perf_counter()
            work()
            runs[name].append(time.perf_counter() - started)
    rate = {name: len(texts) / statistics.median(seconds) for name, seconds in runs.items()}
    for name, value in rate.items():
        print(f"{name:10s} {value:10,.0f} signatures/s (median of 3, {len(texts):,} texts)")
    print(f"sftlab/datatrove: {rate['sftlab'] / rate['datatrove']:.1f}x")


if __name__ == "__main__":
    main()
