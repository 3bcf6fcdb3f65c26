"""Every exception type sftlab defines survives a pickle round trip: cleaning hands work between processes, and
an exception that cannot be unpickled there breaks the whole worker pool instead of rejecting one row."""

import importlib
import inspect
import pickle
import pkgutil

import sftlab
from sftlab.chat_format import MessageError, SampleTooLong, TemplateRefused
from sftlab.data.clean import Reject, Rejection
from sftlab.data.convert import FieldError, ToolCallError
from sftlab.data.preference import PairDefect
from sftlab.data.shards import DamagedShard
from sftlab.errors import Terminated, UserError
from sftlab.infer.engine import QueueFull
from sftlab.train.guards import Stopped

# each exception class with the arguments it is raised with; a new class fails the test below until it is here
EXAMPLES = {
    UserError: ("data.jsonl:3: something to fix",),
    MessageError: ("messages[1]: expected the assistant",),
    TemplateRefused: ("the chat template refuses this conversation: only single tool-calls",),
    SampleTooLong: (1500, 1024),
    FieldError: ("instruction", "expected a string, got int"),
    ToolCallError: ("conversations[1].value", "function_call is not valid JSON"),
    Reject: ("boilerplate", "a reply contains 'as an ai language model'"),
    QueueFull: ("9 requests are waiting or running (the cap is 8)",),
    Stopped: (15,),
    PairDefect: ("identical_sides", "chosen and rejected are the same reply"),
    Terminated: (),
    DamagedShard: ("shards/00000.arrow does not match the hash it was committed with",),
}


def sftlab_exception_classes() -> set[type]:
    found = set()
    for module in pkgutil.walk_packages(sftlab.__path__, "sftlab."):
        loaded = importlib.import_module(module.name)
        found |= {cls for _, cls in inspect.getmembers(loaded, inspect.isclass)
                  if issubclass(cls, BaseException) and cls.__module__.startswith("sftlab.")}
    return found


def test_every_exception_class_is_covered():
    assert sftlab_exception_classes() == set(EXAMPLES)


def test_every_exception_survives_a_pickle_round_trip():
    for cls, args in EXAMPLES.items():
        original = cls(*args)
        copy = pickle.loads(pickle.dumps(original))
        assert type(copy) is cls and str(copy) == str(original) and vars(copy) == vars(original), cls


def test_a_rejection_crosses_processes_as_plain_data():
    rejection = Rejection("empty_response", "an assistant message is empty")
    assert pickle.loads(pickle.dumps(rejection)) == rejection


def test_os_failures_are_one_line_naming_the_path_and_what_to_do(tmp_path, monkeypatch, capsys, tiny_model_dir):
    """A read-only output folder and an unwritable prepared-data cache: exit 1 and one line, no traceback."""
    import errno
    import json
    from pathlib import Path

    from sftlab import cli
    from sftlab.environment import cache_root

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"os {i}", "output": f"reply {i}"}) + "\n" for i in range(20)))
    train = ["train", "--config", "configs/demo.yaml", "--report_to", "none", "--data_files", str(data)]
    read_only = tmp_path / "mounted-ro" / "run"
    mkdir = Path.mkdir

    def refusing_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(read_only.parent)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refusing_mkdir)
    assert cli.main([*train, "--output_dir", str(read_only)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"sftlab train: error: the file system is read-only writing {read_only}: choose a writable folder (or fix "
        "its permissions) and run it again"]
    monkeypatch.undo()
    datasets = str(cache_root() / "datasets")

    def unwritable(self, *args, **kwargs):
        if str(self).startswith(datasets):
            raise PermissionError(errno.EACCES, "Permission denied", datasets)
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", unwritable)
    assert cli.main([*train, "--output_dir", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1:] == [f"sftlab train: error: permission denied writing {datasets}: choose a writable folder (or fix its "
                   "permissions) and run it again; the prepared-data cache is under SFTLAB_HOME, which can point "
                   "elsewhere"]
    assert Path.mkdir is unwritable  # the preparation's work folder is made with Path.mkdir
