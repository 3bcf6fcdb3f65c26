"""Data at scale: the streaming, sharded and datatrove paths give the single-process result exactly, an interrupted
preparation resumes after its last complete shard, the length statistics are numpy's, and memory does not grow
with the number of rows."""

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from sftlab import cli
from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments, DataArguments
from sftlab.data import cleaner, prepare
from sftlab.data.lengths import Lengths, length_stats, max_length_suggestion
from sftlab.data.prepare import prepare_data, weighted_indices
from sftlab.data.sources import weighted
from sftlab.model.load import load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from data_pipeline import make_rows  # noqa: E402  the data benchmark's generated rows
from dirty_data import AUTO_REASONS, with_defects  # noqa: E402  and its planted defects

OUTPUTS = ["clean.jsonl", "lengths.png", "rejected.jsonl", "report.json", "report.md"]
FLAGS = ["--model", "sftlab:tiny-glm4", "--max_length", "1024"]


@pytest.fixture(scope="module")
def dirty_file(tmp_path_factory):
    """2,000 generated rows with planted defects of every reason a default-settings file can have."""
    path = tmp_path_factory.mktemp("scale") / "dirty.jsonl"
    path.write_bytes(b"\n".join(with_defects(make_rows(2000, seed=3), 1024, seed=3, reasons=AUTO_REASONS,
                                             share=0.03)) + b"\n")
    return path


def clean_cli(path: Path, out: Path, *flags) -> dict:
    assert cli.main(["data", "clean", str(path), "--output", str(out), *FLAGS, *flags]) == 0
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS  # nothing of the work (duplicate state, task files)
    return {name: (out / name).read_bytes() for name in OUTPUTS}


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_clean_is_identical_in_one_process_in_the_pool_and_on_two_datatrove_workers(tiny_model_dir, dirty_file,
                                                                                   tmp_path, monkeypatch):
    single = clean_cli(dirty_file, tmp_path / "single", "--num_proc", "1")
    report = json.loads(single["report.json"])
    assert set(report["reasons"]) == set(AUTO_REASONS) and report["kept"] + report["rejected"] == report["rows_read"]
    monkeypatch.setattr(cleaner, "BATCH_ROWS", 64)  # many batches: the pool's window turns over, the tasks interleave
    monkeypatch.setattr(cleaner, "PARALLEL_MIN_ROWS", 128)
    assert clean_cli(dirty_file, tmp_path / "pool", "--num_proc", "2") == single
    assert clean_cli(dirty_file, tmp_path / "datatrove", "--datatrove_tasks", "2", "--num_proc", "2") == single
    assert clean_cli(dirty_file, tmp_path / "datatrove3", "--datatrove_tasks", "3", "--num_proc", "2") == single


def prepared(data: prepare.PreparedData) -> dict:
    rejected = data.rejected.read_text(encoding="utf-8")
    return {"train": data.train.to_dict(), "test": data.test.to_dict(), "heldout": list(data.heldout),
            "rejected": rejected, "report": data.report, "examples": data.examples}


@pytest.mark.slow  # in CI's whole run; kept out of the quick loop for its time
def test_preparation_is_identical_in_shards_resumed_and_on_datatrove(tiny_model_dir, dirty_file, tmp_path,
                                                                     monkeypatch, capsys):
    renderer = ChatRenderer(load_tokenizer(tiny_model_dir), 1024)
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"instruction": f"another question {i}", "output": f"another answer {i}"})
                             + "\n" for i in range(300)))
    args = DataArguments(data_files=[str(dirty_file), json.dumps({"path": str(other), "weight": 1.5})],
                         test_size=0.05)

    def fresh(**clean_args):  # a new cache home per variant: each prepares from scratch
        monkeypatch.setenv("SFTLAB_HOME", str(tmp_path / f"home-{len(list(tmp_path.glob('home-*')))}"))
        return prepare_data(args, CleanArguments(**clean_args), renderer)

    whole = fresh(num_proc=1)
    expected = prepared(whole)
    assert expected["report"]["datasets"][str(other)]["train_rows"] == len(whole.train) - sum(
        d["train_rows"] for name, d in expected["report"]["datasets"].items() if name != str(other))
    manifest = json.loads((whole.folder / "manifest.json").read_text())
    assert [s["file"] for s in manifest["shards"]] == ["shards/00000.arrow"]
    assert manifest["rows"] == expected["report"]["kept"]

    monkeypatch.setattr(cleaner, "BATCH_ROWS", 64)
    monkeypatch.setattr(prepare, "SHARD_BATCHES", 4)  # 256 rows read a shard
    sharded = fresh(num_proc=1)
    assert prepared(sharded) == expected
    manifest = json.loads((sharded.folder / "manifest.json").read_text())
    assert len(manifest["shards"]) == 10 and sum(s["rows"] for s in manifest["shards"]) == expected["report"]["kept"]
    assert sum(s["tokens"] for s in manifest["shards"]) == manifest["tokens"]
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])

    # interrupted after 3 shards (a batch of the 4th was being written): the run again resumes after the third
    calls = {"n": 0}
    add_batch = cleaner.Cleaner.add_batch

    def dies_at_batch_14(self, *a):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        add_batch(self, *a)

    monkeypatch.setattr(cleaner.Cleaner, "add_batch", dies_at_batch_14)
    with pytest.raises(KeyboardInterrupt):
        fresh(num_proc=1)
    home = Path(prepare.cache_root())
    partial = next((home / "datasets").glob(".*.partial"))
    assert sorted(p.name for p in (partial / "shards").iterdir()) == ["00000.arrow", "00001.arrow", "00002.arrow",
                                                                     "00003.arrow.tmp"]
    monkeypatch.setattr(cleaner.Cleaner, "add_batch", add_batch)
    capsys.readouterr()
    resumed = prepare_data(args, CleanArguments(num_proc=1), renderer)
    assert f"3 shards done, {3 * 256:,} rows read; reading on from there" in capsys.readouterr().out
    assert prepared(resumed) == expected and not partial.exists()

    on_datatrove = fresh(datatrove_tasks=2, num_proc=2)
    assert prepared(on_datatrove) == expected
    assert sorted(p.name for p in on_datatrove.folder.iterdir()) == [
        ".lock", "manifest.json", "prepared.json", "rejected.jsonl", "shards", "test_rows.npy", "train_rows.npy"]


def test_length_statistics_from_counts_are_numpys_from_every_row():
    rng = random.Random(0)
    for n in (1, 2, 7, 100, 4001):
        pairs = [(rng.randint(1, 900), rng.choice([1, 2, 3, rng.randint(1, 3000)])) for _ in range(n)]
        lengths = Lengths()
        for prompt, response in pairs:
            lengths.add(prompt, response)
        totals = np.array([p + r for p, r in pairs])
        for counts, values in ((lengths.prompt, [p for p, _ in pairs]), (lengths.total, totals)):
            array = np.asarray(values)
            expected = {"n": n, "mean": round(float(array.mean()), 1),
                        **{f"p{p}": int(np.percentile(array, p, method="lower")) for p in (50, 90, 95, 99)},
                        "max": int(array.max())}
            assert length_stats(counts) == expected
        supervised = np.array([r for _, r in pairs])
        for row in max_length_suggestion(lengths):
            over = totals > row["max_length"]
            assert row["samples_lost"] == round(float(over.mean()), 4)
            assert row["supervised_tokens_lost"] == round(float(supervised[over].sum() / supervised.sum()), 4)
        assert Lengths.from_state(json.loads(json.dumps(lengths.to_state()))).stats() == lengths.stats()


def test_weighted_index_arrays_draw_the_rows_the_list_version_draws():
    rng = random.Random(1)
    source_of = np.array([rng.randrange(3) for _ in range(500)], dtype=np.int32)
    indices = np.sort(np.array(rng.sample(range(500), 400), dtype=np.int64))
    names = ["a.jsonl", "b.jsonl", "c.jsonl"]
    weights = {"a.jsonl": 2.0, "b.jsonl": 0.5, "c.jsonl": 1.5}
    expected = weighted(indices.tolist(), [names[s] for s in source_of], weights, seed=42)
    assert weighted_indices(indices, source_of, names, weights, seed=42).tolist() == expected
    assert Counter(expected)[int(indices[source_of[indices] == 0][0])] == 2


# Peak resident memory of `sftlab data clean` in one process, in a child (getrusage of a fresh interpreter's
# children covers that command alone)
MEASURED = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, code)")


def peak_kb(path: Path, out: Path) -> int:
    command = [sys.executable, "-m", "sftlab.cli", "data", "clean", str(path), "--output", str(out), *FLAGS,
               "--num_proc", "1"]
    result = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True, text=True, check=True)
    peak, code = map(int, result.stdout.split())
    assert code == 0
    return peak


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_rows(tiny_model_dir, tmp_path):
    """A file 4x larger (24,000 rows, not 6,000) peaks within 10% of the smaller one's memory. Before streaming,
    memory grew about 16 KB a row: 290 MB more for the larger file."""
    rows = make_rows(24_000, seed=4)
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    for path, n in ((small, 6000), (large, 24_000)):
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[:n]), encoding="utf-8")
    small_kb, large_kb = peak_kb(small, tmp_path / "out-small"), peak_kb(large, tmp_path / "out-large")
    assert large_kb <= 1.10 * small_kb, (small_kb, large_kb)


@pytest.mark.slow
def test_the_datatrove_script_on_ray_in_local_mode_prepares_what_train_reads(tiny_model_dir, dirty_file, tmp_path):
    """scripts/prepare_on_datatrove.py with Ray's executor (a local Ray cluster): stage 1 as 2 Ray tasks, stage 2
    here; the same prepared data as `sftlab data prepare` in one process."""
    pytest.importorskip("ray")
    import os

    import yaml

    from helpers import REPO

    config = yaml.safe_load((REPO / "configs/demo.yaml").read_text())
    config.update(data_files=[str(dirty_file)], max_length=1024)
    (tmp_path / "ray.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    homes = {}
    for name, command in (("ray", [sys.executable, str(REPO / "scripts/prepare_on_datatrove.py"), "--config",
                                   str(tmp_path / "ray.yaml"), "--tasks", "2", "--executor", "ray",
                                   "--mem_per_cpu_gb", "1"]),
                          ("single", [sys.executable, "-m", "sftlab.cli", "data", "prepare", "--config",
                                      str(tmp_path / "ray.yaml"), "--num_proc", "1"])):
        homes[name] = tmp_path / f"home-{name}"
        result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                                env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
                                     "SFTLAB_HOME": str(homes[name])})
        assert result.returncode == 0, result.stderr[-3000:]
    folders = {name: next((home / "datasets").iterdir()) for name, home in homes.items()}
    assert folders["ray"].name == folders["single"].name  # the same content hash: train finds either
    for name in ("manifest.json", "rejected.jsonl", "train_rows.npy", "test_rows.npy", "shards/00000.arrow"):
        assert (folders["ray"] / name).read_bytes() == (folders["single"] / name).read_bytes(), name
