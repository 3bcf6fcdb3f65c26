"""The worker-pool path of cleaning on the inputs that take its unusual branches: files that hold a rejected row
of every reason (a worker once could not hand a rejection back, and the whole run died with BrokenProcessPool),
workers that die or fail, and a --strict stop while the pool runs."""

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from sftlab import cli
from sftlab.chat_format import ChatRenderer
from sftlab.config import CleanArguments
from sftlab.data import clean, cleaner
from sftlab.data.clean import REASONS
from sftlab.data.cleaner import clean_rows
from sftlab.data.load import SourceRow
from sftlab.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from data_pipeline import make_rows  # noqa: E402  the data benchmark's generated rows
from dirty_data import AUTO_REASONS, EVERY_REASON, with_defects  # noqa: E402  and its planted defects

OUTPUTS = ["clean.jsonl", "lengths.png", "rejected.jsonl", "report.json", "report.md"]
EVERY_REASON_FLAGS = ["--model", "sftlab:tiny-glm4", "--max_length", "1024", "--data_format", "sharegpt",
                      "--min_response_chars", "2", "--max_row_bytes", "65536"]


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.fixture(scope="module")
def every_reason_file(tmp_path_factory):
    """1,200 generated rows and 18 planted defects covering every reason sftlab has: three pool batches."""
    lines = with_defects(make_rows(1200, seed=1), 1024, seed=1, reasons=EVERY_REASON, fmt="sharegpt")
    return write_lines(tmp_path_factory.mktemp("pool") / "every_reason.jsonl", lines)


def clean_cli(path: Path, out: Path, *flags) -> dict:
    assert cli.main(["data", "clean", str(path), "--output", str(out), *flags]) == 0
    return {name: (out / name).read_bytes() for name in OUTPUTS}


def test_pool_and_serial_write_identical_outputs_with_every_reason(tiny_model_dir, every_reason_file, tmp_path):
    serial = clean_cli(every_reason_file, tmp_path / "serial", *EVERY_REASON_FLAGS, "--num_proc", "1")
    pooled = clean_cli(every_reason_file, tmp_path / "pool", *EVERY_REASON_FLAGS, "--num_proc", "2")
    assert sorted(serial) == OUTPUTS
    assert pooled == serial  # clean.jsonl, rejected.jsonl, report.json, report.md and the plot, byte for byte
    report = json.loads(serial["report.json"])
    # every reason sftlab has, reported; but tools_unsupported, which needs a template that renders no tools
    # (the tiny GLM-4's renders them: tests/data/test_clean.py checks it on one that does not)
    assert set(report["reasons"]) == set(REASONS) - {"tools_unsupported"} == set(EVERY_REASON)
    assert report["kept"] + report["rejected"] == report["rows_read"] == 1218
    rejected = [json.loads(line) for line in serial["rejected.jsonl"].splitlines()]
    assert len(rejected) == report["rejected"] and {r["reason"] for r in rejected} == set(EVERY_REASON)


@pytest.mark.slow
def test_the_reported_crash_is_gone(tiny_model_dir, tmp_path, monkeypatch):
    """The issue's reproduction: 5,000 generated rows and one boilerplate reply, or one empty reply, through the
    default path (over the pool threshold, one worker per core), by `data clean` and by train's preparation."""
    from sftlab.config import DataArguments
    from sftlab.data.prepare import prepare_data
    from sftlab.model.load import load_tokenizer

    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # the pool path on any machine
    rows = [json.dumps(r, ensure_ascii=False).encode() for r in make_rows(5000)]
    for bad in ("作为一个AI语言模型，我无法回答。", ""):
        path = write_lines(tmp_path / f"repro-{len(bad)}.jsonl", rows + [json.dumps(
            {"instruction": "你好", "input": "", "output": bad}, ensure_ascii=False).encode()])
        report = json.loads(clean_cli(path, tmp_path / f"out-{len(bad)}")["report.json"])
        reason = "boilerplate" if bad else "empty_response"
        assert report["rows_read"] == 5001 and report["reasons"][reason] == 1
        assert report["kept"] + report["rejected"] == 5001
    renderer = ChatRenderer(load_tokenizer(tiny_model_dir), 1024)
    data = prepare_data(DataArguments(data_files=[str(path)], test_size=0.05), CleanArguments(), renderer)
    assert data.report["reasons"]["empty_response"] == 1 and data.report["rows_read"] == 5001
    assert len(data.train) + len(data.test) == data.report["kept"] == 5001 - data.report["rejected"]


@pytest.mark.slow
def test_tens_of_thousands_of_dirty_rows_by_pool_and_serially(tiny_model_dir, tmp_path):
    """20,000 rows with 1.5% planted defects (every reason a default-settings file can have): 40 pool batches."""
    path = write_lines(tmp_path / "large.jsonl", with_defects(make_rows(20_000, seed=2), 1024, seed=2))
    serial = clean_cli(path, tmp_path / "serial", "--model", "sftlab:tiny-glm4", "--max_length", "1024",
                       "--num_proc", "1")
    pooled = clean_cli(path, tmp_path / "pool", "--model", "sftlab:tiny-glm4", "--max_length", "1024",
                       "--num_proc", "2")
    assert pooled == serial
    report = json.loads(serial["report.json"])
    assert set(report["reasons"]) == set(AUTO_REASONS) and report["rows_read"] == 20_300
    assert report["kept"] + report["rejected"] == report["rows_read"]


def generated_rows(n: int) -> list[SourceRow]:
    return [SourceRow("big.jsonl", i + 1, {"instruction": f"问题 {i} 是什么？", "input": "", "output": f"答案是 {i}。"})
            for i in range(n)]


def planted_failure(monkeypatch, failure):
    """Makes a worker (never this process) fail with `failure` on the batch that holds line 1200."""
    check_batch, parent = clean.RowChecker.check_batch, os.getpid()

    def failing(self, rows):
        if os.getpid() != parent and any(r.line == 1200 for r in rows):
            failure()
        return check_batch(self, rows)

    monkeypatch.setattr(clean.RowChecker, "check_batch", failing)


@pytest.mark.parametrize("failure, what", [
    (lambda: os.kill(os.getpid(), signal.SIGKILL),
     "a worker process was killed by SIGKILL (the kernel's out-of-memory killer sends it: check memory)"),
    (lambda: os._exit(3), "a worker process exited with code 3"),
    (lambda: {}["bug"], "a worker process failed with KeyError: 'bug'"),
    (lambda: (_ for _ in ()).throw(MemoryError("no room")), "a worker process failed with MemoryError: no room"),
])
def test_a_worker_that_dies_or_fails_is_one_line_naming_the_rows(tokenizer, monkeypatch, failure, what):
    planted_failure(monkeypatch, failure)
    with pytest.raises(UserError) as error:
        clean_rows(generated_rows(3000), CleanArguments(num_proc=2), ChatRenderer(tokenizer, 256))
    message = str(error.value)
    assert message.startswith(f"cleaning stopped: {what}, while checking rows ") and "\n" not in message
    assert "big.jsonl:1025-1536" in message  # the batch that holds line 1200 (batches of 512 rows)
    assert message.endswith("nothing was written. Run again with --num_proc 1 to clean in one process, or "
                            "sftlab --debug for the traceback")


def test_the_cli_prints_one_line_when_a_worker_is_killed(tiny_model_dir, tmp_path, monkeypatch, capsys):
    planted_failure(monkeypatch, lambda: os.kill(os.getpid(), signal.SIGKILL))
    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(r.row).encode() for r in generated_rows(3000)])
    assert cli.main(["data", "clean", str(path), "--output", str(tmp_path / "out"), "--num_proc", "2"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("cleaning:")]  # not the bar
    assert "Traceback (most recent call last)" not in err and len(lines) == 1
    assert lines[0].startswith("sftlab data: error: cleaning stopped: a worker process was killed by SIGKILL (the "
                               "kernel's out-of-memory killer sends it: check memory), while checking rows ")
    # the killed worker's batch; under load the other worker may still be on an earlier one, named too
    assert f"{path}:1025-1536" in lines[0]
    assert not (tmp_path / "out").exists()


def test_a_strict_stop_while_the_pool_runs_shuts_it_down(tokenizer):
    rows = generated_rows(3000)
    rows[1500] = SourceRow("big.jsonl", 1501, {"instruction": 5, "output": "x"})
    with pytest.raises(UserError, match="big.jsonl:1501: malformed_record: field 'instruction'"):
        clean_rows(rows, CleanArguments(num_proc=2, strict=True), ChatRenderer(tokenizer, 256))
    import multiprocessing

    assert multiprocessing.active_children() == []  # the workers are gone, not left to run the other batches


@pytest.mark.parametrize("num_proc, rows, expected", [(None, 100, 1), (None, 5000, 2), (1, 5000, 1), (2, 100, 1),
                                                      (2, 600, 2), (8, 5000, 8)])
def test_worker_count(monkeypatch, num_proc, rows, expected):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert cleaner.worker_count(num_proc, rows) == expected


def test_num_proc_below_one_is_refused():
    with pytest.raises(ValueError, match="num_proc: must be an integer >= 1, or null, got 0"):
        CleanArguments(num_proc=0)


def start_cleaning(path: Path, out: Path) -> tuple:
    """`sftlab data clean` with two workers in its own process, once both workers run: (process, worker PIDs)."""
    import subprocess
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "sftlab.cli", "data", "clean", str(path), "--output", str(out),
                             "--model", "sftlab:tiny-glm4", "--num_proc", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(psutil.Process(proc.pid).children()) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, "the pool never started"
        time.sleep(0.1)
    return proc, [c.pid for c in psutil.Process(proc.pid).children()]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_end_with_their_parent_however_it_ends(tiny_model_dir, tmp_path, sig):
    """The parent killed (SIGKILL too, which no handler sees) while its workers check rows: every worker ends with it,
    none holds a lock, and SIGTERM is one line saying nothing was written."""
    import time

    import psutil

    path = write_lines(tmp_path / "rows.jsonl", [json.dumps(r.row).encode() for r in generated_rows(200_000)])
    proc, workers = start_cleaning(path, tmp_path / "out")
    os.kill(proc.pid, sig)
    output, _ = proc.communicate(timeout=60)
    deadline = time.monotonic() + 10
    while any(psutil.pid_exists(w) and psutil.Process(w).status() != psutil.STATUS_ZOMBIE for w in workers):
        assert time.monotonic() < deadline, f"workers outlived their parent: {workers}"
        time.sleep(0.1)
    assert not (tmp_path / "out").exists()
    if sig == signal.SIGTERM:
        lines = [line for line in output.splitlines() if line.startswith("sftlab")]
        assert "Traceback" not in output and lines == ["sftlab data: interrupted (SIGTERM): nothing was written to "
                                                       f"{tmp_path / 'out'}; run the same command again"], output[-2000:]
