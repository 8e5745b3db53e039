"""The stop a signal asked for, kept where the program's safe points can see it.

The CLI turns SIGINT and SIGTERM into a KeyboardInterrupt raised wherever the
main thread is. Now and then that is inside Python code which TensorFlow's C++
called and whose error it clears (seen: a tf.function's `name` property, read
by TFE_Py_FastPathExecute while tf.data builds a map), and the interrupt
vanishes: the run would go on as if never asked to stop (a SLURM requeue
left one of a job's tune workers training trial after trial). So the signal
is also recorded here, and the loops raise the interrupt again at their safe
points: each training batch and epoch, each trial of a search.

The opposite case, code that must not be interrupted halfway (Optuna's
journal lock: an interrupt between the two steps of its release made it
fail on its own clean-up, a traceback), runs inside deferred(): a stop
signal that arrives meanwhile raises its interrupt when the block ends.
"""

import contextlib
from typing import Iterator

_signals: list[int] = []
_deferring = 0  # How many deferred() blocks the main thread is in.


def record(signal_number: int) -> None:
    """Called by the signal handler, before it raises the interrupt."""
    _signals.append(signal_number)


def forget() -> None:
    """Called once the stop has been reported (tests run main() many times in one process)."""
    _signals.clear()


def requested() -> bool:
    return bool(_signals)


def raise_if_requested() -> None:
    """At a safe point: the interrupt again, if a stop was asked for and its first one was lost."""
    if _signals:
        raise KeyboardInterrupt()


def deferring() -> bool:
    """Whether a stop signal must wait (asked by the signal handler)."""
    return _deferring > 0


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """A block that a stop signal does not interrupt: its interrupt is raised when the block ends."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring:
        raise_if_requested()
