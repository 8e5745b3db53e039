"""The one exception type for mistakes a user can make.

The CLI prints a UsageError as a single line and exits with code 2; anything
else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A problem with the user's input: a flag, a file, a path, a model."""

    exit_code = 2


class ParityError(RuntimeError):
    """An exported model disagrees with the Keras model beyond the stated bounds.

    Not the user's mistake, but reported the same way (one line), with exit
    code 1; no version is published.
    """

    exit_code = 1


class StoppedError(RuntimeError):
    """The run stopped for a reason outside the program (a full disk, a lost
    worker); running the same command again resumes it.

    Reported as one line, with exit code 1.
    """

    exit_code = 1

