"""The stop a signal asked for, kept where the program's safe points can see it.

The CLI turns SIGINT and SIGTERM into a KeyboardInterrupt raised wherever the
main thread is. Now and then that is inside Python code which TensorFlow's C++
called and whose error it clears (seen: a tf.function's `name` property, read
by TFE_Py_FastPathExecute while tf.data builds a map), and the interrupt
vanishes: the run would go on as if never asked to stop (a SLURM requeue
left one of a job's tune workers training trial after trial). So the signal
is also recorded here, and the loops raise the interrupt again at their safe
points: each training batch and epoch, each trial of a search.
"""

_signals: list[int] = []


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
