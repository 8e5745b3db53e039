"""The stop a signal asked for, kept where the program's safe points can see it.

The CLI turns SIGINT and SIGTERM into a KeyboardInterrupt raised wherever the
main thread is. Now and then that is inside Python code which TensorFlow's C++
called and whose error it clears (seen: a tf.function's `name` property, read
by TFE_Py_FastPathExecute while tf.data builds a map), and the interrupt
vanishes: the run would go on as if never asked to stop (a SLURM requeue
left one of a job's tune workers training trial after trial). So the list
of signals the handler received is also this module's (watch()), and the
loops raise the interrupt again at their safe points: each training batch
and epoch, each trial of a search.

The opposite case, code that must not be interrupted halfway (Optuna's
journal lock: interrupted, its release fails on its own clean-up, a
traceback), runs inside deferred(): a stop signal that arrives meanwhile
raises its interrupt when the block ends.
"""

import contextlib
import threading
from typing import Iterator

_signals: list[int] = []  # The stop signals received: the list the CLI's handler appends to, while it is set.
_deferring = 0  # How many deferred() blocks the main thread is in.


def watch(received: list[int]) -> None:
    """From now on, `received` (the list of signals the CLI's handler appends to) says whether a stop was asked for."""
    global _signals
    _signals = received


def forget() -> None:
    """Once the handler is gone (tests run main() many times in one process)."""
    global _signals
    _signals = []


def raise_if_requested() -> None:
    """At a safe point: the interrupt again, if a stop was asked for and its first one was lost."""
    if _signals:
        raise KeyboardInterrupt()


def deferring() -> bool:
    """Whether a stop signal must wait for the end of a deferred() block (asked by the signal handler)."""
    return _deferring > 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block of the main thread that a stop signal does not interrupt: the
    interrupt of one that arrives meanwhile is raised when the block ends.
    (Signal handlers run in the main thread: elsewhere there is nothing to defer.)"""
    global _deferring
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals_before = len(_signals)
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and len(_signals) > signals_before:
        raise KeyboardInterrupt()
