"""Every exception type sftlab defines survives a pickle round trip: cleaning hands work between processes, and
an exception that cannot be unpickled there breaks the whole worker pool instead of rejecting one row."""

import importlib
import inspect
import pickle
import pkgutil

import sftlab
from sftlab.chat_format import MessageError, SampleTooLong
from sftlab.data.clean import Rejection, _Reject
from sftlab.data.convert import FieldError, ToolCallError
from sftlab.errors import UserError
from sftlab.infer.engine import QueueFull

# each exception class with the arguments it is raised with; a new class fails the test below until it is here
EXAMPLES = {
    UserError: ("data.jsonl:3: something to fix",),
    MessageError: ("messages[1]: expected the assistant",),
    SampleTooLong: (1500, 1024),
    FieldError: ("instruction", "expected a string, got int"),
    ToolCallError: ("conversations[1].value", "function_call is not valid JSON"),
    _Reject: ("boilerplate", "a reply contains 'as an ai language model'"),
    QueueFull: ("9 requests are waiting or running (the cap is 8)",),
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
