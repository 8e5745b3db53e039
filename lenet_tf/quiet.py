"""Silencing the C++ start-up chatter of TensorFlow and LiteRT.

TensorFlow 2.21 prints INFO lines (oneDNN, CUDA probing) from C++ before its
logging is initialised, ignoring TF_CPP_MIN_LOG_LEVEL, and LiteRT announces
its XNNPACK delegate the same way. We honour that variable for them: at 1 or
above (the CLI's default is 2), file descriptor 2 points at /dev/null while
the noisy call runs. Python exceptions are unaffected; set
TF_CPP_MIN_LOG_LEVEL=0 to see everything.
"""

from __future__ import annotations

import contextlib
import os
import sys


@contextlib.contextmanager
def native_stderr_silenced():
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and probes its devices, where the chatter happens.

    Command-line entry points call this first; TF_CPP_MIN_LOG_LEVEL defaults
    to 2 (warnings and errors only) unless the user set it.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    with native_stderr_silenced():
        import tensorflow as tf

        tf.config.list_physical_devices()
